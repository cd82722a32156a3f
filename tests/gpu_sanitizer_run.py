"""Runs a few rules and a ClipNorm chain on the GPU against NumPy; started by tests/test_gpu.py
under NVIDIA's compute-sanitizer (memcheck, and racecheck for the reduction), which fails the
run on any out-of-bounds or misaligned access or shared-memory race.

Usage: python -m tests.gpu_sanitizer_run CASE [CASE ...]   (names from tests.cases.ALL)
"""

from __future__ import annotations

import sys

import cupy
import numpy as np

import gpuopt
from gpuopt.backends.kernel_backend import CHUNK

from .cases import ALL

SIZES = [2 * CHUNK + 37, 7, 1, 0, 1001]


def trajectory(case: str, xp: object, collection: bool) -> list[np.ndarray]:
    opt, rng = ALL[case](), np.random.default_rng(2)
    params = [xp.asarray(rng.standard_normal(n + 1).astype(np.float32))[1:] for n in SIZES]
    if not collection:
        params = params[:1]
    for _ in range(3):
        grads = [xp.asarray(rng.standard_normal(p.shape).astype(np.float32)) for p in params]
        gpuopt.update(opt, params if collection else params[0], grads if collection else grads[0])
    return [cupy.asnumpy(p) if xp is cupy else p for p in params]


if __name__ == "__main__":
    for case in sys.argv[1:]:
        for collection in (False, True):
            for a, b in zip(trajectory(case, cupy, collection), trajectory(case, np, collection)):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        cupy.cuda.runtime.deviceSynchronize()
        print(case, "matches", flush=True)
    print("ok")
