"""MixedPrecision: a float32 master copy of low-precision parameters, kept as a state slot."""

from __future__ import annotations

from ..rule import COPY_OF_PARAMETER, Rule


class MixedPrecision(Rule):
    """Keep a master copy of each parameter in its compute precision (float32 for float16 and
    bfloat16 parameters) and update that instead, as Optimisers.jl's ``MixedPrecision``.

    The wrapped rule (any rule or chain) sees the master copy as the parameter; the step is
    subtracted from the master copy and the parameter is written as its rounding, all in the
    same fused kernel (one more state slot, still one pass over memory). Small steps that the
    parameter's own precision would round away accumulate in the master copy. The master copy
    is state, so checkpoints keep it; it starts as the parameter's value at the first step, so
    after changing a parameter by other means call ``opt.reset()``. For float32 or float64
    parameters the master copy only repeats the parameter (same results, more memory).

    >>> opt = MixedPrecision(Optimiser(ClipNorm(1), ADAM()))
    """

    state = {"master": COPY_OF_PARAMETER}
    master_slot = "master"

    def __init__(self, rule: Rule):
        from ..chain import _check_rule

        super().__init__()
        self.rule = _check_rule(rule, "MixedPrecision's rule")

    def step(self, d, x, s, h):
        return d  # the planner hands the master copy to the rules after this one as their x

    def leaves(self) -> tuple[Rule, ...]:
        return (self, *self.rule.leaves())

    def __repr__(self) -> str:
        return f"MixedPrecision({self.rule!r})"
