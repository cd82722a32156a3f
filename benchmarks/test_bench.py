"""pytest-benchmark timings of one ADAM step: gpuopt against the plain array-expression formula.

    pytest benchmarks                       # quick: few rounds, also fine under plain pytest
    pytest benchmarks --benchmark-only      # the timings table
    python -m gpuopt bench                  # the full benchmark: every rule and size, GB/s, targets

The CuPy cases run only where a GPU is usable (skipped otherwise); their timings synchronise
the device after each round so that they measure the kernels, not the launch.
"""

from __future__ import annotations

import numpy as np
import pytest

import gpuopt
from gpuopt.bench.workload import RULES, gpt2_shapes
from gpuopt.dispatch import gpu_available
from gpuopt.plain import Unfused

NUMPY_SIZE = 1 << 20
CUPY_SIZE = 1 << 24
ROUNDS = 5



def gpu(test):
    """Mark a test as needing a usable CUDA GPU (skipped without one)."""
    skip = pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a usable CUDA GPU")
    return pytest.mark.gpu(skip(test))


def _arrays(xp, n, dtype=np.float32):
    rng = np.random.default_rng(0)
    return (xp.asarray(rng.standard_normal(n, dtype=dtype)), xp.asarray(rng.standard_normal(n, dtype=dtype)))


def _run(benchmark, step, sync=None):
    def one():
        step()
        if sync is not None:
            sync()

    benchmark.pedantic(one, rounds=ROUNDS, iterations=1, warmup_rounds=1)


def test_numpy_gpuopt_adam(benchmark):
    x, g = _arrays(np, NUMPY_SIZE)
    opt = gpuopt.ADAM()
    benchmark.extra_info.update(backend="numpy", elements=NUMPY_SIZE, bytes_per_step=28 * NUMPY_SIZE)
    _run(benchmark, lambda: gpuopt.update(opt, x, g))
    assert np.isfinite(x).all()


def test_numpy_plain_adam(benchmark):
    x, g = _arrays(np, NUMPY_SIZE)
    plain = Unfused(gpuopt.ADAM(), np)
    benchmark.extra_info.update(backend="numpy", elements=NUMPY_SIZE, bytes_per_step=28 * NUMPY_SIZE)
    _run(benchmark, lambda: plain.step(x, g))
    assert np.isfinite(x).all()


@gpu
@pytest.mark.parametrize("rule", ["ADAM", "ClipValue+WeightDecay+ADAM"])
@pytest.mark.parametrize("impl", ["gpuopt", "plain"])
def test_cupy_adam(benchmark, rule, impl):
    import cupy

    x, g = _arrays(cupy, CUPY_SIZE)
    opt = RULES[rule]()
    if impl == "gpuopt":
        step = lambda: gpuopt.update(opt, x, g)  # noqa: E731
    else:
        plain = Unfused(opt, cupy)  # opt supplies the hyperparameters only
        step = lambda: plain.step(x, g)  # noqa: E731
    benchmark.extra_info.update(backend="cupy", rule=rule, elements=CUPY_SIZE, bytes_per_step=28 * CUPY_SIZE)
    _run(benchmark, step, cupy.cuda.Device().synchronize)
    assert bool(cupy.isfinite(x).all())


@gpu
@pytest.mark.parametrize("impl", ["multi_tensor", "per_tensor_loop"])
def test_cupy_gpt2_adam(benchmark, impl):
    import cupy

    params = [cupy.random.standard_normal(shape, dtype=cupy.float32) for _, shape in gpt2_shapes()]
    grads = [cupy.random.standard_normal(p.shape, dtype=cupy.float32) for p in params]
    opt = gpuopt.ADAM()

    def step():
        if impl == "multi_tensor":
            gpuopt.update(opt, params, grads)
        else:
            for p, q in zip(params, grads):
                gpuopt.update(opt, p, q)

    benchmark.extra_info.update(backend="cupy", tensors=len(params), elements=sum(p.size for p in params))
    _run(benchmark, step, cupy.cuda.Device().synchronize)
