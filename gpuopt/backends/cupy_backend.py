"""The CuPy device: generated modules compiled by NVRTC (``nvrtc.py``), loaded with
``cupy.RawModule``.

Modules are cached on their source text, which depends only on the chain's structure and
the dtypes; hyperparameter values are kernel arguments and never cause a compile. Compiled
modules are also kept in the per-user cache, so a new process loads rather than compiles.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from typing import Any

from .kernel_backend import MAX_BLOCKS, THREADS_PER_BLOCK, KernelBackend
from .nvrtc import cached_module_file, target_arch

_COMPILING = threading.Lock()


class CupyDevice:
    """Kernels launched on the current CUDA device with CuPy."""

    threads = THREADS_PER_BLOCK
    max_blocks = MAX_BLOCKS

    def __init__(self) -> None:
        import cupy

        self.xp = cupy
        self.compiles = 0  # modules compiled by this process (tests check eta never adds one)

    def _module(self, source: str, gpu: int) -> Any:
        modules = self.__dict__.setdefault("_modules", {})
        module = modules.get((source, gpu))
        if module is None:
            with _COMPILING:  # threads asking for one new module compile and load it once
                module = modules.get((source, gpu))
                if module is None:
                    self.compiles += 1
                    capability = int(self.xp.cuda.Device(gpu).compute_capability)
                    arch, binary = target_arch(capability, prefer_cupy=True)
                    module = modules[(source, gpu)] = self.xp.RawModule(
                        path=str(cached_module_file(source, arch, binary, prefer_cupy=True)))
        return module

    @functools.cache  # noqa: B019 - looked up on every launch
    def _function(self, source: str, name: str, gpu: int) -> Any:
        return self._module(source, gpu).get_function(name)  # loaded on the current GPU

    def kernel(self, source: str, name: str) -> Callable[[int, int, Sequence[Any]], None]:
        function = self._function(source, name, self.xp.cuda.runtime.getDevice())
        return lambda blocks, threads, args: function((blocks,), (threads,), tuple(args))

    @staticmethod
    def pointer(array: Any) -> int:
        return array.data.ptr


@functools.cache
def _backend() -> KernelBackend:
    return KernelBackend(CupyDevice())


def __getattr__(name: str) -> Any:
    # BACKEND is made on first use: importing this module (for CupyDevice) never imports CuPy.
    if name == "BACKEND":
        return _backend()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
