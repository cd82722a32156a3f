"""``python -m gpuopt bench --host``: the host time of one ``update`` call, on any machine.

The kernel backend runs with :class:`NoopDevice`, a device that compiles and launches nothing,
so what is timed is gpuopt's own Python work per call (checks, the prepared path, host scalars,
table refreshes) without CuPy's launch cost, on GPT-2 small's 148 parameter tensors:

- ADAM with the same gradient arrays every step (PyTorch's persistent ``.grad``) and with new
  ones every step (a CuPy backward pass, or PyTorch after ``zero_grad(set_to_none=True)``);
- the same with PyTorch tensors (CPU tensors here, standing in for CUDA ones: the prepared
  path reads them the same way), where PyTorch is importable;
- 1000 tensors, and the chains ``ClipNorm+ADAM`` and ``ClipValue+WeightDecay+ADAM``.

Arrays are NumPy memory wrapped as :class:`DeviceMemory`, whose address is read as cheaply
as a CuPy array's. Each figure is the median over many calls (the machine may be busy).
"""

from __future__ import annotations

import contextlib
import datetime
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
from ..backends.kernel_backend import KernelBackend
from ..chain import Optimiser
from ..prepared import PATHS, POINTER_READERS
from ..rule import Rule
from ..rules import ADAM, ClipNorm, ClipValue, WeightDecay
from .workload import gpt2_shapes

#: the host-time targets, in microseconds or as ratios
SAME_LIMIT_US, NEW_LIMIT_US, MANY_RATIO, CHAIN_RATIO = 25.0, 60.0, 2.0, 1.3


class DeviceMemory(np.ndarray):
    """A NumPy array that knows its address as an attribute, as a CuPy array does
    (``ndarray.ctypes.data`` costs a microsecond, ``cupy.ndarray.data.ptr`` a few dozen ns)."""

    ptr: int

    def __array_finalize__(self, obj: Any) -> None:
        self.ptr = self.ctypes.data


POINTER_READERS[DeviceMemory] = attrgetter("ptr")


def _pointer(array: Any) -> int:
    return array.ptr if type(array) is DeviceMemory else array.ctypes.data


def _empty(shape: Any, dtype: Any = np.float32) -> DeviceMemory:
    return np.empty(shape, dtype=dtype).view(DeviceMemory)


def _zeros(shape: Any, dtype: Any = np.float32) -> DeviceMemory:
    return np.zeros(shape, dtype=dtype).view(DeviceMemory)


def _asarray(array: Any) -> Any:
    return np.asarray(array).view(DeviceMemory)


class NoopDevice:
    """A kernel-backend device that launches nothing: host work only."""

    xp = SimpleNamespace(empty=_empty, zeros=_zeros, asarray=_asarray, ascontiguousarray=np.ascontiguousarray)
    threads = 256
    max_blocks = 1 << 20
    pointer = staticmethod(_pointer)

    def __init__(self) -> None:
        self.launches = 0

    def kernel(self, source: str, name: str) -> Callable[[int, int, Any], None]:
        def launch(blocks: int, threads: int, args: Any) -> None:
            self.launches += 1

        return launch


def _median_us(times: list[float]) -> float:
    return statistics.median(times) * 1e6


def _time_calls(opt: Rule, params: list, make_grads: Callable[[], list], calls: int, new: bool,
                sync: Callable[[], None]) -> dict[str, Any]:
    grads = make_grads()
    for _ in range(3):  # the first call creates state and prepares; the others warm up
        update(opt, params, grads)
    before = dict(PATHS)
    times = []
    gc.disable()  # a collection inside one timed call would be noise, not gpuopt's cost
    try:
        for _ in range(calls):
            if new:
                grads = make_grads()
            sync()  # an empty launch queue: a launch never waits for a free slot while timed
            start = time.perf_counter()
            update(opt, params, grads)
            times.append(time.perf_counter() - start)
    finally:
        gc.enable()
    prepared = PATHS["prepared"] - before.get("prepared", 0)
    return {"host_time_us": _median_us(times), "host_time_min_us": min(times) * 1e6, "calls": calls,
            "prepared_calls": prepared, "full_calls": calls - prepared}


def _array_case(xp: Any, factory: Callable[[], Rule], shapes: list[tuple[int, ...]], calls: int, new: bool,
                sync: Callable[[], None]) -> dict[str, Any]:
    params = [xp.zeros(shape, dtype=np.float32) for shape in shapes]
    fixed = [xp.zeros(shape, dtype=np.float32) for shape in shapes]

    def make_grads() -> list:
        return [xp.empty(shape, dtype=np.float32) for shape in shapes] if new else fixed

    opt = factory()
    try:
        return _time_calls(opt, params, make_grads, calls, new, sync)
    finally:
        opt.reset()


def _torch_case(torch: Any, device: str, shapes: list[tuple[int, ...]], calls: int, new: bool,
                sync: Callable[[], None]) -> dict[str, Any]:
    params = [torch.nn.Parameter(torch.zeros(shape, device=device)) for shape in shapes]
    fixed = [torch.zeros(shape, device=device) for shape in shapes]

    def make_grads() -> list:
        return [torch.empty(shape, device=device) for shape in shapes] if new else fixed

    opt = ADAM()
    try:
        return _time_calls(opt, params, make_grads, calls, new, sync)
    finally:
        opt.reset()


CHAINS: dict[str, Callable[[], Rule]] = {
    "ClipNorm+ADAM": lambda: Optimiser(ClipNorm(1.0), ADAM()),
    "ClipValue+WeightDecay+ADAM": lambda: Optimiser(ClipValue(1.0), WeightDecay(1e-4), ADAM()),
}


def host_benchmark(calls: int = 500, layers: int = 12, width: int = 768, many: int = 1000,
                   use_torch: bool = True, launches: bool = False) -> dict[str, Any]:
    """Every host-time case; returns the report (``targets`` included) that ``--json`` writes.
    ``launches`` runs them on the GPU with real launches (synchronised before each timed call)."""
    from .devices import CupyDevice, NumpyDevice
    from .runner import software_versions

    shapes = [shape for _, shape in gpt2_shapes(layers, width)]
    many_shapes = [(4096,)] * many
    cases: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    started = time.perf_counter()
    if launches:
        import cupy

        xp, torch_device, sync = cupy, "cuda", cupy.cuda.get_current_stream().synchronize
        context: Any = contextlib.nullcontext()
        gpu = CupyDevice()
        device_info = {"name": gpu.name(), "backend": "host-cupy", **gpu.info()}
    else:
        xp, torch_device, sync = NOOP_ARRAYS, "cpu", _nothing
        context = backend_override("numpy", KernelBackend(NoopDevice()))
        device_info = {"name": NumpyDevice().name(), "backend": "host-noop", **NumpyDevice().info()}
    torch = _torch() if use_torch else None
    if use_torch and torch is None:
        notes.append("PyTorch is not importable: the torch cases were not measured")
    with context:
        for new in (False, True):
            kind = "new" if new else "same"
            cases[f"ADAM/{kind}"] = _array_case(xp, ADAM, shapes, calls, new, sync)
            gc.collect()
            cases[f"ADAM/{kind}/{many}"] = _array_case(xp, ADAM, many_shapes, calls, new, sync)
            for name, factory in CHAINS.items():
                cases[f"{name}/{kind}"] = _array_case(xp, factory, shapes, calls, new, sync)
            gc.collect()
            if torch is not None:
                sync_torch = torch.cuda.synchronize if launches else _nothing
                cases[f"torch ADAM/{kind}"] = _torch_case(torch, torch_device, shapes, calls, new, sync_torch)
                gc.collect()
    report: dict[str, Any] = {
        "schema": 1,
        "kind": "host",
        "device": device_info,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": software_versions(),
        "config": {"calls": calls, "tensors": len(shapes), "layers": layers, "width": width,
                   "parameters": sum(math.prod(s) for s in shapes), "many": many, "dtype": "float32",
                   "rules": ["ADAM", *CHAINS],
                   "timer": "time.perf_counter per call, median",
                   "device": "CuPy, real launches" if launches else "NoopDevice (nothing launched)"},
        "cases": cases,
        "notes": notes,
        "elapsed_s": time.perf_counter() - started,
    }
    report["targets"] = host_targets(report)
    return report


def _nothing() -> None:
    pass


NOOP_ARRAYS = SimpleNamespace(zeros=_zeros, empty=_empty)


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


def host_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The host-time targets on a host report: met, not met or not measured."""
    cases = report["cases"]
    many = report["config"]["many"]
    targets = []

    def target(tid: str, description: str, value: float | None, limit: float, detail: str) -> None:
        status = "not measured" if value is None else ("met" if value <= limit else "not met")
        targets.append({"id": tid, "description": description, "status": status, "value": value,
                        "limit": limit, "detail": detail})

    def us(name: str) -> float | None:
        case = cases.get(name)
        return None if case is None else case["host_time_us"]

    for prefix, who in (("", "arrays"), ("torch ", "PyTorch tensors")):
        tag = "torch_" if prefix else ""
        for kind, limit in (("same", SAME_LIMIT_US), ("new", NEW_LIMIT_US)):
            value = us(f"{prefix}ADAM/{kind}")
            target(f"host_{tag}gpt2_adam_{kind}_grads_us",
                   f"host: GPT-2 small ({report['config']['tensors']} tensors) ADAM, {kind} gradient {who} "
                   f"every step, at most {limit:g} us per update",
                   value, limit, f"median host time per update call, {report['config']['device']}")
    for kind in ("same", "new"):
        base, big = us(f"ADAM/{kind}"), us(f"ADAM/{kind}/{many}")
        target(f"host_{many}_tensors_{kind}_grads_ratio",
               f"host: {many} tensors at most {MANY_RATIO:g}x the time of GPT-2 small's ({kind} gradients)",
               None if base is None or big is None else big / base, MANY_RATIO,
               f"{big:.1f} us vs {base:.1f} us" if base and big else "")
        for name in CHAINS:
            chain = us(f"{name}/{kind}")
            slug = name.lower().replace("+", "_")
            target(f"host_{slug}_vs_adam_{kind}_grads_ratio",
                   f"host: {name} at most {CHAIN_RATIO:g}x the time of ADAM ({kind} gradients)",
                   None if base is None or chain is None else chain / base, CHAIN_RATIO,
                   f"{chain:.1f} us vs {base:.1f} us" if base and chain else "")
    return targets


def format_host_report(report: dict[str, Any]) -> str:
    c = report["config"]
    lines = [f"gpuopt host time per update call on {report['device']['name']} ({report['date']})",
             f"{c['device']}, {c['tensors']} tensors ({c['parameters'] / 1e6:.1f}M parameters), "
             f"median of {c['calls']} calls", ""]
    lines.append(f"{'case':<40} {'median':>10} {'min':>10} {'prepared/full':>14}")
    for name, case in report["cases"].items():
        lines.append(f"{name:<40} {case['host_time_us']:>8.1f}us {case['host_time_min_us']:>8.1f}us "
                     f"{case['prepared_calls']:>7}/{case['full_calls']:<6}")
    lines += ["", "targets:"]
    for t in report["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        lines.append(f"  [{t['status']}] {t['id']}: {value} (limit {t['limit']:g}) {t['detail']}")
    lines += [f"note: {note}" for note in report["notes"]]
    return "\n".join(lines)
