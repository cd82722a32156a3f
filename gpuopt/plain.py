"""Every built-in rule's formula written once more as plain array code, on any array module.

This is deliberately a second, separate reading of Flux.Optimise's formulas, written without
the rule definitions (nothing here imports :mod:`gpuopt.rules`): the tests run it on NumPy in
float64 as their oracle for the traced rules, and the benchmark runs it on NumPy or CuPy as the
unfused baseline, one whole-array operation at a time with fresh temporaries, which is what the
same formula costs without fusion.

Each formula is registered under its rule's name with the rule's default hyperparameters (in
positional order; ``eps`` is keyword-only) and its per-element state. A formula is
``(xp, h, s, x, d, t) -> new d``: ``xp`` the array module, ``h`` this rule's hyperparameters
(attributes; a schedule may change them), ``s`` a dict of this parameter's state arrays, ``x``
the parameter (never changed), ``d`` the incoming update, ``t`` the parameter's step (from 1).
Host scalars are Python floats, computed in float64 as a user writing these by hand would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from .backends.numpy_backend import compute_dtype

EPS = 1e-8
BETA = (0.9, 0.999)


@dataclass(frozen=True)
class Formula:
    """One rule's plain formula: ``step``, its hyperparameters' defaults and its state."""

    step: Callable[..., Any]
    defaults: dict[str, Any]  # positional order; a missing default is REQUIRED
    state: dict[str, Any] = field(default_factory=dict)  # slot -> initial value or hyperparameter name
    keyword_only: tuple[str, ...] = ()


#: a hyperparameter without a default (ClipValue's and ClipNorm's threshold)
REQUIRED = object()
#: every formula, by the rule's name
FORMULAS: dict[str, Formula] = {}


def _formula(name: str, state: dict[str, Any] | None = None, eps: bool = False, **defaults: Any) -> Callable:
    def register(step: Callable) -> Callable:
        FORMULAS[name] = Formula(step, {**defaults, **({"eps": EPS} if eps else {})}, state or {},
                                 ("eps",) if eps else ())
        return step

    return register


@_formula("Descent", eta=0.1)
def descent(xp, h, s, x, d, t):
    return h.eta * d


@_formula("Momentum", {"v": 0.0}, eta=0.01, rho=0.9)
def momentum(xp, h, s, x, d, t):
    s["v"] = h.rho * s["v"] - h.eta * d
    return -s["v"]


@_formula("Nesterov", {"v": 0.0}, eta=0.001, rho=0.9)
def nesterov(xp, h, s, x, d, t):
    dd = h.rho**2 * s["v"] - (1 + h.rho) * h.eta * d
    s["v"] = h.rho * s["v"] - h.eta * d
    return -dd


@_formula("RMSProp", {"acc": 0.0}, eps=True, eta=0.001, rho=0.9)
def rmsprop(xp, h, s, x, d, t):
    s["acc"] = h.rho * s["acc"] + (1 - h.rho) * d**2
    return d * h.eta / (xp.sqrt(s["acc"]) + h.eps)


def _moments(h, s, d):
    b1, b2 = h.beta
    s["m"] = b1 * s["m"] + (1 - b1) * d
    s["v"] = b2 * s["v"] + (1 - b2) * d**2
    return b1, b2


@_formula("ADAM", {"m": 0.0, "v": 0.0}, eps=True, eta=0.001, beta=BETA)
def adam(xp, h, s, x, d, t):
    b1, b2 = _moments(h, s, d)
    return s["m"] / (1 - b1**t) / (xp.sqrt(s["v"] / (1 - b2**t)) + h.eps) * h.eta


@_formula("RADAM", {"m": 0.0, "v": 0.0}, eps=True, eta=0.001, beta=BETA)
def radam(xp, h, s, x, d, t):
    b1, b2 = _moments(h, s, d)
    rinf = 2 / (1 - b2) - 1
    rho = rinf - 2 * t * b2**t / (1 - b2**t)
    if rho > 4:
        rect = math.sqrt((rho - 4) * (rho - 2) * rinf / ((rinf - 4) * (rinf - 2) * rho))
        return s["m"] / (1 - b1**t) / (xp.sqrt(s["v"] / (1 - b2**t)) + h.eps) * h.eta * rect
    return s["m"] / (1 - b1**t) * h.eta


@_formula("AdaMax", {"m": 0.0, "u": 0.0}, eps=True, eta=0.001, beta=BETA)
def adamax(xp, h, s, x, d, t):
    b1, b2 = h.beta
    s["m"] = b1 * s["m"] + (1 - b1) * d
    s["u"] = xp.maximum(b2 * s["u"], xp.abs(d))
    return (h.eta / (1 - b1**t)) * s["m"] / (s["u"] + h.eps)


@_formula("ADAGrad", {"acc": "eps"}, eps=True, eta=0.1)
def adagrad(xp, h, s, x, d, t):
    s["acc"] = s["acc"] + d**2
    return d * h.eta / (xp.sqrt(s["acc"]) + h.eps)


@_formula("ADADelta", {"acc": 0.0, "dacc": 0.0}, eps=True, rho=0.9)
def adadelta(xp, h, s, x, d, t):
    s["acc"] = h.rho * s["acc"] + (1 - h.rho) * d**2
    d = d * xp.sqrt(s["dacc"] + h.eps) / xp.sqrt(s["acc"] + h.eps)
    s["dacc"] = h.rho * s["dacc"] + (1 - h.rho) * d**2
    return d


@_formula("AMSGrad", {"m": "eps", "v": "eps", "vhat": "eps"}, eps=True, eta=0.001, beta=BETA)
def amsgrad(xp, h, s, x, d, t):
    _moments(h, s, d)
    s["vhat"] = xp.maximum(s["vhat"], s["v"])
    return h.eta * s["m"] / (xp.sqrt(s["vhat"]) + h.eps)


@_formula("NADAM", {"m": 0.0, "v": 0.0}, eps=True, eta=0.001, beta=BETA)
def nadam(xp, h, s, x, d, t):
    b1, b2 = _moments(h, s, d)
    return (b1 * s["m"] / (1 - b1 * b1**t) + (1 - b1) * d / (1 - b1**t)) / (
        xp.sqrt(s["v"] * b2 / (1 - b2**t)) + h.eps) * h.eta


@_formula("WeightDecay", wd=0.0)
def weight_decay(xp, h, s, x, d, t):
    return d + h.wd * x.astype(d.dtype, copy=False)


@_formula("ADAMW", {"m": 0.0, "v": 0.0}, eps=True, eta=0.001, beta=BETA, decay=0.0)
def adamw(xp, h, s, x, d, t):
    """Exactly ADAM followed by WeightDecay(decay)."""
    return weight_decay(xp, SimpleNamespace(wd=h.decay), s, x, adam(xp, h, s, x, d, t), t)


@_formula("ClipValue", thresh=REQUIRED)
def clip_value(xp, h, s, x, d, t):
    return xp.clip(d, -h.thresh, h.thresh)


@_formula("ClipNorm", thresh=REQUIRED)
def clip_norm(xp, h, s, x, d, t):
    norm = float(xp.linalg.norm(d))  # the usual hand-written form (a host sync on a GPU)
    if math.isinf(norm):  # the sum of squares overflowed: measure d scaled by its largest element
        largest = float(xp.max(xp.abs(d)))
        norm = largest * float(xp.linalg.norm(d / largest)) if math.isfinite(largest) else largest
    return d * (h.thresh / norm) if norm > h.thresh else d


@_formula("InvDecay", gamma=0.001)
def inv_decay(xp, h, s, x, d, t):
    return d / (1 + h.gamma * t)


@_formula("ExpDecay", eta=0.001, decay=0.1, decay_step=1000, clip=1e-4)
def exp_decay(xp, h, s, x, d, t):
    # eta decays when a step count first reaches a multiple of decay_step: with several
    # parameters that is once per step of the collection, not once per parameter
    decayed = h.__dict__.setdefault("decayed_at", set())
    if t % h.decay_step == 0 and t not in decayed:
        decayed.add(t)
        h.eta = max(h.eta * h.decay, h.clip)
    return h.eta * d


def bind(name: str, *args: Any, **kwargs: Any) -> SimpleNamespace:
    """Hyperparameters of rule ``name`` called with ``args`` and ``kwargs``, over its defaults."""
    formula = FORMULAS[name]
    positional = [k for k in formula.defaults if k not in formula.keyword_only]
    values = dict(formula.defaults, **dict(zip(positional, args)), **kwargs)
    missing = [k for k, v in values.items() if v is REQUIRED]
    if missing or len(args) > len(positional) or not set(kwargs) <= set(values):
        raise TypeError(f"{name}: bad arguments {args!r} {kwargs!r} (missing: {missing})")
    return SimpleNamespace(**values)


class Plain:
    """A chain of plain formulas run on ``xp``: ``members`` is a list of (rule name,
    hyperparameters). State (per parameter key, created on first use) and step counts are the
    runner's own, so it can run beside gpuopt."""

    def __init__(self, members: Sequence[tuple[str, Any]], xp: Any = np):
        missing = sorted({name for name, _ in members if name not in FORMULAS})
        if missing:
            raise NotImplementedError(f"no plain formula for {', '.join(missing)}")
        self.members = [(FORMULAS[name], hypers) for name, hypers in members]
        self.xp = xp
        self._params: dict[Any, tuple[list[int], list[dict[str, Any]]]] = {}

    def direction(self, key: Any, x: Any, d: Any) -> Any:
        """The chain's step for parameter ``key`` (next step count): ``x`` and ``d`` unchanged."""
        entry = self._params.get(key)
        if entry is None:
            states = [{slot: self.xp.full(x.shape, float(getattr(h, v) if isinstance(v, str) else v), dtype=d.dtype)
                       for slot, v in f.state.items()} for f, h in self.members]
            entry = self._params[key] = ([0], states)
        count, states = entry
        count[0] += 1
        for (f, h), s in zip(self.members, states):
            d = f.step(self.xp, h, s, x, d, count[0])
        return d


class Unfused:
    """``rule`` (a gpuopt rule or chain) as plain formulas on ``xp`` (NumPy or CuPy): the
    benchmark's baseline. The rule supplies its hyperparameters, copied at construction.
    Raises NotImplementedError for a rule without a plain formula (a user-defined rule)."""

    def __init__(self, rule: Any, xp: Any):
        self.plain = Plain([(type(leaf).__name__, SimpleNamespace(**leaf.hyperparameters()))
                            for leaf in rule.leaves()], xp)
        self._held: dict[int, Any] = {}  # id -> the array, so an id is never reused while held

    @classmethod
    def by_name(cls, name: str, xp: Any = np, *args: Any, **kwargs: Any) -> Unfused:
        """Rule ``name``'s plain formula alone, with hyperparameters as its constructor takes
        them (``Unfused.by_name("ADAM", np, 1e-3)``), without building the gpuopt rule."""
        unfused = cls.__new__(cls)
        unfused.plain, unfused._held = Plain([(name, bind(name, *args, **kwargs))], xp), {}
        return unfused

    def step(self, x: Any, g: Any) -> None:
        """``x -= d`` for one step of the rule: ``x`` in place, ``g`` untouched."""
        if self._held.get(id(x)) is not x:
            self.plain._params.pop(id(x), None)
            self._held[id(x)] = x
        ct = compute_dtype(x.dtype)
        d = g if g.dtype == ct else g.astype(ct)
        x -= self.plain.direction(id(x), x, d)

    def step_many(self, params: Sequence[Any], grads: Sequence[Any]) -> None:
        for x, g in zip(params, grads):
            self.step(x, g)
