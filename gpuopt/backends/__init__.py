"""Backends: each turns the same traced Program into work on its kind of array."""

from __future__ import annotations

from typing import Any


def get_backend(name: str) -> Any:
    """The backend object for ``"numpy"`` or ``"cupy"`` (CuPy imported only when asked)."""
    if name == "numpy":
        from .numpy_backend import BACKEND
    else:
        from .cupy_backend import BACKEND
    return BACKEND
