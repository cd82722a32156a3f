"""Rule and chain tables shared by the kernel, GPU and benchmark tests (gpuopt objects)."""

from __future__ import annotations

from collections.abc import Callable

import gpuopt
from gpuopt import Hyper, Rule, non_negative, unit_interval, where


class SignMomentum(Rule):
    """A user-defined rule in the documented form (a Lion-like sign update): it uses state,
    comparisons and where(), and is fused like a built-in with no CUDA written for it."""

    eta = Hyper(0.01, non_negative)
    beta = Hyper(0.9, unit_interval)
    state = {"m": 0.0}

    def step(self, d, x, s, h):
        s.m = h.beta * s.m + (1 - h.beta) * d
        return h.eta * where(s.m > 0, 1.0, where(s.m < 0, -1.0, 0.0))


#: every rule alone, with non-default hyperparameters where the defaults would hide terms
RULES: dict[str, Callable[[], Rule]] = {
    "Descent": lambda: gpuopt.Descent(0.05),
    "Momentum": lambda: gpuopt.Momentum(0.02, 0.8),
    "Nesterov": lambda: gpuopt.Nesterov(0.01, 0.85),
    "RMSProp": lambda: gpuopt.RMSProp(0.002, 0.95),
    "ADAM": lambda: gpuopt.ADAM(0.003, (0.8, 0.99)),
    "RADAM": lambda: gpuopt.RADAM(0.003, (0.9, 0.9)),  # b2 = 0.9: rectified from step 6
    "AdaMax": lambda: gpuopt.AdaMax(0.002, (0.85, 0.99)),
    "ADAGrad": lambda: gpuopt.ADAGrad(0.05),
    "ADADelta": lambda: gpuopt.ADADelta(0.85),
    "AMSGrad": lambda: gpuopt.AMSGrad(0.003, (0.85, 0.99)),
    "NADAM": lambda: gpuopt.NADAM(0.002, (0.85, 0.99)),
    "ADAMW": lambda: gpuopt.ADAMW(0.003, (0.9, 0.99), 0.01),
    "WeightDecay": lambda: gpuopt.WeightDecay(0.05),
    "ClipValue": lambda: gpuopt.ClipValue(0.5),
    "ClipNorm": lambda: gpuopt.ClipNorm(3.0),
    "InvDecay": lambda: gpuopt.InvDecay(0.1),
    "ExpDecay": lambda: gpuopt.ExpDecay(0.1, 0.5, 4, 1e-3),
    "SignMomentum": lambda: SignMomentum(0.01, 0.8),
}

#: the twelve optimisers of the seed (the rules that produce a step on their own)
OPTIMISERS = [
    "Descent", "Momentum", "Nesterov", "RMSProp", "ADAM", "RADAM", "AdaMax", "ADAGrad", "ADADelta",
    "AMSGrad", "NADAM", "ADAMW",
]

#: chains: fused, with reductions, nested, and the seed's own combinations
CHAINS: dict[str, Callable[[], Rule]] = {
    "ClipValue+WeightDecay+ADAM": lambda: gpuopt.Optimiser(
        gpuopt.ClipValue(1.0), gpuopt.WeightDecay(1e-2), gpuopt.ADAM()
    ),
    "ClipNorm+ADAM": lambda: gpuopt.Optimiser(gpuopt.ClipNorm(2.0), gpuopt.ADAM(0.01)),
    "ADAM+ClipNorm": lambda: gpuopt.Optimiser(gpuopt.ADAM(0.5), gpuopt.ClipNorm(0.3)),
    "ClipNorm+ClipNorm+Descent": lambda: gpuopt.Optimiser(gpuopt.ClipNorm(5.0), gpuopt.Momentum(),
                                                          gpuopt.ClipNorm(0.01), gpuopt.Descent(0.5)),
    "InvDecay+ADAM": lambda: gpuopt.Optimiser(gpuopt.InvDecay(0.1), gpuopt.ADAM(0.001)),
    "WeightDecay+ADAM": lambda: gpuopt.Optimiser(gpuopt.WeightDecay(0.01), gpuopt.ADAM(0.001)),
    "ExpDecay+ADAM": lambda: gpuopt.Optimiser(gpuopt.ExpDecay(0.5, 0.5, 3, 1e-2), gpuopt.ADAM(0.001)),
    "ExpDecay+Descent": lambda: gpuopt.Optimiser(gpuopt.ExpDecay(0.01, 0.5, 3, 1e-4), gpuopt.Descent()),
    "WeightDecay+Momentum": lambda: gpuopt.Optimiser(gpuopt.WeightDecay(0.01), gpuopt.Momentum()),
    "ClipValue+SignMomentum": lambda: gpuopt.Optimiser(gpuopt.ClipValue(0.1), SignMomentum()),
    "nested": lambda: gpuopt.Optimiser(gpuopt.Optimiser(gpuopt.ClipValue(2.0), gpuopt.InvDecay()),
                                       gpuopt.Optimiser(gpuopt.RMSProp(), gpuopt.WeightDecay(1e-3))),
    "AMSGrad+ClipValue": lambda: gpuopt.Optimiser(gpuopt.AMSGrad(0.01), gpuopt.ClipValue(1e-3)),
}

ALL = {**RULES, **CHAINS}
