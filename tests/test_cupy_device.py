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


# -- the benchmark on a GPU: timed through the backend's own device ---------------------------


class FakeCupy:
    """Enough of CuPy for the benchmark's Machine: NumPy arrays with a ``.data`` copy, events
    that report 0.5 ms, one GPU's properties, memory pools that count their releases."""

    def __init__(self):
        self.log = []
        log = self.log

        class Event:
            def record(self):
                log.append("record")

            def synchronize(self):
                log.append("event sync")

        class Gpu:
            id = 0

            def synchronize(self):
                log.append("device sync")

        props = {"name": b"Fake GPU", "totalGlobalMem": 80 << 30, "major": 9, "minor": 0, "multiProcessorCount": 132}
        self.cuda = SimpleNamespace(
            Event=Event, Device=Gpu, get_elapsed_time=lambda start, end: 0.5,
            runtime=SimpleNamespace(getDeviceProperties=lambda i: props, runtimeGetVersion=lambda: 13000,
                                    driverGetVersion=lambda: 13000))
        self.random = SimpleNamespace(RandomState=lambda seed: np.random.default_rng(seed))
        pool = SimpleNamespace(free_all_blocks=lambda: log.append("pool freed"))
        self.get_default_memory_pool = lambda: pool

    def ones(self, n, dtype):
        return self._device_array(np.ones(n, dtype))

    def zeros(self, n, dtype):
        return self._device_array(np.zeros(n, dtype))

    def _device_array(self, host):
        array = SimpleNamespace(host=host, nbytes=host.nbytes)
        array.data = SimpleNamespace(copy_from_device_async=lambda src, nbytes: np.copyto(host, src.array.host))
        array.data.array = array
        return array

    def ElementwiseKernel(self, *args):  # noqa: N802 - cupy's name
        self.log.append(("compiled", args[-1]))
        return lambda src, dst: np.copyto(dst.host, src.host)


def test_the_benchmark_times_the_gpu_through_the_backends_own_device(monkeypatch):
    from gpuopt.backends import backend_override
    from gpuopt.backends.kernel_backend import KernelBackend
    from gpuopt.bench.devices import COPY_BYTES, Machine

    monkeypatch.setitem(COPY_BYTES, "cupy", 1 << 12)
    device = CupyDevice.__new__(CupyDevice)
    device.xp = FakeCupy()
    with backend_override("cupy", KernelBackend(device)):
        machine = Machine("cupy")
    assert machine.device is device and machine.xp is device.xp  # no second device
    assert machine.describe()["name"] == "Fake GPU" and machine.describe()["compute_capability"] == "9.0"
    ran = []
    assert machine.elapsed(lambda: ran.append(1)) == 0.5e-3 and ran == [1]
    assert device.xp.log[:4] == ["device sync", "record", "record", "event sync"]
    copy = machine.copy_bandwidth(repeats=1)
    assert set(copy["gbps_by_method"]) == {"cudaMemcpy", "copy kernel"}
    assert copy["gbps"] == max(copy["gbps_by_method"].values()) and copy["buffer_bytes"] == 1 << 12
    assert machine.random(5, np.dtype(np.float16), seed=1).dtype == np.float16
    machine.release()
    assert device.xp.log[-1] == "pool freed"


@pytest.mark.parametrize("make", ["noop", "cupy", "native"])
def test_every_device_implements_the_kernel_backends_device_protocol(make):
    from gpuopt.backends.kernel_backend import Device
    from gpuopt.backends.native_backend import NativeDevice
    from gpuopt.backends.noop import NoopDevice

    if make == "cupy":
        device = CupyDevice.__new__(CupyDevice)
        device.xp = FakeCupy()
    else:
        device = NoopDevice() if make == "noop" else NativeDevice("c++")
    members = set(Device.__annotations__) | {name for name in vars(Device) if not name.startswith("_")}
    assert {"xp", "threads", "max_blocks", "kernel", "pointer"} <= members
    assert all(hasattr(device, name) for name in members), members - set(dir(device))
