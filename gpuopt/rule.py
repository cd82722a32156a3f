"""The rule definition: hyperparameters, per-element state, host scalars and the step.

A rule is written once, in this form (Flux.Optimise's "Optimiser Interface" example)::

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
host scalars (every numeric hyperparameter plus what :meth:`Rule.extra_scalars` returns for the step
count). Read hyperparameters through ``h``, never ``self``, so their values stay kernel
arguments and changing them never recompiles anything.
"""

from __future__ import annotations

import copy
import difflib
import functools
import inspect
import math
import numbers
import threading
import weakref
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from .expr import Expr

_REQUIRED = object()


class _CopyOfParameter:
    def __repr__(self) -> str:
        return "COPY_OF_PARAMETER"


#: a state slot's initial value meaning: the parameter itself, in compute precision
COPY_OF_PARAMETER = _CopyOfParameter()


# -- hyperparameter checks: each raises ValueError with what was expected ----------------


#: the largest integer a hyperparameter may hold: checkpoints store integers as int64
INT_LIMIT = 2**63 - 1


def _show(value: Any) -> str:
    """``repr(value)``, shortened when it is long (a 400-digit integer)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:16]}...{text[-4:]} ({len(text)} characters)"


def _number(name: str, value: Any) -> float:
    value = plain_number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a finite real number, got {_show(value)}")
    if isinstance(value, int) and abs(value) > INT_LIMIT:
        raise ValueError(f"{name} must be at most {INT_LIMIT} as an integer (to be used and saved), "
                         f"got {_show(value)}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {_show(value)}")
    return value


def non_negative(name: str, value: Any) -> None:
    if _number(name, value) < 0:
        raise ValueError(f"{name} must be >= 0, got {_show(value)}")


def positive(name: str, value: Any) -> None:
    if _number(name, value) <= 0:
        raise ValueError(f"{name} must be > 0, got {_show(value)}")


def unit_interval(name: str, value: Any) -> None:
    if not 0 <= _number(name, value) < 1:
        raise ValueError(f"{name} must lie in [0, 1), got {_show(value)}")


def beta_pair(name: str, value: Any) -> None:
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"{name} must be a pair (beta1, beta2), got {_show(value)}")
    for i, b in enumerate(value):
        unit_interval(f"{name}[{i}]", b)


def positive_integer(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= INT_LIMIT:
        raise ValueError(f"{name} must be an integer in [1, {INT_LIMIT}], got {_show(value)}")


def plain_number(value: Any) -> Any:
    """A real number of any type (a NumPy scalar, a Fraction) as a Python int or float;
    tuples and lists element-wise; anything else unchanged. bool stays bool (checks refuse it)."""
    if isinstance(value, bool) or isinstance(value, np.bool_):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        try:
            return float(value)
        except OverflowError:
            return value  # (an enormous Fraction): the check reports it
    if isinstance(value, (tuple, list)):
        return tuple(plain_number(v) for v in value)
    return value


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

    # No __get__: reads find the value in the instance's __dict__ at C speed (a data
    # descriptor without __get__ is passed over on reading), and the class gets the descriptor.

    def __set__(self, obj: Any, value: Any) -> None:
        value = plain_number(value)
        if self.check is not None:
            self.check(self.name, value)
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
        # A private count again: setting one array's count never moves the arrays it shared
        # with; and every prepared update is stale (its arrays shared one count).
        global state_edits
        self.count = StepCount(value)
        state_edits += 1


#: how many times a step count was set from outside (prepared updates made before are stale)
state_edits = 0


def _memory_of(key: object) -> tuple[object, tuple] | None:
    """(owner, layout) of an array's memory (see :mod:`gpuopt.memory`), or None."""
    from .dispatch import resolve
    from .memory import layout, memory_owner

    try:
        array = resolve(key, "parameter").array
        return memory_owner(key, array), layout(array)
    except Exception:  # not an array (or not one we can place): found by identity only
        return None


class _Changes(threading.local):
    """Per thread: while a call runs (see gpuopt.guard), every entry a state map adds or
    replaces, with what it held before, so that a call that raises can undo them."""

    def __init__(self) -> None:
        self.log: list[tuple[dict, object, object]] | None = None


changes = _Changes()
_MISSING = object()


def _journal(table: dict, key: object) -> None:
    log = changes.log
    if log is not None:
        log.append((table, key, table.get(key, _MISSING)))


def undo(log: list[tuple[dict, object, object]]) -> None:
    """Put the state maps back as they were before the changes in ``log``."""
    for table, key, old in reversed(log):
        if old is _MISSING:
            table.pop(key, None)
        else:
            table[key] = old


class IdentityWeakMap:
    """Per-parameter state, found by the array object's identity or by its memory.

    Arrays cannot be keys of a WeakKeyDictionary (their == is element-wise), so entries are
    keyed by id() and removed by a weakref callback when the array is collected. Each value is
    also filed under its memory (owner, layout): a new object laid out over the same memory
    (``x[...]``, torch's ``p.data``) finds the same state while the owner lives, rather than
    silently starting afresh. The value goes when the owner and every object bound to it have.
    """

    def __init__(self) -> None:
        self._items: dict[int, tuple[weakref.ref, Any]] = {}
        self._memory: dict[tuple, tuple[weakref.ref, Any]] = {}

    def get(self, key: object) -> Any:
        item = self._items.get(id(key))
        if item is not None and item[0]() is key:
            return item[1]
        if not self._memory:
            return None
        memory = _memory_of(key)
        if memory is None:
            return None
        owner, place = memory
        found = self._memory.get((id(owner), place))
        if found is None or found[0]() is not owner:
            return None
        self._bind(key, found[1])  # remembered, so the next lookup of this object is quick
        return found[1]

    def _bind(self, key: object, value: Any) -> None:
        ident = id(key)
        items = self._items

        def forget(_ref: weakref.ref, ident: int = ident) -> None:
            if items.get(ident, (None,))[0] is _ref:
                del items[ident]

        _journal(items, ident)
        items[ident] = (weakref.ref(key, forget), value)

    def __setitem__(self, key: object, value: Any) -> None:
        self._bind(key, value)
        memory = _memory_of(key)
        if memory is None:
            return
        owner, place = memory
        where = (id(owner), place)
        table = self._memory

        def forget(_ref: weakref.ref, where: tuple = where) -> None:
            if table.get(where, (None,))[0] is _ref:
                del table[where]

        _journal(table, where)
        try:
            table[where] = (weakref.ref(owner, forget), value)
        except TypeError:  # an owner that cannot be referenced weakly: found by identity only
            table.pop(where, None)

    def __len__(self) -> int:
        """How many distinct states are held."""
        # (copied first: a weakref callback may remove an entry at any allocation)
        values = {id(v) for _, v in list(self._items.values())}
        values.update(id(v) for _, v in list(self._memory.values()))
        return len(values)

    def clear(self) -> None:
        for table in (self._items, self._memory):
            for key in list(table):
                _journal(table, key)
            table.clear()

    def __deepcopy__(self, memo: dict) -> IdentityWeakMap:
        # Keys are not copied (unless the same deepcopy copied them): the copy keeps its own
        # weak entries for the same arrays, with callbacks into its own tables.
        new = IdentityWeakMap()
        memo[id(self)] = new
        for ref, value in list(self._items.values()):
            key = ref()
            if key is not None:
                new[memo.get(id(key), key)] = copy.deepcopy(value, memo)
        for where, (ref, value) in list(self._memory.items()):
            owner = ref()
            if owner is not None and id(owner) not in memo and where not in new._memory:
                def forget(_ref: weakref.ref, where: tuple = where, table: dict = new._memory) -> None:
                    if table.get(where, (None,))[0] is _ref:
                        del table[where]
                new._memory[where] = (weakref.ref(owner, forget), copy.deepcopy(value, memo))
        return new

    def __reduce__(self) -> Any:
        if len(self):
            raise TypeError(
                "an optimiser holding per-parameter state cannot be pickled (the state is keyed by "
                "live arrays); save it with gpuopt.save_state, or pickle it before its first update "
                "or after opt.reset()"
            )
        return (IdentityWeakMap, ())


class Rule:
    """Base of every optimiser rule; see the module docstring for the form of a rule."""

    #: per-element state slots and their initial values (a number, a hyperparameter name, or
    #: COPY_OF_PARAMETER)
    state: ClassVar[dict[str, Any]] = {}
    #: a state slot holding a master copy of the parameter (MixedPrecision): the rules after
    #: this one see it as ``x``, the chain's step is subtracted from it, and the stored
    #: parameter is written as its rounding
    master_slot: ClassVar[str | None] = None
    #: attributes a schedule changes besides hyperparameters, with initial values (checkpoints
    #: keep them)
    schedule_state: ClassVar[dict[str, Any]] = {}
    _hypers: ClassVar[tuple[Hyper, ...]] = ()
    _signature: ClassVar[inspect.Signature] = inspect.Signature()

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
        cls._signature = inspect.Signature(params)
        if "__init__" not in vars(cls):  # a chain defines its own
            cls.__signature__ = cls._signature  # type: ignore[attr-defined]
        else:
            cls.__init__ = _constructing(vars(cls)["__init__"])  # type: ignore[method-assign]

    def __init__(self, *args: Any, **kwargs: Any):
        with _building(self):
            self._init(args, kwargs)

    def _init(self, args: tuple, kwargs: dict) -> None:
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{type(self).__name__}(): {exc}") from None
        bound.apply_defaults()
        for name, value in bound.arguments.items():
            setattr(self, name, value)
        for key, initial in self.schedule_state.items():
            setattr(self, key, initial)
        self._state = IdentityWeakMap()
        self.state_version = 0  # bumped whenever state changes outside a prepared update

    # -- what a rule may override ---------------------------------------------------------

    def extra_scalars(self, t: int) -> dict[str, float]:
        """Scalars for step ``t`` (counting from 1) besides the numeric hyperparameters, computed on
        the host in float64 (ADAM's bias corrections)."""
        return {}

    def schedule(self, t: int) -> None:
        """Run once before each step ``t``, on the host: a schedule changes attributes here
        (ExpDecay decays ``eta``)."""

    def step(self, d: Expr, x: Expr, s: Any, h: Any) -> Expr | float:
        """The element-wise step: return the new ``d``; assign state slots on ``s``."""
        raise NotImplementedError(f"{type(self).__name__} does not define step()")

    # -- used by the planner and executors ------------------------------------------------

    def hyperparameters(self) -> dict[str, Any]:
        return {h.name: getattr(self, h.name) for h in self._hypers}

    def scalars(self, t: int) -> dict[str, float]:
        """Every host scalar for step ``t``: numeric hyperparameters, then :meth:`extra_scalars`."""
        values = {
            name: float(v)
            for name, v in self.hyperparameters().items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        values.update(self.extra_scalars(t))
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
        """Forget all per-parameter state (waiting for an update in another thread to finish)."""
        with holding(self, refuse_repeats=False):
            for leaf in self.leaves():
                leaf._state.clear()
                leaf.state_version += 1

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"

    # -- attributes, copies -------------------------------------------------------------

    def __setattr__(self, name: str, value: Any) -> None:
        # A misspelt or foreign hyperparameter name (opt.lr = ...) would otherwise be a new
        # attribute that nothing reads: refuse it once the rule is built.
        if (name.startswith("_") or name in self.__dict__ or hasattr(type(self), name)
                or self.__dict__.get("_building")):
            object.__setattr__(self, name, value)
            return
        raise AttributeError(_unknown_attribute(self, name))

    def __getstate__(self) -> dict:
        # Locks and prepared device tables belong to this object; a copy makes its own.
        state = dict(self.__dict__)
        state.pop("_update_lock", None)
        state.pop("_lock_plan", None)
        state.pop("_prepared", None)
        state.pop("_building", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


#: other libraries' names for gpuopt's hyperparameters, for the hint in an AttributeError
_FOREIGN_NAMES = {
    "lr": ("eta",), "learning_rate": ("eta",), "betas": ("beta",), "momentum": ("rho",),
    "alpha": ("rho",), "weight_decay": ("wd", "decay"), "max_norm": ("thresh",),
    "clip_value": ("thresh",), "epsilon": ("eps",),
}


def _unknown_attribute(rule: Rule, name: str) -> str:
    known = list(rule.hyperparameters())
    hint = [k for k in _FOREIGN_NAMES.get(name, ()) if k in known] or difflib.get_close_matches(name, known, n=1)
    suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
    listed = ", ".join(known) if known else "none"
    return (f"{type(rule).__name__} has no attribute {name!r}{suggestion} "
            f"(its hyperparameters: {listed})")


class _building:
    """Marks a rule as under construction, when it may set attributes of its own."""

    def __init__(self, rule: Rule):
        self.d = rule.__dict__

    def __enter__(self) -> None:
        self.d["_building"] = self.d.get("_building", 0) + 1

    def __exit__(self, *exc: object) -> None:
        self.d["_building"] -= 1
        if not self.d["_building"]:
            del self.d["_building"]


def _constructing(init: Callable) -> Callable:
    @functools.wraps(init)
    def wrapped(self: Rule, *args: Any, **kwargs: Any) -> None:
        with _building(self):
            init(self, *args, **kwargs)

    return wrapped


# -- one update at a time per rule ---------------------------------------------------------

_LOCK_CREATION = threading.Lock()


def _lock_of(rule: Rule) -> threading.Lock:
    lock = rule.__dict__.get("_update_lock")
    if lock is None:
        with _LOCK_CREATION:
            lock = rule.__dict__.setdefault("_update_lock", threading.Lock())
    return lock


class holding:
    """Holds the locks of ``opt`` and of every rule it runs, for one update or apply.

    Rules shared between optimisers (a chain and its slice) are locked too, always in the
    same order (by id), so two threads never wait on each other's locks in a cycle. Also
    refuses a chain that runs one rule object twice (see Optimiser).
    """

    __slots__ = ("locks", "rules", "leaves")

    def __init__(self, opt: Rule, refuse_repeats: bool = True):
        leaves = opt.leaves()
        cached = opt.__dict__.get("_lock_plan")  # (leaves, locks): chains change rarely
        if cached is None or cached[0] != leaves:
            by_id = {id(leaf): leaf for leaf in leaves}
            if len(by_id) != len(leaves) and refuse_repeats:
                raise ValueError(repeated_rule_message(leaves))
            by_id[id(opt)] = opt
            locks = [_lock_of(by_id[k]) for k in sorted(by_id)]
            cached = (leaves, locks)
            if len(by_id) == len(leaves) + (opt not in leaves):  # (the leaves, not opt: no cycle)
                opt.__dict__["_lock_plan"] = cached
        self.locks = cached[1]
        self.leaves = leaves
        self.rules = leaves if opt in leaves else (opt, *leaves)  # what a call may change

    def __enter__(self) -> None:
        for lock in self.locks:
            lock.acquire()

    def __exit__(self, *exc: object) -> None:
        for lock in reversed(self.locks):
            lock.release()


def repeated_rule_message(leaves: tuple[Rule, ...]) -> str:
    seen: set[int] = set()
    twice = next(leaf for leaf in leaves if id(leaf) in seen or seen.add(id(leaf)))
    return (f"this chain runs the same {type(twice).__name__} object twice; its state would advance "
            f"twice per step: use two separate rules, e.g. {type(twice).__name__}(...) twice")
