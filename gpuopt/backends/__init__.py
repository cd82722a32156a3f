"""Backends: each turns the same traced Program into work on its kind of array.

NumPy arrays go to the native backend (C++ compiled from the printed step, see
``native_backend``) where a C++ compiler works, else to the NumPy ufunc executor, which
``GPUOPT_CPU=numpy`` also forces (``GPUOPT_CPU=native`` makes a missing compiler an error).
The choice is made once, on first use; when no compiler works, a one-line notice says so (on
stderr, once).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

from . import numpy_backend
from .protocol import Backend

_OVERRIDES: dict[str, Backend] = {}
_cpu_choice: list[Any] = []  # the native backend for NumPy arrays, or None, once chosen
_choosing = threading.Lock()


def get_backend(name: str) -> Backend:
    """The backend object for ``"numpy"`` or ``"cupy"`` (CuPy imported only when asked)."""
    override = _OVERRIDES.get(name)
    if override is not None:
        return override
    if name == "numpy":
        return cpu_backend()
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


def cpu_backend() -> Any:
    """The backend for NumPy arrays: native where a compiler works, else the ufunc executor
    (``numpy_backend.BACKEND``, read on every call)."""
    if not _cpu_choice:
        with _choosing:
            if not _cpu_choice:
                _cpu_choice.append(_choose_native_backend())
    native = _cpu_choice[0]
    return native if native is not None else numpy_backend.BACKEND


def _choose_native_backend() -> Any:
    """The native backend, or None for the NumPy executor."""
    wanted = os.environ.get("GPUOPT_CPU", "").strip().lower()
    if wanted == "numpy":
        return None
    from .native_backend import native_backend

    backend, why = native_backend()
    if backend is None and wanted == "native":
        raise RuntimeError(f"GPUOPT_CPU=native, but native code cannot be built here: {why}")
    if backend is None:
        print(f"gpuopt: NumPy arrays run on the NumPy executor, not native code: {why}", file=sys.stderr)
    return backend


def describe(name: str) -> str:
    """The backend for ``name`` in words, for the demo and the benchmark's report."""
    if name != "numpy":
        return name
    backend = cpu_backend()
    device = getattr(backend, "device", None)
    if device is None:
        return "numpy (NumPy executor)"
    return f"numpy (native code, {device.cpu_threads} threads)"
