"""The CuPy device: generated modules compiled by NVRTC through ``cupy.RawModule``.

Modules are cached on their source text, which depends only on the chain's structure and
the dtypes; hyperparameter values are kernel arguments and never cause a compile.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from .cuda_source import NVRTC_OPTIONS, cuda_include_options
from .kernel_backend import KernelBackend


class CupyDevice:
    """Kernels launched on the current CUDA device with CuPy."""

    threads = 256
    max_blocks = 1 << 20

    def __init__(self) -> None:
        import cupy

        self.xp = cupy
        self.compiles = 0  # modules compiled by this process (tests check eta never adds one)

    @functools.cache  # noqa: B019 - one device object lives for the process
    def _module(self, source: str) -> Any:
        self.compiles += 1
        return self.xp.RawModule(code=source, options=NVRTC_OPTIONS + cuda_include_options())

    @functools.cache  # noqa: B019 - looked up on every launch
    def _function(self, source: str, name: str, gpu: int) -> Any:
        return self._module(source).get_function(name)  # loaded on the current GPU

    def kernel(self, source: str, name: str) -> Callable[[int, int, Sequence[Any]], None]:
        function = self._function(source, name, self.xp.cuda.runtime.getDevice())
        return lambda blocks, threads, args: function((blocks,), (threads,), tuple(args))

    @staticmethod
    def pointer(array: Any) -> int:
        return array.data.ptr


BACKEND = KernelBackend(CupyDevice())
