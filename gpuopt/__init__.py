"""gpuopt: Flux.Optimise's update rules as fused CUDA kernels on CuPy, NumPy on the CPU.

Every rule is defined once (:mod:`gpuopt.rule`); the NumPy executor and the CUDA kernels
are both generated from that one definition.
"""

from .api import apply, count_launches, update
from .backends.cuda_source import kernel_source
from .backends.kernel_backend import GraphCaptureError
from .chain import Optimiser
from .checkpoint import CheckpointError, load_state, save_state
from .expr import Expr, clamp, maximum, minimum, sqrt, total, where
from .rule import Hyper, Rule, beta_pair, non_negative, positive, positive_integer, unit_interval
from .rules import *  # noqa: F403  (every built-in rule, by its name in BUILT_IN)
from .rules import BUILT_IN

#: Pythonic aliases of Flux's names (torch.optim's spelling; SGD for Descent)
ALIASES = {"Adam": "ADAM", "AdamW": "ADAMW", "NAdam": "NADAM", "RAdam": "RADAM", "Adadelta": "ADADelta",
           "Adagrad": "ADAGrad", "RMSprop": "RMSProp", "SGD": "Descent"}
globals().update({alias: BUILT_IN[name] for alias, name in ALIASES.items()})

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # gpuopt.torch is imported on first use, so that `import gpuopt` never imports torch.
    if name == "torch":
        import importlib

        return importlib.import_module(".torch", __name__)
    raise AttributeError(f"module 'gpuopt' has no attribute {name!r}")

__all__ = [
    "update", "apply", "kernel_source", "count_launches", "Optimiser", "Rule", "Hyper", "Expr",
    "save_state", "load_state", "CheckpointError", "GraphCaptureError",
    "sqrt", "maximum", "minimum", "clamp", "where", "total",
    "non_negative", "positive", "positive_integer", "unit_interval", "beta_pair",
    *BUILT_IN, *ALIASES,
]
