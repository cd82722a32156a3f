"""Where the kernel backend puts work, checked on the CPU with fake GPUs and streams: state and
launches on each parameter's GPU, launches on the caller's stream, and a clear error (with
nothing changed) when that stream is capturing a CUDA graph."""

from __future__ import annotations

import numpy as np
import pytest

import gpuopt
from gpuopt.backends import backend_override
from gpuopt.backends.kernel_backend import GraphCaptureError, KernelBackend

from .fake_gpus import FakeGpus


@pytest.fixture
def gpus():
    device = FakeGpus(count=2)
    with backend_override("numpy", KernelBackend(device)):
        yield device


def _model(gpus, sizes_and_gpus):
    params = [gpus.array(np.ones(n), gpu) for n, gpu in sizes_and_gpus]
    grads = [gpus.array(np.full(n, 0.5), gpu) for n, gpu in sizes_and_gpus]
    return params, grads


@pytest.mark.parametrize("factory", [gpuopt.ADAM, lambda: gpuopt.Optimiser(gpuopt.ClipNorm(1.0), gpuopt.ADAM())])
def test_state_and_launches_on_each_parameters_gpu(gpus, factory):
    params, grads = _model(gpus, [(100, 1), (7, 0), (3000, 1), (5, 0)])
    opt = factory()
    for step in range(3):  # the full path, then the prepared one
        gpus.launched.clear()
        gpuopt.update(opt, params, grads)
        assert {launch.device for launch in gpus.launched} == {0, 1}, f"step {step}"
        for launch in gpus.launched:  # every table and buffer it reads is on its own GPU
            assert launch.arrays_on <= {launch.device}, (launch, step)
    for p in params:
        for leaf in opt.leaves():
            state = leaf.state_for(p)
            if state.slots is not None:
                assert state.slots.gpu == p.gpu
    assert FakeGpus.current_device == 0  # the caller's current GPU is left as it was


def test_single_array_and_apply_on_its_gpu(gpus):
    x, g = gpus.array(np.ones(50), 1), gpus.array(np.ones(50), 1)
    opt = gpuopt.Momentum()
    gpuopt.update(opt, x, g)
    assert [launch.device for launch in gpus.launched] == [1]
    assert opt.state_for(x).slots.gpu == 1
    out = gpuopt.apply(gpuopt.ADAM(), x, g)
    assert out.gpu == 1 and gpus.launched[-1].device == 1


def test_launches_go_on_the_callers_stream(gpus):
    params, grads = _model(gpus, [(100, 0), (30, 0)])
    opt = gpuopt.ADAM()
    for _ in range(2):
        gpuopt.update(opt, params, grads)
    assert {launch.stream.name for launch in gpus.launched} == {"numpy:0"}
    # The caller moves to another stream: the prepared launches follow it there, after the
    # work already queued on the old one (the tables and state were last used there).
    old = gpus.streams[("", 0)]
    new = gpus.streams[("", 0)] = type(old)("numpy:0 other")
    gpus.launched.clear()
    gpuopt.update(opt, params, [gpus.array(np.ones(n), 0) for n in (100, 30)])  # new gradients
    assert {launch.stream.name for launch in gpus.launched} == {"numpy:0 other"}
    assert gpus.followed == [(old, new)]
    assert gpus.uploads[-1] == (0, new)  # the new gradient column, uploaded on the new stream


def test_torch_tensors_use_torchs_stream(gpus):
    torch = pytest.importorskip("torch")
    params = [torch.nn.Parameter(torch.ones(10)), torch.nn.Parameter(torch.ones(20))]
    opt = gpuopt.ADAM()
    for _ in range(3):
        gpuopt.update(opt, params, [torch.ones(10), torch.ones(20)])
    assert {launch.stream.name for launch in gpus.launched} == {"torch:0"}


def test_state_output_and_loaded_state_are_made_on_torchs_stream(gpus, tmp_path):
    """What the API layer itself queues (new state and MixedPrecision's master copy, apply's
    output, a loaded checkpoint's state) goes to the stream the updates run on: a PyTorch side
    stream does not wait for CuPy's, so state filled there could be read before it is written."""
    torch = pytest.importorskip("torch")
    params = [torch.nn.Parameter(torch.ones(n, dtype=torch.float16)) for n in (10, 20)]
    opt = gpuopt.MixedPrecision(gpuopt.ADAM())
    gpuopt.update(opt, params, [torch.ones(10, dtype=torch.float16), torch.ones(20, dtype=torch.float16)])
    torch_stream = gpus.streams[("torch", 0)]
    assert gpus.allocations and set(gpus.allocations) == {(0, torch_stream)}
    gpus.allocations.clear()
    gpuopt.apply(gpuopt.ADAM(), params[0], torch.ones(10, dtype=torch.float16))
    gpuopt.save_state(opt, params, tmp_path / "state.npz")
    gpuopt.load_state(opt, params, tmp_path / "state.npz")
    assert len(gpus.allocations) >= 1 + 2 and set(gpus.allocations) == {(0, torch_stream)}
    assert gpus.current_stream is None  # the caller's current stream is left as it was


@pytest.mark.parametrize("query_fails", [False, True])
@pytest.mark.parametrize("prepared", [False, True])
def test_update_during_graph_capture_raises_and_changes_nothing(gpus, prepared, query_fails):
    params, grads = _model(gpus, [(100, 0), (30, 0)])
    opt = gpuopt.Optimiser(gpuopt.ExpDecay(0.1, 0.5, 1), gpuopt.ADAM())
    gpuopt.update(opt, params, grads)
    if prepared:
        gpuopt.update(opt, params, grads)
        assert "_prepared" in vars(opt)
    before = [p.copy() for p in params]
    states = [(leaf.state_for(p).t, leaf.state_for(p).slots.copy() if leaf.state else None)
              for leaf in opt.leaves() for p in params]
    eta = opt[0].eta
    launches = len(gpus.launched)
    stream = gpus.streams[("", 0)]
    stream.capturing, stream.query_fails = not query_fails, query_fails
    with pytest.raises(GraphCaptureError, match="CUDA graph"):
        gpuopt.update(opt, params, grads)
    fresh = gpus.array(np.ones(8), 0)
    with pytest.raises(GraphCaptureError, match="params"):
        gpuopt.update(opt, [fresh], [gpus.array(np.ones(8), 0)])
    assert len(gpus.launched) == launches
    assert opt[0].eta == eta  # the schedule did not run
    assert opt.leaves()[1].state_for(fresh) is None
    for p, b in zip(params, before):
        np.testing.assert_array_equal(p, b)
    after = [(leaf.state_for(p).t, leaf.state_for(p).slots if leaf.state else None)
             for leaf in opt.leaves() for p in params]
    for (t0, s0), (t1, s1) in zip(states, after):
        assert t0 == t1 and (s0 is None or np.array_equal(s0, s1))
    stream.capturing = stream.query_fails = False
    gpuopt.update(opt, params, grads)  # outside capture it runs again
    assert opt.leaves()[1].state_for(params[0]).t == 3 - (not prepared)


def test_graph_capture_error_is_exported():
    assert gpuopt.GraphCaptureError is GraphCaptureError
    assert issubclass(GraphCaptureError, RuntimeError)
