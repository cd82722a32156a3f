"""What ``python -m gpuopt bench`` times: the rules, the bytes a step must move, the GPT-2 model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..backends.numpy_backend import compute_dtype
from ..chain import Optimiser
from ..plan import plan
from ..rule import Rule
from ..rules import ADAM, OPTIMISERS, ClipValue, WeightDecay

#: the fused chain timed beside the optimisers: clipping and weight decay in front of ADAM, one kernel
CHAIN = "ClipValue+WeightDecay+ADAM"
#: every benchmarked rule by name, with a factory for a fresh instance (default hyperparameters)
RULES: dict[str, Callable[[], Rule]] = {
    **{cls.__name__: cls for cls in OPTIMISERS}, CHAIN: lambda: Optimiser(ClipValue(1), WeightDecay(1e-4), ADAM())}
ALIASES = {"clip+wd+adam": CHAIN, "chain": CHAIN}


def bytes_per_element(rule: Rule, dtype: Any = "float32") -> int:
    """Bytes one step must move per parameter element: ``x`` and ``g`` read and ``x`` written
    (parameter itemsize), every state slot read and written (state itemsize: float32 for float16
    parameters), and per reduction pass of a chain (``ClipNorm``) what that pass reads."""
    p, s = np.dtype(dtype).itemsize, compute_dtype(np.dtype(dtype)).itemsize
    total = 3 * p + 2 * s * sum(len(leaf.state) for leaf in rule.leaves())
    program = plan(rule)
    for level in range(1, program.levels + 1):
        for node in program.needed([t.args[0] for t in program.totals_at(level)]):
            total += {"x": p, "g": p, "load": s}.get(node.op, 0)
    return total


def gpt2_shapes(n_layer: int = 12, n_embd: int = 768, vocab: int = 50257, n_ctx: int = 1024
                ) -> list[tuple[str, tuple[int, ...]]]:
    """The parameter tensors of GPT-2 small (148 tensors, 124,439,808 parameters by default),
    by their Hugging Face names; ``n_layer`` and ``n_embd`` scale it down for quick runs."""
    e = n_embd
    block = {"ln_1.weight": (e,), "ln_1.bias": (e,), "attn.c_attn.weight": (e, 3 * e), "attn.c_attn.bias": (3 * e,),
             "attn.c_proj.weight": (e, e), "attn.c_proj.bias": (e,), "ln_2.weight": (e,), "ln_2.bias": (e,),
             "mlp.c_fc.weight": (e, 4 * e), "mlp.c_fc.bias": (4 * e,), "mlp.c_proj.weight": (4 * e, e),
             "mlp.c_proj.bias": (e,)}
    return [("wte", (vocab, e)), ("wpe", (n_ctx, e)),
            *((f"h.{i}.{name}", shape) for i in range(n_layer) for name, shape in block.items()),
            ("ln_f.weight", (e,)), ("ln_f.bias", (e,))]
