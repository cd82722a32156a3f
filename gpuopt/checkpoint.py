"""Save and restore an optimiser's state for a collection of parameters (``.npz`` files).

A checkpoint holds, for every leaf rule of the optimiser (``opt.leaves()``, in order): its
class name, its hyperparameters (``ExpDecay`` changes its ``eta`` as it runs, so they are part
of the run's state), its ``schedule_state`` attributes, and for each parameter its step count and
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

import math
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import IO, Any, Union

import numpy as np

from .api import fresh_slots
from .backends import get_backend
from .backends.numpy_backend import compute_dtype
from .dispatch import Resolved, check_dtype, resolve
from .rule import ParamState, Rule, holding

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
    """A NumPy or CuPy array as a new NumPy one: a copy taken under the optimiser's lock, so that
    an update in another thread while the file is written does not tear it."""
    if isinstance(array, np.ndarray):
        return array.copy()
    return array.get()  # CuPy: device -> host


def _on_backend(saved: np.ndarray, param: Resolved, dtype: np.dtype) -> Any:
    """``saved`` as state rows of ``dtype`` next to the parameter, laid out exactly as the
    backend lays out fresh state (padded, aligned rows on a GPU), copied in order with its
    updates."""
    backend = get_backend(param.backend)
    with backend.queue_of(param.array, param.framework):
        return backend.state_from(np.asarray(saved), dtype, param.array)


# -- files -----------------------------------------------------------------------------------


def _write(path: PathOrFile, members: dict[str, np.ndarray]) -> None:
    if hasattr(path, "write"):
        np.savez(path, **members)
        return
    # Write beside the target under a name no other writer uses (threads or processes saving
    # to one path at once), then rename: a reader sees the old file or the new one, whole.
    # An open file also stops np.savez from appending ".npz".
    target = os.fspath(path)
    directory, base = os.path.split(os.path.abspath(target))
    descriptor, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(descriptor, "wb") as f:
            np.savez(f, **members)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


#: what reading a damaged archive can raise (truncation, a flipped byte, a forged header)
_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error, UnicodeDecodeError,
                OverflowError, TypeError)


def _starts_with(path: PathOrFile, prefix: bytes) -> bool:
    try:
        if hasattr(path, "read"):
            path.seek(0)
            return path.read(len(prefix)) == prefix
        with open(path, "rb") as f:
            return f.read(len(prefix)) == prefix
    except (OSError, ValueError):
        return False


class _Archive:
    """The members of an ``.npz`` checkpoint, read one at a time, each checked from its ``.npy``
    header (kind, shape, and that the bytes it claims are there) before its data is read."""

    def __init__(self, path: PathOrFile):
        self.source = repr(path)
        try:
            self.zip = zipfile.ZipFile(path)
            self.names = [info.filename for info in self.zip.infolist()]
            self.infos = {info.filename[:-4]: info for info in self.zip.infolist() if info.filename.endswith(".npy")}
        except _READ_ERRORS as exc:
            if isinstance(exc, zipfile.BadZipFile) and _starts_with(path, np.lib.format.MAGIC_PREFIX):
                raise CheckpointError(f"{path!r} is not a gpuopt checkpoint (not an .npz archive)") from None
            raise CheckpointError(f"cannot read a gpuopt checkpoint from {self.source}: {exc}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def close(self) -> None:
        self.zip.close()

    def _damaged(self, name: str, why: object) -> CheckpointError:
        return CheckpointError(f"checkpoint {self.source} is damaged: member {name!r}: {why}")

    def header(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        info = self.infos.get(name)
        if info is None:
            raise CheckpointError(f"checkpoint {self.source} is incomplete: it has no {name!r}")
        try:
            with self.zip.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f"unsupported .npy version {version}")
                offset = f.tell()
        except _READ_ERRORS as exc:
            raise self._damaged(name, exc) from None
        if dtype.hasobject:
            raise CheckpointError(f"cannot read a gpuopt checkpoint from {self.source}: member {name!r} "
                                  "holds Python objects")
        claimed = math.prod(shape) * dtype.itemsize
        if claimed > info.file_size - offset:
            raise self._damaged(name, f"its header claims {claimed} bytes but it holds {info.file_size - offset}")
        return tuple(shape), dtype

    def array(self, name: str, kinds: str, ndim: int | None = None, shape: tuple | None = None,
              what: str = "") -> np.ndarray:
        """The member, if its dtype kind is among ``kinds`` and its shape fits; else CheckpointError."""
        saved_shape, dtype = self.header(name)
        label = what or repr(name)
        if dtype.kind not in kinds:
            raise CheckpointError(f"checkpoint member {label} has dtype {dtype}, expected kind {kinds!r}")
        if ndim is not None and len(saved_shape) != ndim:
            raise CheckpointError(f"checkpoint member {label} has shape {saved_shape}, expected {ndim} dimension(s)")
        if shape is not None and saved_shape != shape:
            raise CheckpointError(f"{label} has shape {saved_shape}, expected {shape}")
        try:
            with self.zip.open(self.infos[name]) as f:
                return np.lib.format.read_array(f, allow_pickle=False)
        except _READ_ERRORS as exc:
            raise self._damaged(name, exc) from None

    def integer(self, name: str, what: str = "") -> int:
        return int(self.array(name, "iu", ndim=0, what=what))

    def text(self, name: str) -> str:
        return str(self.array(name, "U", ndim=0))

    def texts(self, name: str) -> list[str]:
        return [str(v) for v in self.array(name, "U", ndim=1).tolist()]


def _read(path: PathOrFile) -> _Archive:
    archive = _Archive(path)
    if not archive.infos:
        archive.close()
        raise CheckpointError(f"{path!r} is not a gpuopt checkpoint (not an .npz archive)")
    try:
        fmt = archive.text("format") if "format" in archive else None
        if fmt != FORMAT:
            raise CheckpointError(f"{path!r} is not a gpuopt checkpoint (no '{FORMAT}' marker)")
        version = archive.integer("version") if "version" in archive else -1
        if version != VERSION:
            raise CheckpointError(f"{path!r} is checkpoint format version {version}; this gpuopt reads {VERSION}")
    except CheckpointError:
        archive.close()
        raise
    return archive


# -- save ------------------------------------------------------------------------------------


def save_state(opt: Rule, params: Any, path: PathOrFile) -> None:
    """Save ``opt``'s state for ``params`` (one array, or a list/tuple/dict of arrays) to ``path``.

    ``path`` is a file name (written as is, without appending ``.npz``; replaced atomically)
    or a binary file object. Parameters that were never stepped are recorded as such. The
    parameters' own values are not saved: save them alongside (``np.save``) as you like.
    """
    if not isinstance(opt, Rule):
        raise TypeError(f"opt must be a gpuopt rule or Optimiser, got {type(opt).__name__}")
    with holding(opt):  # (no update of this optimiser in another thread meanwhile)
        members = _members_of(opt, params)
    _write(path, members)


def _members_of(opt: Rule, params: Any) -> dict[str, np.ndarray]:
    structure, keys, objs = _flatten(params)
    resolved = [resolve(obj, _describe(structure, key)) for key, obj in zip(keys, objs, strict=True)]
    arrays = [r.array for r in resolved]
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
        # (stored as "host_state" and "host.*": the archive format predates the name)
        members[f"rule{i}.host_state"] = np.array(list(leaf.schedule_state), dtype=str).reshape(
            len(leaf.schedule_state))
        for h in leaf.schedule_state:
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
                with get_backend(resolved[j].backend).queue_of(arrays[j], resolved[j].framework):  # (after its updates)
                    members[f"rule{i}.param{j}.slots"] = _to_host(state.slots)
    return members


# -- load ------------------------------------------------------------------------------------


@dataclass
class LoadPlan:
    """Every write a load makes, computed (and so checked) before the first one."""

    hypers: list[tuple[Rule, dict[str, Any]]] = field(default_factory=list)
    schedules: list[tuple[Rule, dict[str, Any]]] = field(default_factory=list)
    states: list[tuple[Rule, object, ParamState]] = field(default_factory=list)


def _check_hyper(leaf: Rule, name: str, value: Any, what: str) -> None:
    descriptor = next((h for h in type(leaf)._hypers if h.name == name), None)
    if descriptor is not None and descriptor.check is not None:
        try:
            descriptor.check(name, value)
        except ValueError as exc:
            raise CheckpointError(f"{what}: saved value is invalid: {exc}") from exc


def _saved_value(archive: _Archive, name: str, current: Any, what: str) -> Any:
    """A saved hyperparameter or schedule-state value, of the same kind as the current one."""
    if isinstance(current, (tuple, list)):
        saved = archive.array(name, "iuf", shape=(len(current),), what=what)
    elif isinstance(current, bool):
        saved = archive.array(name, "b", ndim=0, what=what)
    elif isinstance(current, int):
        saved = archive.array(name, "iu", ndim=0, what=what)
    elif isinstance(current, float):
        saved = archive.array(name, "iuf", ndim=0, what=what)
    elif isinstance(current, str):
        saved = archive.array(name, "U", ndim=0, what=what)
    else:
        saved = archive.array(name, "biufU", what=what)
    value = _decode_value(saved)
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise CheckpointError(f"{what}: saved value {value!r} is not finite")
    return value


def _decoded_keys(archive: _Archive, count: int) -> list[str]:
    data = archive.array("keys.utf8", "u", ndim=1)
    offsets = archive.array("keys.offsets", "iu", shape=(count + 1,), what="keys.offsets")
    if data.dtype.itemsize != 1 or offsets[0] != 0 or offsets[-1] != data.size or np.any(np.diff(offsets) < 0):
        raise CheckpointError(f"checkpoint {archive.source} is damaged: its dict keys do not decode")
    try:
        return _decode_keys(data, offsets)
    except UnicodeDecodeError:
        raise CheckpointError(f"checkpoint {archive.source} is damaged: its dict keys are not UTF-8") from None


def _plan_load(opt: Rule, params: Any, archive: _Archive, restore_hyper: bool) -> LoadPlan:
    structure, keys, objs = _flatten(params)

    # Optimiser structure: the same leaf rules in the same order.
    saved_rules = archive.texts("rules")
    leaves = opt.leaves()
    names = [type(leaf).__name__ for leaf in leaves]
    if saved_rules != names:
        raise CheckpointError(
            f"checkpoint was saved from rules {saved_rules} but this optimiser has {names}"
        )

    # Parameter structure: same kind of collection and the same keys.
    saved_structure = archive.text("structure")
    n_saved = archive.integer("n_params")
    if saved_structure != structure:
        kinds = {"single": "a single array", "sequence": "a list/tuple", "dict": "a dict"}
        raise CheckpointError(
            f"checkpoint holds state for {kinds.get(saved_structure, saved_structure)} of parameters "
            f"but params is {kinds[structure]}"
        )
    if structure == "dict":
        if not 0 <= n_saved <= len(archive.infos):
            raise CheckpointError(f"checkpoint {archive.source} is damaged: it claims {n_saved} parameters")
        saved_keys = _decoded_keys(archive, n_saved)
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
        saved_shape = tuple(int(n) for n in archive.array(f"param{j}.shape", "iu", ndim=1))
        if tuple(r.array.shape) != saved_shape:
            raise CheckpointError(
                f"{what} has shape {tuple(r.array.shape)} but the checkpoint's has shape {saved_shape}"
            )
        resolved.append((what, obj, r))

    plan = LoadPlan()
    for i, leaf in enumerate(leaves):
        name = f"{type(leaf).__name__} (rule {i})"
        hypers = leaf.hyperparameters()
        saved_hypers = archive.texts(f"rule{i}.hypers")
        if saved_hypers != list(hypers):
            raise CheckpointError(
                f"{name} has hyperparameters {list(hypers)} but the checkpoint's has {saved_hypers}"
            )
        if restore_hyper:
            values = {h: _saved_value(archive, f"rule{i}.hyper.{h}", hypers[h], f"{name}.{h}") for h in saved_hypers}
            for h, value in values.items():
                _check_hyper(leaf, h, value, f"{name}.{h}")
            plan.hypers.append((leaf, values))
        saved_host = archive.texts(f"rule{i}.host_state")
        if saved_host != list(leaf.schedule_state):
            raise CheckpointError(
                f"{name} has schedule state {list(leaf.schedule_state)} but the checkpoint's has {saved_host}"
            )
        plan.schedules.append((leaf, {h: _saved_value(archive, f"rule{i}.host.{h}", getattr(leaf, h), f"{name}.{h}")
                                 for h in saved_host}))
        n_slots = archive.integer(f"rule{i}.n_slots")
        if n_slots != len(leaf.state):
            raise CheckpointError(
                f"{name} keeps {len(leaf.state)} state slots but the checkpoint has {n_slots}"
            )

        for j, (what, obj, r) in enumerate(resolved):
            ct = compute_dtype(r.element)
            t_name = f"rule{i}.param{j}.t"
            if t_name not in archive:
                # Never stepped when saved: a fresh state is what the first step would create.
                if leaf.state_for(obj) is not None:
                    plan.states.append((leaf, obj, ParamState(0, fresh_slots(get_backend(r.backend), leaf, r))))
                continue
            t = archive.integer(t_name, what=f"{name}: step count for {what}")
            if t < 0:
                raise CheckpointError(f"{name}: step count {t} for {what} is negative")
            slots = None
            if leaf.state:
                # The shape is checked from the header, before any data is read.
                saved = archive.array(f"rule{i}.param{j}.slots", "f", shape=(n_slots, r.array.size),
                                      what=f"{name}: state for {what}")
                # Converted to the compute dtype of the parameter it is loaded for.
                slots = _on_backend(saved, r, ct)
            plan.states.append((leaf, obj, ParamState(t, slots)))
    _check_names(archive, leaves, len(resolved), structure == "dict")
    return plan


def _check_names(archive: _Archive, leaves: tuple[Rule, ...], n_params: int, has_keys: bool) -> None:
    """Every member is one the format has: a damaged name (a flipped byte in the zip directory)
    must not make a member look absent, which would read as "never stepped"."""
    allowed = {"format", "version", "structure", "n_params", "rules"}
    if has_keys:
        allowed |= {"keys.utf8", "keys.offsets"}
    allowed |= {f"param{j}.shape" for j in range(n_params)}
    for i, leaf in enumerate(leaves):
        allowed |= {f"rule{i}.hypers", f"rule{i}.host_state", f"rule{i}.n_slots"}
        allowed |= {f"rule{i}.hyper.{h}" for h in leaf.hyperparameters()}
        allowed |= {f"rule{i}.host.{h}" for h in leaf.schedule_state}
        for j in range(n_params):
            allowed |= {f"rule{i}.param{j}.t", f"rule{i}.param{j}.slots"}
    unknown = [name for name in archive.names if not (name.endswith(".npy") and name[:-4] in allowed)]
    if unknown:
        raise CheckpointError(f"checkpoint {archive.source} is damaged: unexpected member {unknown[0]!r}")
    for i in range(len(leaves)):
        for j in range(n_params):
            if f"rule{i}.param{j}.slots" in archive and f"rule{i}.param{j}.t" not in archive:
                raise CheckpointError(f"checkpoint {archive.source} is incomplete: it has no 'rule{i}.param{j}.t'")


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
    with holding(opt):
        _commit(plan_load(opt, params, path, hyperparameters))


def plan_load(opt: Rule, params: Any, path: PathOrFile, hyperparameters: bool = True,
             label: str | None = None) -> LoadPlan:
    """Read and check a checkpoint (``label`` names it in errors, else ``path`` does) and plan
    every write of its load; nothing is changed."""
    archive = _read(path)
    if label is not None:
        archive.source = label
    try:
        return _plan_load(opt, params, archive, hyperparameters)
    finally:
        archive.close()


def _commit(plan: LoadPlan) -> None:
    """Make a load's writes. Nothing here can fail: every value was checked and every array
    built when the plan was made."""
    for leaf, values in plan.hypers:
        for name, value in values.items():
            setattr(leaf, name, value)
    for leaf, values in plan.schedules:
        for name, value in values.items():
            setattr(leaf, name, value)
    for leaf, obj, state in plan.states:
        leaf.set_state_for(obj, state)
