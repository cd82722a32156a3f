"""The strided path: non-contiguous arrays updated in place by one element-wise kernel around
the printed step function. Its text is compiled by NVRTC here and its operation runs on the
CPU stand-in (which stands in for CuPy's indexing by strides); the routing (which arrays go to
it, with which arguments, and no copies) is checked with a fake device."""

from __future__ import annotations

import numpy as np
import pytest

import gpuopt
from gpuopt.backends import backend_override
from gpuopt.backends.kernel_backend import KernelBackend
from gpuopt.backends.strided import strided_kernel
from gpuopt.plan import plan

from .cases import ALL, CHAINS, RULES
from .emulation import device as emulation
from .fake_gpus import FakeGpus
from .test_kernels import nvrtc_compile

ELEMENTWISE = [name for name, factory in ALL.items() if not plan(factory()).levels]


@pytest.mark.parametrize("case", ELEMENTWISE)
def test_strided_kernel_text_compiles_with_nvrtc(case):
    source = gpuopt.kernel_source(ALL[case](), "float32", strided=True)
    assert len(nvrtc_compile(source, 90, by_cupy=True)) > 1000


@pytest.mark.parametrize("dtype, grad", [("float64", "float64"), ("float16", "float32"), ("float32", "float16")])
@pytest.mark.parametrize("apply", [False, True])
def test_strided_kernel_text_compiles_for_every_dtype(dtype, grad, apply):
    for case in ("ADAM", "ClipValue+WeightDecay+ADAM"):
        source = gpuopt.kernel_source(ALL[case](), dtype, grad, apply=apply, strided=True)
        assert len(nvrtc_compile(source, 80, by_cupy=True)) > 1000, (case, dtype, grad, apply)


def test_strided_kernel_is_the_printed_step():
    opt = CHAINS["ClipValue+WeightDecay+ADAM"]()
    kernel = strided_kernel(plan(opt), np.dtype(np.float32), np.dtype(np.float32), False)
    assert kernel.preamble in gpuopt.kernel_source(opt)  # the same types and gpuopt_step as the raw kernels
    assert "gpuopt_step(" in kernel.operation and "x = P(" in kernel.operation
    assert kernel.out_params == "P x, S s0, S s1"
    assert gpuopt.kernel_source(opt, strided=True).startswith(kernel.preamble)
    with pytest.raises(ValueError, match="reduction"):
        strided_kernel(plan(CHAINS["ClipNorm+ADAM"]()), np.dtype(np.float32), np.dtype(np.float32), False)


class StridedFake(FakeGpus):
    def __init__(self):
        super().__init__(count=1)
        self.calls = []

    def elementwise(self, kernel):
        def call(*args):
            self.calls.append((kernel, args))

        return call


@pytest.fixture
def strided_device():
    device = StridedFake()
    with backend_override("numpy", KernelBackend(device)):
        yield device


def test_strided_arrays_go_to_one_elementwise_launch_in_place(strided_device):
    base = strided_device.array(np.ones((40, 30)), 0)
    x = base.T  # not contiguous
    g = strided_device.array(np.ones((30, 40)), 0)
    flat = strided_device.array(np.ones(100), 0)
    opt = RULES["ADAM"]()
    for _ in range(3):
        strided_device.calls.clear()
        strided_device.launched.clear()
        gpuopt.update(opt, [x, flat], [g[:, ::1], strided_device.array(np.ones(100), 0)])
        (kernel, args), = strided_device.calls
        assert args[0] is not None and args[0].shape == x.shape
        scalars = plan(opt).scalar_count
        assert kernel.in_params.startswith("G g") and len(args) == 1 + scalars + 1 + 2  # g, h..., x, m, v
        assert args[1 + scalars] is x  # the parameter itself, written in place: no copy, no write-back
        state = opt.state_for(x).slots
        assert all(np.shares_memory(a, state) and a.shape == x.shape for a in args[2 + scalars:])
        assert [launch.name for launch in strided_device.launched] == ["gpuopt_elementwise"]  # the other array
    with gpuopt.backends.get_backend("numpy").count_launches() as counter:
        gpuopt.apply(opt, x, g)
    assert counter.names == ["gpuopt_strided"]


def test_chain_with_a_reduction_keeps_the_contiguous_copy(strided_device):
    x = strided_device.array(np.ones((40, 30)), 0).T
    gpuopt.update(CHAINS["ClipNorm+ADAM"](), x, strided_device.array(np.ones((30, 40)), 0))
    assert strided_device.calls == []
    assert [launch.name for launch in strided_device.launched] == ["gpuopt_multi_reduce", "gpuopt_multi_tensor"]


class _WithoutElementwise(emulation.EmulatedDevice):
    elementwise = None  # (no element-wise kernels: a Protocol's method set to None is absent)


def test_without_elementwise_kernels_strided_arrays_go_through_a_copy(emulated_backend):
    rng = np.random.default_rng(9)
    base = rng.standard_normal((60, 50)).astype(np.float32)
    grads = [rng.standard_normal((50, 60)).astype(np.float32) for _ in range(4)]
    results = []
    contiguous_only = KernelBackend(_WithoutElementwise())  # (the fixture: the compiler is checked)
    assert not contiguous_only._has_strided_kernels
    for backend in (contiguous_only, None):
        x = base.copy().T  # not contiguous
        opt = RULES["ADAM"]()
        with backend_override("numpy", backend) if backend else _nothing():
            for g in grads:
                gpuopt.update(opt, x, g)
        results.append(x)
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6, atol=1e-9)


def _nothing():
    import contextlib

    return contextlib.nullcontext()


# -- the strided kernel's operation, run on the CPU stand-in ------------------------------------

STRIDED_CASES = {
    **{name: ALL[name] for name in ELEMENTWISE},
    "MixedPrecision of ADAM": lambda: gpuopt.MixedPrecision(gpuopt.ADAM(1e-3)),
    "MixedPrecision of WeightDecay+Momentum": lambda: gpuopt.MixedPrecision(
        gpuopt.Optimiser(gpuopt.WeightDecay(0.1), gpuopt.Momentum(0.01))),
}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("case", list(STRIDED_CASES))
def test_strided_kernel_steps_exactly_as_the_contiguous_kernels(case, dtype, emulated_backend):
    """A transposed parameter and gradient, updated in place by the strided kernel (its
    operation run by the stand-in), take exactly the steps of contiguous copies updated by
    the raw kernels: parameters and state, alone and in a collection, for every rule without a
    reduction and MixedPrecision (whose parameter is the rounding of its float32 master copy)."""
    rng = np.random.default_rng(11)
    start = [rng.standard_normal(shape).astype(dtype) for shape in ((37, 23), (5, 3))]
    strided = [a.copy().T for a in start]  # not contiguous
    contiguous = [np.ascontiguousarray(a.T) for a in start]
    opt_strided, opt_contiguous = STRIDED_CASES[case](), STRIDED_CASES[case]()
    with backend_override("numpy", emulated_backend), emulated_backend.count_launches() as counter:
        for step in range(6):
            grads = [(2 * rng.standard_normal(a.shape)).astype(dtype).T for a in start]
            if step % 2:
                gpuopt.update(opt_strided, strided, grads)
                gpuopt.update(opt_contiguous, contiguous, [np.ascontiguousarray(g) for g in grads])
            else:
                gpuopt.update(opt_strided, strided[0], grads[0])
                gpuopt.update(opt_contiguous, contiguous[0], np.ascontiguousarray(grads[0]))
            for a, b in zip(strided, contiguous):
                assert not a.flags.c_contiguous and np.array_equal(a, b), (case, step)
    assert counter.names.count("gpuopt_strided") == 3 * 1 + 3 * 2
    for a, b in zip(strided, contiguous):
        for leaf_a, leaf_b in zip(opt_strided.leaves(), opt_contiguous.leaves()):
            if leaf_a.state:
                assert np.array_equal(leaf_a.state_for(a).slots, leaf_b.state_for(b).slots), case
