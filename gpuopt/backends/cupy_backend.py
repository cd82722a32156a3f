"""The CuPy device: generated modules compiled by NVRTC (``nvrtc.py``), loaded with
``cupy.RawModule``.

Modules are cached on their source text, which depends only on the chain's structure and
the dtypes; hyperparameter values are kernel arguments and never cause a compile. Compiled
modules are also kept in the per-user cache, so a new process loads rather than compiles.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from operator import attrgetter
from typing import Any

from .kernel_backend import MAX_BLOCKS, THREADS_PER_BLOCK, KernelBackend
from .nvrtc import cached_module_file, elementwise_options, target_arch
from .strided import StridedKernel

_COMPILING = threading.Lock()


class CupyDevice:
    """Kernels launched with CuPy, on the GPU that holds the arrays and the caller's stream:
    CuPy's current stream for CuPy arrays, PyTorch's current stream for torch tensors."""

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

    pointer = staticmethod(attrgetter("data.ptr"))

    @functools.cache  # noqa: B019 - one device object lives for the process
    def elementwise(self, kernel: StridedKernel) -> Callable[..., None]:
        # Compiled by CuPy, with the raw kernels' options but flush-to-zero (CuPy forces it).
        return self.xp.ElementwiseKernel(kernel.in_params, kernel.out_params, kernel.operation, kernel.name,
                                         preamble=kernel.preamble, options=elementwise_options(), no_return=True)

    # -- placement (kernel_backend.Placement) ---------------------------------------------

    device_of = staticmethod(attrgetter("data.device_id"))

    def caller_stream(self, framework: str, device: int) -> Any:
        if framework == "torch":
            # torch is imported: one of its tensors is being updated.
            return self._wrapped(sys.modules["torch"].cuda.current_stream(device))
        return self.xp.cuda.get_current_stream(device)

    @functools.lru_cache(maxsize=64)  # noqa: B019 - torch streams compare by handle: a handful
    def _wrapped(self, torch_stream: Any) -> Any:
        return self.xp.cuda.Stream.from_external(torch_stream)

    @staticmethod
    def is_capturing(stream: Any) -> bool:
        return bool(stream.is_capturing())

    def scope(self, device: int, stream: Any) -> contextlib.AbstractContextManager[Any]:
        cuda = self.xp.cuda
        same_device = cuda.runtime.getDevice() == device
        if same_device and (stream is None or stream.ptr == cuda.get_current_stream().ptr):
            return contextlib.nullcontext()  # (the common case, on every call: kept cheap)
        return self._switch(device, stream, same_device)

    @contextlib.contextmanager
    def _switch(self, device: int, stream: Any, same_device: bool) -> Iterator[None]:
        cuda = self.xp.cuda
        with contextlib.ExitStack() as stack:
            if not same_device:
                stack.enter_context(cuda.Device(device))
            if stream is not None:
                stack.enter_context(stream)
            yield

    def follow(self, earlier: Any, stream: Any) -> None:
        stream.wait_event(earlier.record())

    @staticmethod
    def upload(target: Any, host: Any) -> None:
        # An asynchronous copy on the current stream; the driver stages pageable memory
        # before returning, so the host buffer may change right after.
        target.data.copy_from_host_async(host.ctypes.data, host.nbytes)

    # -- what reports say about it (the benchmark) ---------------------------------------

    def describe(self) -> dict[str, Any]:
        """The current GPU: its name, memory, compute capability, multiprocessors, CUDA versions."""
        runtime = self.xp.cuda.runtime
        props = runtime.getDeviceProperties(self.xp.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        return {"name": name, "total_memory_bytes": int(props.get("totalGlobalMem", 0)),
                "compute_capability": f"{props.get('major')}.{props.get('minor')}",
                "multiprocessors": props.get("multiProcessorCount"),
                "cuda_runtime": runtime.runtimeGetVersion(), "cuda_driver": runtime.driverGetVersion()}

    def copies(self, dst: Any, src: Any) -> dict[str, Callable[[], None]]:
        """``dst[...] = src`` (contiguous, the same size) each way the GPU copies memory, by name:
        the reference for a memory-bound kernel's bandwidth."""
        kernel = self.xp.ElementwiseKernel("T x", "T y", "y = x", "gpuopt_copy")
        return {"cudaMemcpy": lambda: dst.data.copy_from_device_async(src.data, src.nbytes),
                "copy kernel": lambda: kernel(src, dst)}


@functools.cache
def _backend() -> KernelBackend:
    return KernelBackend(CupyDevice())


def __getattr__(name: str) -> Any:
    # BACKEND is made on first use: importing this module (for CupyDevice) never imports CuPy.
    if name == "BACKEND":
        return _backend()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
