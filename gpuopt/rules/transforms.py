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


#: powers of two that scale ``d`` so that its sum of squares fits float32 and float64
DOWN32, DOWN64 = 2.0**-90, 2.0**-600


class ClipNorm(Rule):
    """Scale the update down to L2 norm ``thresh`` when its norm (over this array) exceeds it.

    The norm is per array, as in Flux. It needs a reduction over the array before the
    element-wise pass; the reduction recomputes the rules before it instead of storing them.
    The norm never overflows: besides the plain sum of squares, the same pass sums the squares
    of ``d`` scaled down by powers of two, used when the plain sum overflows the compute type
    (in float32 ``DOWN32`` always suffices, in float64 ``DOWN64`` does).
    """

    thresh = Hyper(check=positive)

    def step(self, d, x, s, h):
        plain = sqrt(total(d * d))

        def factor(norm, down):
            # norm * down > thresh * down, and thresh / (norm * down) * down: no overflow
            return where(norm > h.thresh * down, h.thresh / norm * down, 1.0)

        scaled32, scaled64 = d * DOWN32, d * DOWN64
        norm32, norm64 = sqrt(total(scaled32 * scaled32)), sqrt(total(scaled64 * scaled64))
        # thresh * DOWN64 rounds to 0 in float32 (and never in float64): it picks the scaling
        overflowed = where(h.thresh * DOWN64 > 0, factor(norm64, DOWN64), factor(norm32, DOWN32))
        return d * where(plain - plain < 1, factor(plain, 1.0), overflowed)  # (inf - inf is NaN)
