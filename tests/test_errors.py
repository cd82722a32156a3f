"""A bad call raises a clear error naming the offending parameter and what
was expected, and leaves every parameter and all optimiser state exactly as they were."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import gpuopt
import gpuopt.dispatch

KEYS = ["w", "b", "c", "d"]
SHAPES = [(3, 4), (5,), (2, 2), (6,)]


def make_optimiser() -> gpuopt.Optimiser:
    # ExpDecay decays every 2 steps and the bad call is the 4th step: a call that ran the
    # schedule before failing would change eta. ClipNorm needs a reduction; ADAM has slots.
    return gpuopt.Optimiser(
        gpuopt.ExpDecay(0.5, 0.5, 2, 1e-3), gpuopt.ClipNorm(1.0), gpuopt.WeightDecay(1e-3), gpuopt.ADAM(0.01)
    )


def snapshot(opt: gpuopt.Rule, arrays: list[Any], grads: list[Any]) -> dict:
    """Every byte of every parameter and gradient, and all of the optimiser's state."""
    def data(a: Any) -> Any:
        if isinstance(a, np.ndarray):
            return (a.dtype.str, a.shape, a.flags.writeable, a.tobytes())
        return repr(a)

    leaves = []
    for leaf in opt.leaves():
        per_param = []
        for p in arrays:
            state = leaf.state_for(p)
            per_param.append(None if state is None else
                             (state.t, None if state.slots is None else state.slots.tobytes()))
        host = {k: getattr(leaf, k) for k in leaf.schedule_state}
        leaves.append((leaf.hyperparameters(), host, len(leaf._state), per_param))
    return {"params": [data(a) for a in arrays], "grads": [data(g) for g in grads], "state": leaves}


def warmed_up(n_steps: int = 3) -> tuple[gpuopt.Optimiser, list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s) for s in SHAPES]
    opt = make_optimiser()
    for _ in range(n_steps):
        gpuopt.update(opt, params, [rng.standard_normal(s) for s in SHAPES])
    grads = [rng.standard_normal(s) for s in SHAPES]
    return opt, params, grads


# -- one bad entry, the third of the collection ---------------------------------------------


class FakeCupyArray:
    """Stands in for a cupy.ndarray (there is no GPU here): the backend check must refuse
    a NumPy/CuPy pair before anything is read or written."""

    def __init__(self, shape: tuple, dtype: Any = np.float64):
        self.shape, self.dtype, self.size = shape, np.dtype(dtype), int(np.prod(shape))


class FakeCupy:
    ndarray = FakeCupyArray


def _set(which: str, value: Callable[[np.ndarray], Any]) -> Callable:
    """A case that replaces the third parameter or gradient by ``value(original)``."""
    def mutate(params: list, grads: list) -> None:
        target = params if which == "param" else grads
        target[2] = value(params[2] if which == "param" else grads[2])
    return mutate


def _read_only(params: list, grads: list) -> None:
    params[2].setflags(write=False)


def _same_array(params: list, grads: list) -> None:
    params[2] = params[0]
    grads[2] = np.ones(params[0].shape)


# (id, mutation, exception, what the message must say besides the parameter's name)
ENTRY_CASES = [
    ("grad-shape", _set("grad", lambda g: np.ones((2, 3))), ValueError,
     r"shape \(2, 2\).*\(2, 3\).*expected"),
    ("grad-flat-shape", _set("grad", lambda g: np.ones((4,))), ValueError, r"shape .*expected"),
    ("param-int", _set("param", lambda p: p.astype(np.int64)), TypeError,
     r"int64.*expected float16, bfloat16, float32 or float64"),
    ("param-bool", _set("param", lambda p: p > 0), TypeError, r"bool.*expected float16, bfloat16, float32 or float64"),
    ("param-object", _set("param", lambda p: p.astype(object)), TypeError, r"object.*expected float16"),
    ("param-complex", _set("param", lambda p: p.astype(np.complex128)), TypeError,
     r"complex128.*expected float16"),
    ("grad-int", _set("grad", lambda g: g.astype(np.int32)), TypeError, r"gradient.*int32.*expected float16"),
    ("grad-bool", _set("grad", lambda g: g > 0), TypeError, r"gradient.*bool.*expected float16"),
    ("grad-object", _set("grad", lambda g: g.astype(object)), TypeError,
     r"gradient.*object.*expected float16"),
    ("grad-complex", _set("grad", lambda g: g.astype(np.complex64)), TypeError,
     r"gradient.*complex64.*expected"),
    ("grad-list", _set("grad", lambda g: g.tolist()), TypeError, r"gradient.*must be an array.*list"),
    ("grad-float", _set("grad", lambda g: 0.5), TypeError, r"gradient.*must be an array.*float"),
    ("param-list", _set("param", lambda p: p.tolist()), TypeError, r"must be an array.*list"),
    ("read-only-param", _read_only, ValueError, r"read-only"),
    ("same-array-twice", _same_array, ValueError, r"same array as params\[0\]|same array as params\['w'\]"),
    ("backends-differ", _set("grad", lambda g: FakeCupyArray(g.shape)), TypeError,
     r"numpy\.ndarray.*FakeCupyArray.*same backend"),
    ("backends-differ-param", _set("param", lambda p: FakeCupyArray(p.shape)), TypeError,
     r"FakeCupyArray.*numpy\.ndarray.*same backend"),
]


def as_collection(kind: str, items: list) -> Any:
    if kind == "dict":
        return dict(zip(KEYS, items))
    return tuple(items) if kind == "tuple" else list(items)


@pytest.mark.parametrize("kind", ["list", "tuple", "dict"])
@pytest.mark.parametrize("case_id, mutate, exc, expected", ENTRY_CASES, ids=[c[0] for c in ENTRY_CASES])
def test_bad_third_entry_changes_nothing(case_id, mutate, exc, expected, kind, monkeypatch):
    monkeypatch.setattr(gpuopt.dispatch, "cupy_module", lambda: FakeCupy)
    opt, params, grads = warmed_up()
    mutate(params, grads)
    before = snapshot(opt, params, grads)
    name = "params['c']" if kind == "dict" else "params[2]"
    with pytest.raises(exc) as info:
        gpuopt.update(opt, as_collection(kind, params), as_collection(kind, grads))
    message = str(info.value)
    assert name in message, f"{message!r} does not name {name}"
    assert re.search(expected, message), f"{message!r} does not say what was expected ({expected})"
    assert snapshot(opt, params, grads) == before


# (a list in place of one array is a collection: the structure cases below cover it)
SINGLE_CASES = [c for c in ENTRY_CASES if c[0] not in ("same-array-twice", "grad-list", "param-list")]


@pytest.mark.parametrize("call", ["update", "apply"])
@pytest.mark.parametrize("case_id, mutate, exc, expected", SINGLE_CASES, ids=[c[0] for c in SINGLE_CASES])
def test_bad_single_array_changes_nothing(case_id, mutate, exc, expected, call, monkeypatch):
    monkeypatch.setattr(gpuopt.dispatch, "cupy_module", lambda: FakeCupy)
    opt, params, grads = warmed_up()
    mutate(params, grads)
    x, g = params[2], grads[2]
    before = snapshot(opt, params, grads)
    if call == "apply" and case_id == "read-only-param":
        gpuopt.apply(opt, x, g)  # apply never writes x: a read-only parameter is fine
        assert opt[-1].state_for(x).t == 4
        return
    with pytest.raises(exc) as info:
        getattr(gpuopt, call)(opt, x, g)
    message = str(info.value)
    assert "parameter" in message and re.search(expected, message), message
    assert snapshot(opt, params, grads) == before


# -- the grads collection does not match params ---------------------------------------------

STRUCTURE_CASES = [
    ("list-vs-dict", lambda p, g: (list(p), dict(zip(KEYS, g))),
     r"params is a list.*grads must be a list or tuple.*dict"),
    ("dict-vs-list", lambda p, g: (dict(zip(KEYS, p)), list(g)),
     r"params is a dict.*grads must be a dict.*list"),
    ("fewer-grads", lambda p, g: (list(p), list(g[:3])), r"params has 4 entries but grads has 3"),
    ("more-grads", lambda p, g: (tuple(p), tuple(g) + (g[0],)), r"params has 4 entries but grads has 5"),
    ("missing-key", lambda p, g: (dict(zip(KEYS, p)), dict(zip(KEYS[:2] + KEYS[3:], g[:2] + g[3:]))),
     r"same keys.*missing \['c'\]"),
    ("extra-key", lambda p, g: (dict(zip(KEYS, p)), {**dict(zip(KEYS, g)), "e": g[0]}),
     r"same keys.*unexpected \['e'\]"),
    ("renamed-key", lambda p, g: (dict(zip(KEYS, p)), dict(zip(["w", "b", "C", "d"], g))),
     r"missing \['c'\], unexpected \['C'\]"),
    ("array-vs-list", lambda p, g: (p[0], [g[0]]), r"params is a single array but grads is a list"),
    ("grads-none-collection", lambda p, g: (list(p), None), r"grads must be a list or tuple, got NoneType"),
]


@pytest.mark.parametrize("case_id, build, expected", STRUCTURE_CASES, ids=[c[0] for c in STRUCTURE_CASES])
def test_grads_structure_mismatch_changes_nothing(case_id, build, expected):
    opt, params, grads = warmed_up()
    before = snapshot(opt, params, grads)
    p, g = build(params, grads)
    with pytest.raises(TypeError, match=expected):
        gpuopt.update(opt, p, g)
    assert snapshot(opt, params, grads) == before


def test_apply_refuses_a_collection():
    opt, params, grads = warmed_up()
    before = snapshot(opt, params, grads)
    with pytest.raises(TypeError, match="apply takes one array"):
        gpuopt.apply(opt, params, grads)
    with pytest.raises(TypeError, match="gradient"):
        gpuopt.apply(opt, params[0], None)
    assert snapshot(opt, params, grads) == before


def test_not_an_optimiser():
    x, g = np.ones(3), np.ones(3)
    with pytest.raises(TypeError, match="gpuopt rule"):
        gpuopt.update("ADAM", x, g)
    np.testing.assert_array_equal(x, np.ones(3))


def test_bad_entry_after_new_parameters_creates_no_state():
    """A parameter never seen before, ahead of the bad entry, gets no state either."""
    opt, params, grads = warmed_up()
    new = np.zeros(7)
    before = snapshot(opt, params + [new], grads + [np.ones(7)])
    with pytest.raises(ValueError, match=r"params\[3\] has shape"):
        gpuopt.update(opt, [new, *params[:3]], [np.ones(7), grads[0], grads[1], np.ones(9)])
    assert snapshot(opt, params + [new], grads + [np.ones(7)]) == before
    assert all(leaf.state_for(new) is None for leaf in opt.leaves())


# -- hyperparameters out of range at construction -------------------------------------------

HYPER_CASES = [
    ("Descent", (-0.1,), {}, "eta"),
    ("Momentum", (-1e-3,), {}, "eta"),
    ("Momentum", (0.01, 1.0), {}, "rho"),
    ("Nesterov", (0.01, -0.1), {}, "rho"),
    ("RMSProp", (0.001, 1.5), {}, "rho"),
    ("RMSProp", (), {"eps": -1e-8}, "eps"),
    ("ADAM", (-0.001,), {}, "eta"),
    ("ADAM", (0.001, (0.9, 1.0)), {}, "beta"),
    ("ADAM", (0.001, (1.0, 0.999)), {}, "beta"),
    ("ADAM", (0.001, (-0.1, 0.999)), {}, "beta"),
    ("ADAM", (0.001, 0.9), {}, "beta"),
    ("RADAM", (0.001, (0.9, 1.2)), {}, "beta"),
    ("AdaMax", (float("inf"),), {}, "eta"),
    ("ADAGrad", (-0.1,), {}, "eta"),
    ("ADADelta", (1.0,), {}, "rho"),
    ("AMSGrad", (0.001, (0.9, 0.999, 0.5)), {}, "beta"),
    ("NADAM", (float("nan"),), {}, "eta"),
    ("ADAMW", (-0.001,), {}, "eta"),
    ("ADAMW", (0.001, (0.9, 1.0)), {}, "beta"),
    ("ADAMW", (0.001, (0.9, 0.999), -0.1), {}, "decay"),
    ("WeightDecay", (-1e-4,), {}, "wd"),
    ("ClipValue", (0,), {}, "thresh"),
    ("ClipValue", (-1.0,), {}, "thresh"),
    ("ClipNorm", (0.0,), {}, "thresh"),
    ("ClipNorm", (-5,), {}, "thresh"),
    ("InvDecay", (-0.1,), {}, "gamma"),
    ("ExpDecay", (-0.001,), {}, "eta"),
    ("ExpDecay", (0.001, -0.1), {}, "decay"),
    ("ExpDecay", (0.001, 0.1, 0), {}, "decay_step"),
    ("ExpDecay", (0.001, 0.1, -1000), {}, "decay_step"),
    ("ExpDecay", (0.001, 0.1, 10.5), {}, "decay_step"),
    ("ExpDecay", (0.001, 0.1, 1000, -1e-4), {}, "clip"),
]


@pytest.mark.parametrize(
    "name, args, kwargs, hyper", HYPER_CASES,
    ids=[f"{n}-{h}-{i}" for i, (n, _, _, h) in enumerate(HYPER_CASES)],
)
def test_hyperparameter_out_of_range_at_construction(name, args, kwargs, hyper):
    with pytest.raises(ValueError) as info:
        getattr(gpuopt, name)(*args, **kwargs)
    message = str(info.value)
    assert re.match(rf"{hyper}(\[\d\])? must", message), message
    bad = {**dict(zip(inspect.signature(getattr(gpuopt, name)).parameters, args)), **kwargs}[hyper]
    assert repr(bad) in message or (isinstance(bad, tuple) and any(repr(b) in message for b in bad))


def test_snapshot_sees_every_kind_of_change():
    """The snapshot above is not blind: a good step changes parameters, slots, step counts
    and ExpDecay's eta; a new parameter adds state."""
    opt, params, grads = warmed_up()
    before = snapshot(opt, params, grads)
    gpuopt.update(opt, params, grads)
    after = snapshot(opt, params, grads)
    assert after["params"] != before["params"] and after["grads"] == before["grads"]
    for leaf_before, leaf_after in zip(before["state"], after["state"]):
        assert all(a[0] + 1 == b[0] for a, b in zip(leaf_before[3], leaf_after[3]))  # step counts
    assert before["state"][0][0]["eta"] != after["state"][0][0]["eta"]  # ExpDecay decayed
    assert before["state"][-1][3] != after["state"][-1][3]  # ADAM's slots
    extra = np.ones(2)
    gpuopt.update(opt, extra, np.ones(2))
    assert snapshot(opt, params, grads)["state"][-1][2] == before["state"][-1][2] + 1


# -- all-or-nothing: a failure injected at every stage of a call changes nothing -------------


class FailOn:
    """Wraps ``original``; its ``n``-th call (counting from 0) raises ``error`` instead."""

    def __init__(self, original: Callable, n: int, error: BaseException):
        self.original, self.n, self.error, self.calls = original, n, error, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls - 1 == self.n:
            raise self.error
        return self.original(*args, **kwargs)


def strided_setup() -> tuple[gpuopt.Optimiser, list[np.ndarray], list[np.ndarray]]:
    """Warmed-up parameters that are not contiguous (each step copies them), plus two new
    parameters (the step creates their state), with a schedule that decays on this step."""
    opt, params, grads = warmed_up()
    rng = np.random.default_rng(5)
    params = params + [rng.standard_normal((6, 4)).T, rng.standard_normal((3, 10))[:, ::2]]
    grads = grads + [rng.standard_normal((4, 6)), rng.standard_normal((3, 5))]
    return opt, params, grads


def _stages() -> list[tuple[str, Any, str]]:
    from gpuopt.backends import numpy_backend

    return [
        ("state-allocation", numpy_backend.NumpyBackend, "full_state"),
        ("contiguous-copy", numpy_backend.np, "ascontiguousarray"),
        ("executor", numpy_backend, "executor"),
        ("scratch", numpy_backend, "_Scratch"),
    ]


@pytest.mark.parametrize("stage", range(4), ids=[s[0] for s in _stages()])
@pytest.mark.parametrize("call", ["update", "apply"])
def test_failure_at_every_stage_changes_nothing(stage, call, monkeypatch):
    """The n-th call of the stage fails, for every n the step makes; then one that succeeds."""
    from gpuopt.backends import backend_override, numpy_backend

    name, owner, attribute = _stages()[stage]
    with backend_override("numpy", numpy_backend.BACKEND):  # (the executor's stages, whatever GPUOPT_CPU says)
        _fail_at_every_call(call, name, owner, attribute, monkeypatch)


def _fail_at_every_call(call: str, name: str, owner: Any, attribute: str, monkeypatch: Any) -> None:
    from gpuopt.backends import numpy_backend

    n = 0
    while True:
        opt, params, grads = strided_setup()
        numpy_backend.executor.cache_clear()  # so that scratch buffers are allocated in this call
        before = snapshot(opt, params, grads)
        failing = FailOn(getattr(owner, attribute), n, MemoryError("injected"))
        monkeypatch.setattr(owner, attribute, failing)
        try:
            if call == "update":
                gpuopt.update(opt, params, grads)
            else:
                gpuopt.apply(opt, params[-1], grads[-1])
        except MemoryError as exc:
            assert str(exc) == "injected"
            assert snapshot(opt, params, grads) == before, f"{name}: failure at call {n} changed something"
            n += 1
            continue
        finally:
            monkeypatch.undo()
        assert n > 0, f"{name}: the step never reached this stage"
        assert snapshot(opt, params, grads) != before  # the step that did not fail did change things
        break


class FailingDevice:
    """A kernel device whose compile or launch fails: the kernel backend must fail before
    writing (NumPy arrays stand in for device memory)."""

    xp = np
    threads = 8
    max_blocks = 2

    def __init__(self, fail_at: str):
        self.fail_at = fail_at

    def kernel(self, source: str, name: str) -> Callable:
        if self.fail_at == "compile":
            raise RuntimeError("injected compile failure")

        def launch(blocks: int, threads: int, args: Any) -> None:
            raise RuntimeError("injected launch failure")

        return launch

    @staticmethod
    def pointer(array: np.ndarray) -> int:
        return array.ctypes.data


@pytest.mark.parametrize("fail_at", ["compile", "launch"])
def test_failing_kernel_changes_nothing(fail_at, monkeypatch):
    from gpuopt.backends.kernel_backend import KernelBackend

    opt, params, grads = strided_setup()
    backend = KernelBackend(FailingDevice(fail_at))
    monkeypatch.setattr(gpuopt.api, "get_backend", lambda name: backend)
    before = snapshot(opt, params, grads)
    with pytest.raises(RuntimeError, match=f"injected {fail_at} failure"):
        gpuopt.update(opt, params, grads)
    assert snapshot(opt, params, grads) == before


# -- hyperparameters: any real number, stored as a Python number, within savable limits ------

LIMIT_CASES = [
    ("Descent", (10**400,), {}, "eta"),
    ("Descent", (2**64,), {}, "eta"),
    ("Descent", (True,), {}, "eta"),
    ("Descent", (np.bool_(True),), {}, "eta"),
    ("ExpDecay", (), {"decay_step": 10**400}, "decay_step"),
    ("ExpDecay", (), {"decay_step": 2**64}, "decay_step"),
    ("ExpDecay", (), {"decay_step": np.float64(10.0)}, "decay_step"),
    ("ADAM", (), {"beta": (np.float32(0.9), 10**400)}, r"beta\[1\]"),
]


@pytest.mark.parametrize("name, args, kwargs, hyper", LIMIT_CASES,
                         ids=[f"{n}-{h}-{i}" for i, (n, _, _, h) in enumerate(LIMIT_CASES)])
def test_hyperparameter_beyond_what_can_be_used_or_saved(name, args, kwargs, hyper):
    with pytest.raises(ValueError, match=rf"^{hyper} must") as info:
        getattr(gpuopt, name)(*args, **kwargs)
    assert len(str(info.value)) < 200 and "\n" not in str(info.value)


NUMBER_CASES = [  # (constructor, attribute, value given, Python type kept)
    (lambda v: gpuopt.Descent(v), "eta", np.float32(0.25), float),
    (lambda v: gpuopt.Descent(v), "eta", np.float16(0.5), float),
    (lambda v: gpuopt.Descent(v), "eta", np.int64(2), int),
    (lambda v: gpuopt.ExpDecay(decay_step=v), "decay_step", np.int64(10), int),
    (lambda v: gpuopt.ExpDecay(decay_step=v), "decay_step", np.uint8(7), int),
    (lambda v: gpuopt.ADAM(beta=v), "beta", (np.float64(0.9), np.float32(0.5)), tuple),
    (lambda v: gpuopt.ADAMW(decay=v), "decay", np.float32(0.125), float),
]


@pytest.mark.parametrize("make, attribute, value, kind", NUMBER_CASES,
                         ids=[f"{c[1]}-{type(c[2]).__name__}" for c in NUMBER_CASES])
def test_numpy_scalars_are_accepted_as_python_numbers(make, attribute, value, kind):
    from fractions import Fraction

    opt = make(value)
    stored = getattr(opt, attribute)
    assert type(stored) is kind and stored == (tuple(float(v) for v in value) if kind is tuple else value)
    setattr(opt, attribute, value)  # the same by assignment
    assert type(getattr(opt, attribute)) is kind
    if kind is float:
        setattr(opt, attribute, Fraction(1, 8))
        assert getattr(opt, attribute) == 0.125 and type(getattr(opt, attribute)) is float


def test_exponential_growth_stops_at_the_largest_float():
    opt = gpuopt.ExpDecay(eta=10.0, decay=1e308, decay_step=2, clip=0.0)
    x = np.zeros(3)
    for _ in range(6):
        gpuopt.update(opt, x, np.ones(3))
    assert opt.eta == np.finfo(np.float64).max


# -- clear errors from the API ---------------------------------------------------------------


@pytest.mark.parametrize("name, hint", [("lr", "eta"), ("learning_rate", "eta"), ("etaa", "eta"),
                                        ("betas", "beta"), ("momentum", "rho")])
def test_unknown_attribute_is_refused_with_a_hint(name, hint):
    opt = gpuopt.Momentum() if hint == "rho" else gpuopt.ADAM()
    before = repr(opt)
    with pytest.raises(AttributeError, match=rf"has no attribute '{name}'; did you mean '{hint}'\?"):
        setattr(opt, name, 1e-4)
    assert repr(opt) == before and name not in vars(opt)


def test_adamw_hints_at_its_own_hyperparameters():
    """ADAMW's hyperparameters are its members' (properties), and the hint names them."""
    with pytest.raises(AttributeError, match=r"did you mean 'decay'\?.*eta, beta, decay, eps"):
        gpuopt.ADAMW().weight_decay = 0.1


def test_custom_rules_may_keep_their_own_attributes():
    class Scaled(gpuopt.Rule):
        eta = gpuopt.Hyper(1.0)

        def __init__(self, eta=1.0, *, label="scaled"):
            self.label = label  # set in its own constructor: allowed
            super().__init__(eta)

        def step(self, d, x, s, h):
            return h.eta * d

    rule = Scaled(label="mine")
    rule.label = "renamed"  # an attribute it has is assignable
    assert rule.label == "renamed"
    with pytest.raises(AttributeError, match="did you mean 'eta'"):
        rule.lr = 1.0


def test_a_rule_class_instead_of_a_rule():
    x = np.ones(3)
    with pytest.raises(TypeError, match=r"opt is the class ADAM, not an optimiser.*ADAM\(\)"):
        gpuopt.update(gpuopt.ADAM, x, np.ones(3))
    with pytest.raises(TypeError, match=r"class Descent.*Descent\(\)"):
        gpuopt.apply(gpuopt.Descent, x, np.ones(3))
    np.testing.assert_array_equal(x, 1.0)


@pytest.mark.parametrize("cupy, gpu, expected", [(None, False, "needs CuPy"), (object(), False, "usable GPU")])
def test_count_launches_says_what_it_needs(cupy, gpu, expected, monkeypatch):
    monkeypatch.setattr(gpuopt.api, "cupy_module", lambda: cupy)
    monkeypatch.setattr(gpuopt.api, "gpu_available", lambda: gpu)
    with pytest.raises(RuntimeError, match=expected):
        gpuopt.count_launches()


def _adam_inv() -> tuple[gpuopt.ADAM, gpuopt.InvDecay]:
    return gpuopt.ADAM(), gpuopt.InvDecay()


REPEAT_CASES = [
    ("twice", lambda a, i: gpuopt.Optimiser(i, i)),
    ("nested", lambda a, i: gpuopt.Optimiser(a, gpuopt.Optimiser(i, a))),
    ("append", lambda a, i: gpuopt.Optimiser(i, a).append(a)),
    ("extend", lambda a, i: gpuopt.Optimiser(i).extend([a, i])),
    ("insert", lambda a, i: gpuopt.Optimiser(i, a).insert(0, i)),
    ("setitem", lambda a, i: gpuopt.Optimiser(i, a, gpuopt.Descent()).__setitem__(2, a)),
]


@pytest.mark.parametrize("case_id, build", REPEAT_CASES, ids=[c[0] for c in REPEAT_CASES])
def test_one_rule_object_twice_in_a_chain_is_refused(case_id, build):
    adam, inv = _adam_inv()
    with pytest.raises(ValueError, match=r"same (ADAM|InvDecay) object twice"):
        build(adam, inv)


def test_a_chain_changed_through_a_nested_chain_is_refused_at_update():
    adam, inv = _adam_inv()
    inner = gpuopt.Optimiser(inv)
    outer = gpuopt.Optimiser(inner, adam)
    x, g = np.ones(3), np.ones(3)
    gpuopt.update(outer, x, g)
    inner.append(adam)  # the inner chain cannot see the outer one
    before = snapshot(outer, [x], [g])
    with pytest.raises(ValueError, match="same ADAM object twice"):
        gpuopt.update(outer, x, g)
    assert snapshot(outer, [x], [g]) == before


# -- copies and pickles ----------------------------------------------------------------------


def test_deepcopy_is_independent_with_its_own_weak_entries():
    import copy
    import gc

    opt, params, grads = warmed_up()
    twin = copy.deepcopy(opt)
    saved = snapshot(opt, params, grads)
    assert snapshot(twin, params, grads) == saved
    gpuopt.update(twin, params[:1], grads[:1])
    assert snapshot(opt, params, grads)["state"] == saved["state"]  # the original did not move
    del params[0], grads[0]
    gc.collect()
    assert all(len(leaf._state) == 3 for leaf in twin.leaves() if leaf.state)  # the copy forgot it too


def test_pickling_state_is_refused_but_a_fresh_rule_pickles():
    import pickle

    opt, params, grads = warmed_up()
    with pytest.raises(TypeError, match="cannot be pickled.*save_state"):
        pickle.dumps(opt)
    fresh = make_optimiser()
    again = pickle.loads(pickle.dumps(fresh))
    assert repr(again) == repr(fresh)
    x = np.ones(4)
    gpuopt.update(again, x, np.ones(4))  # works, with locks of its own
    opt.reset()
    assert repr(pickle.loads(pickle.dumps(opt))) == repr(opt)
