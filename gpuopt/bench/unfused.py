"""The unfused baseline: each rule as ordinary NumPy/CuPy array expressions (:class:`Unfused`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from ..backends.numpy_backend import compute_dtype
from ..rule import Rule
from ..rules import (
    ADAM,
    NADAM,
    RADAM,
    ADADelta,
    ADAGrad,
    AdaMax,
    AMSGrad,
    ClipNorm,
    ClipValue,
    Descent,
    ExpDecay,
    InvDecay,
    Momentum,
    Nesterov,
    RMSProp,
    WeightDecay,
)

_FORMULAS: dict[type, tuple[dict[str, Any], Callable[..., Any]]] = {}


def _formula(cls: type, **initial: Any) -> Callable:
    """Register the plain-expression step of ``cls``; ``initial`` gives each state array's
    starting value (a number, or a function of the rule such as ``lambda r: r.eps``)."""

    def register(fn: Callable) -> Callable:
        _FORMULAS[cls] = (initial, fn)
        return fn

    return register


# Each formula is (xp, r, s, x, d, t) -> new d: xp the array module, r the rule (read its
# hyperparameters), s a dict of this parameter's state arrays, x the parameter, d the incoming
# update, t the step (from 1). Host scalars are Python floats, computed in float64 as a user
# writing these by hand would; every array operation is one whole-array pass, with temporaries.


@_formula(Descent)
def _descent(xp, r, s, x, d, t):
    return r.eta * d


@_formula(Momentum, v=0.0)
def _momentum(xp, r, s, x, d, t):
    s["v"] = r.rho * s["v"] - r.eta * d
    return -s["v"]


@_formula(Nesterov, v=0.0)
def _nesterov(xp, r, s, x, d, t):
    dd = r.rho**2 * s["v"] - (1 + r.rho) * r.eta * d
    s["v"] = r.rho * s["v"] - r.eta * d
    return -dd


@_formula(RMSProp, acc=0.0)
def _rmsprop(xp, r, s, x, d, t):
    s["acc"] = r.rho * s["acc"] + (1 - r.rho) * d**2
    return d * r.eta / (xp.sqrt(s["acc"]) + r.eps)


@_formula(ADAM, m=0.0, v=0.0)
def _adam(xp, r, s, x, d, t):
    b1, b2 = r.beta
    s["m"] = b1 * s["m"] + (1 - b1) * d
    s["v"] = b2 * s["v"] + (1 - b2) * d**2
    return s["m"] / (1 - b1**t) / (xp.sqrt(s["v"] / (1 - b2**t)) + r.eps) * r.eta


@_formula(RADAM, m=0.0, v=0.0)
def _radam(xp, r, s, x, d, t):
    b1, b2 = r.beta
    s["m"] = b1 * s["m"] + (1 - b1) * d
    s["v"] = b2 * s["v"] + (1 - b2) * d**2
    rinf = 2 / (1 - b2) - 1
    rho = rinf - 2 * t * b2**t / (1 - b2**t)
    if rho > 4:
        rect = math.sqrt((rho - 4) * (rho - 2) * rinf / ((rinf - 4) * (rinf - 2) * rho))
        return s["m"] / (1 - b1**t) / (xp.sqrt(s["v"] / (1 - b2**t)) + r.eps) * r.eta * rect
    return s["m"] / (1 - b1**t) * r.eta


@_formula(AdaMax, m=0.0, u=0.0)
def _adamax(xp, r, s, x, d, t):
    b1, b2 = r.beta
    s["m"] = b1 * s["m"] + (1 - b1) * d
    s["u"] = xp.maximum(b2 * s["u"], xp.abs(d))
    return (r.eta / (1 - b1**t)) * s["m"] / (s["u"] + r.eps)


@_formula(ADAGrad, acc=lambda r: r.eps)
def _adagrad(xp, r, s, x, d, t):
    s["acc"] = s["acc"] + d**2
    return d * r.eta / (xp.sqrt(s["acc"]) + r.eps)


@_formula(ADADelta, acc=0.0, dacc=0.0)
def _adadelta(xp, r, s, x, d, t):
    s["acc"] = r.rho * s["acc"] + (1 - r.rho) * d**2
    d = d * xp.sqrt(s["dacc"] + r.eps) / xp.sqrt(s["acc"] + r.eps)
    s["dacc"] = r.rho * s["dacc"] + (1 - r.rho) * d**2
    return d


@_formula(AMSGrad, m=lambda r: r.eps, v=lambda r: r.eps, vhat=lambda r: r.eps)
def _amsgrad(xp, r, s, x, d, t):
    b1, b2 = r.beta
    s["m"] = b1 * s["m"] + (1 - b1) * d
    s["v"] = b2 * s["v"] + (1 - b2) * d**2
    s["vhat"] = xp.maximum(s["vhat"], s["v"])
    return r.eta * s["m"] / (xp.sqrt(s["vhat"]) + r.eps)


@_formula(NADAM, m=0.0, v=0.0)
def _nadam(xp, r, s, x, d, t):
    b1, b2 = r.beta
    s["m"] = b1 * s["m"] + (1 - b1) * d
    s["v"] = b2 * s["v"] + (1 - b2) * d**2
    return (b1 * s["m"] / (1 - b1 * b1**t) + (1 - b1) * d / (1 - b1**t)) / (
        xp.sqrt(s["v"] * b2 / (1 - b2**t)) + r.eps) * r.eta


@_formula(WeightDecay)
def _weight_decay(xp, r, s, x, d, t):
    return d + r.wd * x.astype(d.dtype, copy=False)


@_formula(ClipValue)
def _clip_value(xp, r, s, x, d, t):
    return xp.clip(d, -r.thresh, r.thresh)


@_formula(ClipNorm)
def _clip_norm(xp, r, s, x, d, t):
    norm = float(xp.linalg.norm(d))  # the usual hand-written form (a host sync on a GPU)
    return d * (r.thresh / norm) if norm > r.thresh else d


@_formula(InvDecay)
def _inv_decay(xp, r, s, x, d, t):
    return d / (1 + r.gamma * t)


@_formula(ExpDecay)
def _exp_decay(xp, r, s, x, d, t):
    eta = s.get("eta", r.eta)  # the baseline keeps its own decayed eta
    if t % r.decay_step == 0:
        eta = max(eta * r.decay, r.clip)
    s["eta"] = eta
    return eta * d


class Unfused:
    """``rule`` written as ordinary array expressions on ``xp`` (NumPy or CuPy): the baseline.

    Every operation is a separate pass over whole arrays with fresh temporaries, which is what
    the same formula costs without fusion. The rule object supplies hyperparameters only; the
    baseline keeps its own state (per parameter, created on first use) and step counts, so it
    can run beside gpuopt on a separate copy of the rule. A chain runs its members' formulas in
    order. Raises NotImplementedError for a rule without a formula here (a user-defined rule).
    """

    def __init__(self, rule: Rule, xp: Any):
        self.leaves = rule.leaves()
        missing = sorted({type(leaf).__name__ for leaf in self.leaves if type(leaf) not in _FORMULAS})
        if missing:
            raise NotImplementedError(f"no unfused baseline formula for {', '.join(missing)}")
        self.xp = xp
        self._params: dict[int, tuple[Any, list[int], list[dict[str, Any]]]] = {}

    def _state(self, x: Any) -> tuple[list[int], list[dict[str, Any]]]:
        entry = self._params.get(id(x))
        if entry is None or entry[0] is not x:
            ct = compute_dtype(x.dtype)
            states = []
            for leaf in self.leaves:
                initial = _FORMULAS[type(leaf)][0]
                states.append({
                    name: self.xp.full(x.shape, value(leaf) if callable(value) else value, dtype=ct)
                    for name, value in initial.items()
                })
            entry = self._params[id(x)] = (x, [0], states)
        return entry[1], entry[2]

    def step(self, x: Any, g: Any) -> None:
        """``x -= d`` for one step of the rule: ``x`` in place, ``g`` untouched."""
        count, states = self._state(x)
        count[0] += 1
        t = count[0]
        ct = compute_dtype(x.dtype)
        d = g if g.dtype == ct else g.astype(ct)  # float16: computed in float32, as gpuopt does
        for leaf, s in zip(self.leaves, states):
            d = _FORMULAS[type(leaf)][1](self.xp, leaf, s, x, d, t)
        x -= d

    def step_many(self, params: Sequence[Any], grads: Sequence[Any]) -> None:
        for x, g in zip(params, grads):
            self.step(x, g)
