"""The rule definition: hyperparameters, per-element state, host scalars and the step.

A rule is written once, in this form (the seed's "Optimiser Interface" example)::

    class Momentum(Rule):
        \"\"\"Gradient descent with momentum.\"\"\"
        eta = Hyper(0.01, check=non_negative)
        rho = Hyper(0.9, check=unit_interval)
        state = {"v": 0.0}

        def step(self, d, x, s, h):
            s.v = h.rho * s.v - h.eta * d
            return -s.v

``step`` is traced once per chain structure (see :mod:`gpuopt.expr`): ``d`` is the incoming
update, ``x`` the parameter, ``s`` the rule's state slots (read and assign them), ``h`` its
host scalars (every numeric hyperparameter plus what :meth:`Rule.host` returns for the step
count). Read hyperparameters through ``h``, never ``self``, so their values stay kernel
arguments and changing them never recompiles anything.
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Callable
from typing import Any, ClassVar

from .expr import Expr

_REQUIRED = object()


class _CopyOfParameter:
    def __repr__(self) -> str:
        return "COPY_OF_PARAMETER"


#: a state slot's initial value meaning: the parameter itself, in compute precision
COPY_OF_PARAMETER = _CopyOfParameter()


# -- hyperparameter checks: each raises ValueError with what was expected ----------------


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return value


def non_negative(name: str, value: Any) -> None:
    if _number(name, value) < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def positive(name: str, value: Any) -> None:
    if _number(name, value) <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def unit_interval(name: str, value: Any) -> None:
    if not 0 <= _number(name, value) < 1:
        raise ValueError(f"{name} must lie in [0, 1), got {value!r}")


def beta_pair(name: str, value: Any) -> None:
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"{name} must be a pair (beta1, beta2), got {value!r}")
    for i, b in enumerate(value):
        unit_interval(f"{name}[{i}]", b)


def positive_integer(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


class Hyper:
    """A hyperparameter: a constructor argument and a plain, mutable, validated attribute."""

    def __init__(
        self,
        default: Any = _REQUIRED,
        check: Callable[[str, Any], None] | None = None,
        keyword_only: bool = False,
    ):
        self.default = default
        self.check = check
        self.keyword_only = keyword_only
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return obj.__dict__[self.name]

    def __set__(self, obj: Any, value: Any) -> None:
        if self.check is not None:
            self.check(self.name, value)
        if isinstance(value, list):
            value = tuple(value)
        obj.__dict__[self.name] = value


class StepCount:
    """A step count, shared by the states of a prepared update whose arrays step together
    (one increment per rule per step instead of one per array)."""

    __slots__ = ("value",)

    def __init__(self, value: int):
        self.value = value


class ParamState:
    """One rule's state for one parameter: its step count and its per-element slots."""

    __slots__ = ("count", "slots")

    def __init__(self, t: int, slots: Any):
        self.count = StepCount(t)
        self.slots = slots  # array of shape (number of slots, parameter size), or None

    @property
    def t(self) -> int:
        """Steps taken so far."""
        return self.count.value

    @t.setter
    def t(self, value: int) -> None:
        # A private count again: setting one array's count never moves the arrays it shared with.
        self.count = StepCount(value)


class IdentityWeakMap:
    """A mapping keyed by object identity whose entries vanish with their key.

    Arrays cannot be keys of a WeakKeyDictionary (their == is element-wise), so entries are
    keyed by id() and removed by a weakref callback when the array is collected.
    """

    def __init__(self) -> None:
        self._items: dict[int, tuple[weakref.ref, Any]] = {}

    def get(self, key: object) -> Any:
        item = self._items.get(id(key))
        if item is None or item[0]() is not key:
            return None
        return item[1]

    def __setitem__(self, key: object, value: Any) -> None:
        ident = id(key)
        items = self._items

        def forget(_ref: weakref.ref, ident: int = ident) -> None:
            if items.get(ident, (None,))[0] is _ref:
                del items[ident]

        items[ident] = (weakref.ref(key, forget), value)

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()


class Rule:
    """Base of every optimiser rule; see the module docstring for the form of a rule."""

    #: per-element state slots and their initial values (a number, a hyperparameter name, or
    #: COPY_OF_PARAMETER)
    state: ClassVar[dict[str, Any]] = {}
    #: a state slot holding a master copy of the parameter (MixedPrecision): the rules after
    #: this one see it as ``x``, the chain's step is subtracted from it, and the stored
    #: parameter is written as its rounding
    master_slot: ClassVar[str | None] = None
    #: host-side attributes besides hyperparameters, with initial values (checkpoints keep them)
    host_state: ClassVar[dict[str, Any]] = {}
    _hypers: ClassVar[tuple[Hyper, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        hypers: dict[str, Hyper] = {}
        for klass in reversed(cls.__mro__):
            for name, value in vars(klass).items():
                if isinstance(value, Hyper):
                    hypers.pop(name, None)
                    hypers[name] = value
        # Positional order is declaration order; keyword-only ones (eps) come last.
        ordered = [h for h in hypers.values() if not h.keyword_only]
        ordered += [h for h in hypers.values() if h.keyword_only]
        cls._hypers = tuple(ordered)
        params = []  # the class's signature, as inspect.signature(cls) shows it: no self
        for h in cls._hypers:
            kind = (
                inspect.Parameter.KEYWORD_ONLY
                if h.keyword_only
                else inspect.Parameter.POSITIONAL_OR_KEYWORD
            )
            default = inspect.Parameter.empty if h.default is _REQUIRED else h.default
            params.append(inspect.Parameter(h.name, kind, default=default))
        if "__init__" not in vars(cls):  # a chain defines its own
            cls.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]

    def __init__(self, *args: Any, **kwargs: Any):
        positional = [h for h in self._hypers if not h.keyword_only]
        name = type(self).__name__
        if len(args) > len(positional):
            raise TypeError(f"{name}() takes at most {len(positional)} positional arguments")
        known = {h.name for h in self._hypers}
        for key in kwargs:
            if key not in known:
                raise TypeError(f"{name}() got an unexpected keyword argument {key!r}")
        for i, h in enumerate(self._hypers):
            if i < len(args) and not h.keyword_only:
                if h.name in kwargs:
                    raise TypeError(f"{name}() got multiple values for argument {h.name!r}")
                value = args[i]
            elif h.name in kwargs:
                value = kwargs[h.name]
            elif h.default is _REQUIRED:
                raise TypeError(f"{name}() missing required argument {h.name!r}")
            else:
                value = h.default
            setattr(self, h.name, value)
        for key, initial in self.host_state.items():
            setattr(self, key, initial)
        self._state = IdentityWeakMap()
        self.state_version = 0  # bumped whenever state changes outside a prepared update

    # -- what a rule may override ---------------------------------------------------------

    def host(self, t: int) -> dict[str, float]:
        """Extra host scalars for step ``t`` (counting from 1), computed in float64."""
        return {}

    def advance(self, t: int) -> None:
        """Host-side schedule run once before each step ``t`` (ExpDecay decays here)."""

    def step(self, d: Expr, x: Expr, s: Any, h: Any) -> Expr | float:
        """The element-wise step: return the new ``d``; assign state slots on ``s``."""
        raise NotImplementedError(f"{type(self).__name__} does not define step()")

    def structure(self) -> tuple:
        """Whatever besides the class changes the traced step (kernels are cached on it)."""
        return ()

    # -- used by the planner and executors ------------------------------------------------

    def hyperparameters(self) -> dict[str, Any]:
        return {h.name: getattr(self, h.name) for h in self._hypers}

    def scalars(self, t: int) -> dict[str, float]:
        """Every host scalar for step ``t``: numeric hyperparameters, then :meth:`host`."""
        values = {
            name: float(v)
            for name, v in self.hyperparameters().items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        values.update(self.host(t))
        return values

    def initial_state(self) -> list[float]:
        """The slots' initial values (0 for a copy of the parameter: see parameter_slots)."""
        return [
            0.0 if v is COPY_OF_PARAMETER else float(getattr(self, v)) if isinstance(v, str) else float(v)
            for v in self.state.values()
        ]

    def parameter_slots(self) -> list[int]:
        """Rows of the state that start as a copy of the parameter."""
        return [i for i, v in enumerate(self.state.values()) if v is COPY_OF_PARAMETER]

    def leaves(self) -> tuple[Rule, ...]:
        """The plain rules this rule runs, in order (a chain flattens its members)."""
        return (self,)

    def state_for(self, param: object) -> ParamState | None:
        return self._state.get(param)

    def set_state_for(self, param: object, state: ParamState) -> None:
        self._state[param] = state
        self.state_version += 1

    def reset(self) -> None:
        """Forget all per-parameter state."""
        for leaf in self.leaves():
            leaf._state.clear()
            leaf.state_version += 1

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"
