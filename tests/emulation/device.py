"""A Device for gpuopt's kernel backend that runs the generated CUDA text on the CPU.

The module source is compiled, byte for byte as NVRTC would get it, by g++ with a header
(cuda_shim.h) standing in for the CUDA built-ins; NumPy arrays stand in for device memory.
The host logic of the kernel backend (tables, chunking, launch counts) runs as is.

Two builds of every module:
- ``checked`` (in-process): -fsanitize=alignment, so a misaligned vector access fails the
  launch with an error naming the kernel, as it would fault on a GPU;
- ``sanitized`` (run in a subprocess with the ASan runtime preloaded, see sanitized_run.py):
  -fsanitize=address,undefined, so any read or write outside an allocation aborts the run.

Builds go through gpuopt's own cached builder (gpuopt/backends/cxx_build.py) into
``build/emulation`` in the checkout (``$GPUOPT_EMULATION_CACHE`` overrides), keyed on every
input: the module text, the shim and stand-in headers, the flags and the compiler's version.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gpuopt.backends import cxx_build
from gpuopt.backends.kernel_backend import MAX_BLOCKS, THREADS_PER_BLOCK
from gpuopt.backends.strided import StridedKernel, wrapped_source

HERE = Path(__file__).resolve().parent
INCLUDE = HERE / "include"
_CTYPES = {
    np.dtype(np.int32): ctypes.c_int32,
    np.dtype(np.int64): ctypes.c_int64,
    np.dtype(np.float32): ctypes.c_float,
    np.dtype(np.float64): ctypes.c_double,
}
_FLAGS = [
    "-std=c++20", "-O1", "-fPIC", "-pthread", "-fno-omit-frame-pointer",
    "-ffp-contract=off",  # as NumPy: no fused multiply-add
    "-Wall", "-Wno-unknown-pragmas", "-Werror=return-type",
]
MODES = {
    "checked": (["-fsanitize=alignment"], []),  # (compile flags, link flags)
    "sanitized": (
        ["-DGPUOPT_SANITIZE", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
        ["-fsanitize=address,undefined"],
    ),
}


class EmulatedKernelError(RuntimeError):
    """An emulated kernel did something a GPU would fault on or get wrong."""


def cache_dir() -> Path:
    return Path(os.environ.get("GPUOPT_EMULATION_CACHE") or HERE.parents[1] / "build" / "emulation")


def compiler() -> str | None:
    return cxx_build.find_compiler()


def _shim(mode: str) -> Path:
    """cuda_shim.h with a precompiled copy beside it: the standard headers it pulls in cost
    more to parse than a whole kernel module."""
    cxx = compiler()
    flags = [*_FLAGS, *MODES[mode][0]]
    command = [cxx, *flags, "-x", "c++-header", "cuda_shim.h", "-o", "cuda_shim.h.gch"]
    return cxx_build.build([command], {"cuda_shim.h": (HERE / "cuda_shim.h").read_text()}, cache_dir()) / "cuda_shim.h"


def build(source: str, mode: str = "checked") -> Path:
    """Compile a module's source for the CPU (cached on every input); returns the library."""
    cxx = compiler()
    compile_flags, link_flags = MODES[mode]
    entries = "\n".join(_entry_points(source))
    files = {"module.cu": source, "entry.cpp": f'#include "module.cu"\n{entries}\n'}
    commands = [
        [cxx, *_FLAGS, *compile_flags, "-include", str(_shim(mode)), "-I", str(INCLUDE), "-c", "entry.cpp",
         "-o", "module.o"],
        [cxx, "-shared", "-pthread", *link_flags, "module.o", "-o", "module.so"],
    ]
    return cxx_build.build(commands, files, cache_dir(), inputs=[INCLUDE]) / "module.so"


def _entry_points(source: str) -> list[str]:
    """One C entry per kernel, inside the same #ifdef as the kernel itself."""
    entries, conditions = [], []
    for line in source.splitlines():
        if line.startswith("#if"):
            conditions.append(line)
        elif line.startswith("#endif"):
            conditions.pop()
        found = re.match(r'extern "C" __global__ void (\w+)\(', line)
        if found:
            k = found.group(1)
            entry = (f'extern "C" int emulate_{k}(unsigned g, unsigned b, unsigned w, void** argv, char* e, '
                     f'std::size_t n) {{ return gpuopt_emulate({k}, g, b, w, argv, e, n); }}')
            entries.append("\n".join([*conditions, entry, *["#endif"] * len(conditions)]))
    return entries


class EmulatedDevice:
    """Runs kernels on the CPU: NumPy arrays are the device memory.

    The default shape is small (8 threads, at most 3 blocks) so grid-stride loops and
    cross-block sums are exercised on small arrays; ``production()`` has the GPU's shape.
    """

    xp = np

    def __init__(self, threads: int = 8, max_blocks: int = 3, workers: int = 4, mode: str = "checked") -> None:
        self.threads, self.max_blocks, self.workers, self.mode = threads, max_blocks, workers, mode
        self._libraries: dict[str, ctypes.CDLL] = {}
        self._lock = threading.Lock()
        self.launched: list[str] = []

    @classmethod
    def production(cls, **options: Any) -> EmulatedDevice:
        """The CuPy backend's launch shape: its threads per block and block limit."""
        return cls(threads=THREADS_PER_BLOCK, max_blocks=MAX_BLOCKS, **options)

    def _library(self, source: str) -> ctypes.CDLL:
        with self._lock:
            library = self._libraries.get(source)
            if library is None:
                library = self._libraries[source] = ctypes.CDLL(str(build(source, self.mode)))
            return library

    def kernel(self, source: str, name: str) -> Callable[[int, int, Sequence[Any]], None]:
        entry = getattr(self._library(source), f"emulate_{name}")
        entry.restype = ctypes.c_int

        def launch(blocks: int, threads: int, args: Sequence[Any]) -> None:
            holders = []
            for arg in args:
                if isinstance(arg, np.ndarray):
                    holders.append(ctypes.c_void_p(arg.ctypes.data))
                else:
                    holders.append(_CTYPES[np.dtype(type(arg))](arg))
            argv = (ctypes.c_void_p * len(holders))(*[ctypes.cast(ctypes.pointer(h), ctypes.c_void_p) for h in holders])
            error = ctypes.create_string_buffer(512)
            with self._lock:
                self.launched.append(name)
            failed = entry(ctypes.c_uint(blocks), ctypes.c_uint(threads), ctypes.c_uint(self.workers), argv, error,
                           ctypes.c_size_t(len(error)))
            if failed:
                raise EmulatedKernelError(f"{name} ({blocks} blocks of {threads}): {error.value.decode()}")

        return launch

    def elementwise(self, kernel: StridedKernel) -> Callable[..., None]:
        """A ``cupy.ElementwiseKernel`` as the stand-in runs it: its operation, in the kernel
        :func:`~gpuopt.backends.strided.wrapped_source` prints, over contiguous copies of the
        arrays (where CuPy indexes each array by its strides), the outputs then written back."""
        launch = self.kernel(wrapped_source(kernel), kernel.name)
        outputs = len(kernel.out_params.split(", "))

        def call(*args: Any) -> None:
            arrays = [a for a in args if isinstance(a, np.ndarray)]
            if len({a.shape for a in arrays}) != 1:
                raise EmulatedKernelError(f"{kernel.name}: arrays of different shapes {[a.shape for a in arrays]}")
            copies = [np.ascontiguousarray(a) if isinstance(a, np.ndarray) else a for a in args]
            n = arrays[0].size
            launch(max(1, min(self.max_blocks, -(-n // self.threads))), self.threads, [np.int64(n), *copies])
            for original, copy in zip(args[-outputs:], copies[-outputs:]):
                if copy is not original:
                    original[...] = copy

        return call

    @staticmethod
    def pointer(array: np.ndarray) -> int:
        return array.ctypes.data
