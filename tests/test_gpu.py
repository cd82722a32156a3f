"""CuPy on a real GPU: the same rules, chains and dtypes as NumPy, launch counts, zero-copy
PyTorch tensors. Skipped where no GPU is usable (CI); run on a lent device."""

from __future__ import annotations

import numpy as np
import pytest

import gpuopt
from gpuopt.dispatch import gpu_available

from .cases import ALL, CHAINS, RULES

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
    command = [sanitizer, f"--tool={tool}", "--error-exitcode=1", sys.executable, "-m", "tests.gpu_sanitizer_run",
               *cases]
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=420,
                            env={**os.environ, "PYTHONPATH": str(root)})
    report = (result.stdout + result.stderr)[-4000:]
    assert result.returncode == 0, report
    assert result.stdout.count("matches") == len(cases), report
