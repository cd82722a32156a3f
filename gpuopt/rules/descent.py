"""Gradient descent and its momentum variants."""

from __future__ import annotations

from ..rule import Hyper, Rule, non_negative, unit_interval


class Descent(Rule):
    """Classic gradient descent with learning rate ``eta``: ``x -= eta * d``."""

    eta = Hyper(0.1, non_negative)

    def step(self, d, x, s, h):
        return h.eta * d


class Momentum(Rule):
    """Gradient descent with learning rate ``eta`` and momentum ``rho``.

    ``v = rho*v - eta*d; d = -v``. Same values as ``torch.optim.SGD(lr=eta, momentum=rho)``.
    """

    eta = Hyper(0.01, non_negative)
    rho = Hyper(0.9, unit_interval)
    state = {"v": 0.0}

    def step(self, d, x, s, h):
        s.v = h.rho * s.v - h.eta * d
        return -s.v


class Nesterov(Rule):
    """Gradient descent with learning rate ``eta`` and Nesterov momentum ``rho``.

    Same values as ``torch.optim.SGD(lr=eta, momentum=rho, nesterov=True)``.
    """

    eta = Hyper(0.001, non_negative)
    rho = Hyper(0.9, unit_interval)
    state = {"v": 0.0}

    def step(self, d, x, s, h):
        dd = h.rho * h.rho * s.v - (1 + h.rho) * h.eta * d
        s.v = h.rho * s.v - h.eta * d
        return -dd
