"""Checkpoints: save_state / load_state round trips, across processes, and their validation."""

from __future__ import annotations

import io
import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import gpuopt
from gpuopt import CheckpointError, load_state, save_state
from gpuopt.dispatch import gpu_available
from gpuopt.rule import ParamState

ROOT = Path(__file__).resolve().parents[1]

# Shared by the test process and the fresh processes it starts: the same optimisers, parameters
# and gradients, so the only thing carried across the process boundary is the checkpoint.
SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import numpy as np

    import gpuopt

    SAVE_AT, STOP = 7, 16

    CONFIGS = {
        "adam": lambda: gpuopt.ADAM(0.01, (0.8, 0.99)),
        # eta decays at steps 3, 6, ... so it decays both before and after the save point
        "expdecay": lambda: gpuopt.Optimiser(gpuopt.ExpDecay(0.05, 0.5, 3, 1e-3), gpuopt.Momentum(0.1, 0.8)),
        "clipnorm": lambda: gpuopt.Optimiser(
            gpuopt.ClipNorm(0.5), gpuopt.WeightDecay(1e-3), gpuopt.ADAM(0.01)),
    }


    def make_params():
        rng = np.random.default_rng(0)
        return {
            "w": rng.normal(size=(5, 7)).astype(np.float32),
            "b": rng.normal(size=7),  # float64
            "h": rng.normal(size=13).astype(np.float16),  # float16: float32 state
            "unused": np.zeros(3, np.float32),  # never stepped: no state to save
        }


    def grads(params, step):
        rng = np.random.default_rng(1000 + step)
        out = {k: rng.normal(size=v.shape).astype(v.dtype) for k, v in params.items()}
        out["unused"] = None
        return out


    def run(opt, params, start, stop):
        for step in range(start, stop):
            gpuopt.update(opt, params, grads(params, step))


    def main(phase, directory):
        directory = Path(directory)
        for name, make in CONFIGS.items():
            opt = make()
            if phase == "first":
                params = make_params()
                run(opt, params, 0, SAVE_AT)
                gpuopt.save_state(opt, params, directory / f"{name}-mid.ckpt")
                np.savez(directory / f"{name}-mid-params.npz", **params)
            else:
                with np.load(directory / f"{name}-mid-params.npz") as f:
                    params = {k: f[k] for k in f.files}
                gpuopt.load_state(opt, params, directory / f"{name}-mid.ckpt")
                run(opt, params, SAVE_AT, STOP)
                gpuopt.save_state(opt, params, directory / f"{name}-end.ckpt")
                np.savez(directory / f"{name}-end-params.npz", **params)


    if __name__ == "__main__":
        main(sys.argv[1], sys.argv[2])
    """
)


def _members(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _snapshot(opt: gpuopt.Rule, params: list) -> list:
    """Everything a load could change: hyperparameters, host state, per-parameter state."""
    out: list = []
    for leaf in opt.leaves():
        out.append(dict(leaf.hyperparameters()))
        out.append({k: getattr(leaf, k) for k in leaf.schedule_state})
        for p in params:
            s = leaf.state_for(p)
            out.append(None if s is None else (s.t, None if s.slots is None else s.slots.copy()))
    return out


def _equal(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))  # type: ignore[arg-type]
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


def test_resume_in_fresh_process_is_bit_identical(tmp_path: Path) -> None:
    script = _write_script(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for phase in ("first", "second"):  # two fresh interpreters: save at SAVE_AT, then resume
        subprocess.run([sys.executable, str(script), phase, str(tmp_path)], check=True, env=env,
                       capture_output=True, timeout=120)

    ns = runpy.run_path(str(script))  # the run that never stopped, in this process
    for name, make in ns["CONFIGS"].items():
        opt, params = make(), ns["make_params"]()
        ns["run"](opt, params, 0, ns["STOP"])
        save_state(opt, params, tmp_path / f"{name}-straight.ckpt")

        resumed = _members(tmp_path / f"{name}-end-params.npz")
        assert resumed.keys() == params.keys()
        for k in params:
            assert resumed[k].dtype == params[k].dtype
            assert np.array_equal(resumed[k], params[k]), (name, k)
        assert not np.array_equal(resumed["w"], _members(tmp_path / f"{name}-mid-params.npz")["w"])

        straight = _members(tmp_path / f"{name}-straight.ckpt")
        end = _members(tmp_path / f"{name}-end.ckpt")
        assert straight.keys() == end.keys()
        for k in straight:  # every hyperparameter, host attribute, step count and slot
            assert straight[k].dtype == end[k].dtype and np.array_equal(straight[k], end[k]), (name, k)
        assert not any(k.endswith("param3.t") for k in end)  # "unused" never got state

    end = _members(tmp_path / "expdecay-end.ckpt")
    assert float(end["rule0.hyper.eta"]) == 0.05 * 0.5**5  # decayed at 3, 6 | 9, 12, 15
    assert int(end["rule0.host.decayed_at"]) == 15


def test_resuming_without_the_checkpoint_differs(tmp_path: Path) -> None:
    """The state matters: continuing with a fresh optimiser gives other parameters."""
    ns = runpy.run_path(str(_write_script(tmp_path)))
    make, run = ns["CONFIGS"]["adam"], ns["run"]
    opt, a = make(), ns["make_params"]()
    run(opt, a, 0, 5)
    path = tmp_path / "s.ckpt"
    save_state(opt, a, path)
    b, c = ({k: v.copy() for k, v in a.items()} for _ in range(2))
    restored, fresh = make(), make()
    load_state(restored, b, path)
    for o, p in ((opt, a), (restored, b), (fresh, c)):
        run(o, p, 5, 8)
    assert np.array_equal(a["w"], b["w"])
    assert not np.array_equal(a["w"], c["w"])


def _write_script(tmp_path: Path) -> Path:
    script = tmp_path / "ckpt_run.py"
    script.write_text(SCRIPT)
    return script


def _stepped(opt: gpuopt.Rule, params: list, steps: int = 3, seed: int = 0) -> None:
    """``steps`` updates of a list of parameters with seeded random gradients."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        gpuopt.update(opt, params, [rng.normal(size=p.shape).astype(p.dtype) for p in params])


def _saved(opt: gpuopt.Rule, params) -> io.BytesIO:
    buf = io.BytesIO()
    save_state(opt, params, buf)
    buf.seek(0)
    return buf


def test_odd_dict_keys_round_trip() -> None:
    keys = ["a/b", "../../etc/passwd", "", "x.npy", "ключ", "sp ace\ttab", "nul\x00", "\x00", "🙂",
            "rule0.param0.t", "lone\ud800surrogate"]
    rng = np.random.default_rng(1)
    params = {k: rng.normal(size=i + 1).astype(np.float32) for i, k in enumerate(keys)}
    opt = gpuopt.ADAM()
    _stepped(opt, list(params.values()))
    buf = _saved(opt, params)

    # Same keys in another order, equal but distinct arrays: state follows the key.
    other = {k: params[k].copy() for k in reversed(keys)}
    restored = gpuopt.ADAM()
    load_state(restored, other, buf)
    for k in keys:
        a, b = opt.state_for(params[k]), restored.state_for(other[k])
        assert a.t == b.t == 3
        assert np.array_equal(a.slots, b.slots)
        assert b.slots is not a.slots


def test_single_array_and_tuple() -> None:
    x = np.linspace(-1, 1, 10)
    opt = gpuopt.Optimiser(gpuopt.InvDecay(0.1), gpuopt.Nesterov())
    _stepped(opt, [x])
    buf = _saved(opt, x)
    restored = gpuopt.Optimiser(gpuopt.InvDecay(0.1), gpuopt.Nesterov())
    y = x.copy()
    load_state(restored, y, buf)
    assert restored[1].state_for(y).t == 3
    assert np.array_equal(restored[1].state_for(y).slots, opt[1].state_for(x).slots)
    assert restored[0].state_for(y).slots is None and restored[0].state_for(y).t == 3

    ps = (np.ones(4, np.float32), np.ones((2, 2), np.float32))
    opt = gpuopt.ADADelta()
    _stepped(opt, list(ps))
    restored = gpuopt.ADADelta()
    qs = [p.copy() for p in ps]  # a list loads what a tuple saved
    load_state(restored, qs, _saved(opt, ps))
    for p, q in zip(ps, qs, strict=True):
        assert np.array_equal(restored.state_for(q).slots, opt.state_for(p).slots)


def test_hyperparameters_restored_unless_asked_not_to() -> None:
    x = np.ones(5)
    opt = gpuopt.ExpDecay(0.1, 0.5, 1, 1e-3)
    _stepped(opt, [x], steps=2)
    assert opt.eta == 0.025 and opt.decayed_at == 2
    buf = _saved(opt, x)
    fresh = gpuopt.ExpDecay(0.1, 0.5, 1, 1e-3)
    load_state(fresh, x, buf)
    assert (fresh.eta, fresh.decayed_at, fresh.state_for(x).t) == (0.025, 2, 2)
    buf.seek(0)
    tuned = gpuopt.ExpDecay(0.3, 0.5, 1, 1e-3)
    load_state(tuned, x, buf, hyperparameters=False)
    assert (tuned.eta, tuned.decayed_at) == (0.3, 2)  # host state is always part of the run

    adam = gpuopt.ADAM(0.02, (0.5, 0.75), eps=1e-6)
    _stepped(adam, [x])
    other = gpuopt.ADAM()
    load_state(other, x, _saved(adam, x))
    assert (other.eta, other.beta, other.eps) == (0.02, (0.5, 0.75), 1e-6)
    assert isinstance(other.beta, tuple)


def test_unstepped_parameter_resets_existing_state() -> None:
    a, b = np.ones(3), np.ones(4)
    opt = gpuopt.Momentum()
    _stepped(opt, [a])  # b never stepped
    buf = _saved(opt, [a, b])
    other = gpuopt.Momentum()
    _stepped(other, [a, b], steps=5)
    load_state(other, [a, b], buf)
    assert other.state_for(a).t == 3
    assert other.state_for(b).t == 0 and not other.state_for(b).slots.any()
    # and it then behaves like a first step
    ref = gpuopt.Momentum()
    b1, b2 = b.copy(), b.copy()
    gpuopt.update(ref, b1, np.full(4, 0.5))
    load_state(other, [a, b2], _saved(opt, [a, b2]))  # no state for b2 yet: nothing created
    assert other.state_for(b2) is None
    gpuopt.update(other, b2, np.full(4, 0.5))
    assert np.array_equal(b1, b2)


def test_loads_onto_other_dtype() -> None:
    x32 = np.ones(6, np.float32)
    opt = gpuopt.RMSProp()
    _stepped(opt, [x32])
    x64 = np.ones(6)
    other = gpuopt.RMSProp()
    load_state(other, x64, _saved(opt, x32))
    assert other.state_for(x64).slots.dtype == np.float64
    assert np.array_equal(other.state_for(x64).slots, opt.state_for(x32).slots)


def test_file_path_is_written_as_given(tmp_path: Path) -> None:
    x = np.ones(3)
    opt = gpuopt.ADAM()
    _stepped(opt, [x])
    path = tmp_path / "state.ckpt"
    save_state(opt, x, str(path))
    assert path.exists() and not (tmp_path / "state.ckpt.npz").exists()
    save_state(opt, x, path)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.ckpt"]
    load_state(gpuopt.ADAM(), x.copy(), path)


# -- validation: a clear error, and nothing changes ----------------------------------------------


@pytest.fixture
def trained():
    """An optimiser with state for a dict of parameters, and its checkpoint."""
    params = {"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)}
    opt = gpuopt.Optimiser(gpuopt.ClipValue(1.0), gpuopt.ExpDecay(0.1, 0.5, 2), gpuopt.ADAM())
    _stepped(opt, list(params.values()))
    return opt, params, _saved(opt, params).getvalue()


def _target():
    """A second optimiser with its own, different state, to check failed loads leave it alone."""
    params = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    opt = gpuopt.Optimiser(gpuopt.ClipValue(2.0), gpuopt.ExpDecay(0.2, 0.5, 2), gpuopt.ADAM(0.5))
    _stepped(opt, list(params.values()), steps=5, seed=9)
    return opt, params


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda opt, p: (gpuopt.Optimiser(gpuopt.ClipValue(1.0), gpuopt.ADAM()), p), "saved from rules"),
        (lambda opt, p: (gpuopt.Optimiser(opt[0], opt[1], gpuopt.NADAM()), p), "saved from rules"),
        (lambda opt, p: (opt, {"w": p["w"]}), "missing ['b']"),
        (lambda opt, p: (opt, {**p, "extra": np.ones(2, np.float32)}), "unexpected ['extra']"),
        (lambda opt, p: (opt, [p["w"], p["b"]]), "params is a list/tuple"),
        (lambda opt, p: (opt, p["w"]), "params is a single array"),
        (lambda opt, p: (opt, {"w": p["w"].reshape(3, 2), "b": p["b"]}), "params['w'] has shape (3, 2)"),
        (lambda opt, p: (opt, {"w": p["w"], "b": np.zeros(4, np.float32)}), "params['b'] has shape (4,)"),
    ],
)
def test_mismatch_is_rejected_without_changes(trained, change, message) -> None:
    _, _, data = trained
    opt, params = _target()
    target_opt, target_params = change(opt, params)
    all_params = list(params.values()) + (
        list(target_params.values()) if isinstance(target_params, dict) else [target_params])
    before = _snapshot(opt, all_params)
    with pytest.raises(CheckpointError) as info:
        load_state(target_opt, target_params, io.BytesIO(data))
    assert message in str(info.value)
    assert _equal(before, _snapshot(opt, all_params))


def _tampered(data: bytes, **changes: np.ndarray) -> io.BytesIO:
    members = _members(io.BytesIO(data))  # type: ignore[arg-type]
    members.update(changes)
    buf = io.BytesIO()
    np.savez(buf, **members)
    buf.seek(0)
    return buf


@pytest.mark.parametrize(
    "changes, message",
    [
        # the last things checked: a later failure must not leave earlier writes behind
        ({"rule2.param1.slots": np.zeros((2, 4), np.float32)}, "state for params['b'] has shape (2, 4)"),
        ({"rule2.hyper.eta": np.array(-1.0)}, "eta must be >= 0"),
        ({"rule2.hypers": np.array(["eta", "beta"])}, "has hyperparameters"),
        ({"rule1.host_state": np.array([], dtype=str)}, "schedule state"),
        ({"rule2.n_slots": np.array(3)}, "keeps 2 state slots"),
        ({"rule2.param0.t": np.array(-4)}, "negative"),
        ({"version": np.array(99)}, "version 99"),
        ({"format": np.array("something else")}, "not a gpuopt checkpoint"),
    ],
)
def test_corrupt_checkpoint_is_rejected_without_changes(trained, changes, message) -> None:
    _, _, data = trained
    opt, params = _target()
    before = _snapshot(opt, list(params.values()))
    with pytest.raises(CheckpointError) as info:
        load_state(opt, params, _tampered(data, **changes))
    assert message in str(info.value)
    assert _equal(before, _snapshot(opt, list(params.values())))


def test_missing_member_and_foreign_files(tmp_path: Path, trained) -> None:
    _, _, data = trained
    opt, params = _target()
    members = _members(io.BytesIO(data))  # type: ignore[arg-type]
    del members["rule2.param0.slots"]
    buf = io.BytesIO()
    np.savez(buf, **members)
    buf.seek(0)
    with pytest.raises(CheckpointError, match="incomplete.*rule2.param0.slots"):
        load_state(opt, params, buf)

    npy = tmp_path / "a.npy"
    np.save(npy, np.ones(3))
    with pytest.raises(CheckpointError, match="not an .npz"):
        load_state(opt, params, npy)
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_state(opt, params, junk)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_state(opt, params, tmp_path / "does-not-exist")
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, format=np.array(["gpuopt-checkpoint", None], dtype=object))
    with pytest.raises(CheckpointError, match="cannot read"):  # allow_pickle=False refuses it
        load_state(opt, params, pickled)


def test_save_rejects_what_it_cannot_store() -> None:
    opt = gpuopt.ADAM()
    with pytest.raises(TypeError, match="string dict keys"):
        save_state(opt, {1: np.ones(2)}, io.BytesIO())
    with pytest.raises(TypeError, match="must be an array"):
        save_state(opt, [np.ones(2), "nope"], io.BytesIO())
    with pytest.raises(TypeError, match="gpuopt rule"):
        save_state("ADAM", np.ones(2), io.BytesIO())  # type: ignore[arg-type]
    x = np.ones(5)
    opt.set_state_for(x, ParamState(1, np.zeros((2, 4))))  # as if x had been resized after a step
    with pytest.raises(ValueError, match=r"parameter has 5 elements but ADAM holds state for 4"):
        save_state(opt, x, io.BytesIO())


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs a usable CUDA GPU")
def test_numpy_to_cupy_and_back() -> None:
    import cupy

    x = np.linspace(-1, 1, 1000).astype(np.float32)
    opt = gpuopt.Optimiser(gpuopt.ExpDecay(0.1, 0.5, 2), gpuopt.ADAM())
    _stepped(opt, [x])
    x_gpu = cupy.asarray(x)
    on_gpu = gpuopt.Optimiser(gpuopt.ExpDecay(0.1, 0.5, 2), gpuopt.ADAM())
    load_state(on_gpu, x_gpu, _saved(opt, x))
    slots = on_gpu[1].state_for(x_gpu).slots
    assert isinstance(slots, cupy.ndarray) and slots.dtype == np.float32
    assert np.array_equal(slots.get(), opt[1].state_for(x).slots)
    back = gpuopt.Optimiser(gpuopt.ExpDecay(0.1, 0.5, 2), gpuopt.ADAM())
    y = x.copy()
    load_state(back, y, _saved(on_gpu, x_gpu))
    assert isinstance(back[1].state_for(y).slots, np.ndarray)
    assert np.array_equal(back[1].state_for(y).slots, opt[1].state_for(x).slots)
    assert back[0].eta == opt[0].eta and back[0].decayed_at == opt[0].decayed_at


# -- hostile files: every malformed checkpoint raises CheckpointError, changing nothing --------


def _load_outcome(data: bytes) -> tuple[str, list]:
    """("ok" or "refused", the target's snapshot after the attempt); any other error escapes."""
    opt, params = _target()
    before = _snapshot(opt, list(params.values()))
    try:
        load_state(opt, params, io.BytesIO(data))
    except CheckpointError as exc:
        assert "\n" not in str(exc)
        assert _equal(before, _snapshot(opt, list(params.values()))), f"a refused load changed something: {exc}"
        return "refused", before
    return "ok", _snapshot(opt, list(params.values()))


def test_truncated_files_are_refused(trained) -> None:
    _, _, data = trained
    for cut in sorted({*range(0, len(data), max(1, len(data) // 60)), len(data) - 1, len(data) - 22}):
        assert _load_outcome(data[:cut])[0] == "refused", f"truncated at {cut} of {len(data)}"


def test_flipped_bytes_are_refused_or_harmless(trained) -> None:
    """A flipped byte anywhere is refused, or (in a field zip does not check, such as a
    timestamp) the load gives exactly what the intact file gives."""
    _, _, data = trained
    _, intact = _load_outcome(data)
    refused = 0
    for offset in range(0, len(data), max(1, len(data) // 150)):
        damaged = bytearray(data)
        damaged[offset] ^= 0x5A
        outcome, after = _load_outcome(bytes(damaged))
        refused += outcome == "refused"
        assert outcome == "refused" or _equal(after, intact), f"byte {offset}: a different state loaded"
    assert refused > 100


def _replacements() -> list[tuple[str, np.ndarray]]:
    return [("vector", np.array([1, 2])), ("text", np.array("abc")), ("matrix", np.zeros((2, 2))),
            ("float", np.array(1.5)), ("bool", np.array(True)), ("empty", np.zeros(0))]


def test_every_member_replaced_by_a_wrong_type_or_shape(trained) -> None:
    opt, params, data = trained
    names = sorted(_members(io.BytesIO(data)))  # type: ignore[arg-type]
    for name in names:
        for kind, value in _replacements():
            outcome, after = _load_outcome(_tampered(data, **{name: value}).getvalue())
            if outcome == "ok":  # only a float where a float belongs may load, and then it is used
                assert kind == "float" and (".hyper." in name or ".host." in name), (name, kind)
                assert any(isinstance(v, dict) and 1.5 in v.values() for v in after), (name, kind)


def test_host_state_of_the_wrong_type_is_refused(trained) -> None:
    _, _, data = trained
    for value in (np.array("abc"), np.array(2.5), np.array([1, 2])):
        outcome, _ = _load_outcome(_tampered(data, **{"rule1.host.decayed_at": value}).getvalue())
        assert outcome == "refused"


def _with_forged_header(data: bytes, name: str, shape: tuple, dtype: str = "<f4") -> bytes:
    """The archive with member ``name`` replaced by a header claiming ``shape`` and 16 bytes."""
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": dtype, "fortran_order": False, "shape": shape})
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            body = header.getvalue() + bytes(16) if info.filename == f"{name}.npy" else src.read(info)
            dst.writestr(info.filename, body)
    return out.getvalue()


@pytest.mark.parametrize("name, shape, dtype", [
    ("rule2.param0.slots", (2, 5 * 10**12), "<f4"),  # sizes checked before data is read
    ("rule2.param0.slots", (2, 6), "<f4"),  # the right shape, but its bytes are missing
    ("rule2.param0.t", (10**13,), "<i8"),
    ("keys.utf8", (10**13,), "|u1"),
    ("rules", (), "<U1000000000"),
    ("param0.shape", (10**12,), "<i8"),
])
def test_oversized_headers_are_refused_before_reading(trained, name, shape, dtype) -> None:
    _, _, data = trained
    outcome, _ = _load_outcome(_with_forged_header(data, name, shape, dtype))
    assert outcome == "refused"


def test_threads_saving_to_one_path(tmp_path: Path, trained) -> None:
    import threading

    opt, params, _ = trained
    path = tmp_path / "state.ckpt"
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def save() -> None:
        try:
            start.wait()
            for _ in range(10):
                save_state(opt, params, path)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=save) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.ckpt"]
    assert _load_outcome(path.read_bytes())[0] == "ok"
