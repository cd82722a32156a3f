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

#: the fused chain the benchmark times beside the rules: clipping and weight decay in front of ADAM, one kernel
CHAIN = "ClipValue+WeightDecay+ADAM"

#: every benchmarked rule by name, with a factory for a fresh instance (default hyperparameters)
RULES: dict[str, Callable[[], Rule]] = {
    **{cls.__name__: cls for cls in OPTIMISERS},
    CHAIN: lambda: Optimiser(ClipValue(1), WeightDecay(1e-4), ADAM()),
}
ALIASES = {"clip+wd+adam": CHAIN, "chain": CHAIN}

#: bytes a step moves per element for float32 parameters, counted by hand (x and g read, x
#: written, each state slot read and written): the derivation below must agree
COUNTED_BYTES_FLOAT32 = {
    "Descent": 12, "Momentum": 20, "Nesterov": 20, "RMSProp": 20, "ADAGrad": 20,
    "ADAM": 28, "RADAM": 28, "AdaMax": 28, "NADAM": 28, "ADADelta": 28, "AMSGrad": 36,
}


def state_slots(rule: Rule) -> int:
    """Number of per-element state arrays the rule (or chain) keeps per parameter."""
    return sum(len(leaf.state) for leaf in rule.leaves())


def bytes_per_element(rule: Rule, dtype: Any = "float32") -> int:
    """Bytes one step must move per parameter element.

    The element-wise pass reads ``x`` and ``g`` and writes ``x`` (parameter itemsize each) and
    reads and writes every state slot (state itemsize: 4 for float16 parameters, whose state
    is float32). A chain with reductions (``ClipNorm``) also reads, per reduction pass, what
    that pass needs. For float32 this reproduces the hand count (:data:`COUNTED_BYTES_FLOAT32`).
    """
    dtype = np.dtype(dtype)
    p, s = dtype.itemsize, compute_dtype(dtype).itemsize
    total = 3 * p + 2 * s * state_slots(rule)
    program = plan(rule)
    for level in range(1, program.levels + 1):
        roots = [t.args[0] for t in program.totals_at(level)]
        for node in program.needed(roots):
            if node.op in ("x", "g"):
                total += p
            elif node.op == "load":
                total += s
    return total


def check_counted_bytes() -> dict[str, tuple[int, int]]:
    """Rules whose derived float32 bytes differ from the hand count: name -> (derived, counted)."""
    wrong = {}
    for name, counted in COUNTED_BYTES_FLOAT32.items():
        derived = bytes_per_element(RULES[name](), "float32")
        if derived != counted:
            wrong[name] = (derived, counted)
    return wrong


# -- the GPT-2 small model -------------------------------------------------------------------


def gpt2_shapes(n_layer: int = 12, n_embd: int = 768, vocab: int = 50257, n_ctx: int = 1024
                ) -> list[tuple[str, tuple[int, ...]]]:
    """The parameter tensors of GPT-2 small (148 tensors, 124,439,808 parameters by default),
    by their Hugging Face names; ``n_layer`` and ``n_embd`` scale it down for quick runs."""
    e = n_embd
    shapes: list[tuple[str, tuple[int, ...]]] = [("wte", (vocab, e)), ("wpe", (n_ctx, e))]
    for i in range(n_layer):
        h = f"h.{i}."
        shapes += [
            (h + "ln_1.weight", (e,)), (h + "ln_1.bias", (e,)),
            (h + "attn.c_attn.weight", (e, 3 * e)), (h + "attn.c_attn.bias", (3 * e,)),
            (h + "attn.c_proj.weight", (e, e)), (h + "attn.c_proj.bias", (e,)),
            (h + "ln_2.weight", (e,)), (h + "ln_2.bias", (e,)),
            (h + "mlp.c_fc.weight", (e, 4 * e)), (h + "mlp.c_fc.bias", (4 * e,)),
            (h + "mlp.c_proj.weight", (4 * e, e)), (h + "mlp.c_proj.bias", (e,)),
        ]
    shapes += [("ln_f.weight", (e,)), ("ln_f.bias", (e,))]
    return shapes


