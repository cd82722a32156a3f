"""The rules' values: gpuopt against the float64 oracle (the plain formulas of gpuopt.plain,
run by tests/cases.py), PyTorch and
Flux.Optimise's own tests (fitting a matrix, ExpDecay's schedule, clipping)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import gpuopt

from .cases import ORACLE_CASES, Oracle, R, build_gpuopt, spec_id

STEPS = 20
BLOCK_CROSSING = 2 * 16384 + 17  # more than two of the NumPy backend's blocks

#: dtype -> (rtol, atol as a fraction of the largest |expected step|). float64 is the same
#: math in the same precision. float32 keeps float32 state for 20 steps. float16 stores
#: the result in float16 (half an ulp is 2.4e-4 relative), computing in float32.
TOLERANCES = {
    np.dtype(np.float64): (1e-10, 1e-12),
    np.dtype(np.float32): (2e-5, 1e-5),
    np.dtype(np.float16): (2e-3, 1e-3),
}

DTYPES = [np.float64, np.float32, np.float16]


def gradient(rng: np.random.Generator, shape: tuple, dtype) -> np.ndarray:
    """A gradient whose overall scale varies from step to step, so that ClipNorm's two
    branches (norm above and below the threshold) both occur."""
    scale = 10 ** rng.uniform(-1.0, 0.5)
    return np.array(scale * rng.standard_normal(shape), dtype=dtype)


def assert_step_close(actual, expected, dtype, what: str) -> None:
    """|actual - expected| <= rtol*|expected| + atol*max|expected| + one ulp of ``dtype``."""
    rtol, atol = TOLERANCES[np.dtype(dtype)]
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, what
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    ulp = np.abs(np.spacing(expected.astype(dtype))).astype(np.float64)
    bound = rtol * np.abs(expected) + atol * scale + ulp
    err = np.abs(actual - expected)
    bad = ~(err <= bound)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.size} elements differ; worst at "
        f"{np.unravel_index(int(np.argmax(np.where(bad, err, -1))), bad.shape)}: "
        f"got {actual[bad][:3]}, expected {expected[bad][:3]}"
    )


def assert_update_close(x_new, x_old64, expected_step, dtype, what: str) -> None:
    """``x_new`` equals ``x_old - step`` up to the step's tolerance and the final rounding."""
    rtol, atol = TOLERANCES[np.dtype(dtype)]
    expected_step = np.asarray(expected_step, dtype=np.float64)
    target = x_old64 - expected_step
    scale = float(np.max(np.abs(expected_step))) if expected_step.size else 0.0
    ulp = np.abs(np.spacing(target.astype(dtype))).astype(np.float64)
    bound = rtol * np.abs(expected_step) + atol * scale + ulp
    err = np.abs(np.asarray(x_new, dtype=np.float64) - target)
    bad = ~(err <= bound)
    assert not bad.any(), f"{what}: got {x_new[bad][:3]}, expected {target[bad][:3]}"


def run_against_reference(spec, x: np.ndarray, grad_dtype, mode: str, rng, steps: int = STEPS,
                          xs_outside: tuple | None = None) -> None:
    """``steps`` steps of gpuopt on ``x`` (in place) and of the reference, compared each step.

    The reference is given the library's current ``x`` (as float64) and the same gradient
    each step, so only the rules' own state and arithmetic can make them differ.
    """
    opt, ref = build_gpuopt(spec), Oracle(spec)
    dtype = x.dtype
    for t in range(1, steps + 1):
        g = gradient(rng, x.shape, grad_dtype)
        g_before = g.copy()
        x64 = x.astype(np.float64)
        expected = ref.step("x", x64, g.astype(np.float64))
        if mode == "apply":
            x_before = x.copy()
            out = gpuopt.apply(opt, x, g)
            assert isinstance(out, np.ndarray) and out.shape == x.shape and out.dtype == dtype
            np.testing.assert_array_equal(x, x_before, err_msg="apply modified x")
            assert_step_close(out, expected, dtype, f"{spec_id(spec)} step {t}")
            x -= out
        else:
            gpuopt.update(opt, x, g)
            assert_update_close(x, x64, expected, dtype, f"{spec_id(spec)} step {t}")
        np.testing.assert_array_equal(g, g_before, err_msg="the gradient was modified")
        if xs_outside is not None:
            base, mask, before = xs_outside
            np.testing.assert_array_equal(base[~mask], before, err_msg="elements outside the view")


CASE_IDS = list(ORACLE_CASES)
ORACLE_SPECS = list(ORACLE_CASES.values())


@pytest.mark.parametrize("mode", ["update", "apply"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("spec", ORACLE_SPECS, ids=CASE_IDS)
def test_steps_match_reference(spec, dtype, mode):
    rng = np.random.default_rng(1234)
    x = np.array(rng.standard_normal((2, 5)), dtype=dtype)
    run_against_reference(spec, x, dtype, mode, rng)


#: 0-d, empty, 1-element, 2-D, 3-D, and more than two blocks (in float64 and float32)
SHAPES = [(np.float64, s) for s in [(), (0,), (3, 0), (1,), (7, 5), (2, 3, 4), (BLOCK_CROSSING,)]]
SHAPES += [(np.float32, (BLOCK_CROSSING,))]


@pytest.mark.parametrize("dtype, shape", SHAPES, ids=[f"{np.dtype(d).name}-{s}" for d, s in SHAPES])
@pytest.mark.parametrize("spec", ORACLE_SPECS, ids=CASE_IDS)
def test_shapes(spec, shape, dtype):
    rng = np.random.default_rng(7)
    x = np.array(rng.standard_normal(shape), dtype=dtype)
    steps = 5 if shape == (BLOCK_CROSSING,) else 10
    run_against_reference(spec, x, dtype, "update", rng, steps=steps)
    assert x.shape == shape


VIEWS = {
    "every-other-column": lambda a: a[:, ::2],
    "transposed": lambda a: a.T,
    "interior": lambda a: a[1:-1:2, 2:7],
    "reversed-rows": lambda a: a[::-1, 1:],
}


@pytest.mark.parametrize(
    "view, mode", [(v, "update") for v in VIEWS] + [("every-other-column", "apply")], ids="-".join
)
@pytest.mark.parametrize("spec", ORACLE_SPECS, ids=CASE_IDS)
def test_non_contiguous_views(spec, view, mode):
    rng = np.random.default_rng(11)
    base = rng.standard_normal((6, 10))
    x = VIEWS[view](base)
    assert x.base is base
    inside = np.zeros(base.shape, dtype=bool)
    VIEWS[view](inside)[...] = True
    run_against_reference(spec, x, np.float64, mode, rng, steps=10,
                          xs_outside=(base, inside, base[~inside].copy()))


@pytest.mark.parametrize("spec", ORACLE_SPECS, ids=CASE_IDS)
def test_non_contiguous_gradient(spec):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 5))
    opt, ref = build_gpuopt(spec), Oracle(spec)
    for t in range(STEPS):
        g = gradient(rng, (5, 4), np.float64).T  # Fortran-ordered
        expected = ref.step("x", x.copy(), g)
        x_old = x.copy()
        gpuopt.update(opt, x, g)
        assert_update_close(x, x_old, expected, np.float64, f"{spec_id(spec)} step {t}")


@pytest.mark.parametrize(
    "param_dtype, grad_dtype",
    [(np.float32, np.float64), (np.float64, np.float32), (np.float16, np.float32)],
    ids=["f32-param-f64-grad", "f64-param-f32-grad", "f16-param-f32-grad"],
)
@pytest.mark.parametrize("spec", ORACLE_SPECS, ids=CASE_IDS)
def test_gradient_dtype_differs_from_parameter(spec, param_dtype, grad_dtype):
    rng = np.random.default_rng(3)
    x = np.array(rng.standard_normal((3, 4)), dtype=param_dtype)
    run_against_reference(spec, x, grad_dtype, "update", rng, steps=10)
    assert x.dtype == param_dtype


@pytest.mark.parametrize("spec", ORACLE_SPECS, ids=CASE_IDS)
def test_collection_matches_reference_per_parameter(spec):
    """Several parameters in one call: each has its own state; ExpDecay decays once a step."""
    rng = np.random.default_rng(21)
    shapes = {"w": (3, 4), "b": (4,), "s": ()}
    params = {k: np.array(rng.standard_normal(s)) for k, s in shapes.items()}
    opt, ref = build_gpuopt(spec), Oracle(spec)
    for t in range(STEPS):
        grads = {k: gradient(rng, s, np.float64) for k, s in shapes.items()}
        old = {k: p.copy() for k, p in params.items()}
        expected = {k: ref.step(k, old[k], grads[k]) for k in shapes}
        gpuopt.update(opt, params, grads)
        for k in shapes:
            assert_update_close(params[k], old[k], expected[k], np.float64, f"{spec_id(spec)} {k} step {t}")


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("spec", ORACLE_SPECS, ids=CASE_IDS)
def test_non_finite_gradients_propagate(spec, dtype):
    """A NaN or inf in the gradient gives what the formulas give (no rule here checks for
    them): NaN propagates, as in PyTorch and Flux."""
    rng = np.random.default_rng(8)
    x = np.array(rng.standard_normal(8), dtype=dtype)
    opt, ref = build_gpuopt(spec), Oracle(spec)
    for t in range(6):
        g = gradient(rng, x.shape, dtype)
        if t == 2:
            g[1], g[4], g[6] = np.nan, np.inf, -np.inf
        x64 = x.astype(np.float64)
        with np.errstate(invalid="ignore"):  # inf - inf, inf / inf: NaN is the point here
            expected = ref.step("x", x64, g.astype(np.float64))
            target = x64 - expected
        gpuopt.update(opt, x, g)
        np.testing.assert_array_equal(np.isnan(x), np.isnan(target), err_msg=f"NaNs at step {t}")
        np.testing.assert_array_equal(np.isinf(x), np.isinf(target), err_msg=f"infs at step {t}")
        finite = np.isfinite(target)
        assert_update_close(x[finite], x64[finite], expected[finite], dtype, f"{spec_id(spec)} step {t}")
        if t == 2 and spec[0] in ("Descent", "ClipValue", "WeightDecay", "ADAM"):
            assert np.isnan(x[1]), "a NaN gradient must give a NaN parameter"


# -- PyTorch cross-checks: the equivalences the README's rule table lists ---------------

TORCH_CASES = [
    (R("Descent", 0.1), "SGD", {"lr": 0.1}),
    (R("Descent", 0.03), "SGD", {"lr": 0.03}),
    (R("Momentum", 0.01, 0.9), "SGD", {"lr": 0.01, "momentum": 0.9}),
    (R("Momentum", 0.05, 0.5), "SGD", {"lr": 0.05, "momentum": 0.5}),
    (R("Nesterov", 0.001, 0.9), "SGD", {"lr": 0.001, "momentum": 0.9, "nesterov": True}),
    (R("Nesterov", 0.02, 0.7), "SGD", {"lr": 0.02, "momentum": 0.7, "nesterov": True}),
    (R("RMSProp", 0.001, 0.9), "RMSprop", {"lr": 0.001, "alpha": 0.9, "eps": 1e-8}),
    (R("RMSProp", 0.01, 0.5), "RMSprop", {"lr": 0.01, "alpha": 0.5, "eps": 1e-8}),
    (R("ADAM", 0.001, (0.9, 0.999)), "Adam", {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-8}),
    (R("ADAM", 0.01, (0.8, 0.9)), "Adam", {"lr": 0.01, "betas": (0.8, 0.9), "eps": 1e-8}),
    (R("ADAGrad", 0.1), "Adagrad", {"lr": 0.1, "initial_accumulator_value": 1e-8, "eps": 1e-8}),
    (R("ADAGrad", 0.01), "Adagrad", {"lr": 0.01, "initial_accumulator_value": 1e-8, "eps": 1e-8}),
    (R("ADADelta", 0.9), "Adadelta", {"lr": 1.0, "rho": 0.9, "eps": 1e-8}),
    (R("ADADelta", 0.5), "Adadelta", {"lr": 1.0, "rho": 0.5, "eps": 1e-8}),
    (R("ADAMW", 0.001, (0.9, 0.999), 0.01), "AdamW",
     {"lr": 0.001, "betas": (0.9, 0.999), "weight_decay": 0.01 / 0.001, "eps": 1e-8}),
    (R("ADAMW", 0.01, (0.8, 0.99), 0.001), "AdamW",
     {"lr": 0.01, "betas": (0.8, 0.99), "weight_decay": 0.001 / 0.01, "eps": 1e-8}),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(
    "spec, torch_name, torch_kwargs", TORCH_CASES,
    ids=[f"{spec_id(s)}-vs-{n}" for s, n, _ in TORCH_CASES],
)
def test_matches_pytorch(spec, torch_name, torch_kwargs, dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(99)
    x = np.array(rng.standard_normal((3, 7)), dtype=dtype)
    p = torch.nn.Parameter(torch.tensor(x.copy()))
    torch_opt = getattr(torch.optim, torch_name)([p], **torch_kwargs)
    opt = build_gpuopt(spec)
    rtol, atol = (1e-9, 1e-12) if dtype == np.float64 else (5e-5, 1e-6)
    for t in range(STEPS):
        g = gradient(rng, x.shape, dtype)
        x_old, p_old = x.copy(), p.detach().numpy().copy()
        gpuopt.update(opt, x, g)
        p.grad = torch.tensor(g.copy())
        torch_opt.step()
        ours = x_old.astype(np.float64) - x
        theirs = p_old.astype(np.float64) - p.detach().numpy()
        scale = float(np.max(np.abs(theirs)))
        ulp = 4 * np.abs(np.spacing(x_old)).astype(np.float64)  # two roundings of x - step
        assert np.all(np.abs(ours - theirs) <= rtol * np.abs(theirs) + atol * scale + ulp), (
            f"step {t}: {ours.ravel()[:3]} vs torch {theirs.ravel()[:3]}"
        )


# -- Flux.Optimise's own tests ---------------------------------------------------------

#: Flux's rules, each fitting w to w1. Where the default learning rate needs far more
#: than a few thousand steps, a larger one is used (ADADelta has none: a larger eps is its
#: initial step size instead). The last three are Flux's decay chains.
FIT_CASES = [
    gpuopt.Descent, gpuopt.Momentum,
    lambda: gpuopt.Nesterov(0.01),
    lambda: gpuopt.RMSProp(0.01),
    lambda: gpuopt.ADAM(0.01),
    lambda: gpuopt.RADAM(0.02),
    lambda: gpuopt.AdaMax(0.05),
    lambda: gpuopt.ADAGrad(0.3),
    lambda: gpuopt.ADADelta(0.9, eps=1e-4),
    lambda: gpuopt.AMSGrad(0.01),
    lambda: gpuopt.NADAM(0.01),
    lambda: gpuopt.ADAMW(0.01),
    lambda: gpuopt.Optimiser(gpuopt.InvDecay(), gpuopt.ADAM(0.01)),
    lambda: gpuopt.Optimiser(gpuopt.WeightDecay(), gpuopt.ADAM(0.01)),
    lambda: gpuopt.Optimiser(gpuopt.ExpDecay(), gpuopt.ADAM(0.01)),
]


@pytest.mark.parametrize("make", FIT_CASES, ids=lambda m: repr(m()))
def test_fits_w_to_w1(make):
    """Flux.Optimise's test: loss(x) = mse(w*x, w1*x) with x = rand(10) each step, until < 0.01."""
    rng = np.random.default_rng(42)
    opt = make()
    w, w1 = rng.standard_normal((10, 10)), rng.standard_normal((10, 10))
    w_id = id(w)

    def loss(x):
        return float(np.mean((w @ x - w1 @ x) ** 2))

    start = loss(rng.random((10, 10)))
    assert start > 1
    for t in range(1, 10001):
        x = rng.random(10)
        grad = 2 / 10 * np.outer(w @ x - w1 @ x, x)  # d mse / d w
        gpuopt.update(opt, w, grad)
        if t % 25 == 0 and loss(rng.random((10, 10))) < 0.01:
            break
    else:
        pytest.fail(f"{opt!r}: loss still {loss(rng.random((10, 10))):.3g} after {t} steps")
    assert id(w) == w_id and np.isfinite(w).all()


def test_exp_decay_sanity():
    """ExpDecay(0.2, 0.5, 1, 1e-3): after step k the step is eta = max(0.2*0.5^k, 1e-3)."""
    o = gpuopt.ExpDecay(0.2, 0.5, 1, 1e-3)
    p = np.zeros(1)
    expected = [max(0.2 * 0.5**k, 1e-3) for k in range(1, 9)]
    actual = []
    for _ in range(8):
        step = gpuopt.apply(o, p, np.ones(1))
        assert step[0] == o.eta
        actual.append(o.eta)
    assert actual == expected
    assert expected[-1] == 1e-3  # the clip is reached within the eight steps


def test_exp_decay_schedule_over_5000_steps():
    """ExpDecay(0.1, 0.1, 1000, 1e-4): each step is exactly eta*gradient; eta changes at
    steps 1000, 2000, 3000 and 4000 (0.1*0.1^3 rounds just above 1e-4), then stays at clip."""
    rng = np.random.default_rng(0)
    o = gpuopt.ExpDecay(0.1, 0.1, 1000, 1e-4)
    w1 = rng.standard_normal((3, 3))
    decay_steps = []
    for t in range(1, 5001):
        prev_eta = o.eta
        g = rng.standard_normal((3, 3))
        delta = gpuopt.apply(o, w1, g)
        assert np.array_equal(delta, o.eta * g), f"step {t}"
        w1 -= delta
        if o.eta != prev_eta:
            decay_steps.append(t)
    assert decay_steps == [1000, 2000, 3000, 4000]
    assert o.eta == o.clip


def test_exp_decay_decays_once_per_step_over_several_parameters():
    o = gpuopt.ExpDecay(1.0, 0.5, 2, 0.0)
    opt = gpuopt.Optimiser(o, gpuopt.Descent(1.0))
    params = [np.ones(3), np.ones((2, 2)), np.ones(())]
    for t in range(1, 9):
        before = [p.copy() for p in params]
        grads = [np.full(p.shape, 0.25) for p in params]
        gpuopt.update(opt, params, grads)
        eta = 0.5 ** (t // 2)
        assert o.eta == eta, f"step {t}"
        for p, b in zip(params, before):
            np.testing.assert_array_equal(p, b - eta * 0.25)  # every parameter saw the same eta


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("thresh", [1.0, 0.01, 3.5])
def test_clip_value_bounds_output(thresh, dtype):
    rng = np.random.default_rng(int(thresh * 100))
    w = np.array(rng.standard_normal((10, 10)), dtype=dtype)
    x = 1000 * rng.standard_normal(10)
    grad = np.array(np.outer(np.ones(10), x), dtype=dtype)  # gradient of sum(w @ x)
    out = gpuopt.apply(gpuopt.ClipValue(thresh), w, grad)
    assert np.all(np.abs(out) <= np.asarray(thresh, dtype=dtype))
    np.testing.assert_array_equal(out, np.clip(grad, -thresh, thresh).astype(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("thresh", [1.0, 0.01, 3.5])
def test_clip_norm_scales_down_to_thresh(thresh, dtype):
    rng = np.random.default_rng(int(thresh * 100))
    w = np.array(rng.standard_normal((10, 10)), dtype=dtype)
    grad = np.array(np.outer(np.ones(10), 1000 * rng.standard_normal(10)), dtype=dtype)
    out = gpuopt.apply(gpuopt.ClipNorm(thresh), w, grad)
    norm = float(np.linalg.norm(out.astype(np.float64)))
    eps = float(np.finfo(dtype).eps)
    # The norm is thresh up to the rounding of n and of each element (a few ulps).
    assert norm <= thresh * (1 + 4 * eps)
    assert norm == pytest.approx(thresh, rel=8 * eps)
    grad64 = grad.astype(np.float64)
    expected = grad64 * thresh / np.linalg.norm(grad64)  # same direction
    assert_step_close(out, expected, dtype, "ClipNorm direction")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_clip_norm_leaves_small_updates_unchanged(dtype):
    rng = np.random.default_rng(2)
    w = np.array(rng.standard_normal((10, 10)), dtype=dtype)
    grad = np.array(rng.standard_normal((10, 10)), dtype=dtype)
    thresh = 1.01 * float(np.linalg.norm(grad.astype(np.float64)))
    out = gpuopt.apply(gpuopt.ClipNorm(thresh), w, grad)
    np.testing.assert_array_equal(out, grad)


def test_radam_switches_to_adaptive_step_when_rho_exceeds_4():
    """With beta2 = 0.9 (rinf = 19), rho_t > 4 first at t = 5: steps 1-4 are the momentum
    step m/(1-b1^t)*eta, step 5 on are scaled by sqrt(v)."""
    x = np.zeros(4)
    g = np.array([1.0, -2.0, 0.5, 4.0])
    opt = gpuopt.RADAM(0.1, (0.8, 0.9))
    rinf = 2 / (1 - 0.9) - 1
    for t in range(1, 7):
        out = gpuopt.apply(opt, x, g)
        rho = rinf - 2 * t * 0.9**t / (1 - 0.9**t)
        # a constant gradient: m/(1-b1^t) = g and v/(1-b2^t) = g^2
        if t <= 4:
            assert rho <= 4
            np.testing.assert_allclose(out, 0.1 * g, rtol=1e-12)
        else:
            assert rho > 4
            r = math.sqrt((rho - 4) * (rho - 2) * rinf / ((rinf - 4) * (rinf - 2) * rho))
            np.testing.assert_allclose(out, 0.1 * r * g / (np.abs(g) + 1e-8), rtol=1e-12)


def test_chain_feeds_each_output_to_the_next():
    """Optimiser(ClipValue(1), WeightDecay(0.5), Descent(0.1)) on a constant example."""
    x = np.array([2.0, -4.0, 0.0, 1.0])
    g = np.array([5.0, -0.25, -3.0, 0.5])
    opt = gpuopt.Optimiser(gpuopt.ClipValue(1), gpuopt.WeightDecay(0.5), gpuopt.Descent(0.1))
    out = gpuopt.apply(opt, x, g)
    np.testing.assert_allclose(out, 0.1 * (np.array([1.0, -0.25, -1.0, 0.5]) + 0.5 * x), rtol=1e-15)


def test_adamw_is_adam_then_weight_decay():
    rng = np.random.default_rng(4)
    x1 = rng.standard_normal(6)
    x2 = x1.copy()
    a = gpuopt.ADAMW(0.01, (0.8, 0.95), 0.1)
    b = gpuopt.Optimiser(gpuopt.ADAM(0.01, (0.8, 0.95)), gpuopt.WeightDecay(0.1))
    for _ in range(STEPS):
        g = rng.standard_normal(6)
        gpuopt.update(a, x1, g)
        gpuopt.update(b, x2, g)
        np.testing.assert_array_equal(x1, x2)


@pytest.mark.parametrize(
    "make, gamma",
    [(lambda: gpuopt.Optimiser(gpuopt.InvDecay(0.1), gpuopt.Descent(1.0)), 0.1),
     (lambda: gpuopt.InvDecay(0.5), 0.5)],
    ids=["chain", "alone"],
)
def test_inv_decay_divides_by_one_plus_gamma_n(make, gamma):
    opt = make()
    x = np.zeros(3)
    for n in range(1, 11):
        out = gpuopt.apply(opt, x, np.ones(3))
        np.testing.assert_allclose(out, 1 / (1 + gamma * n), rtol=1e-15)


# -- ClipNorm's norm does not overflow ---------------------------------------------------------

#: (dtype, element size, thresh): the sum of squares overflows the compute type in all but the last
CLIPNORM_OVERFLOW = [
    (np.float32, 1e20, 2.0), (np.float32, 3e38, 2.0), (np.float16, 6e4, 2.0),
    (np.float64, 1e200, 2.0), (np.float64, 1e307, 1e300), (np.float32, 1.0, 0.5),
]


def clipnorm_overflow_check(dtype, size, thresh):
    """A step of norm ``thresh`` along ``d``, for a single array and inside a collection."""
    d = np.array([size, -size, size, size / 2], dtype)
    expected = -d.astype(np.float64) * (thresh / (size * 3.25**0.5))
    x = np.zeros(4, dtype)
    gpuopt.update(gpuopt.ClipNorm(thresh), x, d)
    params = [np.zeros(4, dtype), np.zeros(3, dtype)]
    gpuopt.update(gpuopt.ClipNorm(thresh), params, [d, np.ones(3, dtype)])
    rtol = 2e-3 if dtype == np.float16 else 1e-6
    for got in (x, params[0]):
        np.testing.assert_allclose(got.astype(np.float64), expected, rtol=rtol)


@pytest.mark.parametrize("dtype, size, thresh", CLIPNORM_OVERFLOW,
                         ids=[f"{np.dtype(c[0]).name}-{c[1]:g}" for c in CLIPNORM_OVERFLOW])
def test_clipnorm_norm_never_overflows(dtype, size, thresh):
    clipnorm_overflow_check(dtype, size, thresh)
