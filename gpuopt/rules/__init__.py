"""The built-in rules of Flux.Optimise, each defined once, and their registry.

The registry is the one list of built-in rules: ``gpuopt``'s exports, the command line's rule
names, the benchmark's rule list and the test tables are all derived from it. A new built-in
rule is its file here, its line below (the import and its place in one of the tuples) and its
plain formula in :mod:`gpuopt.plain` (the tests' oracle and the benchmark's baseline).
"""

from __future__ import annotations

from ..rule import Rule
from .adaptive import ADAM, ADAMW, NADAM, RADAM, ADADelta, ADAGrad, AdaMax, AMSGrad, RMSProp
from .descent import Descent, Momentum, Nesterov
from .mixed import MixedPrecision
from .schedules import ExpDecay, InvDecay
from .transforms import ClipNorm, ClipValue, WeightDecay

#: rules that produce a step on their own (the benchmark times each of them)
OPTIMISERS: tuple[type[Rule], ...] = (
    Descent, Momentum, Nesterov, RMSProp, ADAM, RADAM, AdaMax, ADAGrad, ADADelta, AMSGrad, NADAM, ADAMW,
)
#: rules that reshape the update in a chain (decay, clipping, schedules)
TRANSFORMS: tuple[type[Rule], ...] = (WeightDecay, ClipValue, ClipNorm, InvDecay, ExpDecay)
#: rules that wrap another rule
WRAPPERS: tuple[type[Rule], ...] = (MixedPrecision,)

#: every built-in rule by name
BUILT_IN: dict[str, type[Rule]] = {cls.__name__: cls for cls in (*OPTIMISERS, *TRANSFORMS, *WRAPPERS)}

__all__ = list(BUILT_IN)
