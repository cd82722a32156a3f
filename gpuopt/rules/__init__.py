"""The built-in rules of Flux.Optimise, each defined once."""

from .adaptive import ADAM, ADAMW, NADAM, RADAM, ADADelta, ADAGrad, AdaMax, AMSGrad, RMSProp
from .descent import Descent, Momentum, Nesterov
from .mixed import MixedPrecision
from .schedules import ExpDecay, InvDecay
from .transforms import ClipNorm, ClipValue, WeightDecay

__all__ = [
    "ADAM", "ADAMW", "NADAM", "RADAM", "ADADelta", "ADAGrad", "AdaMax", "AMSGrad", "RMSProp",
    "Descent", "Momentum", "Nesterov", "ExpDecay", "InvDecay", "ClipNorm", "ClipValue",
    "WeightDecay", "MixedPrecision",
]
