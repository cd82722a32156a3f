"""Rules that reshape the update before an optimiser sees it: decay and clipping."""

from __future__ import annotations

from ..expr import clamp, sqrt, total, where
from ..rule import Hyper, Rule, non_negative, positive


class WeightDecay(Rule):
    """Decay weights by ``wd``: ``d = d + wd * x`` (L2 regularisation added to the gradient)."""

    wd = Hyper(0.0, non_negative)

    def step(self, d, x, s, h):
        return d + h.wd * x


class ClipValue(Rule):
    """Clip the update element-wise to ``[-thresh, thresh]``. A NaN stays NaN (as Julia's
    and PyTorch's clamp), so non-finite gradients still propagate."""

    thresh = Hyper(check=positive)

    def step(self, d, x, s, h):
        return clamp(d, -h.thresh, h.thresh)


class ClipNorm(Rule):
    """Scale the update down to L2 norm ``thresh`` when its norm (over this array) exceeds it.

    The norm is per array, as in Flux. It needs a reduction over the array before the
    element-wise pass; the reduction recomputes the rules before it instead of storing them.
    """

    thresh = Hyper(check=positive)

    def step(self, d, x, s, h):
        norm = sqrt(total(d * d))
        return where(norm > h.thresh, d * h.thresh / norm, d)
