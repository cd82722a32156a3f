"""A float64 NumPy transcription of SPEC section 1, written independently of gpuopt.

Nothing here imports gpuopt: each rule below is the SPEC table's formula written out plainly,
one parameter's state at a time, so that the library's traced definitions are checked against
a second, separate reading of the same table.

A *spec* names a rule the same way for both sides: ``(name, args, kwargs)`` for a rule, or
``("Optimiser", [spec, ...])`` for a chain. :func:`build_reference` turns it into one of the
classes below; the tests turn it into the gpuopt object with ``getattr(gpuopt, name)``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

EPS = 1e-8


class RefRule:
    """One rule; ``step(key, x, d)`` returns the new ``d`` for the parameter called ``key``.

    ``x`` and ``d`` are float64 arrays and are never modified. Each parameter has its own
    step count ``t`` (from 1) and its own state, created on first use.
    """

    slots: dict[str, Any] = {}  # name -> initial value (a number or an attribute name)

    def __init__(self) -> None:
        self.t: dict[Any, int] = {}
        self.state: dict[Any, dict[str, np.ndarray]] = {}

    def step(self, key: Any, x: np.ndarray, d: np.ndarray) -> np.ndarray:
        t = self.t.get(key, 0) + 1
        self.t[key] = t
        if key not in self.state:
            self.state[key] = {
                name: np.full(np.shape(x), float(getattr(self, v) if isinstance(v, str) else v))
                for name, v in self.slots.items()
            }
        return self.rule(t, x, np.asarray(d, dtype=np.float64), self.state[key])

    def rule(self, t: int, x: np.ndarray, d: np.ndarray, s: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError


class Descent(RefRule):
    def __init__(self, eta=0.1):
        super().__init__()
        self.eta = eta

    def rule(self, t, x, d, s):
        return self.eta * d


class Momentum(RefRule):
    slots = {"v": 0.0}

    def __init__(self, eta=0.01, rho=0.9):
        super().__init__()
        self.eta, self.rho = eta, rho

    def rule(self, t, x, d, s):
        s["v"] = self.rho * s["v"] - self.eta * d
        return -s["v"]


class Nesterov(RefRule):
    slots = {"v": 0.0}

    def __init__(self, eta=0.001, rho=0.9):
        super().__init__()
        self.eta, self.rho = eta, rho

    def rule(self, t, x, d, s):
        rho, eta, v = self.rho, self.eta, s["v"]
        dd = rho**2 * v - (1 + rho) * eta * d
        s["v"] = rho * v - eta * d
        return -dd


class RMSProp(RefRule):
    slots = {"acc": 0.0}

    def __init__(self, eta=0.001, rho=0.9, *, eps=EPS):
        super().__init__()
        self.eta, self.rho, self.eps = eta, rho, eps

    def rule(self, t, x, d, s):
        s["acc"] = self.rho * s["acc"] + (1 - self.rho) * d**2
        return d * self.eta / (np.sqrt(s["acc"]) + self.eps)


class _Moments(RefRule):
    """Shared constructor of the (eta, beta) rules; each writes its own formula."""

    slots = {"m": 0.0, "v": 0.0}

    def __init__(self, eta=0.001, beta=(0.9, 0.999), *, eps=EPS):
        super().__init__()
        self.eta, self.beta, self.eps = eta, tuple(beta), eps

    def moments(self, d, s):
        b1, b2 = self.beta
        s["m"] = b1 * s["m"] + (1 - b1) * d
        s["v"] = b2 * s["v"] + (1 - b2) * d**2
        return s["m"], s["v"]


class ADAM(_Moments):
    def rule(self, t, x, d, s):
        b1, b2 = self.beta
        m, v = self.moments(d, s)
        return m / (1 - b1**t) / (np.sqrt(v / (1 - b2**t)) + self.eps) * self.eta


class RADAM(_Moments):
    def rule(self, t, x, d, s):
        b1, b2 = self.beta
        m, v = self.moments(d, s)
        rinf = 2 / (1 - b2) - 1
        rho = rinf - 2 * t * b2**t / (1 - b2**t)
        if rho > 4:
            r = math.sqrt((rho - 4) * (rho - 2) * rinf / ((rinf - 4) * (rinf - 2) * rho))
            return m / (1 - b1**t) / (np.sqrt(v / (1 - b2**t)) + self.eps) * self.eta * r
        return m / (1 - b1**t) * self.eta


class AdaMax(_Moments):
    slots = {"m": 0.0, "u": 0.0}

    def rule(self, t, x, d, s):
        b1, b2 = self.beta
        s["m"] = b1 * s["m"] + (1 - b1) * d
        s["u"] = np.maximum(b2 * s["u"], np.abs(d))
        return (self.eta / (1 - b1**t)) * s["m"] / (s["u"] + self.eps)


class ADAGrad(RefRule):
    slots = {"acc": "eps"}

    def __init__(self, eta=0.1, *, eps=EPS):
        super().__init__()
        self.eta, self.eps = eta, eps

    def rule(self, t, x, d, s):
        s["acc"] = s["acc"] + d**2
        return d * self.eta / (np.sqrt(s["acc"]) + self.eps)


class ADADelta(RefRule):
    slots = {"acc": 0.0, "dacc": 0.0}

    def __init__(self, rho=0.9, *, eps=EPS):
        super().__init__()
        self.rho, self.eps = rho, eps

    def rule(self, t, x, d, s):
        rho, eps = self.rho, self.eps
        s["acc"] = rho * s["acc"] + (1 - rho) * d**2
        d = d * np.sqrt(s["dacc"] + eps) / np.sqrt(s["acc"] + eps)
        s["dacc"] = rho * s["dacc"] + (1 - rho) * d**2
        return d


class AMSGrad(_Moments):
    slots = {"m": "eps", "v": "eps", "vhat": "eps"}

    def rule(self, t, x, d, s):
        m, v = self.moments(d, s)
        s["vhat"] = np.maximum(s["vhat"], v)
        return self.eta * m / (np.sqrt(s["vhat"]) + self.eps)


class NADAM(_Moments):
    def rule(self, t, x, d, s):
        b1, b2 = self.beta
        m, v = self.moments(d, s)
        return (
            (b1 * m / (1 - b1 * b1**t) + (1 - b1) * d / (1 - b1**t))
            / (np.sqrt(v * b2 / (1 - b2**t)) + self.eps)
            * self.eta
        )


class WeightDecay(RefRule):
    def __init__(self, wd=0.0):
        super().__init__()
        self.wd = wd

    def rule(self, t, x, d, s):
        return d + self.wd * x


class ClipValue(RefRule):
    def __init__(self, thresh):
        super().__init__()
        self.thresh = thresh

    def rule(self, t, x, d, s):
        return np.clip(d, -self.thresh, self.thresh)


class ClipNorm(RefRule):
    def __init__(self, thresh):
        super().__init__()
        self.thresh = thresh

    def rule(self, t, x, d, s):
        largest = float(np.max(np.abs(d))) if d.size else 0.0
        # scaled by the largest element, so that the float64 reference never overflows either
        n = largest * math.sqrt(float(np.sum((d / largest) ** 2))) if largest and math.isfinite(largest) \
            else largest
        return d * self.thresh / n if n > self.thresh else d


class InvDecay(RefRule):
    slots = {"n": 1.0}

    def __init__(self, gamma=0.001):
        super().__init__()
        self.gamma = gamma

    def rule(self, t, x, d, s):
        d = d / (1 + self.gamma * s["n"])
        s["n"] = s["n"] + 1
        return d


class ExpDecay(RefRule):
    """``eta`` decays when a step count first reaches a multiple of ``decay_step``: with
    several parameters that is once per step, not once per parameter."""

    def __init__(self, eta=0.001, decay=0.1, decay_step=1000, clip=1e-4):
        super().__init__()
        self.eta, self.decay, self.decay_step, self.clip = eta, decay, decay_step, clip
        self.decayed: set[int] = set()

    def rule(self, t, x, d, s):
        if t % self.decay_step == 0 and t not in self.decayed:
            self.decayed.add(t)
            self.eta = max(self.eta * self.decay, self.clip)
        return self.eta * d


class Optimiser(RefRule):
    def __init__(self, *rules: RefRule):
        super().__init__()
        self.rules = list(rules)

    def step(self, key, x, d):
        for r in self.rules:
            d = r.step(key, x, d)
        return d


class ADAMW(Optimiser):
    """Exactly ``Optimiser(ADAM(eta, beta), WeightDecay(decay))``."""

    def __init__(self, eta=0.001, beta=(0.9, 0.999), decay=0.0, *, eps=EPS):
        super().__init__(ADAM(eta, beta, eps=eps), WeightDecay(decay))

    eta = property(lambda self: self.rules[0].eta, lambda self, v: setattr(self.rules[0], "eta", v))
    beta = property(lambda self: self.rules[0].beta, lambda self, v: setattr(self.rules[0], "beta", v))
    decay = property(lambda self: self.rules[1].wd, lambda self, v: setattr(self.rules[1], "wd", v))


REFERENCES = {
    cls.__name__: cls
    for cls in (
        Descent, Momentum, Nesterov, RMSProp, ADAM, RADAM, AdaMax, ADAGrad, ADADelta, AMSGrad,
        NADAM, ADAMW, WeightDecay, ClipValue, ClipNorm, InvDecay, ExpDecay,
    )
}


def build_reference(spec: tuple) -> RefRule:
    """The reference rule for ``spec`` (see the module docstring)."""
    if spec[0] == "Optimiser":
        return Optimiser(*(build_reference(s) for s in spec[1]))
    name, args, kwargs = spec
    return REFERENCES[name](*args, **kwargs)


def spec_id(spec: tuple) -> str:
    if spec[0] == "Optimiser":
        return "Optimiser(" + ",".join(spec_id(s) for s in spec[1]) + ")"
    name, args, kwargs = spec
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"{name}({','.join(parts)})".replace(" ", "")


def R(name: str, *args: Any, **kwargs: Any) -> tuple:
    return (name, args, kwargs)


def chain(*specs: tuple) -> tuple:
    return ("Optimiser", list(specs))


#: Every rule with its defaults, every rule with non-default hyperparameters, and chains.
CASES: list[tuple] = [
    # defaults (ClipValue and ClipNorm have no default threshold)
    R("Descent"), R("Momentum"), R("Nesterov"), R("RMSProp"), R("ADAM"), R("RADAM"),
    R("AdaMax"), R("ADAGrad"), R("ADADelta"), R("AMSGrad"), R("NADAM"), R("ADAMW"),
    R("WeightDecay"), R("InvDecay"), R("ExpDecay"),
    # non-default hyperparameters, positional as in the seed's examples, and eps=
    R("Descent", 0.3),
    R("Momentum", 0.01, 0.99),
    R("Nesterov", 0.003, 0.95),
    R("RMSProp", 0.002, 0.95, eps=1e-6),
    R("ADAM", 0.001, (0.9, 0.8)),
    R("ADAM", 0.01, (0.5, 0.9), eps=1e-3),
    R("RADAM", 0.001, (0.9, 0.8)),  # rinf = 9: rectified from step 3 on
    R("RADAM", 0.01, (0.8, 0.9)),  # rinf = 19: rectified from step 5 on
    R("AdaMax", 0.001, (0.9, 0.995)),
    R("AdaMax", 0.02, (0.7, 0.9), eps=1e-4),
    R("ADAGrad", 0.001),
    R("ADAGrad", 0.5, eps=1e-4),
    R("ADADelta", 0.89),
    R("ADADelta", 0.5, eps=1e-4),
    R("AMSGrad", 0.001, (0.89, 0.995)),
    R("AMSGrad", 0.01, (0.5, 0.7), eps=1e-5),
    R("NADAM", 0.002, (0.89, 0.995)),
    R("NADAM", 0.01, (0.5, 0.7), eps=1e-5),
    R("ADAMW", 0.001, (0.89, 0.995), 0.1),
    R("WeightDecay", 0.1),
    R("ClipValue", 0.5),
    R("ClipNorm", 2.0),  # a 10-element N(0,1) gradient has norm about 3: some steps clip
    R("InvDecay", 0.1),
    R("ExpDecay", 0.5, 0.5, 4, 0.1),  # decays at 4, 8, 12 and reaches the clip at 12
    # chains
    chain(R("ClipValue", 1), R("WeightDecay", 1e-4), R("ADAM")),
    chain(R("ClipNorm", 1.0), R("ADAM")),
    chain(R("InvDecay"), R("ADAM", 0.001)),
    chain(R("ExpDecay", 0.01, 0.5, 3, 1e-4), R("Descent")),
    chain(R("WeightDecay", 0.01), R("Momentum")),
    R("ADAMW", 0.01, (0.9, 0.99), 0.1),
    chain(R("ADAM", 0.01), R("ClipNorm", 0.01), R("WeightDecay", 0.01)),  # clips some steps
    chain(R("ClipValue", 0.8), R("ClipNorm", 1.5), R("RMSProp", 0.01), R("InvDecay", 0.05)),
    chain(chain(R("WeightDecay", 0.05), R("AMSGrad", 0.01)), R("ExpDecay", 1.0, 0.7, 5, 0.2)),
]
