"""Element types, including bfloat16, which NumPy and CuPy have no dtype for.

A bfloat16 array (a PyTorch tensor's memory) is handled as its 16-bit patterns, a ``uint16``
view, and its real element type travels beside it as :data:`BFLOAT16`. The kernels read it as
``__nv_bfloat16``; the NumPy executor widens it to float32 exactly (a bfloat16 is the top half
of a float32) and narrows results with round-to-nearest-even, as PyTorch does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: the element type of bfloat16 storage (the arrays themselves are uint16 views)
BFLOAT16 = np.dtype([("bfloat16", np.uint16)])

SUPPORTED = (np.dtype(np.float16), BFLOAT16, np.dtype(np.float32), np.dtype(np.float64))


def name(element: np.dtype) -> str:
    """``float32``, ``bfloat16``, ...: the element type as users spell it."""
    return "bfloat16" if element == BFLOAT16 else np.dtype(element).name


def as_element_type(value: Any) -> np.dtype:
    """A dtype-like (``"bfloat16"`` included) as an element type."""
    if isinstance(value, str) and value == "bfloat16":
        return BFLOAT16
    return np.dtype(value)


def widen(bits: np.ndarray, out: np.ndarray) -> None:
    """bfloat16 patterns into float32 ``out`` (exact: the patterns are the top 16 bits)."""
    wide = out.view(np.uint32)
    np.copyto(wide, bits)
    np.left_shift(wide, 16, out=wide)


def narrow(values: np.ndarray, out: np.ndarray, scratch: np.ndarray, nan: np.ndarray) -> None:
    """float32 ``values`` rounded to the nearest bfloat16 (ties to even) into the uint16
    ``out``. ``scratch`` (uint32) and ``nan`` (bool) are work buffers of the same length, so
    that nothing is allocated."""
    bits = values.view(np.uint32)
    np.right_shift(bits, 16, out=scratch)
    np.bitwise_and(scratch, 1, out=scratch)  # the last kept bit: ties go to where it is 0
    np.add(scratch, 0x7FFF, out=scratch)
    np.add(scratch, bits, out=scratch)  # a carry rounds the magnitude up (to inf past the max)
    np.right_shift(scratch, 16, out=scratch)
    np.copyto(out, scratch, casting="unsafe")
    np.isnan(values, out=nan)  # rounding could carry a NaN's low payload into infinity
    np.copyto(out, np.uint16(0x7FC0), where=nan)


def to_compute(array: Any, element: np.dtype) -> Any:
    """A new array of ``array``'s values in its compute precision (float64 stays float64,
    others become float32), on ``array``'s backend."""
    if element == BFLOAT16:
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float64 if element == np.float64 else np.float32)
