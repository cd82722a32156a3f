"""``python -m gpuopt bench --host``: the host time of one ``update`` call, on any machine.

The kernel backend runs with :class:`NoopDevice`, a device that compiles and launches nothing,
so what is timed is gpuopt's own Python work per call (checks, the prepared path, host scalars,
table refreshes) without CuPy's launch cost, on GPT-2 small's 148 parameter tensors: ADAM with
the same gradient arrays every step (PyTorch's persistent ``.grad``) and with new ones every
step (a CuPy backward pass, or PyTorch after ``zero_grad(set_to_none=True)``); the same with
PyTorch tensors (CPU tensors here, standing in for CUDA ones: the prepared path reads them the
same way); 1000 tensors; and the chains ``ClipNorm+ADAM`` and ``ClipValue+WeightDecay+ADAM``.

Arrays are NumPy memory wrapped as :class:`DeviceMemory`, whose address is read as cheaply
as a CuPy array's. Each figure is the median over many calls (the machine may be busy).
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
from collections.abc import Callable
from operator import attrgetter
from types import SimpleNamespace
from typing import Any

import numpy as np

from ..api import update
from ..backends import backend_override
from ..backends.kernel_backend import Device, KernelBackend
from ..chain import Optimiser
from ..prepared import PATHS, POINTER_READERS
from ..rule import Rule
from ..rules import ADAM, ClipNorm, ClipValue, WeightDecay
from .workload import gpt2_shapes

CHAINS: dict[str, Callable[[], Rule]] = {
    "ClipNorm+ADAM": lambda: Optimiser(ClipNorm(1.0), ADAM()),
    "ClipValue+WeightDecay+ADAM": lambda: Optimiser(ClipValue(1.0), WeightDecay(1e-4), ADAM()),
}


class DeviceMemory(np.ndarray):
    """A NumPy array that knows its address as an attribute, as a CuPy array does
    (``ndarray.ctypes.data`` costs a microsecond, ``cupy.ndarray.data.ptr`` a few dozen ns)."""

    ptr: int

    def __array_finalize__(self, obj: Any) -> None:
        self.ptr = self.ctypes.data


POINTER_READERS[DeviceMemory] = attrgetter("ptr")


class NoopDevice(Device):
    """A kernel-backend :class:`~gpuopt.backends.kernel_backend.Device` that launches nothing:
    host work only. It counts the launches it is asked for."""

    xp = SimpleNamespace(empty=lambda shape, dtype=np.float32: np.empty(shape, dtype).view(DeviceMemory),
                         zeros=lambda shape, dtype=np.float32: np.zeros(shape, dtype).view(DeviceMemory),
                         asarray=lambda array: np.asarray(array).view(DeviceMemory),
                         ascontiguousarray=np.ascontiguousarray)
    threads = 256
    max_blocks = 1 << 20

    def __init__(self) -> None:
        self.launches = 0

    def kernel(self, source: str, name: str) -> Callable[[int, int, Any], None]:
        def launch(blocks: int, threads: int, args: Any) -> None:
            self.launches += 1

        return launch

    @staticmethod
    def pointer(array: Any) -> int:
        return array.ptr if type(array) is DeviceMemory else array.ctypes.data


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
    from .devices import Machine
    from .runner import run_record
    from .targets import host_targets

    started = time.perf_counter()
    machine = Machine("cupy" if launches else "numpy")
    shapes = [shape for _, shape in gpt2_shapes(layers, width)]
    xp = machine.xp if launches else NoopDevice.xp
    makers = {"": (lambda s: xp.zeros(s, dtype=np.float32), lambda s: xp.empty(s, dtype=np.float32), list)}
    torch = machine.torch() if use_torch else None
    if torch is not None:
        on = "cuda" if launches else "cpu"
        makers["torch "] = (lambda s: torch.zeros(s, device=on), lambda s: torch.empty(s, device=on),
                            lambda tensors: [torch.nn.Parameter(t) for t in tensors])
    cases: dict[str, dict[str, Any]] = {}
    with contextlib.nullcontext() if launches else backend_override("numpy", KernelBackend(NoopDevice())):
        for kind in ("same", "new"):
            runs = [(f"ADAM/{kind}", ADAM, shapes, ""), (f"ADAM/{kind}/{many}", ADAM, [(4096,)] * many, ""),
                    *((f"{name}/{kind}", factory, shapes, "") for name, factory in CHAINS.items()),
                    (f"torch ADAM/{kind}", ADAM, shapes, "torch ")]
            for name, factory, case_shapes, arrays in runs:
                if arrays not in makers:
                    continue
                zeros, empty, as_params = makers[arrays]
                params = as_params([zeros(s) for s in case_shapes])
                new_grads = (lambda e=empty, s=case_shapes: [e(shape) for shape in s]) if kind == "new" else None
                cases[name] = time_calls(factory(), params, [zeros(s) for s in case_shapes], calls, machine.sync,
                                         new_grads)
                gc.collect()
    report = run_record("host", {"name": machine.name(), "backend": "host-cupy" if launches else "host-noop",
                                 **machine.info()}, {
        "calls": calls, "tensors": len(shapes), "layers": layers, "width": width, "many": many, "dtype": "float32",
        "parameters": sum(math.prod(s) for s in shapes), "rules": ["ADAM", *CHAINS],
        "timer": "time.perf_counter per call, median",
        "device": "CuPy, real launches" if launches else "NoopDevice (nothing launched)"})
    notes = ["PyTorch is not importable: the torch cases were not measured"] if use_torch and torch is None else []
    report.update(cases=cases, notes=notes, elapsed_s=time.perf_counter() - started)
    report["targets"] = host_targets(report)
    return report
