"""A kernel-backend device standing in for several GPUs and their streams, on the CPU.

Nothing is computed: arrays are NumPy memory tagged with the GPU they were made on, streams
are plain objects that may say they are capturing a graph, and every launch and upload is
recorded with the GPU and stream current at that moment, so tests can check where work went.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from gpuopt.backends.noop import NoopDevice


class OnGpu(np.ndarray):
    """NumPy memory that remembers which fake GPU holds it (views inherit it)."""

    gpu: int

    def __array_finalize__(self, obj: Any) -> None:
        self.gpu = getattr(obj, "gpu", FakeGpus.current_device)


@dataclass(eq=False)
class FakeStream:
    name: str
    capturing: bool = False
    query_fails: bool = False  # as CUDA refuses the query on the legacy stream while another captures


@dataclass
class Launch:
    name: str
    device: int
    stream: FakeStream | None
    arrays_on: set[int] = field(default_factory=set)  # GPUs holding the launch's array arguments


class FakeGpus(NoopDevice):
    current_device = 0  # class-wide, as the CUDA current device is per thread (tests run on one)

    def __init__(self, count: int = 2) -> None:
        super().__init__()
        self.count = count
        self.current_stream: FakeStream | None = None
        self.streams: dict[tuple[str, int], FakeStream] = {}
        self.launched: list[Launch] = []
        self.uploads: list[tuple[int, FakeStream | None]] = []
        self.followed: list[tuple[FakeStream, FakeStream]] = []
        self.allocations: list[tuple[int, FakeStream | None]] = []  # the GPU and stream current at each
        self.xp = SimpleNamespace(
            empty=lambda shape, dtype=np.float32: self._allocated(np.empty(shape, dtype)),
            zeros=lambda shape, dtype=np.float32: self._allocated(np.zeros(shape, dtype)),
            asarray=lambda a: np.array(a).view(OnGpu),
            ascontiguousarray=np.ascontiguousarray,
        )
        FakeGpus.current_device = 0

    def _allocated(self, memory: np.ndarray) -> OnGpu:
        self.allocations.append((FakeGpus.current_device, self.current_stream))
        return memory.view(OnGpu)

    def array(self, values: Any, gpu: int) -> OnGpu:
        with self.scope(gpu, None):
            return np.array(values, dtype=np.float32).view(OnGpu)

    @staticmethod
    def pointer(array: Any) -> int:
        return array.ctypes.data

    def kernel(self, source: str, name: str) -> Any:
        def launch(blocks: int, threads: int, args: Any) -> None:
            on = {a.gpu for a in args if isinstance(a, OnGpu)}
            self.launched.append(Launch(name, FakeGpus.current_device, self.current_stream, on))

        return launch

    # -- placement ----------------------------------------------------------------------

    @staticmethod
    def device_of(array: Any) -> int:
        return getattr(array, "gpu", 0)

    def caller_stream(self, framework: str, device: int) -> FakeStream:
        key = (framework, device)
        if key not in self.streams:
            self.streams[key] = FakeStream(f"{framework or 'numpy'}:{device}")
        return self.streams[key]

    @staticmethod
    def is_capturing(stream: FakeStream) -> bool:
        if stream.query_fails:
            raise RuntimeError("cudaErrorStreamCaptureImplicit")
        return stream.capturing

    @contextlib.contextmanager
    def scope(self, device: int, stream: Any) -> Iterator[None]:
        assert 0 <= device < self.count, f"no GPU {device}"
        saved = FakeGpus.current_device, self.current_stream
        FakeGpus.current_device = device
        if stream is not None:
            self.current_stream = stream
        try:
            yield
        finally:
            FakeGpus.current_device, self.current_stream = saved

    def follow(self, earlier: FakeStream, stream: FakeStream) -> None:
        self.followed.append((earlier, stream))

    def upload(self, target: Any, host: np.ndarray) -> None:
        assert self.device_of(target) == FakeGpus.current_device
        np.copyto(target, host)
        self.uploads.append((FakeGpus.current_device, self.current_stream))
