"""Where the benchmark runs (:class:`Machine`): the clock, memory, copy bandwidth and build times
of the device the backend itself launches on, and PyTorch on the same arrays."""

from __future__ import annotations

import gc
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..backends import describe, get_backend

MAX_INNER = 1000  # steps in one timed repeat at most
SETTLE_S = 0.02  # libgomp's threads spun for about 10 ms after torch's Adam here (and took a core: 25% slower)
#: bytes of the buffer whose copy gives the reference bandwidth
COPY_BYTES = {"cupy": 1 << 30, "numpy": 256 << 20}


class Machine:
    """The GPU (``"cupy"``) or the CPU (``"numpy"``) through the device its backend launches on:
    ``device`` is that backend's own object, None where NumPy arrays run on the NumPy executor."""

    def __init__(self, kind: str) -> None:
        self.kind, self.gpu = kind, kind == "cupy"
        self.device: Any = getattr(get_backend(kind), "device", None)
        self.xp: Any = np if self.device is None else self.device.xp
        self.threads = getattr(self.device, "cpu_threads", 1)  # the CPU threads an update uses

    def describe(self) -> dict[str, Any]:
        """The machine's name and what else a report should say about it (a GPU describes itself)."""
        if self.gpu:
            return self.device.describe()
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:  # (Linux) the CPU's marketing name
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            name = platform.processor() or platform.machine() or "unknown CPU"
        return {"name": name, "cpu_count": os.cpu_count(), "platform": platform.platform(),
                "cpu_backend": describe("numpy"), "threads": self.threads}

    def sync(self) -> None:
        if self.gpu:
            self.xp.cuda.Device().synchronize()

    def elapsed(self, fn: Callable[[], None], events: Any = None) -> float:
        """Seconds ``fn`` takes: ``perf_counter`` on the CPU; on the GPU, CUDA events (CuPy's, or
        ``events`` such as ``torch.cuda.Event`` for work on PyTorch's stream)."""
        if not self.gpu:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        self.sync()
        start, end = (events(enable_timing=True) if events else self.xp.cuda.Event() for _ in range(2))
        start.record()
        fn()
        end.record()
        end.synchronize()
        return (start.elapsed_time(end) if events else self.xp.cuda.get_elapsed_time(start, end)) / 1e3

    def time_steps(self, steps: dict[str, tuple[Callable[[], Any], Any]], repeats: int, warmup: int, target_s: float
                   ) -> dict[str, dict[str, Any]]:
        """Seconds per step of each ``name: (step, events)``: warm up, pick how many steps one repeat
        runs (to last ``target_s``), then ``repeats`` rounds of one repeat each, in a new order every
        round (a machine whose speed drifts during a run favours none of them, and neither does a
        position: here the same step ran up to 15% slower right after torch's than after another);
        the median (``time_s``) and the fastest. On the CPU every repeat follows a pause (untimed):
        OpenMP threads spin for milliseconds after torch's work, taking a core from the next one."""
        def run(step: Callable[[], Any], n: int) -> Callable[[], None]:
            return lambda: [step() for _ in range(n)]
        inner = {}
        for name, (step, events) in steps.items():
            if warmup:
                self.elapsed(run(step, warmup), events)
            inner[name] = max(1, min(MAX_INNER, math.ceil(target_s / max(self.elapsed(step, events), 1e-7))))
        times: dict[str, list[float]] = {name: [] for name in steps}
        orders = random.Random(0)  # (the same orders every run)
        for _ in range(repeats):
            for name in orders.sample(list(steps), len(steps)):
                if not self.gpu:
                    time.sleep(SETTLE_S)
                step, events = steps[name]
                times[name].append(self.elapsed(run(step, inner[name]), events) / inner[name])
        return {name: {"time_s": statistics.median(t), "time_min_s": min(t), "repeats": repeats,
                       "steps_per_repeat": inner[name]} for name, t in times.items()}

    def random(self, shape: Any, dtype: np.dtype, seed: int) -> Any:
        generator = self.xp.random.RandomState(seed) if self.gpu else np.random.default_rng(seed)
        drawn = generator.standard_normal(shape, dtype=np.float32 if dtype == np.float16 else dtype)
        return drawn.astype(dtype, copy=False)

    def release(self) -> None:
        """Collect garbage and give the memory freed back (CuPy's and PyTorch's pools)."""
        gc.collect()
        torch = sys.modules.get("torch")
        if self.gpu:
            self.xp.get_default_memory_pool().free_all_blocks()
            if torch is not None and torch.cuda.is_initialized():
                torch.cuda.empty_cache()

    def copy_bandwidth(self, repeats: int) -> dict[str, Any]:
        """GB/s of a copy (bytes read + written) of a buffer far larger than any cache, the fastest
        of the ways the device copies (on the GPU cudaMemcpy and a copy kernel; on the CPU a copy
        on the threads an update uses)."""
        xp, n = self.xp, COPY_BYTES[self.kind] // 4
        src, dst = xp.ones(n, dtype=np.float32), xp.zeros(n, dtype=np.float32)
        copies = self.device.copies(dst, src) if self.device is not None else {"np.copyto": lambda: np.copyto(dst, src)}
        timed = self.time_steps({method: (copy, None) for method, copy in copies.items()}, max(repeats, 5),
                                3 if self.gpu else 1, 0.0)
        rates = {method: 2 * n * 4 / t["time_s"] / 1e9 for method, t in timed.items()}
        best = max(rates, key=rates.__getitem__)
        return {"gbps": rates[best], "method": best, "buffer_bytes": n * 4, "gbps_by_method": rates}

    def build_times(self) -> dict[str, float] | None:
        """Seconds to build a native module and to load it from the cache; None on the GPU or the
        NumPy executor."""
        return None if self.gpu or self.device is None else self.device.build_times()

    def torch(self) -> Any:
        """PyTorch where it is importable (with CUDA on the GPU; on the CPU set to the threads an
        update uses), else None."""
        try:
            import torch
        except Exception:  # noqa: BLE001 - an optional comparison
            return None
        if not self.gpu:
            torch.set_num_threads(self.threads)
        return torch if not self.gpu or torch.cuda.is_available() else None

