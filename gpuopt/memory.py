"""Where an array's elements live: byte bounds, overlap between the arrays of one call, and
the memory owner that optimiser state follows.

Two checks use this:
- ``update`` refuses memory shared between a parameter and any other parameter or gradient of
  the same call (a parameter passed as its own gradient, element for element, is fine). Bounds
  decide first (sorted, so a 150-tensor model costs one sort); arrays whose bounds meet are
  then compared element-exactly with ``np.shares_memory``, so interleaved views such as
  ``buf[0::2]`` and ``buf[1::2]`` are not refused. CuPy arrays are compared the same way, from
  their device pointer, shape and strides (no device memory is read).
- State follows memory: a new array object laid out exactly over memory that already has state
  (``x[...]``, ``p.data`` of a PyTorch parameter) finds that state, for as long as the memory's
  owner (the base array, or a torch tensor's storage) is alive.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: np.shares_memory's work bound for arrays whose bounds meet; beyond it they count as overlapping
_EXACT_WORK = 100_000
_TOO_HARD = getattr(np, "exceptions", np).TooHardError


def data_pointer(array: Any) -> int:
    """Address of element 0 (a host address for NumPy, a device address for CuPy)."""
    if isinstance(array, np.ndarray):
        return array.__array_interface__["data"][0]
    return int(array.data.ptr)


def layout(array: Any) -> tuple:
    """What makes two arrays the same elements in the same order: pointer, shape, strides, dtype."""
    return (data_pointer(array), tuple(array.shape), tuple(array.strides), np.dtype(array.dtype).str)


def byte_bounds(array: Any) -> tuple[int, int] | None:
    """[low, high) bytes an array may touch; None for an empty array."""
    if array.size == 0:
        return None
    low = high = data_pointer(array)
    for n, stride in zip(array.shape, array.strides):
        if stride < 0:
            low += (n - 1) * stride
        else:
            high += (n - 1) * stride
    return low, high + np.dtype(array.dtype).itemsize


class _Interface:
    """An ``__array_interface__`` for an address: NumPy only does arithmetic on it here."""

    def __init__(self, array: Any):
        self.__array_interface__ = {
            "data": (data_pointer(array), True), "shape": tuple(array.shape),
            "strides": tuple(array.strides), "typestr": np.dtype(array.dtype).str, "version": 3,
        }


def _elements_meet(a: Any, b: Any) -> bool:
    host_a = a if isinstance(a, np.ndarray) else np.asarray(_Interface(a))
    host_b = b if isinstance(b, np.ndarray) else np.asarray(_Interface(b))
    try:
        return bool(np.shares_memory(host_a, host_b, max_work=_EXACT_WORK))
    except _TOO_HARD:
        return True


def _allocation(array: Any) -> int | None:
    """id of the NumPy array that owns ``array``'s memory, or None where that is not known
    (CuPy, memory from a buffer or DLPack): two arrays with different owners cannot meet."""
    if not isinstance(array, np.ndarray):
        return None
    root, base = array, array.base
    while base is not None:
        if type(base) is not np.ndarray:
            return None  # memory from elsewhere (a buffer, a DLPack capsule, a subclass)
        root, base = base, base.base
    return id(root)  # (no base: the array allocated its own memory)


def _suspects(entries: list[tuple[str, str, Any, Any]]) -> list[tuple[int, bool]]:
    """(position, is_param) of the arrays whose bounds need comparing. Reading pointers costs
    microseconds per NumPy array, so arrays in allocations of their own are left out."""
    arrays = []
    for position, (_, _, x, g) in enumerate(entries):
        arrays.append((position, True, x))
        if g is not x:
            arrays.append((position, False, g))
    owners = [_allocation(a) for _, _, a in arrays]
    distinct = set(owners)
    if None in distinct:
        return [(position, is_param) for position, is_param, _ in arrays]
    if len(distinct) == len(owners):
        return []  # every array in an allocation of its own
    shared: dict[int, list[int]] = {}
    for k, owner in enumerate(owners):
        shared.setdefault(owner, []).append(k)
    return [arrays[k][:2] for ks in shared.values() if len(ks) > 1 and any(arrays[k][1] for k in ks) for k in ks]


def check_overlaps(entries: list[tuple[str, str, Any, Any]]) -> None:
    """ValueError naming both arrays if a parameter's memory meets any other parameter or
    gradient among ``entries`` = (name, backend, parameter array, gradient array).

    A gradient laid out exactly as its own parameter is allowed: each element is read before
    the same element is written.
    """
    spans = []  # (low, high, position, is_param)
    for position, is_param in _suspects(entries):
        _, _, x, g = entries[position]
        if not is_param and g.size and x.size and layout(g) == layout(x):
            continue  # its own parameter's elements, one for one
        bounds = byte_bounds(x if is_param else g)
        if bounds is not None:
            spans.append((*bounds, position, is_param))
    spans.sort(key=lambda s: s[0])
    open_spans: list[tuple] = []
    for span in spans:
        low, _, position, is_param = span
        open_spans = [s for s in open_spans if s[1] > low]
        for other in open_spans:
            if not (is_param or other[3]):
                continue  # two gradients: both only read
            if entries[position][1] != entries[other[2]][1]:
                continue  # host and device addresses are different spaces
            first, second = (other, span) if other[3] else (span, other)  # the parameter first
            a = entries[first[2]][2]
            b = entries[second[2]][2 if second[3] else 3]
            if _elements_meet(a, b):
                raise ValueError(_overlap_message(entries, first, second))
        open_spans.append(span)


def _overlap_message(entries: list, param: tuple, other: tuple) -> str:
    name = entries[param[2]][0]
    other_name = entries[other[2]][0]
    if other[3]:
        what = f"{other_name}"
    elif other[2] == param[2]:
        what = "its own gradient at another offset or layout"
    else:
        what = f"the gradient of {other_name}"
    return (f"{name} shares memory with {what}: the update would read values it has already "
            "written; pass arrays that do not overlap")


def memory_owner(obj: object, array: Any) -> object:
    """The object whose life is the memory's: a torch tensor's storage, or the base array a
    view was taken from (the array itself if it owns its memory or its owner cannot be
    referenced weakly)."""
    storage = getattr(obj, "untyped_storage", None)
    if callable(storage):
        try:
            return storage()
        except Exception:  # a tensor without storage (meta, sparse): fall back to the array
            pass
    root = array
    while isinstance(getattr(root, "base", None), type(array)):
        root = root.base
    return root


class Disjoint:
    """The bytes of a prepared update's parameters (disjoint: the full check passed), for a
    quick test of new gradient arrays laid out like the old ones: do any meet a parameter?
    Conservative (bounds only): a True sends the call through the full, exact check."""

    def __init__(self, params: list[Any], grads: list[Any]):
        spans = sorted(bounds for bounds in map(byte_bounds, params) if bounds is not None)
        # A first span below every address, so that each gradient has one before it.
        self.lows = np.array([-1] + [low for low, _ in spans], dtype=np.int64)
        self.highs = np.array([-1] + [high for _, high in spans], dtype=np.int64)
        # Each gradient's bounds as offsets from its pointer: the same for a new array of the
        # same layout. (An empty one spans nothing.)
        offsets = [(b[0] - data_pointer(g), b[1] - data_pointer(g)) if (b := byte_bounds(g)) else (0, 0)
                   for g in grads]
        self.low_offsets = np.array([o[0] for o in offsets], dtype=np.int64)
        self.high_offsets = np.array([o[1] for o in offsets], dtype=np.int64)
        # The last two sets of pointers found apart: memory pools hand the same addresses out
        # again, often alternating between two sets (the old gradients live while new ones are made).
        self.cleared: list[bytes | tuple[int, ...]] = []

    def meets(self, pointers: Sequence[int]) -> bool:
        """Whether gradients at ``pointers`` (a list, or an int64 array) laid out as the old
        ones meet a parameter."""
        key = pointers.tobytes() if isinstance(pointers, np.ndarray) else tuple(pointers)
        if key in self.cleared:
            return False
        start = np.asarray(pointers, dtype=np.int64)
        # The last parameter starting before each gradient ends is the only one it can meet.
        before = self.lows.searchsorted(start + self.high_offsets) - 1
        if (self.highs[before] > start + self.low_offsets).any():
            return True
        self.cleared = [key, *self.cleared[:1]]
        return False
