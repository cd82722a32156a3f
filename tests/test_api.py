"""The public API: update and apply on arrays and collections, Flux's names and
signatures, Optimiser as a list, weakly held state, live hyperparameters, no allocation per
step, and user-defined rules."""

from __future__ import annotations

import gc
import inspect
import tracemalloc
import weakref

import numpy as np
import pytest

import gpuopt
from gpuopt.plan import plan

from .cases import Oracle, R, build_gpuopt, chain, spec_id

EPS = 1e-8


# -- update and apply on one array and on collections -----------------------------------

COLLECTIONS = {
    "list": lambda items: [v for _, v in items],
    "tuple": lambda items: tuple(v for _, v in items),
    "dict": lambda items: dict(items),
}
KEYS = ["w", "b", "c", "d"]
SHAPES = [(3, 4), (4,), (), (2, 2)]


@pytest.mark.parametrize("kind", list(COLLECTIONS))
@pytest.mark.parametrize(
    "spec",
    [chain(R("ClipNorm", 1.0), R("ADAM", 0.01)), chain(R("ExpDecay", 0.5, 0.5, 2, 0.01), R("Momentum"))],
    ids=spec_id,
)
def test_update_collection_skips_none_gradients(spec, kind):
    """A None gradient skips its parameter: unchanged, no state created, step count frozen."""
    rng = np.random.default_rng(0)
    make = COLLECTIONS[kind]
    arrays = [rng.standard_normal(s) for s in SHAPES]
    params = make(list(zip(KEYS, arrays)))
    opt, ref = build_gpuopt(spec), Oracle(spec)
    skipped = arrays[1]
    for t in range(1, 9):
        # parameter 1 gets a gradient only at steps 4 and 5
        grads64 = [rng.standard_normal(s) for s in SHAPES]
        has_grad = [True, t in (4, 5), True, True]
        grads = make([(k, g if h else None) for k, g, h in zip(KEYS, grads64, has_grad)])
        grads_before = [g.copy() for g in grads64]
        old = [a.copy() for a in arrays]
        expected = [ref.step(k, o, g) if h else None for k, o, g, h in zip(KEYS, old, grads64, has_grad)]
        gpuopt.update(opt, params, grads)
        for a, o, e, h in zip(arrays, old, expected, has_grad):
            if h:
                np.testing.assert_allclose(a, o - e, rtol=1e-12, atol=1e-15)
            else:
                np.testing.assert_array_equal(a, o)
        for g, b in zip(grads64, grads_before):
            np.testing.assert_array_equal(g, b)  # gradients are never modified
        for leaf in opt.leaves():
            state = leaf.state_for(skipped)
            if t < 4:
                assert state is None, f"state created for a skipped parameter at step {t}"
            else:
                assert state.t == min(t, 5) - 3, f"step count of the skipped parameter at step {t}"
            assert leaf.state_for(arrays[0]).t == t
    assert len(opt.leaves()[0]._state) == 4


def test_update_single_array_in_place_and_returns_nothing():
    x = np.arange(6.0).reshape(2, 3)
    g = np.ones((2, 3))
    x_id = id(x)
    assert gpuopt.update(gpuopt.Descent(0.5), x, g) is None
    assert id(x) == x_id
    np.testing.assert_array_equal(x, np.arange(6.0).reshape(2, 3) - 0.5)
    np.testing.assert_array_equal(g, np.ones((2, 3)))


def test_apply_returns_a_new_array_and_advances_state():
    x = np.linspace(-1, 1, 5)
    g = np.full(5, 2.0)
    x_before, g_before = x.copy(), g.copy()
    opt = gpuopt.Momentum(0.1, 0.5)
    first = gpuopt.apply(opt, x, g)
    second = gpuopt.apply(opt, x, g)
    assert first is not x and first is not g and not np.shares_memory(first, x)
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(g, g_before)
    np.testing.assert_allclose(first, 0.2)  # v = -0.1*2
    np.testing.assert_allclose(second, 0.5 * 0.2 + 0.2)  # the state advanced
    assert opt.state_for(x).t == 2


def test_update_with_all_gradients_none_changes_nothing():
    params = [np.ones(3), np.ones(2)]
    opt = gpuopt.ADAM()
    gpuopt.update(opt, params, [None, None])
    np.testing.assert_array_equal(params[0], np.ones(3))
    assert opt.state_for(params[0]) is None and len(opt._state) == 0


def test_torch_cpu_tensor_is_updated_in_place():
    torch = pytest.importorskip("torch")
    p = torch.linspace(-1, 1, 7, dtype=torch.float64)
    g = np.full(7, 0.5)
    expected = p.numpy().copy() - 0.1 * 0.5
    gpuopt.update(gpuopt.Descent(0.1), p, g)
    np.testing.assert_allclose(p.numpy(), expected, rtol=1e-15)


# -- Flux's names, positional order and defaults -----------------------------------------

REQUIRED = inspect.Parameter.empty
SEED_SIGNATURES = {
    "Descent": [("eta", 0.1)],
    "Momentum": [("eta", 0.01), ("rho", 0.9)],
    "Nesterov": [("eta", 0.001), ("rho", 0.9)],
    "RMSProp": [("eta", 0.001), ("rho", 0.9)],
    "ADAM": [("eta", 0.001), ("beta", (0.9, 0.999))],
    "RADAM": [("eta", 0.001), ("beta", (0.9, 0.999))],
    "AdaMax": [("eta", 0.001), ("beta", (0.9, 0.999))],
    "ADAGrad": [("eta", 0.1)],
    "ADADelta": [("rho", 0.9)],
    "AMSGrad": [("eta", 0.001), ("beta", (0.9, 0.999))],
    "NADAM": [("eta", 0.001), ("beta", (0.9, 0.999))],
    "ADAMW": [("eta", 0.001), ("beta", (0.9, 0.999)), ("decay", 0)],
    "WeightDecay": [("wd", 0)],
    "ClipValue": [("thresh", REQUIRED)],
    "ClipNorm": [("thresh", REQUIRED)],
    "InvDecay": [("gamma", 0.001)],
    "ExpDecay": [("eta", 0.001), ("decay", 0.1), ("decay_step", 1000), ("clip", 1e-4)],
}
WITH_EPS = {"RMSProp", "ADAM", "RADAM", "AdaMax", "ADAGrad", "ADADelta", "AMSGrad", "NADAM", "ADAMW"}

#: distinct, valid, non-default values for each positional argument
OTHER_VALUES = {
    "eta": 0.0123, "rho": 0.77, "beta": (0.81, 0.97), "decay": 0.3, "wd": 0.02, "thresh": 2.5,
    "gamma": 0.04, "decay_step": 7, "clip": 0.002,
}


@pytest.mark.parametrize("name", list(SEED_SIGNATURES))
def test_flux_name_is_exported_with_fluxs_signature(name):
    assert name in gpuopt.__all__
    cls = getattr(gpuopt, name)
    params = list(inspect.signature(cls).parameters.values())
    positional = [p for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    keyword_only = [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert [(p.name, p.default) for p in positional] == SEED_SIGNATURES[name]
    assert [(p.name, p.default) for p in keyword_only] == ([("eps", EPS)] if name in WITH_EPS else [])
    assert all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params)


@pytest.mark.parametrize("name", list(SEED_SIGNATURES))
def test_constructor_arguments_are_attributes(name):
    cls = getattr(gpuopt, name)
    signature = SEED_SIGNATURES[name]
    if all(default is not REQUIRED for _, default in signature):
        opt = cls()
        for arg, default in signature:
            assert getattr(opt, arg) == default
    else:
        with pytest.raises(TypeError, match="thresh"):
            cls()
    values = [OTHER_VALUES[arg] for arg, _ in signature]
    opt = cls(*values)  # positionally, in Flux's order
    for (arg, _), value in zip(signature, values):
        assert getattr(opt, arg) == value
    with pytest.raises(TypeError):
        cls(*values, 0.5)  # no further positional argument


@pytest.mark.parametrize("name", sorted(WITH_EPS))
def test_eps_keyword(name):
    opt = getattr(gpuopt, name)(eps=1e-3)
    assert opt.eps == 1e-3
    ref = Oracle(R(name, eps=1e-3))
    x = np.linspace(-1, 1, 6)
    for _ in range(3):
        g = np.array([1e-3, -2e-3, 0.0, 0.5, -1.0, 3e-4])
        np.testing.assert_allclose(gpuopt.apply(opt, x, g), ref.step("x", x, g), rtol=1e-12, atol=1e-16)


@pytest.mark.parametrize(
    "alias, name",
    [("Adam", "ADAM"), ("AdamW", "ADAMW"), ("NAdam", "NADAM"), ("RAdam", "RADAM"),
     ("Adadelta", "ADADelta"), ("Adagrad", "ADAGrad"), ("RMSprop", "RMSProp"), ("SGD", "Descent")],
)
def test_pythonic_aliases(alias, name):
    assert getattr(gpuopt, alias) is getattr(gpuopt, name)


# -- Optimiser is list-like -------------------------------------------------------------


def test_optimiser_is_list_like():
    e, c, a = gpuopt.ExpDecay(0.5, 0.5, 2, 0.01), gpuopt.ClipValue(1.0), gpuopt.ADAM(0.01)
    opt = gpuopt.Optimiser(e, c, a)
    assert len(opt) == 3
    assert opt[0] is e and opt[1] is c and opt[-1] is a
    assert list(opt) == [e, c, a]
    tail = opt[1:]
    assert isinstance(tail, gpuopt.Optimiser) and list(tail) == [c, a]
    x = np.ones(4)
    gpuopt.update(opt, x, np.full(4, 3.0))
    assert tail[-1].state_for(x).t == 1  # a slice is the same rule objects, sharing state
    w = gpuopt.WeightDecay(0.1)
    assert opt.append(w) is None
    assert len(opt) == 4 and opt[-1] is w and opt[3] is w
    assert len(tail) == 2  # the slice is a new chain


def test_appended_rule_takes_part_from_the_next_step():
    rng = np.random.default_rng(1)
    opt = gpuopt.Optimiser(gpuopt.ClipValue(0.5), gpuopt.Momentum(0.1, 0.5))
    ref = Oracle(chain(R("ClipValue", 0.5), R("Momentum", 0.1, 0.5)))
    x = rng.standard_normal(5)
    for t in range(6):
        if t == 3:
            opt.append(gpuopt.WeightDecay(0.2))
            ref.rules.append(Oracle(R("WeightDecay", 0.2)))
        g = rng.standard_normal(5)
        expected = x - ref.step("x", x.copy(), g)
        gpuopt.update(opt, x, g)
        np.testing.assert_allclose(x, expected, rtol=1e-13)


def test_optimiser_rejects_non_rules():
    with pytest.raises(TypeError, match="rule"):
        gpuopt.Optimiser(gpuopt.ADAM(), "Descent")
    opt = gpuopt.Optimiser(gpuopt.ADAM())
    with pytest.raises(TypeError, match="rule"):
        opt.append(lambda d: d)
    assert len(opt) == 1


# -- state is held weakly -----------------------------------------------------------------


@pytest.mark.parametrize(
    "spec", [R("ADAM"), chain(R("ClipNorm", 1.0), R("Momentum")), R("ADAMW", 0.01, (0.9, 0.99), 0.1),
             chain(R("InvDecay"), R("ExpDecay"))],
    ids=spec_id,
)
def test_state_is_held_weakly(spec):
    opt = build_gpuopt(spec)
    keep = np.ones(10)
    gone = np.ones(10)
    gpuopt.update(opt, [keep, gone], [np.ones(10), np.ones(10)])
    for leaf in opt.leaves():
        assert len(leaf._state) == 2
    ref = weakref.ref(gone)
    del gone
    gc.collect()
    assert ref() is None, "the optimiser keeps the parameter alive"
    for leaf in opt.leaves():
        assert len(leaf._state) == 1
        assert leaf.state_for(keep) is not None
    # a new array that reuses the freed memory (and maybe the id) starts from fresh state
    fresh = np.ones(10)
    gpuopt.update(opt, fresh, np.ones(10))
    for leaf in opt.leaves():
        assert leaf.state_for(fresh).t == 1


# -- hyperparameters are live attributes ----------------------------------------------------

MID_RUN = [
    (R("ADAM", 0.01), "eta", 0.001),
    (R("ADAM", 0.01), "beta", (0.5, 0.9)),
    (R("Momentum"), "rho", 0.5),
    (R("RMSProp"), "eps", 1e-2),
    (R("ADAMW", 0.01, (0.9, 0.99), 0.1), "decay", 0.3),
    (R("ADAMW", 0.01, (0.9, 0.99), 0.1), "eta", 0.05),
    (R("ClipNorm", 2.0), "thresh", 0.5),
    (R("ExpDecay", 0.5, 0.5, 3, 0.01), "decay", 0.9),
    (R("InvDecay", 0.1), "gamma", 1.0),
    (R("AMSGrad", 0.01), "beta", (0.6, 0.7)),
]


@pytest.mark.parametrize("spec, attr, value", MID_RUN, ids=[f"{spec_id(s)}.{a}" for s, a, _ in MID_RUN])
def test_hyperparameter_change_takes_effect_next_step(spec, attr, value):
    rng = np.random.default_rng(6)
    opt, ref = build_gpuopt(spec), Oracle(spec)
    program = plan(opt)
    x = rng.standard_normal((3, 3))
    for t in range(12):
        if t == 5:
            setattr(opt, attr, value)
            setattr(ref, attr, value)
            assert getattr(opt, attr) == value
        g = rng.standard_normal((3, 3))
        expected = x - ref.step("x", x.copy(), g)
        gpuopt.update(opt, x, g)
        np.testing.assert_allclose(x, expected, rtol=1e-12, atol=1e-15, err_msg=f"step {t}")
    assert plan(opt) is program  # no retrace, so no kernel is rebuilt


def test_hyperparameter_change_inside_a_chain():
    rng = np.random.default_rng(2)
    opt = gpuopt.Optimiser(gpuopt.ClipValue(1.0), gpuopt.ADAM(0.01))
    ref = Oracle(chain(R("ClipValue", 1.0), R("ADAM", 0.01)))
    x = rng.standard_normal(8)
    for t in range(8):
        if t == 4:
            opt[0].thresh = ref.rules[0].thresh = 0.1
            opt[-1].eta = ref.rules[1].eta = 0.1
        g = 3 * rng.standard_normal(8)
        expected = x - ref.step("x", x.copy(), g)
        gpuopt.update(opt, x, g)
        np.testing.assert_allclose(x, expected, rtol=1e-12)


BAD_ASSIGNMENTS = [
    (R("Descent"), "eta", -0.1),
    (R("Momentum"), "rho", 1.0),
    (R("ADAM"), "beta", (0.9, 1.0)),
    (R("ADAM"), "beta", 0.9),
    (R("RADAM"), "eta", float("nan")),
    (R("NADAM"), "eps", -1e-8),
    (R("ADADelta"), "rho", -0.5),
    (R("ADAMW"), "decay", -0.1),
    (R("ADAMW"), "beta", (1.0, 0.9)),
    (R("ClipValue", 1.0), "thresh", 0),
    (R("ClipNorm", 1.0), "thresh", -2.0),
    (R("ExpDecay"), "decay_step", 0),
    (R("ExpDecay"), "decay_step", 2.5),
    (R("ExpDecay"), "clip", -1e-4),
    (R("InvDecay"), "gamma", -1.0),
    (R("WeightDecay"), "wd", -0.5),
    (R("AdaMax"), "eta", "0.1"),
]


@pytest.mark.parametrize(
    "spec, attr, value", BAD_ASSIGNMENTS, ids=[f"{spec_id(s)}.{a}={v!r}" for s, a, v in BAD_ASSIGNMENTS]
)
def test_hyperparameters_validated_on_assignment(spec, attr, value):
    opt = build_gpuopt(spec)
    before = getattr(opt, attr)
    with pytest.raises(ValueError, match=attr):
        setattr(opt, attr, value)
    assert getattr(opt, attr) == before
    name, args, kwargs = spec
    cls = getattr(gpuopt, name)
    bound = inspect.signature(cls).bind(*args, **kwargs)
    bound.arguments[attr] = value
    with pytest.raises(ValueError, match=attr):  # the same value is refused at construction
        cls(*bound.args, **bound.kwargs)


# -- no allocation per step after the first ------------------------------------------------


@pytest.mark.parametrize(
    "make, dtype",
    [
        (gpuopt.ADAM, np.float32),
        (lambda: gpuopt.Optimiser(gpuopt.ClipNorm(1.0), gpuopt.ADAM()), np.float32),
        (lambda: gpuopt.Optimiser(gpuopt.ClipValue(1), gpuopt.WeightDecay(1e-4), gpuopt.ADAM()), np.float32),
        (lambda: gpuopt.Optimiser(gpuopt.ClipNorm(1.0), gpuopt.ADAM()), np.float16),
        (lambda: gpuopt.RADAM(), np.float64),
    ],
    ids=["ADAM-f32", "ClipNorm-ADAM-f32", "ClipValue-WeightDecay-ADAM-f32", "ClipNorm-ADAM-f16", "RADAM-f64"],
)
def test_no_allocation_per_step_after_the_first(make, dtype):
    n = 2**20
    rng = np.random.default_rng(0)
    params = [np.array(rng.standard_normal(n), dtype=dtype), np.ones(1000, dtype=dtype)]
    grads = [np.array(rng.standard_normal(n), dtype=dtype), np.ones(1000, dtype=dtype)]
    opt = make()
    gpuopt.update(opt, params, grads)  # creates state and scratch buffers
    array_bytes = params[0].nbytes
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        for _ in range(3):
            gpuopt.update(opt, params, grads)
        growth = tracemalloc.get_traced_memory()[1] - start
        probe = np.empty(n // 4, dtype=np.float32)  # the measurement does see array memory
        seen = tracemalloc.get_traced_memory()[1] - start
        del probe
    finally:
        tracemalloc.stop()
    assert seen >= n  # 1 MiB probe
    assert growth < 64 * 1024, f"{growth} bytes allocated in 3 steps ({array_bytes} per array)"


# -- user-defined rules in the documented form -----------------------------------------------


class SeedMomentum(gpuopt.Rule):
    """Flux.Optimise's Optimiser Interface example, in gpuopt's form."""

    eta = gpuopt.Hyper(0.01, check=gpuopt.non_negative)
    rho = gpuopt.Hyper(0.9, check=gpuopt.unit_interval)
    state = {"velocity": 0.0}

    def step(self, d, x, s, h):
        s.velocity = h.rho * s.velocity - h.eta * d
        return -s.velocity


class DampedSign(gpuopt.Rule):
    """A new rule: a bias-corrected average a of d (state starting at ``start``), giving
    ``eta * a/(1-rho^t)`` where that is larger than ``floor`` in magnitude, else 0."""

    eta = gpuopt.Hyper(0.1, check=gpuopt.non_negative)
    rho = gpuopt.Hyper(0.5, check=gpuopt.unit_interval)
    floor = gpuopt.Hyper(0.05, check=gpuopt.non_negative)
    start = gpuopt.Hyper(0.0, check=gpuopt.non_negative, keyword_only=True)
    state = {"a": "start"}

    def extra_scalars(self, t):
        return {"correction": 1 - self.rho**t}

    def step(self, d, x, s, h):
        s.a = h.rho * s.a + (1 - h.rho) * d
        step = h.eta * s.a / h.correction
        return gpuopt.where(abs(step) > h.floor, step, 0.0)


def damped_sign_by_hand(eta, rho, floor, start):
    a, t = None, 0

    def step(d):
        nonlocal a, t
        t += 1
        a = (np.full_like(d, start) if a is None else a) * rho + (1 - rho) * d
        s = eta * a / (1 - rho**t)
        return np.where(np.abs(s) > floor, s, 0.0)

    return step


def test_user_rule_signature_and_validation():
    sig = inspect.signature(DampedSign)
    assert [(p.name, p.default) for p in sig.parameters.values()] == [
        ("eta", 0.1), ("rho", 0.5), ("floor", 0.05), ("start", 0.0)]
    assert sig.parameters["start"].kind is inspect.Parameter.KEYWORD_ONLY
    opt = DampedSign(0.2, 0.3, start=0.5)
    assert (opt.eta, opt.rho, opt.floor, opt.start) == (0.2, 0.3, 0.05, 0.5)
    with pytest.raises(ValueError, match="rho"):
        DampedSign(0.1, 1.5)
    with pytest.raises(ValueError, match="floor"):
        opt.floor = -1.0


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_flux_momentum_example_equals_builtin(dtype):
    rng = np.random.default_rng(3)
    x1 = np.array(rng.standard_normal((4, 6)), dtype=dtype)
    x2 = x1.copy()
    mine, builtin = SeedMomentum(0.05, 0.8), gpuopt.Momentum(0.05, 0.8)
    for _ in range(10):
        g = np.array(rng.standard_normal((4, 6)), dtype=dtype)
        gpuopt.update(mine, x1, g)
        gpuopt.update(builtin, x2, g)
        np.testing.assert_array_equal(x1, x2)
    assert mine.state_for(x1).t == 10


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_user_rule_alone_matches_hand_formula(dtype):
    rng = np.random.default_rng(4)
    x = np.array(rng.standard_normal(50), dtype=dtype)
    opt = DampedSign(0.2, 0.6, 0.05, start=0.1)
    by_hand = damped_sign_by_hand(0.2, 0.6, 0.05, 0.1)
    zeros = 0
    for _ in range(12):
        g = np.array(rng.standard_normal(50), dtype=dtype)
        expected = by_hand(g.astype(np.float64))
        out = gpuopt.apply(opt, x, g)
        # elements within rounding of the floor may fall either side of it in float32
        near = np.abs(np.abs(expected) - 0.05) < 1e-5
        np.testing.assert_allclose(out[~near], expected[~near], rtol=1e-5 if dtype == np.float32 else 1e-13)
        zeros += int(np.sum(expected == 0))
        x -= out
    assert zeros > 0  # the floor was exercised


def test_user_rule_inside_a_chain_matches_hand_formula():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((5, 4))
    opt = gpuopt.Optimiser(gpuopt.ClipValue(0.5), DampedSign(0.3, 0.5, 0.02), gpuopt.WeightDecay(0.01),
                           SeedMomentum(1.0, 0.5))
    damped = damped_sign_by_hand(0.3, 0.5, 0.02, 0.0)
    v = np.zeros_like(x)
    for _ in range(10):
        g = 2 * rng.standard_normal((5, 4))
        d = damped(np.clip(g, -0.5, 0.5)) + 0.01 * x
        v = 0.5 * v - 1.0 * d
        expected = x + v
        gpuopt.update(opt, x, g)
        np.testing.assert_allclose(x, expected, rtol=1e-13, atol=1e-15)
    assert len(opt.leaves()) == 4 and all(leaf.state_for(x) is not None for leaf in opt.leaves())
