"""CuPy on a real GPU: the same rules, chains and dtypes as NumPy, launch counts, zero-copy
PyTorch tensors. Skipped where no GPU is usable (CI); run on a lent device."""

from __future__ import annotations

import numpy as np
import pytest

import gpuopt
from gpuopt.dispatch import gpu_available

from .cases import ALL, CHAINS, RULES
from .paths import counted_paths

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a usable CUDA GPU"),
]

TOLERANCE = {"float16": 2e-3, "float32": 1e-5, "float64": 1e-12}
SIZES = [1001, 7, 0, 70001, 3, 1]


def _run(factory, dtype, xp, collection, steps=20, seed=0):
    opt = factory()
    rng = np.random.default_rng(seed)
    host = [rng.standard_normal(n + 1).astype(dtype) for n in SIZES]
    params = [xp.asarray(h)[1:] for h in host]  # one element in: misaligned views
    if not collection:
        params = params[:1]
    grads = None
    for _ in range(steps):
        fresh = [xp.asarray((2 * rng.standard_normal(p.shape)).astype(dtype)) for p in params]
        if grads is None or not collection:
            grads = fresh
        else:  # a collection reuses its gradient arrays, as PyTorch's .grad: the prepared path
            for g, f in zip(grads, fresh):
                g[...] = f
        gpuopt.update(opt, params if collection else params[0], grads if collection else grads[0])
    return [np.asarray(p.get() if hasattr(p, "get") else p) for p in params]


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("case", list(ALL))
def test_cupy_matches_numpy(case, dtype):
    import cupy

    tol = TOLERANCE[dtype]
    for collection in (False, True):
        gpu = _run(ALL[case], dtype, cupy, collection)
        cpu = _run(ALL[case], dtype, np, collection)
        for a, b in zip(gpu, cpu):
            assert a.dtype == b.dtype
            np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=tol, atol=tol * 1e-2,
                                       err_msg=f"{case} collection={collection}")


@pytest.mark.parametrize("case", list(ALL))
def test_one_array_and_collection_identical_on_gpu(case):
    import cupy

    for factory in (ALL[case],):
        rng = np.random.default_rng(1)
        params = [cupy.asarray(rng.standard_normal(n).astype(np.float32)) for n in (5000, 13, 70001)]
        singles = [p.copy() for p in params]
        together, alone = factory(), factory()
        for _ in range(5):
            grads = [cupy.asarray(rng.standard_normal(p.shape).astype(np.float32)) for p in params]
            gpuopt.update(together, params, grads)
            for p, g in zip(singles, grads):
                gpuopt.update(alone, p, g)
        for a, b in zip(params, singles):
            assert bool(cupy.array_equal(a, b))


def test_fused_chain_equals_rules_one_by_one_on_gpu():
    import cupy

    rng = np.random.default_rng(2)
    x = cupy.asarray(rng.standard_normal(3000))
    y = x.copy()
    rules = [gpuopt.ClipValue(0.7), gpuopt.WeightDecay(1e-2), gpuopt.ClipNorm(10.0), gpuopt.ADAM(0.01)]
    chain = gpuopt.Optimiser(*[type(r)(**r.hyperparameters()) for r in rules])
    for _ in range(10):
        g = cupy.asarray(rng.standard_normal(3000))
        gpuopt.update(chain, x, g)
        d = g
        for rule in rules:
            d = gpuopt.apply(rule, y, d)
        y -= d
    np.testing.assert_allclose(x.get(), y.get(), rtol=1e-12)


@pytest.mark.parametrize(
    "factory, single",
    [(RULES["ADAM"], 1), (CHAINS["ClipValue+WeightDecay+ADAM"], 1), (CHAINS["ClipNorm+ADAM"], 2)],
)
def test_launch_counts_on_gpu(factory, single):
    import cupy

    opt = factory()
    x, g = cupy.ones(1 << 20, cupy.float32), cupy.full(1 << 20, 0.5, cupy.float32)
    gpuopt.update(opt, x, g)
    with gpuopt.count_launches() as counter:
        gpuopt.update(opt, x, g)
    assert counter.launches == single
    params = [cupy.ones(n * 100, cupy.float32) for n in range(1, 151)]
    grads = [cupy.full(p.shape, 0.5, cupy.float32) for p in params]
    gpuopt.update(opt, params, grads)
    with gpuopt.count_launches() as counter:
        gpuopt.update(opt, params, grads)
    assert counter.launches == single  # 150 tensors: still one update launch (+ reduction)


def test_changing_eta_compiles_nothing():
    import cupy

    from gpuopt.backends.cupy_backend import BACKEND

    opt = gpuopt.ADAM()
    x, g = cupy.ones(1000, cupy.float32), cupy.ones(1000, cupy.float32)
    gpuopt.update(opt, x, g)
    compiles = BACKEND.device.compiles
    before = x.copy()
    opt.eta = 0.5
    gpuopt.update(opt, x, g)
    assert BACKEND.device.compiles == compiles
    assert float(cupy.abs(x - before).max()) > 0.1  # the new eta was used


def test_torch_cuda_tensor_updated_in_place_without_copy():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    x = torch.ones(4096, device="cuda")
    g = torch.full((4096,), 0.5, device="cuda")
    pointer = x.data_ptr()
    opt = gpuopt.Descent(0.1)
    gpuopt.update(opt, x, g)
    torch.cuda.synchronize()
    assert x.data_ptr() == pointer
    assert torch.allclose(x, torch.full_like(x, 0.95))
    gpuopt.update(opt, x, g)  # state is keyed on the tensor itself, across calls
    torch.cuda.synchronize()
    assert torch.allclose(x, torch.full_like(x, 0.9))
    adam = gpuopt.ADAM()
    for _ in range(3):
        gpuopt.update(adam, x, g)
    assert adam.state_for(x).t == 3


def test_backends_differ_is_a_type_error():
    import cupy

    x = np.ones(4, np.float32)
    g = cupy.ones(4, cupy.float32)
    with pytest.raises(TypeError, match="numpy.*cupy"):
        gpuopt.update(gpuopt.ADAM(), x, g)
    assert np.array_equal(x, np.ones(4, np.float32))


def test_checkpoint_crosses_backends(tmp_path):
    import cupy

    opt = gpuopt.ADAM()
    params = {"w": cupy.ones(100, cupy.float32)}
    for _ in range(3):
        gpuopt.update(opt, params, {"w": cupy.full(100, 0.1, cupy.float32)})
    gpuopt.save_state(opt, params, tmp_path / "state.npz")
    host = {"w": params["w"].get()}
    restored = gpuopt.ADAM()
    gpuopt.load_state(restored, host, tmp_path / "state.npz")
    gpuopt.update(opt, params, {"w": cupy.full(100, 0.1, cupy.float32)})
    gpuopt.update(restored, host, {"w": np.full(100, 0.1, np.float32)})
    np.testing.assert_allclose(params["w"].get(), host["w"], rtol=1e-6)


def test_mixed_dtypes_in_one_call_on_gpu():
    import cupy

    dtypes = (np.float32, np.float64, np.float16, np.float32, np.float16)
    rng = np.random.default_rng(3)
    host = [rng.standard_normal(n).astype(dt) for n, dt in zip((1000, 33, 70001, 5, 0), dtypes)]
    gpu = [cupy.asarray(h) for h in host]
    opt_gpu, opt_cpu = CHAINS["ClipNorm+ADAM"](), CHAINS["ClipNorm+ADAM"]()
    for _ in range(5):
        grads = [rng.standard_normal(h.shape).astype(h.dtype) for h in host]
        gpuopt.update(opt_gpu, gpu, [cupy.asarray(g) for g in grads])
        gpuopt.update(opt_cpu, host, grads)
    for a, b in zip(gpu, host):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a.get().astype(np.float64), b.astype(np.float64),
                                   rtol=TOLERANCE[np.dtype(b.dtype).name], atol=1e-6)


# -- 64-bit indexing, odd offsets, subnormals, compute-sanitizer -------------------------------


def test_more_than_two_billion_elements_use_64_bit_indices():
    import cupy

    n = 2**31 + 5
    if cupy.cuda.Device().mem_info[0] < 3 * 4 * n:
        pytest.skip("needs 26 GB of free GPU memory")
    x = cupy.zeros(n, dtype=cupy.float32)
    g = cupy.ones(n, dtype=cupy.float32)
    gpuopt.update(gpuopt.Descent(0.5), x, g)
    assert float(x[0]) == -0.5 and float(x[2**31 - 1]) == -0.5 and float(x[2**31]) == -0.5
    assert cupy.asnumpy(x[-8:]).tolist() == [-0.5] * 8
    assert int(cupy.count_nonzero(x != -0.5)) == 0
    del x, g


@pytest.mark.parametrize("offset", [1, 3, 5])
def test_float16_views_at_odd_offsets_match_numpy(offset):
    import cupy

    rng = np.random.default_rng(offset)
    sizes = [70001, 13, 4099]
    host = [rng.standard_normal(n + offset).astype(np.float16) for n in sizes]
    results = []
    for xp in (cupy, np):
        params = [xp.asarray(h)[offset:] for h in host]
        opt = CHAINS["ClipNorm+ADAM"]()
        for step in range(5):
            grads = [xp.asarray(np.random.default_rng(step).standard_normal(n).astype(np.float16)) for n in sizes]
            gpuopt.update(opt, params, grads)
        results.append([cupy.asnumpy(p) if xp is cupy else p for p in params])
    for a, b in zip(*results):
        np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=2e-3, atol=2e-4)


def test_subnormal_state_is_kept_on_the_gpu():
    """Compiled with -ftz=false (gpuopt.backends.nvrtc): subnormal float32 state stays, as in NumPy."""
    import cupy

    states = []
    for xp in (cupy, np):
        opt, x = gpuopt.ADAM(), xp.ones(1001, dtype=np.float32)
        for _ in range(3):
            gpuopt.update(opt, x, xp.full(x.shape, 1e-20, dtype=np.float32))
        slots = opt.state_for(x).slots
        states.append(cupy.asnumpy(slots) if xp is cupy else slots)
    assert np.all(states[1][1] > 0) and np.array_equal(states[0], states[1])


@pytest.mark.parametrize("tool, cases", [("memcheck", ["ADAM", "AMSGrad", "ClipNorm+ADAM"]),
                                         ("racecheck", ["ClipNorm+ADAM"])])
def test_kernels_under_compute_sanitizer(tool, cases):
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        pytest.skip("compute-sanitizer is not installed")
    root = Path(__file__).resolve().parents[1]
    # (CUDA API calls that fail by design, such as CuPy's and cuda-python's probes, are not
    # what this test is about: only the kernels' memory and shared-memory errors count)
    command = [sanitizer, f"--tool={tool}", "--report-api-errors=no", "--error-exitcode=1", sys.executable, "-m",
               "tests.gpu_sanitizer_run", *cases]
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=100,
                            env={**os.environ, "PYTHONPATH": path})
    output = result.stdout + result.stderr
    refusal = [line for line in output.splitlines() if "Device not supported" in line]
    if refusal:  # (as under gVisor: the sanitizer cannot attach at all)
        pytest.skip(f"compute-sanitizer cannot attach to this device: {refusal[0].strip()}")
    report = output[-4000:]
    assert result.returncode == 0, report
    assert result.stdout.count("matches") == len(cases), report


# -- training loops: new gradients, strided arrays, streams, devices, graph capture ----------


def _numpy_reference(factory, host_params, host_grads_per_step):
    params = [h.copy() for h in host_params]
    opt = factory()
    for grads in host_grads_per_step:
        gpuopt.update(opt, params, grads)
    return params


def test_new_cupy_gradients_every_step_take_the_prepared_path():
    import cupy

    rng = np.random.default_rng(5)
    host = [rng.standard_normal(n).astype(np.float32) for n in (1000, 7, 70001)]
    steps = [[rng.standard_normal(h.shape).astype(np.float32) for h in host] for _ in range(6)]
    params = [cupy.asarray(h) for h in host]
    opt = CHAINS["ClipNorm+ADAM"]()
    with counted_paths() as taken:
        for grads in steps:
            gpuopt.update(opt, params, [cupy.asarray(g) for g in grads])  # new arrays every step
    assert taken["prepared"] == 5
    for a, b in zip(params, _numpy_reference(CHAINS["ClipNorm+ADAM"], host, steps)):
        np.testing.assert_allclose(a.get(), b, rtol=1e-5, atol=1e-7)


def _malloc_counter():
    """A CuPy memory hook counting allocations from the memory pool while it is active."""
    import cupy

    class MallocCounter(cupy.cuda.MemoryHook):
        name = "gpuopt_malloc_counter"

        def __init__(self):
            self.mallocs = 0

        def malloc_preprocess(self, **kwargs):
            self.mallocs += 1

    return MallocCounter()


def test_strided_parameters_updated_in_place_without_allocation():
    import cupy

    rng = np.random.default_rng(6)
    base = rng.standard_normal((300, 200)).astype(np.float32)
    x = cupy.asarray(base).T  # (200, 300), not contiguous
    host_x = base.T.copy()
    opt, ref = RULES["ADAM"](), RULES["ADAM"]()
    grads = [rng.standard_normal((200, 300)).astype(np.float32) for _ in range(5)]
    device_grads = [cupy.asarray(g)[:, ::1] for g in grads]
    gpuopt.update(opt, x, device_grads[0])  # first step: state, compile
    pointer = x.data.ptr
    counter = _malloc_counter()
    with counter, gpuopt.count_launches() as launches:
        for g in device_grads[1:]:
            gpuopt.update(opt, x, g)
    assert counter.mallocs == 0  # no contiguous copy, no scratch
    assert launches.names == ["gpuopt_strided"] * 4
    assert x.data.ptr == pointer and not x.flags.c_contiguous
    for g in grads:
        gpuopt.update(ref, host_x, g)
    np.testing.assert_allclose(x.get(), host_x, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_strided_steps_equal_contiguous_steps_with_mixed_precision(dtype):
    """CuPy's element-wise kernel (strides) and the raw kernels (contiguous) give the same
    bits; MixedPrecision's float16 parameter is its master copy rounded, where a tiny step
    moves the master copy only."""
    import cupy

    rng = np.random.default_rng(7)
    base = rng.standard_normal((64, 48)).astype(dtype)
    strided, contiguous = cupy.asarray(base).T, cupy.asarray(np.ascontiguousarray(base.T))
    opts = [gpuopt.MixedPrecision(gpuopt.ADAM(1e-5)) for _ in range(2)]
    with gpuopt.count_launches() as launches:
        for _ in range(4):
            g = cupy.asarray(rng.standard_normal((48, 64)).astype(dtype))
            gpuopt.update(opts[0], strided, g)
            gpuopt.update(opts[1], contiguous, cupy.ascontiguousarray(g))
    assert launches.names.count("gpuopt_strided") == 4
    assert cupy.array_equal(strided, contiguous)
    masters = [cupy.asnumpy(opt.state_for(x).slots[0]) for opt, x in zip(opts, (strided, contiguous))]
    assert np.array_equal(masters[0], masters[1])
    np.testing.assert_array_equal(cupy.asnumpy(strided), masters[0].reshape(strided.shape).astype(dtype))


def test_prepared_collection_update_allocates_nothing_per_step():
    import cupy

    params = [cupy.ones(n, cupy.float32) for n in (1000, 70001, 5)]
    opt = RULES["ADAM"]()
    gpuopt.update(opt, params, [cupy.full(p.shape, 0.5, cupy.float32) for p in params])
    grads = [[cupy.full(p.shape, 0.25, cupy.float32) for p in params] for _ in range(3)]
    counter = _malloc_counter()
    with counter:
        for g in grads:  # new gradient arrays: only the table's gradient column is uploaded
            gpuopt.update(opt, params, g)
    assert counter.mallocs == 0


def test_cupy_non_blocking_stream_orders_the_update_after_the_gradients():
    import cupy

    rng = np.random.default_rng(7)
    n = 1 << 22
    host_x = rng.standard_normal(n).astype(np.float32)
    x = cupy.asarray(host_x)
    big = cupy.asarray(rng.standard_normal((2048, 2048)).astype(np.float32))
    opt = RULES["ADAM"]()
    cupy.cuda.Device().synchronize()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        for _ in range(4):
            slow = big @ big  # keeps the stream busy before the gradient is written
            g = cupy.full(n, 0.5, cupy.float32) + 0 * slow[0, 0]
            gpuopt.update(opt, [x], [g])
    stream.synchronize()
    ref = [host_x.copy()]
    reference = RULES["ADAM"]()
    for _ in range(4):
        gpuopt.update(reference, ref, [np.full(n, 0.5, np.float32)])
    np.testing.assert_allclose(x.get(), ref[0], rtol=1e-5, atol=1e-7)


def test_torch_side_stream_backward_then_update_in_order():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(1 << 20, device="cuda")) for _ in range(3)]
    start = [p.detach().cpu().numpy().copy() for p in params]
    weights = [torch.randn(1 << 20, device="cuda") for _ in range(3)]
    opt = RULES["ADAM"]()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    host_grads = []
    with torch.cuda.stream(side):
        for _ in range(3):
            for p in params:
                p.grad = None  # new gradient tensors every step, as zero_grad(set_to_none=True)
            torch.cuda._sleep(50_000_000)  # the backward pass is late on purpose
            sum((p * w).sum() for p, w in zip(params, weights)).backward()
            gpuopt.update(opt, params, [p.grad for p in params])
            host_grads.append([p.grad.detach().cpu().numpy() for p in params])  # (ordered on side)
    torch.cuda.synchronize()
    expected = _numpy_reference(RULES["ADAM"], start, host_grads)
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p.detach().cpu().numpy(), e, rtol=1e-5, atol=1e-7)


def test_first_update_on_a_torch_side_stream_sees_its_fresh_state():
    """New state (here MixedPrecision's master copy, which starts as the parameter) is made on
    torch's stream: with CuPy's stream busy, an update on a side stream still reads it filled."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    param = torch.nn.Parameter(torch.full((1 << 20,), 3.0, device="cuda", dtype=torch.float16))
    opt = gpuopt.MixedPrecision(gpuopt.Descent(0.5))
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    torch.cuda._sleep(200_000_000)  # the default stream (CuPy's current one) is busy meanwhile
    with torch.cuda.stream(side):
        gpuopt.update(opt, [param], [torch.ones_like(param)])
    torch.cuda.synchronize()
    assert torch.all(param == 2.5)  # 3 - 0.5 * 1, from a master copy of 3, not of whatever was there


def test_update_during_cupy_graph_capture_is_an_error():
    import cupy

    x, g = cupy.ones(1000, cupy.float32), cupy.ones(1000, cupy.float32)
    opt = RULES["ADAM"]()
    gpuopt.update(opt, [x], [g])
    before = x.copy()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            for params, grads in (([x], [g]), (x, g)):  # prepared and full path
                with pytest.raises(gpuopt.GraphCaptureError, match="CUDA graph"):
                    gpuopt.update(opt, params, grads)
        finally:
            stream.end_capture()
    assert opt.state_for(x).t == 1 and bool(cupy.array_equal(x, before))


@pytest.mark.filterwarnings("ignore:The CUDA Graph is empty:UserWarning")  # (nothing captured: the point)
def test_update_during_torch_graph_capture_is_an_error():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    params = [torch.nn.Parameter(torch.ones(1000, device="cuda"))]
    grads = [torch.ones(1000, device="cuda")]
    opt = RULES["ADAM"]()
    gpuopt.update(opt, params, grads)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(gpuopt.GraphCaptureError):
        with torch.cuda.graph(graph):
            gpuopt.update(opt, params, grads)
    assert opt.state_for(params[0]).t == 1


def test_state_and_launches_on_the_parameters_device():
    import cupy

    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    rng = np.random.default_rng(8)
    host = [rng.standard_normal(n).astype(np.float32) for n in (1000, 70001)]
    steps = [[rng.standard_normal(h.shape).astype(np.float32) for h in host] for _ in range(3)]
    with cupy.cuda.Device(1):
        params = [cupy.asarray(h) for h in host]
    opt = RULES["ADAM"]()
    with cupy.cuda.Device(0):
        for grads in steps:
            with cupy.cuda.Device(1):
                device_grads = [cupy.asarray(g) for g in grads]
            gpuopt.update(opt, params, device_grads)
        assert cupy.cuda.runtime.getDevice() == 0
    assert all(opt.state_for(p).slots.device.id == 1 for p in params)
    for a, b in zip(params, _numpy_reference(RULES["ADAM"], host, steps)):
        np.testing.assert_allclose(a.get(), b, rtol=1e-5, atol=1e-7)


def test_host_benchmark_with_real_launches():
    from gpuopt.bench import host_benchmark

    report = host_benchmark(calls=5, layers=1, width=64, many=20, launches=True)
    assert report["device"]["backend"] == "host-cupy"
    for name in ("ADAM/same", "ADAM/new", "ADAM/new/20", "ClipNorm+ADAM/new"):
        assert report["cases"][name]["prepared_calls"] == 5, name
    assert all("host" in t["id"] for t in report["targets"])


def test_benchmark_runs_on_the_gpu(tmp_path):
    """A tiny ``python -m gpuopt bench`` on CuPy: CUDA events through the backend's device, the
    copy bandwidth, the baselines, the model (with its host time) and the JSON."""
    import json

    from gpuopt.__main__ import main

    path = tmp_path / "gpu.json"
    argv = ["bench", "--backend", "cupy", "--sizes", "12", "--rules", "ADAM,Clip+WD+ADAM", "--repeats", "2",
            "--warmup", "1", "--model-layers", "1", "--model-width", "64", "--quiet", "--json", str(path)]
    assert main(argv) == 0
    report = json.loads(path.read_text())
    assert report["device"]["backend"] == "cupy" and report["config"]["timer"] == "CUDA events"
    assert set(report["copy_bandwidth"]["gbps_by_method"]) == {"cudaMemcpy", "copy kernel"}
    assert {r["rule"] for r in report["results"]} == {"ADAM", "ClipValue+WeightDecay+ADAM"}
    assert all(r["time_s"] > 0 and "time_ratio" in r["baselines"]["unfused"] for r in report["results"])
    variants = report["model"]["variants"]
    assert variants["multi_tensor"]["host_time_us"] > 0 and variants["flat"]["time_s"] > 0
    assert {t["id"] for t in report["targets"] if t["status"] != "not measured"} >= {"gpu_model_vs_flat",
                                                                                     "gpu_host_time",
                                                                                     "gpu_chain_vs_adam"}
