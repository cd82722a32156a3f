"""The CuPy device's placement logic (which GPU and stream are made current, whose stream a
torch tensor's work goes on), run against a stand-in for ``cupy.cuda`` so it is checked on
machines without a GPU. The real thing runs in test_gpu.py."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest

from gpuopt.backends.cupy_backend import CupyDevice


class FakeStream:
    def __init__(self, cuda, ptr, capturing=False):
        self.cuda, self.ptr, self.capturing = cuda, ptr, capturing
        self.waited = []

    def __enter__(self):
        self.cuda.stack.setdefault(self.cuda.device, []).append(self)
        return self

    def __exit__(self, *exc):
        self.cuda.stack[self.cuda.device].pop()

    def is_capturing(self):
        return self.capturing

    def record(self):
        return ("event on", self.ptr)

    def wait_event(self, event):
        self.waited.append(event)


class FakeCuda:
    def __init__(self):
        self.device = 0
        self.stack = {}
        self.null = {d: FakeStream(self, 0) for d in (0, 1)}
        self.runtime = SimpleNamespace(getDevice=lambda: self.device)
        self.Stream = SimpleNamespace(from_external=lambda s: FakeStream(self, s.cuda_stream))

    def get_current_stream(self, device=-1):
        device = self.device if device == -1 else device
        return (self.stack.get(device) or [self.null[device]])[-1]

    def Device(self, device):  # noqa: N802 - cupy's name
        cuda = self

        class Switch:
            def __enter__(self):
                self.saved, cuda.device = cuda.device, device

            def __exit__(self, *exc):
                cuda.device = self.saved

        return Switch()


@pytest.fixture
def device():
    d = CupyDevice.__new__(CupyDevice)  # without CuPy itself: the stand-in is its array module
    d.xp = SimpleNamespace(cuda=FakeCuda())
    return d


def test_scope_switches_only_what_differs(device):
    cuda = device.xp.cuda
    current = cuda.get_current_stream()
    with device.scope(0, current):
        assert cuda.stack == {}  # nothing entered: already current
    side = FakeStream(cuda, 7)
    with device.scope(1, side):
        assert cuda.device == 1 and cuda.get_current_stream() is side
    assert cuda.device == 0 and cuda.get_current_stream() is current
    with device.scope(1, None):
        assert cuda.device == 1
    assert cuda.device == 0


def test_callers_stream_cupy_and_torch(device, monkeypatch):
    cuda = device.xp.cuda
    mine = FakeStream(cuda, 5)
    with mine:
        assert device.caller_stream("cupy", 0) is mine
    assert device.caller_stream("cupy", 1) is cuda.null[1]

    class TorchStream:
        def __init__(self, handle, index):
            self.cuda_stream, self.index = handle, index

        def __eq__(self, other):
            return (self.cuda_stream, self.index) == (other.cuda_stream, other.index)

        def __hash__(self):
            return hash((self.cuda_stream, self.index))

    asked = []

    def current_stream(index):
        asked.append(index)
        return TorchStream(1000 + index, index)

    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=SimpleNamespace(current_stream=current_stream)))
    first = device.caller_stream("torch", 1)
    assert first.ptr == 1001 and asked == [1]
    assert device.caller_stream("torch", 1) is first  # one wrapper per torch stream


def test_capture_follow_and_upload(device):
    cuda = device.xp.cuda
    assert device.is_capturing(FakeStream(cuda, 3, capturing=True))
    assert not device.is_capturing(FakeStream(cuda, 3))
    earlier, later = FakeStream(cuda, 1), FakeStream(cuda, 2)
    device.follow(earlier, later)
    assert later.waited == [("event on", 1)]
    copies = []
    target = SimpleNamespace(data=SimpleNamespace(copy_from_host_async=lambda *a: copies.append(a)))
    host = np.arange(6, dtype=np.uint64)
    device.upload(target, host)
    assert copies == [(host.ctypes.data, 48)]


def test_placement_reads_the_arrays_device_and_address(device):
    array = SimpleNamespace(data=SimpleNamespace(ptr=1234, device_id=1))
    assert device.device_of(array) == 1 and device.pointer(array) == 1234
