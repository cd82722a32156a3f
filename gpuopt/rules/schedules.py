"""Learning-rate schedules that compose with any rule."""

from __future__ import annotations

import sys

from ..rule import Hyper, Rule, non_negative, positive_integer


class InvDecay(Rule):
    """Inverse time decay: at step ``n`` the update is divided by ``1 + gamma * n``."""

    gamma = Hyper(0.001, non_negative)

    def extra_scalars(self, t):
        return {"denominator": 1.0 + self.gamma * t}

    def step(self, d, x, s, h):
        return d / h.denominator


class ExpDecay(Rule):
    """Multiply the update by ``eta``, which decays by ``decay`` every ``decay_step`` steps
    down to a minimum of ``clip``. The decayed value is visible as the ``eta`` attribute.

    With several parameters it decays once per step count, not once per parameter. A decay
    above 1 grows ``eta`` up to the largest finite float, where it stays.
    """

    eta = Hyper(0.001, non_negative)
    decay = Hyper(0.1, non_negative)
    decay_step = Hyper(1000, positive_integer)
    clip = Hyper(1e-4, non_negative)
    schedule_state = {"decayed_at": 0}  # the last step count at which eta decayed

    def schedule(self, t):
        if t % self.decay_step == 0 and t > self.decayed_at:
            self.eta = min(max(self.eta * self.decay, self.clip), sys.float_info.max)
            self.decayed_at = t

    def step(self, d, x, s, h):
        return h.eta * d
