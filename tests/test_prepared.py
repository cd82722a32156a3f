"""The prepared path of a collection update: which calls take it (counted, not inferred from
results), with new gradient arrays every step and with PyTorch tensors, and what it keeps
right (one step count per rule, replaced storage, dead gradients); the identity check and the
C++ reader of PyTorch tensors' layouts it uses. Host logic only: a device that launches
nothing (the CUDA text itself is checked in test_kernels.py)."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest

import gpuopt
from gpuopt import identities, tensor_records
from gpuopt.__main__ import main
from gpuopt.backends import backend_override
from gpuopt.backends.kernel_backend import KernelBackend
from gpuopt.backends.noop import NoopDevice
from gpuopt.bench import host_benchmark
from gpuopt.identities import Identities

from .cases import CHAINS, RULES
from .paths import counted_paths
from .toolchain import missing


@pytest.fixture
def noop():
    device = NoopDevice()
    with backend_override("numpy", KernelBackend(device)):
        yield device


def _paths(run):
    with counted_paths() as taken:
        run()
    return taken


def _numpy_grads(sizes):
    return [np.full(n, 0.5, np.float32) for n in sizes]


def _torch_grads(sizes):
    torch = pytest.importorskip("torch")
    return [torch.full((n,), 0.5) for n in sizes]


SIZES = (300, 7, 70001, 0, 5)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("new_grads", [False, True])
@pytest.mark.parametrize("case", ["ADAM", "ClipNorm+ADAM"])
def test_prepared_path_taken_every_step_after_the_first(noop, kind, new_grads, case):
    if kind == "torch":
        torch = pytest.importorskip("torch")
        params = [torch.nn.Parameter(torch.ones(n)) for n in SIZES]
        make = _torch_grads
    else:
        params = [np.ones(n, np.float32) for n in SIZES]
        make = _numpy_grads
    opt = (RULES | CHAINS)[case]()
    fixed = make(SIZES)

    def loop():
        for _ in range(10):
            gpuopt.update(opt, params, make(SIZES) if new_grads else fixed)  # new ones die right after

    assert _paths(loop) == {"full": 1, "prepared": 9}
    assert all(leaf.state_for(p).t == 10 for leaf in opt.leaves() for p in params)


def test_new_gradient_of_another_kind_takes_the_full_path_once(noop):
    params = [np.ones(n, np.float32) for n in SIZES]
    opt = gpuopt.ADAM()
    gpuopt.update(opt, params, _numpy_grads(SIZES))
    odd = [
        [np.full(n, 0.5, np.float64) for n in SIZES],  # another dtype
        [np.full((n, 1), 0.5, np.float32) for n in SIZES],  # another shape, same size
        [np.full(2 * n, 0.5, np.float32)[::2] for n in SIZES],  # strided
        [None] + _numpy_grads(SIZES[1:]),  # one skipped
    ]
    for grads in odd:
        if grads[0] is not None and grads[0].ndim == 2:
            with pytest.raises(ValueError, match=r"params\[0\] has shape"):  # the full path's check
                gpuopt.update(opt, params, grads)
            continue
        assert _paths(lambda grads=grads: gpuopt.update(opt, params, grads)) == {"full": 1, "prepared": 0}
        assert _paths(lambda: gpuopt.update(opt, params, _numpy_grads(SIZES))) in (
            {"full": 1, "prepared": 0}, {"full": 0, "prepared": 1})


def test_new_gradients_change_only_the_gradient_column(noop):
    params = [np.ones(n, np.float32) for n in (10, 20)]
    opt = gpuopt.Momentum()
    gpuopt.update(opt, params, _numpy_grads((10, 20)))
    launcher = vars(opt)["_prepared"].launch.parts[0].launchers[0][0]
    before = launcher.host.copy()
    table = launcher.table
    grads = _numpy_grads((10, 20))
    gpuopt.update(opt, params, grads)
    assert launcher.table is table  # kept, refreshed in place
    np.testing.assert_array_equal(launcher.host[:, 1], [g.ctypes.data for g in grads])
    np.testing.assert_array_equal(np.delete(launcher.host, 1, axis=1), np.delete(before, 1, axis=1))


def test_one_step_count_per_rule_while_arrays_step_together(noop):
    params = [np.ones(n, np.float32) for n in (10, 20, 30)]
    grads = _numpy_grads((10, 20, 30))
    opt = gpuopt.Optimiser(gpuopt.ClipValue(1.0), gpuopt.ADAM())
    for _ in range(3):
        gpuopt.update(opt, params, grads)
    counts = {id(leaf.state_for(p).count) for leaf in opt.leaves() for p in params}
    assert len(counts) == 2  # shared by the three arrays, one per rule
    gpuopt.update(opt, params[1], grads[1])  # one array alone: only its count moves
    assert [opt[1].state_for(p).t for p in params] == [3, 4, 3]
    assert [opt[0].state_for(p).t for p in params] == [3, 4, 3]
    gpuopt.update(opt, [params[0], params[2]], [grads[0], grads[2]])
    assert [opt[1].state_for(p).t for p in params] == [4, 4, 4]


def _native_or_python(request, monkeypatch, module, name: str, what: str) -> str:
    """The helper ``module.name()`` as built (a failure where it cannot be, under
    GPUOPT_REQUIRE_KERNEL_TOOLS), or replaced by None: the Python way."""
    if request.param == "native":
        if getattr(module, name)() is None:
            missing(f"the {what} could not be built")
    else:
        monkeypatch.setattr(module, name, lambda: None)
    return request.param


@pytest.fixture(params=["native", "python"])
def records_helper(request, monkeypatch):
    """PyTorch tensors read by the C++ helper (gpuopt.tensor_records), or by their Python getters."""
    pytest.importorskip("torch")
    return _native_or_python(request, monkeypatch, tensor_records, "reader", "tensor-record helper (C++ compiler "
                             "or torch's headers missing)")


@pytest.fixture
def reader():
    pytest.importorskip("torch")
    built = tensor_records.reader()
    if built is None:
        missing("the tensor-record helper could not be built (C++ compiler or torch's headers missing)")
    return built


@pytest.mark.parametrize("replace", ["new memory", "a slice", "another dtype's view"])
def test_torch_parameter_with_replaced_storage_leaves_the_prepared_path(noop, records_helper, replace):
    """Same object, other elements (``p.data = ...``): the full path decides. New memory shows by
    its address; a slice or a view at the same address only in the C++ reader's records."""
    torch = pytest.importorskip("torch")
    if replace != "new memory" and records_helper == "python":
        pytest.skip("the Python getters' check compares addresses only")
    params = [torch.nn.Parameter(torch.ones(10)), torch.nn.Parameter(torch.ones(20))]
    opt = gpuopt.ADAM()
    grads = _torch_grads((10, 20))
    gpuopt.update(opt, params, grads)
    gpuopt.update(opt, params, grads)
    params[1].data = {"new memory": lambda: torch.zeros(20), "a slice": lambda: params[1].data[:10],
                      "another dtype's view": lambda: params[1].data.view(torch.float16)}[replace]()
    if replace == "new memory":
        assert _paths(lambda: gpuopt.update(opt, params, grads)) == {"full": 1, "prepared": 0}
        return
    with counted_paths() as taken, pytest.raises(ValueError, match=r"params\[1\] has shape"):
        gpuopt.update(opt, params, grads)  # (the full path's check refuses it)
    assert taken["prepared"] == 0


@pytest.mark.parametrize("new_grads", [False, True])
def test_torch_tensors_step_the_same_with_either_reader(noop, records_helper, new_grads):
    torch = pytest.importorskip("torch")
    params = [torch.nn.Parameter(torch.arange(n, dtype=torch.float32)) for n in SIZES]
    opt = gpuopt.ADAM()
    fixed = [torch.full((n,), 0.5) for n in SIZES]
    steps = _paths(lambda: [gpuopt.update(opt, params, [g.clone() for g in fixed] if new_grads else fixed)
                            for _ in range(5)])
    assert steps == {"full": 1, "prepared": 4}
    assert all(leaf.state_for(p).t == 5 for leaf in opt.leaves() for p in params)


# -- the C++ reader of PyTorch tensors -----------------------------------------------------------



def _record_tensors():
    torch = pytest.importorskip("torch")
    return {
        "contiguous": torch.ones(300), "2-d": torch.ones(3, 5), "transposed": torch.ones(3, 5).t(),
        "float16": torch.ones(4, dtype=torch.float16), "bfloat16": torch.ones(4, dtype=torch.bfloat16),
        "a parameter": torch.nn.Parameter(torch.ones(6)), "0-d": torch.tensor(2.0), "empty": torch.ones(0),
        "an offset view": torch.ones(10)[3:], "8-d": torch.ones([2] * 8),
    }


@pytest.mark.parametrize("name", ["contiguous", "2-d", "transposed", "float16", "bfloat16", "a parameter", "0-d",
                                  "empty", "an offset view", "8-d"])
def test_tensor_records_say_what_the_getters_say(reader, name):
    torch = pytest.importorskip("torch")
    t = _record_tensors()[name]
    record = reader.records([t])[0]
    assert record.shape == (tensor_records.WIDTH,)
    assert record[0] == t.data_ptr() and record[3] == t.get_device() and record[4] == t.is_contiguous()
    assert record[5] == t.dim() and list(record[6:6 + t.dim()]) == list(t.shape) and not record[6 + t.dim():].any()
    same_dtype = reader.records([torch.ones(1, dtype=t.dtype)])[0]
    assert record[1] == same_dtype[1] >= 0 and record[2] == same_dtype[2]
    others = {torch.float32, torch.float16, torch.bfloat16} - {t.dtype}
    assert all(reader.records([torch.ones(1, dtype=d)])[0][1] != record[1] for d in others)


def test_tensors_the_records_cannot_describe_are_marked(reader):
    torch = pytest.importorskip("torch")
    records = reader.records([torch.ones(3).to_sparse(), torch.ones([1] * 9), torch.ones(2)])
    assert list(records[:, 1] < 0) == [True, True, False]


@pytest.mark.parametrize("where", [0, 2, 4])
@pytest.mark.parametrize("change", ["dtype", "shape, same size", "strided", "device kind", "undescribable"])
def test_take_gives_addresses_only_where_every_layout_is_as_expected(reader, where, change):
    torch = pytest.importorskip("torch")
    make = [lambda: torch.ones(6), lambda: torch.ones(2, 3), lambda: torch.ones(3), lambda: torch.ones(4),
            lambda: torch.ones(5, dtype=torch.float16)]
    expected = np.ascontiguousarray(reader.records([m() for m in make])[:, 1:])
    fresh = [m() for m in make]
    assert list(reader.take(fresh, expected)) == [t.data_ptr() for t in fresh]
    old = fresh[where]
    fresh[where] = {"dtype": lambda: old.to(torch.float64), "shape, same size": lambda: old.reshape(-1, 1),
                    "strided": lambda: torch.ones(2 * old.numel())[::2].reshape(old.shape),
                    "device kind": lambda: torch.ones(old.shape, dtype=old.dtype, device="meta"),
                    "undescribable": lambda: old.to_sparse()}[change]()
    assert reader.take(fresh, expected) is None


def test_gradient_ids_prove_nothing_once_the_gradients_died(noop):
    params = [np.ones(n, np.float32) for n in (10, 20)]
    opt = gpuopt.Descent(0.5)
    grads = _numpy_grads((10, 20))
    gpuopt.update(opt, params, grads)
    gpuopt.update(opt, params, grads)  # the same ids twice: watched from now on
    prepared = vars(opt)["_prepared"]
    assert prepared.grads_alive
    del grads
    gc.collect()
    assert not prepared.grads_alive and "_prepared" in vars(opt)  # the record lives on
    # Whatever ids the next arrays get, they are checked again: here one has another shape.
    with pytest.raises(ValueError, match=r"params\[1\] has shape"):
        gpuopt.update(opt, params, [np.ones(10, np.float32), np.ones((4, 5), np.float32)])


def test_a_step_count_set_by_hand_ends_the_prepared_update(noop):
    params = [np.ones(n, np.float32) for n in (10, 20)]
    grads = _numpy_grads((10, 20))
    opt = gpuopt.ADAM()
    for _ in range(3):
        gpuopt.update(opt, params, grads)
    opt.state_for(params[0]).t = 0  # (the arrays shared one count: the record must not go on with it)
    assert _paths(lambda: gpuopt.update(opt, params, grads)) == {"full": 1, "prepared": 0}
    assert (opt.state_for(params[0]).t, opt.state_for(params[1]).t) == (1, 4)


def test_gradients_that_stop_changing_are_watched_again(noop):
    """New arrays every step are checked every step without reading all their ids; once the
    same arrays come back for a few steps they are watched again (no checks), and new ones
    after that are checked again and read into the table."""
    params = [np.zeros(n, np.float32) for n in (10, 20)]
    opt = gpuopt.Descent(1.0)
    steps = [_numpy_grads((10, 20)) for _ in range(3)]  # all alive: no id is reused
    for grads in steps:
        gpuopt.update(opt, params, grads)
    prepared = vars(opt)["_prepared"]
    assert not prepared.grads_alive and prepared.grad_ids.ids() is None  # new every step: ids not read
    fixed = [np.full(10, 1.0, np.float32), np.full(20, 2.0, np.float32)]
    for _ in range(3):
        assert _paths(lambda: gpuopt.update(opt, params, fixed)) == {"full": 0, "prepared": 1}
    assert prepared.grads_alive and prepared.grad_ids.ids() == (id(fixed[0]), id(fixed[1]))
    grads = [fixed[0], np.full(20, 4.0, np.float32)]  # one new array among them
    gpuopt.update(opt, params, grads)
    assert not prepared.grads_alive
    launcher = prepared.launch.parts[0].launchers[0][0]
    np.testing.assert_array_equal(launcher.host[:, 1], [g.ctypes.data for g in grads])


def test_bench_host_writes_json_with_host_targets(tmp_path, capsys):
    path = tmp_path / "host.json"
    status = main(["bench", "--host", "--host-calls", "5", "--host-many", "40", "--model-layers", "1",
                   "--model-width", "8", "--no-torch", "--json", str(path), "--quiet"])
    assert status == 0
    report = json.loads(path.read_text())
    ids = [t["id"] for t in report["targets"]]
    assert len(ids) == 10 and all("host" in i for i in ids)
    for t in report["targets"]:
        assert t["status"] == ("not measured" if "torch" in t["id"] else t["status"]), t
        assert t["status"] in ("met", "not met", "not measured") and t["limit"] > 0
    adam = report["cases"]["ADAM/new"]
    assert adam["prepared_calls"] == 5 and adam["full_calls"] == 0
    assert "host_gpt2_adam_new_grads_us" in capsys.readouterr().out


def test_host_launches_need_a_gpu(capsys, monkeypatch):
    from gpuopt import dispatch

    monkeypatch.setattr(dispatch, "gpu_available", lambda: False)
    assert main(["bench", "--host", "--host-launches", "--quiet"]) == 2
    assert "needs CuPy and a usable CUDA GPU" in capsys.readouterr().err


def test_host_benchmark_measures_the_prepared_path_with_torch():
    pytest.importorskip("torch")
    report = host_benchmark(calls=3, layers=1, width=8, many=20)
    for name in ("torch ADAM/same", "torch ADAM/new", "ADAM/new/20", "ClipNorm+ADAM/new",
                 "torch Optimizer.step/same", "torch Optimizer.step/new"):
        assert report["cases"][name]["prepared_calls"] == 3, name


def test_mixed_torch_tensor_classes_and_sequence_kinds_are_prepared(noop):
    torch = pytest.importorskip("torch")
    params = (torch.nn.Parameter(torch.ones(10)), torch.ones(20))  # a parameter and a buffer-like tensor
    opt = gpuopt.ADAM()

    def loop():
        for _ in range(4):
            gpuopt.update(opt, params, list(_torch_grads((10, 20))))  # a tuple of params, a list of grads

    assert _paths(loop) == {"full": 1, "prepared": 3}


# -- the identity check of parameters and gradients ------------------------------------------

ITEMS = [np.zeros(2), np.zeros(3), np.zeros(4), np.zeros(5)]
OTHER = np.zeros(2)
IDENTITY_CASES = {  # sequence -> whether it holds ITEMS
    "the same list": (ITEMS, True),
    "a copy of the list": (list(ITEMS), True),
    "a tuple of them": (tuple(ITEMS), True),
    "first replaced": ([OTHER, *ITEMS[1:]], False),
    "middle replaced": ([*ITEMS[:2], OTHER, ITEMS[3]], False),
    "last replaced": ([*ITEMS[:3], OTHER], False),
    "an equal copy of one": ([ITEMS[0].copy(), *ITEMS[1:]], False),
    "reordered": (ITEMS[::-1], False),
    "one fewer": (ITEMS[:3], False),
    "one more": ([*ITEMS, OTHER], False),
    "empty": ([], False),
    "a None among them": ([None, *ITEMS[1:]], False),
}


@pytest.fixture(params=["native", "python"])
def identity_helper(request, monkeypatch):
    return _native_or_python(request, monkeypatch, identities, "native_helper",
                             "identity helper (C++ compiler or Python.h missing)")


@pytest.mark.parametrize("case", IDENTITY_CASES)
def test_identities_tell_the_same_objects_from_any_others(identity_helper, case):
    items, same = IDENTITY_CASES[case]
    remembered = Identities(ITEMS)
    assert remembered.match(items) is same
    assert remembered.ids() == tuple(map(id, ITEMS))
    remembered.remember(items)  # any length: the new ones are matched from now on
    assert remembered.match(items) and remembered.match(list(items))
    assert not remembered.match([*items, OTHER])
    remembered.forget()
    assert not remembered.match(items) and remembered.ids() is None


def test_identities_refuse_anything_but_a_list_or_tuple(identity_helper):
    remembered = Identities(ITEMS)
    assert not remembered.match(iter(ITEMS))
    assert not remembered.match(dict.fromkeys(range(4)))


def test_identities_of_one_item(identity_helper):
    remembered = Identities(ITEMS[:1])
    assert remembered.match(ITEMS[:1]) and remembered.match((ITEMS[0],))
    assert not remembered.match([OTHER]) and not remembered.match([ITEMS[0], ITEMS[0]]) and not remembered.match([])
    assert not remembered.match(iter(ITEMS[:1])) and remembered.ids() == (id(ITEMS[0]),)
