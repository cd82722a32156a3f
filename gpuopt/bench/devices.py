"""Devices: arrays, clocks and memory on the CPU (:class:`NumpyDevice`) and a CUDA GPU
(:class:`CupyDevice`), the copy bandwidth, and the helpers that time PyTorch on the same arrays."""

from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAX_INNER = 1000
MEMORY_MARGIN = 256 << 20
#: bytes of the buffer whose copy gives the reference bandwidth
COPY_BYTES = {"cupy": 1 << 30, "numpy": 256 << 20}


@dataclass
class Timing:
    """Seconds per step: the median over ``repeats`` repeats of ``inner`` steps each."""

    median: float
    minimum: float
    repeats: int
    inner: int

    def as_dict(self) -> dict[str, Any]:
        return {"time_s": self.median, "time_min_s": self.minimum, "repeats": self.repeats,
                "steps_per_repeat": self.inner}


def measure_steps(elapsed: Callable[[Callable[[], None]], float], steps: Callable[[int], None],
                  repeats: int, warmup: int, target_s: float) -> Timing:
    """Warm up, pick how many steps one repeat runs, then time ``repeats`` repeats."""
    if warmup:
        elapsed(lambda: steps(warmup))
    one = elapsed(lambda: steps(1))
    inner = max(1, min(MAX_INNER, math.ceil(target_s / max(one, 1e-7))))
    times = [elapsed(lambda: steps(inner)) / inner for _ in range(repeats)]
    return Timing(statistics.median(times), min(times), repeats, inner)


class NumpyDevice:
    """The CPU: NumPy arrays, ``perf_counter``, MemAvailable."""

    kind = "numpy"

    def __init__(self) -> None:
        self.xp = np

    def name(self) -> str:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                for line in f:
                    if line.lower().startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine() or "unknown CPU"

    def info(self) -> dict[str, Any]:
        from ..backends import describe

        return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "cpu_backend": describe("numpy"),
                "threads": self.threads()}

    @staticmethod
    def native() -> Any:
        """The native device when NumPy arrays run on native code, else None."""
        from ..backends import cpu_backend

        return getattr(cpu_backend(), "device", None)

    def threads(self) -> int:
        """Threads an update uses (the NumPy executor: one)."""
        native = self.native()
        return native.cpu_threads if native is not None else 1

    def build_times(self) -> dict[str, Any] | None:
        """Seconds to build one native module from nothing (a fresh cache folder) and to load it
        again as a new process would (cache on disk, compiler version asked anew)."""
        import tempfile

        from ..backends import cxx_build
        from ..backends.native_backend import NativeDevice
        from ..plan import plan
        from ..rules import ADAM

        native = self.native()
        if native is None:
            return None
        float32 = np.dtype(np.float32)
        with tempfile.TemporaryDirectory(prefix="gpuopt-bench-build-") as folder:
            times = {}
            for what in ("first_build_s", "cached_start_s"):
                cxx_build.compiler_identity.cache_clear()
                start = time.perf_counter()
                device = NativeDevice(native.compiler, Path(folder))
                device.library(device.module_source(plan(ADAM()), float32, float32, False))
                times[what] = time.perf_counter() - start
        return times

    def sync(self) -> None:
        pass

    def elapsed(self, fn: Callable[[], None]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def random(self, shape: Any, dtype: np.dtype, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        if dtype == np.float16:
            return rng.standard_normal(shape, dtype=np.float32).astype(np.float16)
        return rng.standard_normal(shape, dtype=dtype)

    def free_bytes(self) -> int | None:
        try:
            with open("/proc/meminfo", encoding="utf-8") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        return None

    def release(self, collect: bool = False) -> None:
        if collect:
            gc.collect()

    def copy_bandwidth(self, repeats: int) -> dict[str, Any]:
        """GB/s of a copy between two 256 MiB buffers (bytes read + written): far larger than
        any cache, so it is memory bandwidth. With native code it is a native copy on the
        threads an update uses; ``np.copyto`` (one thread) is measured as well."""
        nbytes = COPY_BYTES["numpy"]
        free = self.free_bytes()
        if free is not None:
            nbytes = min(nbytes, max(free // 4, 1 << 20))
        n = nbytes // 4
        src = np.ones(n, dtype=np.float32)
        dst = np.zeros(n, dtype=np.float32)
        timing = measure_steps(self.elapsed, lambda m: [np.copyto(dst, src) for _ in range(m)],
                               max(repeats, 5), 1, 0.0)
        gbps = 2 * n * 4 / timing.median / 1e9
        result = {"gbps": gbps, "method": "np.copyto", "buffer_bytes": n * 4, "time_s": timing.median}
        native = self.native()
        if native is not None:
            from ..backends.native_backend import NativeDevice
            from ..plan import plan
            from ..rules import Descent

            float32 = np.dtype(np.float32)
            source = NativeDevice.module_source(plan(Descent()), float32, float32, False)
            threaded = measure_steps(self.elapsed, lambda m: [native.copy(dst, src, source) for _ in range(m)],
                                          max(repeats, 5), 1, 0.0)
            result.update(gbps=2 * n * 4 / threaded.median / 1e9, time_s=threaded.median, np_copyto_gbps=gbps,
                          method=f"native copy, {native.cpu_threads} threads")
        return result


class CupyDevice:
    """A CUDA GPU through CuPy: CUDA events, memGetInfo, the default memory pool."""

    kind = "cupy"

    def __init__(self) -> None:
        import cupy

        self.xp = cupy
        self.cupy = cupy

    def _props(self) -> dict[str, Any]:
        cupy = self.cupy
        return cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)

    def name(self) -> str:
        name = self._props()["name"]
        return name.decode() if isinstance(name, bytes) else str(name)

    def info(self) -> dict[str, Any]:
        cupy = self.cupy
        props = self._props()
        info: dict[str, Any] = {
            "device_id": cupy.cuda.Device().id,
            "total_memory_bytes": int(props.get("totalGlobalMem", 0)),
            "compute_capability": f"{props.get('major')}.{props.get('minor')}",
            "multiprocessors": props.get("multiProcessorCount"),
        }
        for key, fn in (("cuda_runtime", cupy.cuda.runtime.runtimeGetVersion),
                        ("cuda_driver", cupy.cuda.runtime.driverGetVersion)):
            try:
                info[key] = fn()
            except Exception:  # noqa: BLE001 - informational only
                info[key] = None
        return info

    def sync(self) -> None:
        self.cupy.cuda.Device().synchronize()

    def elapsed(self, fn: Callable[[], None]) -> float:
        cuda = self.cupy.cuda
        self.sync()
        start, end = cuda.Event(), cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return cuda.get_elapsed_time(start, end) / 1e3

    def random(self, shape: Any, dtype: np.dtype, seed: int) -> Any:
        rs = self.cupy.random.RandomState(seed)
        if dtype == np.float16:
            return rs.standard_normal(shape, dtype=np.float32).astype(np.float16)
        return rs.standard_normal(shape, dtype=dtype)

    def free_bytes(self) -> int | None:
        self.release()
        free, _total = self.cupy.cuda.runtime.memGetInfo()
        return int(free) + int(self.cupy.get_default_memory_pool().free_bytes())

    def release(self, collect: bool = False) -> None:
        if collect:
            gc.collect()
        self.cupy.get_default_memory_pool().free_all_blocks()
        self.cupy.get_default_pinned_memory_pool().free_all_blocks()
        torch = sys.modules.get("torch")
        if torch is not None:
            try:
                if torch.cuda.is_initialized():
                    torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001 - best effort
                pass

    def copy_bandwidth(self, repeats: int) -> dict[str, Any]:
        """GB/s of a device-to-device copy of a 1 GiB buffer (bytes read + written): both
        cudaMemcpy and a plain copy kernel are timed, and the faster is the reference."""
        cupy = self.cupy
        nbytes = COPY_BYTES["cupy"]
        free = self.free_bytes()
        if free is not None:
            nbytes = min(nbytes, max((free - MEMORY_MARGIN) // 3, 1 << 20))
        n = nbytes // 4
        src = cupy.ones(n, dtype=cupy.float32)
        dst = cupy.zeros(n, dtype=cupy.float32)
        kernel = cupy.ElementwiseKernel("T x", "T y", "y = x", "gpuopt_bench_copy")
        memcpy = measure_steps(self.elapsed, lambda m: [dst.data.copy_from_device_async(src.data, n * 4)
                                                         for _ in range(m)], max(repeats, 10), 3, 0.0)
        copy_kernel = measure_steps(self.elapsed, lambda m: [kernel(src, dst) for _ in range(m)],
                                    max(repeats, 10), 3, 0.0)
        rates = {"cudaMemcpy": 2 * n * 4 / memcpy.median / 1e9,
                 "copy_kernel": 2 * n * 4 / copy_kernel.median / 1e9}
        best = max(rates, key=rates.get)
        return {"gbps": rates[best], "method": best, "memcpy_gbps": rates["cudaMemcpy"],
                "copy_kernel_gbps": rates["copy_kernel"], "buffer_bytes": n * 4,
                "time_s": (memcpy if best == "cudaMemcpy" else copy_kernel).median}


def torch_module(cuda: bool) -> Any:
    """PyTorch, if importable (and with CUDA when ``cuda``), else None."""
    try:
        import torch
    except Exception:  # noqa: BLE001 - an optional comparison
        return None
    if cuda:
        try:
            if not torch.cuda.is_available():
                return None
        except Exception:  # noqa: BLE001
            return None
    return torch


def torch_elapsed(torch: Any, device: Any) -> Callable[[Callable[[], None]], float]:
    if device.kind == "numpy":
        return device.elapsed

    def elapsed(fn: Callable[[], None]) -> float:
        device.sync()
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    return elapsed


def torch_view(torch: Any, array: Any) -> Any:
    """A PyTorch tensor sharing ``array``'s memory (DLPack on the GPU, from_numpy on the CPU)."""
    if isinstance(array, np.ndarray):
        return torch.from_numpy(array)
    return torch.from_dlpack(array)


def torch_variants(device: Any) -> list[tuple[str, dict[str, Any]]]:
    """(name, Adam keyword arguments) of the PyTorch baselines on this device."""
    if device.kind == "cupy":
        return [("torch_fused", {"fused": True}), ("torch_foreach", {"foreach": True})]
    return [("torch", {}), ("torch_fused", {"fused": True})]

