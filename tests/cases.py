"""The one catalogue of test cases, and the helpers that build a case on both sides.

A *spec* names a rule the same way for gpuopt and for the oracle: ``(name, args, kwargs)``
for a rule (a built-in's name, or a user-defined rule of :data:`USER_RULES`), or
``("Optimiser", [spec, ...])`` for a chain. :func:`build_gpuopt` turns it into the gpuopt object;
:class:`Oracle` runs it as the plain formulas of :mod:`gpuopt.plain` on NumPy in float64.

:data:`CASES` is every case, by id: every built-in rule with its defaults (derived from the
registry, ``gpuopt.rules.BUILT_IN``), then the rows of :data:`_TABLE`. The reference tests run
every case the oracle can run; the kernel, GPU and benchmark tests run the rows marked for the
kernels (:data:`ALL`, with :data:`RULES` and :data:`CHAINS` its single rules and chains) plus
the default case of every built-in rule that no such row runs alone.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np

import gpuopt
from gpuopt import Hyper, Rule, non_negative, unit_interval, where
from gpuopt.plain import FORMULAS, Plain, bind
from gpuopt.rules import BUILT_IN, WRAPPERS
from gpuopt.rules import OPTIMISERS as _OPTIMISER_CLASSES


class SignMomentum(Rule):
    """A user-defined rule in the documented form (a Lion-like sign update): it uses state,
    comparisons and where(), and is fused like a built-in with no CUDA written for it."""

    eta = Hyper(0.01, non_negative)
    beta = Hyper(0.9, unit_interval)
    state = {"m": 0.0}

    def step(self, d, x, s, h):
        s.m = h.beta * s.m + (1 - h.beta) * d
        return h.eta * where(s.m > 0, 1.0, where(s.m < 0, -1.0, 0.0))


#: rules the tests define themselves, by name
USER_RULES: dict[str, type[Rule]] = {"SignMomentum": SignMomentum}


def R(name: str, *args: Any, **kwargs: Any) -> tuple:
    return (name, args, kwargs)


def chain(*specs: tuple) -> tuple:
    return ("Optimiser", list(specs))


def spec_id(spec: tuple) -> str:
    if spec[0] == "Optimiser":
        return "Optimiser(" + ",".join(spec_id(s) for s in spec[1]) + ")"
    name, args, kwargs = spec
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"{name}({','.join(parts)})".replace(" ", "")


def names_in(spec: tuple) -> list[str]:
    return [n for s in spec[1] for n in names_in(s)] if spec[0] == "Optimiser" else [spec[0]]


def build_gpuopt(spec: tuple) -> gpuopt.Rule:
    """The gpuopt object for ``spec``."""
    if spec[0] == "Optimiser":
        return gpuopt.Optimiser(*(build_gpuopt(s) for s in spec[1]))
    name, args, kwargs = spec
    return USER_RULES.get(name, BUILT_IN.get(name))(*args, **kwargs)


class Oracle:
    """``spec`` as the plain formulas on NumPy float64: ``step(key, x, d)`` returns the new
    ``d`` for the parameter called ``key`` (its own state and step count), changing nothing
    it is given. A rule's hyperparameters are its attributes (set them mid-run as on gpuopt);
    a chain's members are ``rules``."""

    def __init__(self, spec: tuple):
        if spec[0] == "Optimiser":
            self.__dict__["rules"] = [Oracle(s) for s in spec[1]]
        else:
            name, args, kwargs = spec
            hypers = bind(name, *args, **kwargs)
            self.__dict__.update(hypers=hypers, plain=Plain([(name, hypers)]))

    def step(self, key: Any, x: np.ndarray, d: np.ndarray) -> np.ndarray:
        d = np.asarray(d, dtype=np.float64)
        if "rules" in self.__dict__:
            for rule in self.rules:
                d = rule.step(key, x, d)
            return d
        return self.plain.direction(key, x, d)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["hypers"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.hypers, name, value)


def _defaults_case(cls: type[Rule]) -> tuple | None:
    """``R(name)`` for a rule whose hyperparameters all have defaults, else None."""
    required = [p for p in inspect.signature(cls).parameters.values() if p.default is inspect.Parameter.empty]
    return None if required else R(cls.__name__)


# Each row: (id, spec, whether the kernel, GPU and benchmark tests run it). The ids of kernel
# rows are short names the tests look up (ALL["ClipNorm+ADAM"]); other rows go by spec_id.
_TABLE: list[tuple[str | None, tuple, bool]] = [
    # every rule alone with non-default hyperparameters where the defaults would hide terms;
    # positional as in Flux's examples, and eps=
    ("Descent", R("Descent", 0.05), True),
    (None, R("Descent", 0.3), False),
    ("Momentum", R("Momentum", 0.02, 0.8), True),
    (None, R("Momentum", 0.01, 0.99), False),
    ("Nesterov", R("Nesterov", 0.01, 0.85), True),
    (None, R("Nesterov", 0.003, 0.95), False),
    ("RMSProp", R("RMSProp", 0.002, 0.95), True),
    (None, R("RMSProp", 0.002, 0.95, eps=1e-6), False),
    ("ADAM", R("ADAM", 0.003, (0.8, 0.99)), True),
    (None, R("ADAM", 0.001, (0.9, 0.8)), False),
    (None, R("ADAM", 0.01, (0.5, 0.9), eps=1e-3), False),
    ("RADAM", R("RADAM", 0.003, (0.9, 0.9)), True),  # b2 = 0.9: rectified from step 6
    (None, R("RADAM", 0.001, (0.9, 0.8)), False),  # rinf = 9: rectified from step 3 on
    (None, R("RADAM", 0.01, (0.8, 0.9)), False),  # rinf = 19: rectified from step 5 on
    ("AdaMax", R("AdaMax", 0.002, (0.85, 0.99)), True),
    (None, R("AdaMax", 0.001, (0.9, 0.995)), False),
    (None, R("AdaMax", 0.02, (0.7, 0.9), eps=1e-4), False),
    ("ADAGrad", R("ADAGrad", 0.05), True),
    (None, R("ADAGrad", 0.001), False),
    (None, R("ADAGrad", 0.5, eps=1e-4), False),
    ("ADADelta", R("ADADelta", 0.85), True),
    (None, R("ADADelta", 0.89), False),
    (None, R("ADADelta", 0.5, eps=1e-4), False),
    ("AMSGrad", R("AMSGrad", 0.003, (0.85, 0.99)), True),
    (None, R("AMSGrad", 0.001, (0.89, 0.995)), False),
    (None, R("AMSGrad", 0.01, (0.5, 0.7), eps=1e-5), False),
    ("NADAM", R("NADAM", 0.002, (0.85, 0.99)), True),
    (None, R("NADAM", 0.002, (0.89, 0.995)), False),
    (None, R("NADAM", 0.01, (0.5, 0.7), eps=1e-5), False),
    ("ADAMW", R("ADAMW", 0.003, (0.9, 0.99), 0.01), True),
    (None, R("ADAMW", 0.001, (0.89, 0.995), 0.1), False),
    (None, R("ADAMW", 0.01, (0.9, 0.99), 0.1), False),
    ("WeightDecay", R("WeightDecay", 0.05), True),
    (None, R("WeightDecay", 0.1), False),
    ("ClipValue", R("ClipValue", 0.5), True),
    ("ClipNorm", R("ClipNorm", 3.0), True),
    (None, R("ClipNorm", 2.0), False),  # a 10-element N(0,1) gradient has norm about 3: some steps clip
    ("InvDecay", R("InvDecay", 0.1), True),
    ("ExpDecay", R("ExpDecay", 0.1, 0.5, 4, 1e-3), True),
    (None, R("ExpDecay", 0.5, 0.5, 4, 0.1), False),  # decays at 4, 8, 12 and reaches the clip at 12
    ("SignMomentum", R("SignMomentum", 0.01, 0.8), True),
    # chains: fused, with reductions, nested, and Flux's own combinations
    ("ClipValue+WeightDecay+ADAM", chain(R("ClipValue", 1.0), R("WeightDecay", 1e-2), R("ADAM")), True),
    (None, chain(R("ClipValue", 1), R("WeightDecay", 1e-4), R("ADAM")), False),
    ("ClipNorm+ADAM", chain(R("ClipNorm", 2.0), R("ADAM", 0.01)), True),
    (None, chain(R("ClipNorm", 1.0), R("ADAM")), False),
    ("ADAM+ClipNorm", chain(R("ADAM", 0.5), R("ClipNorm", 0.3)), True),
    ("ClipNorm+ClipNorm+Descent",
     chain(R("ClipNorm", 5.0), R("Momentum"), R("ClipNorm", 0.01), R("Descent", 0.5)), True),
    ("InvDecay+ADAM", chain(R("InvDecay", 0.1), R("ADAM", 0.001)), True),
    (None, chain(R("InvDecay"), R("ADAM", 0.001)), False),
    ("WeightDecay+ADAM", chain(R("WeightDecay", 0.01), R("ADAM", 0.001)), True),
    ("ExpDecay+ADAM", chain(R("ExpDecay", 0.5, 0.5, 3, 1e-2), R("ADAM", 0.001)), True),
    ("ExpDecay+Descent", chain(R("ExpDecay", 0.01, 0.5, 3, 1e-4), R("Descent")), True),
    ("WeightDecay+Momentum", chain(R("WeightDecay", 0.01), R("Momentum")), True),
    ("ClipValue+SignMomentum", chain(R("ClipValue", 0.1), R("SignMomentum")), True),
    ("nested", chain(chain(R("ClipValue", 2.0), R("InvDecay")), chain(R("RMSProp"), R("WeightDecay", 1e-3))), True),
    ("AMSGrad+ClipValue", chain(R("AMSGrad", 0.01), R("ClipValue", 1e-3)), True),
    (None, chain(R("ADAM", 0.01), R("ClipNorm", 0.01), R("WeightDecay", 0.01)), False),  # clips some steps
    (None, chain(R("ClipValue", 0.8), R("ClipNorm", 1.5), R("RMSProp", 0.01), R("InvDecay", 0.05)), False),
    (None, chain(chain(R("WeightDecay", 0.05), R("AMSGrad", 0.01)), R("ExpDecay", 1.0, 0.7, 5, 0.2)), False),
]

_DEFAULTS = [spec for cls in BUILT_IN.values() if cls not in WRAPPERS and (spec := _defaults_case(cls))]

#: every case, by id
CASES: dict[str, tuple] = {spec_id(spec): spec for spec in _DEFAULTS}
CASES.update({name or spec_id(spec): spec for name, spec, _ in _TABLE})

#: the cases the oracle runs (every name in them has a plain formula)
ORACLE_CASES: dict[str, tuple] = {k: s for k, s in CASES.items() if all(n in FORMULAS for n in names_in(s))}

_alone = {spec[0] for name, spec, kernels in _TABLE if kernels and spec[0] != "Optimiser"}
_KERNEL_SPECS = {name: spec for name, spec, kernels in _TABLE if kernels}
_KERNEL_SPECS.update({spec[0]: spec for spec in _DEFAULTS if spec[0] not in _alone})


def _factory(spec: tuple) -> Callable[[], Rule]:
    return lambda: build_gpuopt(spec)


#: the kernel, GPU and benchmark tests' cases, as factories of fresh gpuopt objects
ALL: dict[str, Callable[[], Rule]] = {name: _factory(spec) for name, spec in _KERNEL_SPECS.items()}
RULES = {name: f for name, f in ALL.items() if _KERNEL_SPECS[name][0] != "Optimiser"}
CHAINS = {name: f for name, f in ALL.items() if _KERNEL_SPECS[name][0] == "Optimiser"}

#: the optimisers (rules that produce a step on their own), from the registry
OPTIMISERS = [cls.__name__ for cls in _OPTIMISER_CLASSES]
