"""The CPU stand-in for the GPU (tests/emulation) is strict: what would fault or race on a GPU
fails here too, the kernels run in the GPU's own launch shape, blocks run concurrently, and a
build with AddressSanitizer and UBSan runs a representative set of kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import gpuopt
import gpuopt.backends
from gpuopt.backends import numpy_backend
from gpuopt.backends.cuda_source import module_source
from gpuopt.backends.kernel_backend import CHUNK, THREADS_PER_BLOCK, KernelBackend
from gpuopt.plan import plan

from .cases import ALL
from .emulation import device as emulation
from .toolchain import missing

ROOT = Path(__file__).resolve().parents[1]

# -- what the stand-in must refuse, shown on tiny kernels -------------------------------------

MISALIGNED = """
struct alignas(16) vec4 { float v[4]; };
extern "C" __global__ void misaligned(float* p) {
    const vec4 v = *reinterpret_cast<const vec4*>(p + 1);
    p[threadIdx.x] = v.v[0];
}
"""
DIVERGENT = """
extern "C" __global__ void divergent(float* p) {
    if (threadIdx.x == 0) __syncthreads();
    p[threadIdx.x] = 1.0f;
}
"""
UNFENCED = """
extern "C" __global__ void unfenced(unsigned int* counter) {
    if (threadIdx.x == 0) atomicAdd(counter, 1u);
}
"""


@pytest.mark.parametrize(
    "source, name, argument, message",
    [
        (MISALIGNED, "misaligned", np.zeros(64, np.float32), "misaligned access"),
        (DIVERGENT, "divergent", np.zeros(64, np.float32), "different numbers of __syncthreads"),
        (UNFENCED, "unfenced", np.zeros(1, np.uint32), "without a __threadfence"),
    ],
    ids=["misaligned vector load", "barrier in divergent code", "atomic without a fence"],
)
def test_stand_in_fails_the_launch_where_a_gpu_would_fault(source, name, argument, message):
    if emulation.compiler() is None:
        missing("no C++ compiler is installed")
    launch = emulation.EmulatedDevice().kernel(source, name)
    with pytest.raises(emulation.EmulatedKernelError, match=f"{name} .*{message}"):
        launch(2, 8, [argument])


HANDOFF = """
extern "C" __global__ void handoff(float* out) {
    __shared__ float s[64];
    s[threadIdx.x] = (float)threadIdx.x;
    BARRIER
    out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}
"""


@pytest.mark.parametrize("barrier", [True, False])
def test_a_missing_barrier_gives_wrong_values(barrier):
    """Threads run in changing orders between barriers: a read of another thread's shared
    memory write without __syncthreads() in between sees a stale value."""
    if emulation.compiler() is None:
        missing("no C++ compiler is installed")
    source = HANDOFF.replace("BARRIER", "__syncthreads();" if barrier else "")
    out = np.full(64, -1.0, np.float32)
    emulation.EmulatedDevice().kernel(source, "handoff")(1, 64, [out])
    expected = (np.arange(64) + 1) % 64
    assert np.array_equal(out, expected) == barrier


# -- the kernels in the GPU's launch shape ----------------------------------------------------


@pytest.fixture(scope="module")
def production_backend():
    if emulation.compiler() is None:
        missing("no C++ compiler is installed")
    return KernelBackend(emulation.EmulatedDevice.production())


PRODUCTION_CASES = {
    # case: (chain, sizes, the kernels it must launch)
    "one array": ("ADAM", [2 * CHUNK + 37], ["gpuopt_elementwise"]),
    "collection": ("ADAM", [2 * CHUNK + 37, 5, 1001], ["gpuopt_multi_tensor"]),
    "reduction": ("ClipNorm+ADAM", [2 * CHUNK + 37, 5, 1001], ["gpuopt_multi_reduce", "gpuopt_multi_tensor"]),
}


@pytest.mark.parametrize("case", list(PRODUCTION_CASES))
def test_kernels_in_the_gpu_launch_shape_match_numpy(case, production_backend, monkeypatch):
    """256 threads a block, 64K-element chunks, several chunks and a ragged tail; arrays one
    element into their allocation (so the unaligned path runs too)."""
    chain, sizes, kernels = PRODUCTION_CASES[case]
    results = []
    for backend in (production_backend, numpy_backend.NumpyBackend()):
        monkeypatch.setattr(gpuopt.backends, "cpu_backend", lambda backend=backend: backend)
        opt, rng = ALL[chain](), np.random.default_rng(7)
        params = [rng.standard_normal(n + 1).astype(np.float32)[1:] for n in sizes]
        with production_backend.count_launches() as counter:
            for _ in range(3):
                grads = [rng.standard_normal(n).astype(np.float32) for n in sizes]
                gpuopt.update(opt, params if len(sizes) > 1 else params[0], grads if len(sizes) > 1 else grads[0])
        results.append((params, counter.names))
    (got, names), (want, _) = results
    assert sorted(set(names)) == sorted(kernels)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_concurrent_blocks_sum_identically_every_launch(monkeypatch):
    """The segmented reduction's last block adds the partial sums in chunk order whichever
    block finishes last: hundreds of launches with blocks racing give the same bits."""
    if emulation.compiler() is None:
        missing("no C++ compiler is installed")
    backend = KernelBackend(emulation.EmulatedDevice(threads=THREADS_PER_BLOCK // 8, max_blocks=64, workers=4))
    monkeypatch.setattr(gpuopt.backends, "cpu_backend", lambda backend=backend: backend)
    rng = np.random.default_rng(8)
    x = rng.standard_normal(5 * CHUNK + 77).astype(np.float32)  # six chunks: six racing blocks
    g = (100 * rng.standard_normal(x.shape)).astype(np.float32)
    opt = gpuopt.Optimiser(gpuopt.ClipNorm(1.0), gpuopt.Descent(1.0))
    first = gpuopt.apply(opt, x, g)
    with backend.count_launches() as counter:
        for _ in range(200):
            assert np.array_equal(gpuopt.apply(opt, x, g), first)
    assert counter.names.count("gpuopt_multi_reduce") == 200
    monkeypatch.setattr(gpuopt.backends, "cpu_backend", numpy_backend.NumpyBackend)
    np.testing.assert_allclose(first, gpuopt.apply(opt, x, g), rtol=1e-6)
    assert np.linalg.norm(first.astype(np.float64)) == pytest.approx(1.0, rel=1e-5)


# -- AddressSanitizer and UBSan ---------------------------------------------------------------

SANITIZED = [(case, dtype) for case in ("ADAM", "ClipNorm+ADAM", "AMSGrad")
             for dtype in ("float16", "float32", "float64")]


def _asan_runtime() -> str:
    compiler = emulation.compiler()
    if compiler is None:
        missing("no C++ compiler is installed")
    found = subprocess.run([compiler, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(found) or not os.path.exists(found):
        missing("the AddressSanitizer runtime (libasan) is not installed")
    return found


def test_sanitizer_build_of_representative_kernels_runs_clean():
    """ADAM, a ClipNorm chain and AMSGrad, in float16/32/64, one array and a collection, in
    the small and the GPU launch shape, built with -fsanitize=address,undefined: a read or
    write outside any allocation aborts the run (see tests/emulation/sanitized_run.py)."""
    runtime = _asan_runtime()
    sources = {module_source(plan(ALL[case]()), np.dtype(dt), np.dtype(dt), False) for case, dt in SANITIZED}
    with ThreadPoolExecutor(2) as pool:  # built here, without the runtime preloaded
        list(pool.map(lambda s: emulation.build(s, "sanitized"), sources))
    environment = {**os.environ, "LD_PRELOAD": runtime, "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1",
                   "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}
    arguments = [item for pair in SANITIZED for item in pair]
    result = subprocess.run([sys.executable, "-m", "tests.emulation.sanitized_run", *arguments], cwd=ROOT,
                            env=environment, capture_output=True, text=True, timeout=600)
    report = (result.stdout + result.stderr)[-4000:]
    assert result.returncode == 0 and result.stdout.rstrip().endswith("ok"), report
    assert result.stdout.count("matches") == len(SANITIZED)
