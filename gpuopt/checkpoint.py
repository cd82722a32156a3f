"""Save and restore an optimiser's state for a collection of parameters (``.npz`` files).

A checkpoint holds, for every leaf rule of the optimiser (``opt.leaves()``, in order): its
class name, its hyperparameters (``ExpDecay`` changes its ``eta`` as it runs, so they are part
of the run's state), its ``host_state`` attributes, and for each parameter its step count and
state slots. It is a plain NumPy ``.npz`` archive read with ``allow_pickle=False``: no Python
objects are ever unpickled, so loading a file cannot run code.

Member names are generated (``rule0.hyper.eta``, ``rule1.param3.slots``, ...), never taken
from user data: dict keys may hold any characters (``/``, NUL, non-ASCII) and are stored as
UTF-8 bytes instead. Arrays are stored on the host (CuPy state goes through ``.get()``) and
restored onto the backend of the parameter they are loaded for, so a checkpoint written from
CuPy loads onto NumPy and back.

Loading checks everything (rule classes, hyperparameter names and values, parameter keys,
shapes, slot counts) before it writes anything: a failed load leaves the optimiser as it was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import IO, Any, Union

import numpy as np

from .backends import get_backend
from .backends.numpy_backend import compute_dtype
from .dispatch import check_dtype, resolve
from .dtypes import to_compute
from .rule import ParamState, Rule

__all__ = ["save_state", "load_state", "CheckpointError"]

FORMAT = "gpuopt-checkpoint"
VERSION = 1

PathOrFile = Union[str, "os.PathLike[str]", IO[bytes]]


class CheckpointError(ValueError):
    """A checkpoint that does not fit the optimiser or parameters it is loaded into."""


# -- parameters: a single array, a sequence, or a dict with string keys ----------------------


def _flatten(params: Any) -> tuple[str, list[object], list[object]]:
    """(structure, keys, parameter objects); keys are indices or dict keys."""
    if isinstance(params, dict):
        for key in params:
            if not isinstance(key, str):
                raise TypeError(f"checkpoints need string dict keys, got {key!r} ({type(key).__name__})")
        return "dict", list(params), list(params.values())
    if isinstance(params, (list, tuple)):
        return "sequence", list(range(len(params))), list(params)
    return "single", [None], [params]


def _describe(structure: str, key: object) -> str:
    return "parameter" if structure == "single" else f"params[{key!r}]"


def _encode_keys(keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    # surrogatepass: any Python str round-trips, even one holding lone surrogates.
    blobs = [k.encode("utf-8", "surrogatepass") for k in keys]
    offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
    return np.frombuffer(b"".join(blobs), dtype=np.uint8).copy(), offsets


def _decode_keys(data: np.ndarray, offsets: np.ndarray) -> list[str]:
    raw = data.tobytes()
    return [raw[a:b].decode("utf-8", "surrogatepass") for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


# -- hyperparameter and host-state values ----------------------------------------------------


def _encode_value(value: Any, what: str) -> np.ndarray:
    """A number, bool, string or tuple of numbers as an array that needs no pickle."""
    ok = isinstance(value, (bool, int, float, str, np.generic)) or (
        isinstance(value, (tuple, list))
        and all(isinstance(v, (bool, int, float, np.generic)) for v in value)
    )
    array = np.asarray(value) if ok else None
    if array is None or array.dtype.kind not in "biufU":
        raise TypeError(
            f"cannot save {what} = {value!r}: checkpoints hold numbers, strings and tuples of numbers"
        )
    return array


def _decode_value(array: np.ndarray) -> Any:
    # float64 and int64 round-trip Python floats and ints exactly; tuples come back as tuples.
    return array.item() if array.ndim == 0 else tuple(array.tolist())


# -- arrays on either backend ---------------------------------------------------------------


def _to_host(array: Any) -> np.ndarray:
    """A NumPy or CuPy array as a NumPy one (np.savez writes it out before anything changes)."""
    if isinstance(array, np.ndarray):
        return array
    return array.get()  # CuPy: device -> host


def _on_backend(saved: np.ndarray, backend: str, like: Any, dtype: np.dtype) -> Any:
    """``saved`` as state rows of ``dtype`` next to the parameter ``like``, laid out exactly as
    the backend lays out fresh state (padded, aligned rows on a GPU)."""
    return get_backend(backend).state_from(np.asarray(saved), dtype, like)


# -- files -----------------------------------------------------------------------------------


def _write(path: PathOrFile, members: dict[str, np.ndarray]) -> None:
    if hasattr(path, "write"):
        np.savez(path, **members)
        return
    # Write beside the target and rename, so a crash mid-save never leaves a torn checkpoint
    # in place of a good one; an open file also stops np.savez from appending ".npz".
    target = os.fspath(path)
    tmp = f"{target}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **members)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read(path: PathOrFile) -> dict[str, np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a bare .npy array
            raise CheckpointError(f"{path!r} is not a gpuopt checkpoint (not an .npz archive)")
        with loaded:
            members = {name: loaded[name] for name in loaded.files}
    except (OSError, ValueError, EOFError) as exc:  # not a zip / an object array / truncated
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"cannot read a gpuopt checkpoint from {path!r}: {exc}") from exc
    fmt = members.get("format")
    if fmt is None or fmt.ndim != 0 or str(fmt) != FORMAT:
        raise CheckpointError(f"{path!r} is not a gpuopt checkpoint (no '{FORMAT}' marker)")
    version = int(members.get("version", -1))
    if version != VERSION:
        raise CheckpointError(f"{path!r} is checkpoint format version {version}; this gpuopt reads {VERSION}")
    return members


# -- save ------------------------------------------------------------------------------------


def save_state(opt: Rule, params: Any, path: PathOrFile) -> None:
    """Save ``opt``'s state for ``params`` (one array, or a list/tuple/dict of arrays) to ``path``.

    ``path`` is a file name (written as is, without appending ``.npz``; replaced atomically)
    or a binary file object. Parameters that were never stepped are recorded as such. The
    parameters' own values are not saved: save them alongside (``np.save``) as you like.
    """
    if not isinstance(opt, Rule):
        raise TypeError(f"opt must be a gpuopt rule or Optimiser, got {type(opt).__name__}")
    structure, keys, objs = _flatten(params)
    arrays = [resolve(obj, _describe(structure, key)).array for key, obj in zip(keys, objs, strict=True)]
    leaves = opt.leaves()
    members: dict[str, np.ndarray] = {
        "format": np.array(FORMAT),
        "version": np.array(VERSION),
        "structure": np.array(structure),
        "n_params": np.array(len(objs)),
        "rules": np.array([type(leaf).__name__ for leaf in leaves], dtype=str).reshape(len(leaves)),
    }
    if structure == "dict":
        members["keys.utf8"], members["keys.offsets"] = _encode_keys(keys)  # type: ignore[arg-type]
    for j, array in enumerate(arrays):
        members[f"param{j}.shape"] = np.array(array.shape, dtype=np.int64).reshape(-1)
    for i, leaf in enumerate(leaves):
        name = type(leaf).__name__
        hypers = leaf.hyperparameters()
        members[f"rule{i}.hypers"] = np.array(list(hypers), dtype=str).reshape(len(hypers))
        for h, value in hypers.items():
            members[f"rule{i}.hyper.{h}"] = _encode_value(value, f"{name}.{h}")
        members[f"rule{i}.host_state"] = np.array(list(leaf.host_state), dtype=str).reshape(
            len(leaf.host_state))
        for h in leaf.host_state:
            members[f"rule{i}.host.{h}"] = _encode_value(getattr(leaf, h), f"{name}.{h}")
        members[f"rule{i}.n_slots"] = np.array(len(leaf.state))
        for j, obj in enumerate(objs):
            state = leaf.state_for(obj)
            if state is None:
                continue  # never stepped: nothing to restore
            if state.slots is not None and state.slots.shape[1] != arrays[j].size:
                raise ValueError(
                    f"{_describe(structure, keys[j])} has {arrays[j].size} elements but {name} holds "
                    f"state for {state.slots.shape[1]}; call opt.reset() after resizing parameters"
                )
            members[f"rule{i}.param{j}.t"] = np.array(state.t, dtype=np.int64)
            if state.slots is not None:
                members[f"rule{i}.param{j}.slots"] = _to_host(state.slots)
    _write(path, members)


# -- load ------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """Every write a load makes, computed (and so checked) before the first one."""

    hypers: list[tuple[Rule, dict[str, Any]]] = field(default_factory=list)
    host: list[tuple[Rule, dict[str, Any]]] = field(default_factory=list)
    states: list[tuple[Rule, object, ParamState]] = field(default_factory=list)


def _check_hyper(leaf: Rule, name: str, value: Any, what: str) -> None:
    descriptor = next((h for h in type(leaf)._hypers if h.name == name), None)
    if descriptor is not None and descriptor.check is not None:
        try:
            descriptor.check(name, value)
        except ValueError as exc:
            raise CheckpointError(f"{what}: saved value is invalid: {exc}") from exc


def _plan(opt: Rule, params: Any, members: dict[str, np.ndarray], restore_hyper: bool,
          source: str) -> _Plan:
    def member(name: str) -> np.ndarray:
        try:
            return members[name]
        except KeyError:
            raise CheckpointError(f"checkpoint {source} is incomplete: it has no {name!r}") from None

    structure, keys, objs = _flatten(params)

    # Optimiser structure: the same leaf rules in the same order.
    saved_rules = [str(r) for r in member("rules").tolist()]
    leaves = opt.leaves()
    names = [type(leaf).__name__ for leaf in leaves]
    if saved_rules != names:
        raise CheckpointError(
            f"checkpoint was saved from rules {saved_rules} but this optimiser has {names}"
        )

    # Parameter structure: same kind of collection and the same keys.
    saved_structure = str(member("structure"))
    n_saved = int(member("n_params"))
    if saved_structure != structure:
        kinds = {"single": "a single array", "sequence": "a list/tuple", "dict": "a dict"}
        raise CheckpointError(
            f"checkpoint holds state for {kinds.get(saved_structure, saved_structure)} of parameters "
            f"but params is {kinds[structure]}"
        )
    if structure == "dict":
        saved_keys = _decode_keys(member("keys.utf8"), member("keys.offsets"))
        missing = [k for k in saved_keys if k not in params]
        extra = [k for k in keys if k not in saved_keys]
        if missing or extra:
            raise CheckpointError(
                f"params must have the checkpoint's keys: missing {missing}, unexpected {extra}"
            )
        order: list[object] = list(saved_keys)
    else:
        if n_saved != len(objs):
            raise CheckpointError(f"checkpoint holds {n_saved} parameters but params has {len(objs)}")
        order = list(keys)
    lookup = dict(zip(keys, objs, strict=True))

    # Each parameter: a supported array of the saved shape.
    resolved = []
    for j, key in enumerate(order):
        what = _describe(structure, key)
        obj = lookup[key]
        r = resolve(obj, what)
        check_dtype(r.array, what, r.element)
        saved_shape = tuple(int(n) for n in member(f"param{j}.shape"))
        if tuple(r.array.shape) != saved_shape:
            raise CheckpointError(
                f"{what} has shape {tuple(r.array.shape)} but the checkpoint's has shape {saved_shape}"
            )
        resolved.append((what, obj, r))

    plan = _Plan()
    for i, leaf in enumerate(leaves):
        name = f"{type(leaf).__name__} (rule {i})"
        hypers = leaf.hyperparameters()
        saved_hypers = [str(h) for h in member(f"rule{i}.hypers").tolist()]
        if saved_hypers != list(hypers):
            raise CheckpointError(
                f"{name} has hyperparameters {list(hypers)} but the checkpoint's has {saved_hypers}"
            )
        if restore_hyper:
            values = {h: _decode_value(member(f"rule{i}.hyper.{h}")) for h in saved_hypers}
            for h, value in values.items():
                _check_hyper(leaf, h, value, f"{name}.{h}")
            plan.hypers.append((leaf, values))
        saved_host = [str(h) for h in member(f"rule{i}.host_state").tolist()]
        if saved_host != list(leaf.host_state):
            raise CheckpointError(
                f"{name} has host state {list(leaf.host_state)} but the checkpoint's has {saved_host}"
            )
        plan.host.append((leaf, {h: _decode_value(member(f"rule{i}.host.{h}")) for h in saved_host}))
        n_slots = int(member(f"rule{i}.n_slots"))
        if n_slots != len(leaf.state):
            raise CheckpointError(
                f"{name} keeps {len(leaf.state)} state slots but the checkpoint has {n_slots}"
            )

        for j, (what, obj, r) in enumerate(resolved):
            ct = compute_dtype(r.element)
            t_name = f"rule{i}.param{j}.t"
            if t_name not in members:
                # Never stepped when saved: a fresh state is what the first step would create.
                if leaf.state_for(obj) is not None:
                    slots = None
                    if leaf.state:
                        initial = np.array(leaf.initial_state(), dtype=ct)[:, None]
                        slots = _on_backend(np.broadcast_to(initial, (n_slots, r.array.size)),
                                            r.backend, r.array, ct)
                        for row in leaf.parameter_slots():  # a master copy starts as the parameter
                            slots[row][...] = to_compute(r.array.reshape(-1), r.element)
                    plan.states.append((leaf, obj, ParamState(0, slots)))
                continue
            t = int(members[t_name])
            if t < 0:
                raise CheckpointError(f"{name}: step count {t} for {what} is negative")
            slots = None
            if leaf.state:
                saved = member(f"rule{i}.param{j}.slots")
                expected = (n_slots, r.array.size)
                if saved.shape != expected:
                    raise CheckpointError(
                        f"{name}: state for {what} has shape {saved.shape}, expected {expected}"
                    )
                if saved.dtype.kind != "f":
                    raise CheckpointError(f"{name}: state for {what} has dtype {saved.dtype}")
                # Converted to the compute dtype of the parameter it is loaded for.
                slots = _on_backend(saved, r.backend, r.array, ct)
            plan.states.append((leaf, obj, ParamState(t, slots)))
    return plan


def load_state(opt: Rule, params: Any, path: PathOrFile, *, hyperparameters: bool = True) -> None:
    """Restore ``opt``'s state for ``params`` from a checkpoint written by :func:`save_state`.

    ``params`` has the structure it had when saved (same dict keys, or as many entries) and
    the same shapes; each may live on either backend, and its state is created there (in its
    compute dtype). Hyperparameters are restored too (``ExpDecay``'s decayed ``eta`` is part of
    the run); pass ``hyperparameters=False`` to keep the optimiser's current values. Raises
    :class:`CheckpointError` (a ``ValueError``) when the checkpoint does not fit, before
    changing anything.
    """
    if not isinstance(opt, Rule):
        raise TypeError(f"opt must be a gpuopt rule or Optimiser, got {type(opt).__name__}")
    members = _read(path)
    _commit(_plan(opt, params, members, hyperparameters, repr(path)))


def _commit(plan: _Plan) -> None:
    """Make a load's writes. Nothing here can fail: every value was checked and every array
    built when the plan was made."""
    for leaf, values in plan.hypers:
        for name, value in values.items():
            setattr(leaf, name, value)
    for leaf, values in plan.host:
        for name, value in values.items():
            setattr(leaf, name, value)
    for leaf, obj, state in plan.states:
        leaf.set_state_for(obj, state)
