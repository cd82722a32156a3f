"""Memory shared between a parameter and any other parameter or gradient of
the same call raises before any write (a parameter may be its own gradient); state follows
memory, so a new array object over the same memory continues its state."""

from __future__ import annotations

import gc
import re

import numpy as np
import pytest

import gpuopt
from gpuopt.memory import check_overlaps

from .test_errors import KEYS, as_collection, snapshot


def _fresh(n: int = 12) -> np.ndarray:
    return np.random.default_rng(n).standard_normal(n)


# Each case builds (params, grads) for a collection of three and says which two must be named.
def _param_is_other_gradient():
    a, b, c = _fresh(), _fresh(), _fresh()
    return [a, b, c], [np.ones(12), a, np.ones(12)], (0, 1, "the gradient of")


def _two_views_same_memory():
    buf = _fresh(24)
    return [buf[:12], _fresh(), buf[:12][:]], [np.ones(12)] * 3, (0, 2, "")


def _overlapping_slices():
    buf = _fresh(30)
    return [buf[:12], _fresh(), buf[10:22]], [np.ones(12)] * 3, (0, 2, "")


def _reshaped_view():
    buf = _fresh(12)
    return [buf, _fresh(), buf.reshape(3, 4)], [np.ones(12), np.ones(12), np.ones((3, 4))], (0, 2, "")


def _gradient_inside_other_parameter():
    buf = _fresh(40)
    return [buf[:20].reshape(4, 5), _fresh(), _fresh()], [np.ones((4, 5)), buf[5:17], np.ones(12)], \
        (0, 1, "the gradient of")


def _reversed_view():
    buf = _fresh(12)
    return [buf, _fresh(), buf[::-1]], [np.ones(12)] * 3, (0, 2, "")


CASES = [
    ("param-is-other-gradient", _param_is_other_gradient),
    ("two-views-same-memory", _two_views_same_memory),
    ("overlapping-slices", _overlapping_slices),
    ("reshaped-view", _reshaped_view),
    ("gradient-inside-other-parameter", _gradient_inside_other_parameter),
    ("reversed-view", _reversed_view),
]


def _name(kind: str, i: int) -> str:
    return f"params[{KEYS[i]!r}]" if kind == "dict" else f"params[{i}]"


@pytest.mark.parametrize("kind", ["list", "tuple", "dict"])
@pytest.mark.parametrize("case_id, build", CASES, ids=[c[0] for c in CASES])
def test_shared_memory_raises_naming_both_and_changes_nothing(case_id, build, kind):
    params, grads, (first, second, what) = build()
    opt = gpuopt.Optimiser(gpuopt.ClipNorm(1.0), gpuopt.ADAM(0.1))
    others = [_fresh(), _fresh()]
    gpuopt.update(opt, others, [np.ones(12), np.ones(12)])  # some state already there
    before = snapshot(opt, params + others, grads)
    with pytest.raises(ValueError) as info:
        gpuopt.update(opt, as_collection(kind, params), as_collection(kind, grads))
    message = str(info.value)
    pattern = rf"{re.escape(_name(kind, first))} shares memory with {what}\s*{re.escape(_name(kind, second))}"
    assert re.search(pattern, message), message
    assert "\n" not in message
    assert snapshot(opt, params + others, grads) == before


def test_gradient_overlapping_its_parameter_at_an_offset():
    buf = np.random.default_rng(0).standard_normal(3 * 65536 + 1)
    x, g = buf[1:], buf[:-1]
    before = buf.copy()
    with pytest.raises(ValueError, match=r"parameter shares memory with its own gradient"):
        gpuopt.update(gpuopt.Descent(), x, g)
    np.testing.assert_array_equal(buf, before)


@pytest.mark.parametrize("view", ["same-object", "equal-view"])
def test_parameter_as_its_own_gradient_works(view):
    x = np.random.default_rng(1).standard_normal(70000)
    expected = x - 0.1 * x
    gpuopt.update(gpuopt.Descent(0.1), x, x if view == "same-object" else x[...])
    np.testing.assert_allclose(x, expected, rtol=1e-15)


def test_interleaved_views_do_not_share_elements():
    """Bounds that meet are compared element-exactly: even and odd elements are two arrays."""
    buf = np.zeros(20)
    gpuopt.update(gpuopt.Descent(1.0), [buf[0::2], buf[1::2]], [np.ones(10), np.full(10, 2.0)])
    np.testing.assert_array_equal(buf, np.tile([-1.0, -2.0], 10))


def test_gradients_may_share_memory_with_each_other():
    g = np.ones(6)
    x, y = np.zeros(6), np.zeros(6)
    gpuopt.update(gpuopt.Descent(1.0), [x, y], [g, g[...]])
    np.testing.assert_array_equal(x, -1.0)
    np.testing.assert_array_equal(y, -1.0)


class DeviceArray:
    """Stands in for a CuPy array (no GPU here): only its pointer, shape and strides are used."""

    def __init__(self, ptr: int, shape: tuple, strides: tuple, dtype=np.float32):
        self.data = type("Pointer", (), {"ptr": ptr})()
        self.shape, self.strides, self.dtype = shape, strides, np.dtype(dtype)
        self.size = int(np.prod(shape))


DEVICE_CASES = [
    ("disjoint", DeviceArray(0x10000, (100,), (4,)), DeviceArray(0x10000 + 400, (100,), (4,)), None),
    ("offset-by-one", DeviceArray(0x10000, (100,), (4,)), DeviceArray(0x10004, (100,), (4,)), "shares memory"),
    ("interleaved", DeviceArray(0x10000, (50,), (8,)), DeviceArray(0x10004, (50,), (8,)), None),
    ("strided-meets", DeviceArray(0x10000, (10, 10), (80, 4)), DeviceArray(0x10000 + 36, (10,), (80,)),
     "shares memory"),
    ("empty", DeviceArray(0x10000, (0,), (4,)), DeviceArray(0x10000, (0,), (4,)), None),
]


@pytest.mark.parametrize("case_id, a, b, error", DEVICE_CASES, ids=[c[0] for c in DEVICE_CASES])
def test_device_arrays_are_compared_by_pointer_and_strides(case_id, a, b, error):
    gradient = DeviceArray(0x900000, a.shape, a.strides)
    entries = [("params[0]", "cupy", a, gradient), ("params[1]", "cupy", b, DeviceArray(0x800000, b.shape, b.strides))]
    if error is None:
        check_overlaps(entries)
    else:
        with pytest.raises(ValueError, match=r"params\[0\] shares memory with params\[1\]"):
            check_overlaps(entries)


def test_host_and_device_addresses_never_meet():
    host = np.zeros(4)
    device = DeviceArray(host.ctypes.data, (4,), (8,), np.float64)
    check_overlaps([("params[0]", "numpy", host, np.ones(4)),
                    ("params[1]", "cupy", device, DeviceArray(0x100, (4,), (8,), np.float64))])


# -- state follows memory ------------------------------------------------------------------


def _adam_steps(make_param, steps: int = 4) -> np.ndarray:
    x = np.zeros(8)
    opt = gpuopt.ADAM(0.1)
    for i in range(steps):
        gpuopt.update(opt, make_param(x), np.full(8, 1.0 + i))
    return x


@pytest.mark.parametrize("view", [lambda x: x[...], lambda x: x.view(), lambda x: x.reshape(2, 4).reshape(8)],
                         ids=["ellipsis", "view", "reshaped-back"])
def test_new_view_each_step_continues_the_state(view):
    np.testing.assert_array_equal(_adam_steps(view), _adam_steps(lambda x: x))


def test_torch_data_each_step_continues_the_state():
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.zeros(8, dtype=torch.float64))
    opt = gpuopt.ADAM(0.1)
    for i in range(4):
        gpuopt.update(opt, p.data, torch.full((8,), 1.0 + i, dtype=torch.float64))
    np.testing.assert_array_equal(p.detach().numpy(), _adam_steps(lambda x: x))


def test_state_goes_with_the_memory():
    opt = gpuopt.ADAM()
    x = np.zeros(8)
    gpuopt.update(opt, x[...], np.ones(8))
    assert len(opt._state) == 1
    del x
    gc.collect()
    assert len(opt._state) == 0


def test_different_elements_of_one_buffer_keep_their_own_state():
    buf = np.zeros(16)
    opt = gpuopt.ADAM(0.1)
    gpuopt.update(opt, buf[:8], np.ones(8))
    gpuopt.update(opt, buf[8:], np.ones(8))
    assert opt.state_for(buf[:8]).t == 1 and opt.state_for(buf[8:]).t == 1
    assert opt.state_for(buf[:8]) is not opt.state_for(buf[8:])
