"""bfloat16 parameters (PyTorch tensors viewed as their 16-bit patterns) and MixedPrecision:
rounding as PyTorch rounds, every rule against the float64 reference within bfloat16's
resolution, and a master copy that follows float32 training exactly."""

from __future__ import annotations

import io

import numpy as np
import pytest

import gpuopt
from gpuopt import dtypes

from .cases import ORACLE_CASES, Oracle, build_gpuopt, spec_id

torch = pytest.importorskip("torch")


def _bits(t):
    return t.view(torch.int16).numpy().view(np.uint16)


def _special_float32() -> np.ndarray:
    """Values that exercise every rounding case: ties both ways, carries into the exponent,
    overflow to infinity, subnormals, signed zeros, infinities and NaN."""
    rng = np.random.default_rng(0)
    random = (rng.standard_normal(20000) * 10.0 ** rng.integers(-40, 38, 20000)).astype(np.float32)
    upper = rng.integers(0, 1 << 16, 4000, dtype=np.uint32) << 16
    ties = np.concatenate([upper | 0x8000, upper | 0x7FFF, upper | 0x8001, upper | 0xFFFF]).view(np.float32)
    edges = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.3895314e38, np.finfo(np.float32).max,
                      -np.finfo(np.float32).max, 1e-40, -1e-45, 1.0, 1.00390625, 1.01171875], np.float32)
    return np.concatenate([random, ties, edges])


def test_rounding_is_pytorchs_round_to_nearest_even():
    values = _special_float32()
    ours = np.empty(values.size, np.uint16)
    dtypes.narrow(values, ours, np.empty(values.size, np.uint32), np.empty(values.size, bool))
    theirs = _bits(torch.from_numpy(values).to(torch.bfloat16))
    nan = np.isnan(values)
    np.testing.assert_array_equal(ours[~nan], theirs[~nan])
    assert np.all((ours[nan] & 0x7FFF) > 0x7F80)  # NaN stays NaN
    wide = np.empty(values.size, np.float32)
    dtypes.widen(ours, wide)
    np.testing.assert_array_equal(wide[~nan], torch.from_numpy(values).to(torch.bfloat16).float().numpy()[~nan])


def test_bfloat16_tensors_are_updated_in_place_with_float32_state():
    x = torch.randn(1000).to(torch.bfloat16)
    g = torch.randn(1000).to(torch.bfloat16)
    pointer = x.data_ptr()
    opt = gpuopt.ADAM(0.01)
    for _ in range(3):
        gpuopt.update(opt, x, g)
    assert x.dtype == torch.bfloat16 and x.data_ptr() == pointer
    assert opt.state_for(x).slots.dtype == np.float32
    step = gpuopt.apply(gpuopt.Descent(0.5), x, g)  # the step's bfloat16 rounding, as float32
    assert step.dtype == np.float32
    np.testing.assert_array_equal(step, (0.5 * g.float()).to(torch.bfloat16).float().numpy())
    with pytest.raises(TypeError, match=r"params\[0\] has dtype int16"):
        gpuopt.update(opt, [torch.zeros(3, dtype=torch.int16)], [torch.zeros(3, dtype=torch.int16)])


def _bfloat16_ulp(values: np.ndarray) -> np.ndarray:
    magnitude = np.maximum(np.abs(values), np.float64(2.0**-126))
    return 2.0 ** (np.floor(np.log2(magnitude)) - 7)


@pytest.mark.parametrize("spec", list(ORACLE_CASES.values()), ids=list(ORACLE_CASES))
def test_every_rule_within_bfloat16_resolution_of_the_reference(spec):
    """Each step from the same bfloat16 parameter: the float64 reference's new value and
    gpuopt's differ by the float32 arithmetic (relative 2e-5 of the step) plus the rounding
    to bfloat16 (at most half an ulp of the new value)."""
    opt, ref = build_gpuopt(spec), Oracle(spec)
    rng = np.random.default_rng(7)
    x = torch.from_numpy(rng.standard_normal((2, 5)).astype(np.float32)).to(torch.bfloat16)
    for t in range(1, 21):
        g = torch.from_numpy((10 ** rng.uniform(-1, 0.5) * rng.standard_normal((2, 5))).astype(np.float32))
        g = g.to(torch.bfloat16)
        x64 = x.double().numpy()
        expected = x64 - ref.step("x", x64, g.double().numpy())
        gpuopt.update(opt, x, g)
        step = np.abs(x64 - expected)
        bound = 2e-5 * step + 1e-5 * step.max() + 0.5 * _bfloat16_ulp(expected) * (1 + 1e-6)
        err = np.abs(x.double().numpy() - expected)
        assert np.all(err <= bound), f"{spec_id(spec)} step {t}: {x.double().numpy()} vs {expected}"


# -- MixedPrecision -------------------------------------------------------------------------------

MIXED = {
    "ADAM": lambda: gpuopt.ADAM(0.01),
    "ClipNorm+ADAM": lambda: gpuopt.Optimiser(gpuopt.ClipNorm(1.0), gpuopt.ADAM(0.01)),
    "WeightDecay+Momentum": lambda: gpuopt.Optimiser(gpuopt.WeightDecay(0.1), gpuopt.Momentum(0.01)),
    "ExpDecay+Descent": lambda: gpuopt.Optimiser(gpuopt.ExpDecay(1e-3, 0.5, 5, 1e-5), gpuopt.Descent(1.0)),
}


def _low_precision(values: np.ndarray, kind: str):
    if kind == "bfloat16":
        return torch.from_numpy(values).to(torch.bfloat16)
    return values.astype(np.float16)


def _as_float32(x) -> np.ndarray:
    return x.float().numpy() if isinstance(x, torch.Tensor) else x.astype(np.float32)


@pytest.mark.parametrize("kind", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", list(MIXED))
def test_mixed_precision_master_copy_is_float32_training(case, kind):
    """With gradients that the low precision holds exactly, the master copy takes exactly the
    float32 run's steps (WeightDecay reads the master copy as x), and the parameter is always
    its rounding."""
    rng = np.random.default_rng(3)
    start = _as_float32(_low_precision(rng.standard_normal(3000).astype(np.float32), kind))
    wide = start.copy()
    narrow = _low_precision(start, kind)
    mixed, reference = gpuopt.MixedPrecision(MIXED[case]()), MIXED[case]()
    for _ in range(30):
        g = _low_precision(rng.standard_normal(3000).astype(np.float32), kind)
        gpuopt.update(mixed, narrow, g)
        gpuopt.update(reference, wide, _as_float32(g))
        master = mixed.state_for(narrow).slots[0]
        np.testing.assert_array_equal(master, wide)
        np.testing.assert_array_equal(_as_float32(narrow), _as_float32(_low_precision(wide, kind)))


def test_mixed_precision_keeps_tiny_steps_that_plain_storage_loses():
    x_plain = torch.ones(100, dtype=torch.bfloat16)
    x_mixed = torch.ones(100, dtype=torch.bfloat16)
    plain, mixed = gpuopt.Descent(1e-4), gpuopt.MixedPrecision(gpuopt.Descent(1e-4))
    for _ in range(100):
        g = torch.ones(100, dtype=torch.bfloat16)
        gpuopt.update(plain, x_plain, g)
        gpuopt.update(mixed, x_mixed, g)
    assert torch.all(x_plain == 1)  # 1e-4 is below half an ulp of 1 (2^-8): lost every step
    assert torch.all(x_mixed == torch.tensor(0.99, dtype=torch.bfloat16))  # 1 - 100 * 1e-4


def test_mixed_precision_of_float32_is_the_plain_rule():
    rng = np.random.default_rng(4)
    a = rng.standard_normal(500).astype(np.float32)
    b = a.copy()
    mixed, plain = gpuopt.MixedPrecision(gpuopt.ADAM(0.01)), gpuopt.ADAM(0.01)
    for _ in range(10):
        g = rng.standard_normal(500).astype(np.float32)
        gpuopt.update(mixed, a, g)
        gpuopt.update(plain, b, g)
    np.testing.assert_array_equal(a, b)


def test_mixed_precision_composes_and_names_itself():
    inner = gpuopt.Optimiser(gpuopt.ClipNorm(1), gpuopt.ADAM())
    mixed = gpuopt.MixedPrecision(inner)
    assert [type(leaf).__name__ for leaf in mixed.leaves()] == ["MixedPrecision", "ClipNorm", "ADAM"]
    assert repr(mixed).startswith("MixedPrecision(Optimiser(ClipNorm(")
    chained = gpuopt.Optimiser(gpuopt.ClipValue(1.0), gpuopt.MixedPrecision(gpuopt.Momentum()))
    x = np.ones(10, np.float16)
    gpuopt.update(chained, x, np.full(10, 5.0, np.float16))  # clipped to 1, then momentum 0.01
    np.testing.assert_array_equal(x, np.float16(1 - 0.01))
    with pytest.raises(TypeError, match="one master copy"):
        gpuopt.update(gpuopt.MixedPrecision(gpuopt.MixedPrecision(gpuopt.ADAM())), x, x.copy())
    with pytest.raises(TypeError, match="MixedPrecision's rule must be a gpuopt rule"):
        gpuopt.MixedPrecision("ADAM")


def test_checkpoint_keeps_the_master_copy():
    rng = np.random.default_rng(5)
    grads = [rng.standard_normal(200).astype(np.float16) for _ in range(20)]

    def run(steps, opt, x):
        for g in steps:
            gpuopt.update(opt, x, g)

    straight = np.ones(200, np.float16)
    run(grads, gpuopt.MixedPrecision(gpuopt.ADAM(1e-4)), straight)
    x = np.ones(200, np.float16)
    opt = gpuopt.MixedPrecision(gpuopt.ADAM(1e-4))
    run(grads[:10], opt, x)
    saved = io.BytesIO()
    gpuopt.save_state(opt, x, saved)
    saved.seek(0)
    assert not np.array_equal(opt.state_for(x).slots[0], x.astype(np.float32))  # the copy knows more
    fresh = gpuopt.MixedPrecision(gpuopt.ADAM(1e-4))
    gpuopt.load_state(fresh, x, saved)
    np.testing.assert_array_equal(fresh.state_for(x).slots[0], opt.state_for(x).slots[0])
    run(grads[10:], fresh, x)
    np.testing.assert_array_equal(x, straight)


# -- on a GPU: the __nv_bfloat16 kernels against the NumPy path ------------------------------

GPU_CASES = {
    "ADAM": (lambda: gpuopt.ADAM(0.01), True),
    "MixedPrecision of WeightDecay+Momentum": (lambda: gpuopt.MixedPrecision(MIXED["WeightDecay+Momentum"]()), True),
    # the reduction sums in another order than NumPy's blocks: equal to a bfloat16 ulp
    "ClipNorm+ADAM": (MIXED["ClipNorm+ADAM"], False),
}


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and gpuopt.dispatch.gpu_available()),
                    reason="needs a CUDA GPU visible to torch and CuPy")
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_cuda_bfloat16_tensors_match_the_cpu(case):
    factory, exact = GPU_CASES[case]
    generator = torch.Generator().manual_seed(9)
    host = [torch.randn(n, generator=generator).to(torch.bfloat16) for n in (1001, 7, 70001)]
    device = [h.cuda() for h in host]
    on_cpu, on_gpu = factory(), factory()
    for _ in range(10):
        grads = [torch.randn(h.shape, generator=generator).to(torch.bfloat16) for h in host]
        gpuopt.update(on_cpu, host, grads)
        gpuopt.update(on_gpu, device, [g.cuda() for g in grads])
    for h, d in zip(host, device):
        assert d.dtype == torch.bfloat16 and d.is_cuda
        if exact:
            assert torch.equal(h, d.cpu())
        else:
            torch.testing.assert_close(d.cpu().float(), h.float(), rtol=2**-7, atol=1e-6)
