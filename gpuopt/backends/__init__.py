"""Backends: each turns the same traced Program into work on its kind of array."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .protocol import Backend

_OVERRIDES: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    """The backend object for ``"numpy"`` or ``"cupy"`` (CuPy imported only when asked)."""
    override = _OVERRIDES.get(name)
    if override is not None:
        return override
    if name == "numpy":
        from .numpy_backend import BACKEND
    else:
        from .cupy_backend import BACKEND
    return BACKEND


@contextlib.contextmanager
def backend_override(name: str, backend: Backend) -> Iterator[Backend]:
    """Run arrays of ``name`` through ``backend`` inside the block: the host-time benchmark
    sends NumPy arrays through the kernel backend with a device that launches nothing."""
    previous = _OVERRIDES.get(name)
    _OVERRIDES[name] = backend
    try:
        yield backend
    finally:
        if previous is None:
            del _OVERRIDES[name]
        else:
            _OVERRIDES[name] = previous
