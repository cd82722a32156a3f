"""State restored from a checkpoint has exactly the layout of fresh state (padded, aligned rows
on the kernel backend), so a loaded run keeps vector access for every slot."""

from __future__ import annotations

import numpy as np
import pytest

import gpuopt
from gpuopt.backends import backend_override
from gpuopt.backends.kernel_backend import KernelBackend
from gpuopt.backends.noop import NoopDevice


def _layout(state):
    base = state.slots.ctypes.data
    return state.slots.shape, state.slots.strides, state.slots.dtype, [row.ctypes.data - base for row in state.slots]


@pytest.mark.parametrize("kernels", [False, True])
@pytest.mark.parametrize("size, dtype", [(1, np.float32), (7, np.float32), (1001, np.float64), (70001, np.float16)])
def test_loaded_state_has_the_layout_of_fresh_state(tmp_path, kernels, size, dtype):
    backend = KernelBackend(NoopDevice()) if kernels else None
    with backend_override("numpy", backend) if kernels else _nothing():
        params = {"w": np.ones(size, dtype), "b": np.ones(3, dtype)}
        grads = {k: np.ones_like(v) for k, v in params.items()}
        opt = gpuopt.Optimiser(gpuopt.ClipValue(1.0), gpuopt.AMSGrad())
        gpuopt.update(opt, params, grads)
        fresh = {k: _layout(opt[1].state_for(v)) for k, v in params.items()}
        gpuopt.save_state(opt, params, tmp_path / "state.npz")
        restored = gpuopt.Optimiser(gpuopt.ClipValue(1.0), gpuopt.AMSGrad())
        gpuopt.load_state(restored, params, tmp_path / "state.npz")
        for k, v in params.items():
            assert _layout(restored[1].state_for(v)) == fresh[k], k
            np.testing.assert_array_equal(restored[1].state_for(v).slots, opt[1].state_for(v).slots)
        if kernels:
            assert all(offset % 256 == 0 for offset in fresh["w"][3])  # padded rows: each starts aligned


def _nothing():
    import contextlib

    return contextlib.nullcontext()
