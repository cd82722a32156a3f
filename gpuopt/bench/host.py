"""``python -m gpuopt bench --host``: the host time of one ``update`` call, on any machine.

The kernel backend runs with :class:`~gpuopt.backends.noop.NoopDevice`, which launches nothing,
so what is timed is gpuopt's own work per call without CuPy's launch cost, on GPT-2 small's 148
tensors: ADAM with the same gradient arrays every step (PyTorch's persistent ``.grad``) and with
new ones (a CuPy backward pass, or ``zero_grad(set_to_none=True)``); the same with PyTorch
tensors (CPU tensors standing in for CUDA ones: the prepared path reads them the same way);
1000 tensors; and two chains. Each figure is the median over many calls.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..api import update
from ..backends import backend_override
from ..backends.kernel_backend import KernelBackend
from ..backends.noop import NoopDevice
from ..chain import Optimiser
from ..prepared import PATHS
from ..rule import Rule
from ..rules import ADAM, ClipNorm
from .devices import Machine
from .report import run_record
from .targets import host_targets
from .workload import CHAIN, RULES, gpt2_shapes

CHAINS: dict[str, Callable[[], Rule]] = {"ClipNorm+ADAM": lambda: Optimiser(ClipNorm(1.0), ADAM()), CHAIN: RULES[CHAIN]}


def time_calls(opt: Rule, params: list, grads: list, calls: int, sync: Callable[[], None],
               new_grads: Callable[[], list] | None = None) -> dict[str, Any]:
    """The host time of ``update(opt, params, grads)``: the median over ``calls`` calls after
    warm-up, with gradients from ``new_grads()`` before each call where it is given, and how
    many calls took the prepared path. ``opt``'s state is freed afterwards."""
    for _ in range(3):  # the first call creates state and prepares; the others warm up
        update(opt, params, grads)
    before, times = PATHS["prepared"], []
    gc.disable()  # a collection inside one timed call would be noise, not gpuopt's cost
    try:
        for _ in range(calls):
            if new_grads is not None:
                grads = new_grads()
            sync()  # an empty launch queue: a launch never waits for a free slot while timed
            start = time.perf_counter()
            update(opt, params, grads)
            times.append(time.perf_counter() - start)
    finally:
        gc.enable()
        opt.reset()
    prepared = PATHS["prepared"] - before
    return {"host_time_us": statistics.median(times) * 1e6, "host_time_min_us": min(times) * 1e6, "calls": calls,
            "prepared_calls": prepared, "full_calls": calls - prepared}


def host_benchmark(calls: int = 500, layers: int = 12, width: int = 768, many: int = 1000,
                   use_torch: bool = True, launches: bool = False) -> dict[str, Any]:
    """Every host-time case; returns the report (``targets`` included) that ``--json`` writes.
    ``launches`` runs them on the GPU with real launches (synchronised before each timed call)."""
    started = time.perf_counter()
    machine = Machine("cupy" if launches else "numpy")
    shapes = [shape for _, shape in gpt2_shapes(layers, width)]
    xp, torch = machine.xp if launches else NoopDevice.xp, machine.torch() if use_torch else None

    def arrays(shapes: list, params: bool = False) -> list:  # (params or gradients: the same)
        return [xp.zeros(shape, dtype=np.float32) for shape in shapes]

    def tensors(shapes: list, params: bool = False) -> list:
        made = [torch.zeros(shape, device="cuda" if launches else "cpu") for shape in shapes]
        return [torch.nn.Parameter(t) for t in made] if params else made

    cases: dict[str, dict[str, Any]] = {}
    with contextlib.nullcontext() if launches else backend_override("numpy", KernelBackend(NoopDevice())):
        for kind in ("same", "new"):
            runs = {f"ADAM/{kind}": (ADAM, shapes, arrays), f"ADAM/{kind}/{many}": (ADAM, [(4096,)] * many, arrays),
                    **{f"{name}/{kind}": (factory, shapes, arrays) for name, factory in CHAINS.items()},
                    **({f"torch ADAM/{kind}": (ADAM, shapes, tensors)} if torch is not None else {})}
            for name, (factory, case_shapes, make) in runs.items():
                new_grads = functools.partial(make, case_shapes) if kind == "new" else None
                cases[name] = time_calls(factory(), make(case_shapes, params=True), make(case_shapes),
                                         calls, machine.sync, new_grads)
                gc.collect()
    report = run_record("host", {"backend": "host-cupy" if launches else "host-noop", **machine.describe()}, {
        "calls": calls, "tensors": len(shapes), "layers": layers, "width": width, "many": many, "dtype": "float32",
        "parameters": sum(math.prod(s) for s in shapes), "rules": ["ADAM", *CHAINS],
        "timer": "time.perf_counter per call, median",
        "device": "CuPy, real launches" if launches else "NoopDevice (nothing launched)"})
    notes = ["PyTorch is not importable: the torch cases were not measured"] if use_torch and torch is None else []
    report.update(cases=cases, notes=notes, elapsed_s=time.perf_counter() - started)
    report["targets"] = host_targets(report)
    return report
