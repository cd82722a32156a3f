"""Properties over random chains, shapes, dtypes and memory layouts (hypothesis):
- one fused call over a collection equals one call per array, bit for bit, and both follow
  the float64 oracle (gpuopt.plain, tests/cases.py);
- a rejected call never changes a byte of any parameter, gradient or state.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpuopt

from .cases import Oracle, R, build_gpuopt, chain
from .test_errors import snapshot

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

RULE_SPECS = [
    R("Descent", 0.1), R("Momentum", 0.01, 0.9), R("Nesterov", 0.01), R("RMSProp", 0.01), R("ADAM", 0.01),
    R("RADAM", 0.01), R("AdaMax", 0.01), R("ADAGrad", 0.1), R("ADADelta", 0.9), R("AMSGrad", 0.01),
    R("NADAM", 0.01), R("WeightDecay", 1e-2), R("ClipValue", 0.5), R("ClipNorm", 1.0), R("InvDecay", 0.1),
    R("ExpDecay", 0.5, 0.5, 2, 1e-3),
]

LAYOUTS = ["contiguous", "transposed", "strided", "reversed"]

#: dtype -> (rtol, atol as a fraction of the largest |total step|), as in test_rules
TOLERANCES = {np.dtype(np.float64): (1e-9, 1e-11), np.dtype(np.float32): (5e-5, 2e-5)}


def laid_out(values: np.ndarray, layout: str) -> np.ndarray:
    """A new array equal to ``values`` whose memory is laid out as named."""
    if layout == "transposed":
        return np.array(values.T, order="C").T  # (a copy, even where values.T is contiguous)
    if layout == "strided":
        wide = np.zeros((*values.shape[:-1], values.shape[-1] * 2), values.dtype)
        wide[..., ::2] = values
        return wide[..., ::2]
    if layout == "reversed":
        return np.array(values[::-1], order="C")[::-1]
    return values.copy()


@st.composite
def problems(draw: st.DrawFn) -> dict:
    specs = draw(st.lists(st.sampled_from(RULE_SPECS), min_size=1, max_size=4))
    count = draw(st.integers(1, 4))
    shapes = [tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))) for _ in range(count)]
    return {
        "spec": specs[0] if len(specs) == 1 else chain(*specs),
        "dtype": np.dtype(draw(st.sampled_from([np.float32, np.float64]))),
        "shapes": shapes,
        "layouts": [draw(st.sampled_from(LAYOUTS)) for _ in shapes],
        "steps": draw(st.integers(1, 4)),
        "seed": draw(st.integers(0, 2**16)),
    }


def data(problem: dict) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    rng = np.random.default_rng(problem["seed"])
    dtype = problem["dtype"]
    start = [rng.standard_normal(s).astype(dtype) for s in problem["shapes"]]
    grads = [[rng.standard_normal(s).astype(dtype) for s in problem["shapes"]] for _ in range(problem["steps"])]
    return start, grads


@SETTINGS
@given(problems())
def test_fused_equals_one_by_one_equals_reference(problem):
    start, grads = data(problem)
    fused = [laid_out(x, layout) for x, layout in zip(start, problem["layouts"])]
    single = [laid_out(x, layout) for x, layout in zip(start, problem["layouts"])]
    reference = [x.astype(np.float64) for x in start]
    opt_fused, opt_single = build_gpuopt(problem["spec"]), build_gpuopt(problem["spec"])
    ref = Oracle(problem["spec"])
    for step in grads:
        gpuopt.update(opt_fused, fused, step)
        for x, g in zip(single, step):
            gpuopt.update(opt_single, x, g)
        for i, g in enumerate(step):
            reference[i] = reference[i] - ref.step(i, reference[i], g.astype(np.float64))
    rtol, atol = TOLERANCES[problem["dtype"]]
    for x0, a, b, r in zip(start, fused, single, reference):
        np.testing.assert_array_equal(a, b)
        scale = float(np.max(np.abs(r - x0))) or 1.0
        np.testing.assert_allclose(a.astype(np.float64), r, rtol=rtol, atol=atol * scale)


def _bad_shape(params: list, grads: list, i: int) -> None:
    grads[i] = np.ones(params[i].size + 1, params[i].dtype)


def _bad_dtype(params: list, grads: list, i: int) -> None:
    grads[i] = grads[i].astype(np.int32)


def _read_only(params: list, grads: list, i: int) -> None:
    params[i].setflags(write=False)


def _gradient_is_another_parameter(params: list, grads: list, i: int) -> None:
    grads[i] = params[(i + 1) % len(params)]  # (with one parameter: its own gradient, which is fine)


def _overlapping_views(params: list, grads: list, i: int) -> None:
    params.append(params[i][..., ::-1])  # always a view of the same elements
    grads.append(np.ones(params[-1].shape, params[-1].dtype))


MUTATIONS = [_bad_shape, _bad_dtype, _read_only, _gradient_is_another_parameter, _overlapping_views]


@SETTINGS
@given(problems(), st.sampled_from(MUTATIONS), st.integers(0, 3), st.booleans())
def test_a_rejected_call_changes_nothing(problem, mutate, position, as_dict):
    start, grads = data(problem)
    params = [laid_out(x, layout) for x, layout in zip(start, problem["layouts"])]
    opt = build_gpuopt(problem["spec"])
    for step in grads[:-1]:
        gpuopt.update(opt, params, step)
    bad_params, bad_grads = list(params), [g.copy() for g in grads[-1]]
    i = position % len(params)
    mutate(bad_params, bad_grads, i)
    every = list({id(a): a for a in bad_params + params}.values())
    before = snapshot(opt, every, bad_grads)
    if as_dict:
        call_params = {f"p{k}": p for k, p in enumerate(bad_params)}
        call_grads = {f"p{k}": g for k, g in enumerate(bad_grads)}
    else:
        call_params, call_grads = bad_params, bad_grads
    try:
        gpuopt.update(opt, call_params, call_grads)
    except (TypeError, ValueError) as exc:
        assert "\n" not in str(exc)
        assert snapshot(opt, every, bad_grads) == before
    else:
        # Only a parameter that is its own gradient (a collection of one) is a legal call.
        assert mutate is _gradient_is_another_parameter and len(params) == 1, f"{mutate.__name__} was accepted"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_hold_the_values_they_are_given(layout):
    values = np.arange(24.0).reshape(2, 3, 4)
    arranged = laid_out(values, layout)
    np.testing.assert_array_equal(arranged, values)
    assert arranged.flags.c_contiguous == (layout == "contiguous")
