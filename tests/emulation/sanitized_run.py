"""Runs a representative set of kernels built with -fsanitize=address,undefined against the
NumPy executor; started by tests/test_kernels.py in a subprocess with the ASan runtime
preloaded, so any read or write outside an allocation (or other undefined behaviour) in a
kernel aborts this process with a report.

Usage: python -m tests.emulation.sanitized_run CASE DTYPE [CASE DTYPE ...]
(CASE names an entry of tests.cases.ALL). Prints one line per case and "ok" at the end.
"""

from __future__ import annotations

import sys

import numpy as np

import gpuopt
from gpuopt.backends import numpy_backend
from gpuopt.backends.kernel_backend import CHUNK, KernelBackend

from ..cases import ALL
from .device import EmulatedDevice

SIZES = [CHUNK + 4099, 7, 1, 0, 1001]  # across chunks with a ragged tail, odd, one, empty
TOLERANCE = {"float16": 1e-3, "float32": 1e-6, "float64": 1e-12}


def trajectory(case: str, dtype: str, backend: object, collection: bool, steps: int = 3) -> list[np.ndarray]:
    numpy_backend.BACKEND = backend
    opt = ALL[case]()
    rng = np.random.default_rng(1)
    # Each parameter is its own allocation seen one element in (misaligned, and its last
    # element is the allocation's last byte); gradients are exact-size allocations too.
    params = [rng.standard_normal(n + 1).astype(dtype)[1:] for n in SIZES]
    if not collection:
        params = params[:1]
    for _ in range(steps):
        grads = [rng.standard_normal(p.shape).astype(dtype) for p in params]
        gpuopt.update(opt, params if collection else params[0], grads if collection else grads[0])
    return params


def main(arguments: list[str]) -> None:
    kernels = KernelBackend(EmulatedDevice(mode="sanitized"))
    production = KernelBackend(EmulatedDevice.production(mode="sanitized"))
    reference = numpy_backend.NumpyBackend()
    for case, dtype in zip(arguments[::2], arguments[1::2]):
        for backend, collection in ((kernels, False), (kernels, True), (production, True)):
            got = trajectory(case, dtype, backend, collection)
            want = trajectory(case, dtype, reference, collection)
            for a, b in zip(got, want):
                np.testing.assert_allclose(a, b, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
        print(case, dtype, "matches", flush=True)
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1:])
