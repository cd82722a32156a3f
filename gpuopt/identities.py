"""Whether a list or tuple holds the very same objects as before, at C speed.

The prepared path asks this of every parameter and gradient on every call. In Python the
question costs about 27 ns per item (one ``id`` each, then a tuple comparison), which for a
1000-tensor model is most of a call. A few lines of C over the sequence's item array answer it
in about half a nanosecond per item: :file:`kernels/identities.cpp`, built once per interpreter
with the system C++ compiler against the interpreter's own headers, cached like the native
modules, and called through ``ctypes.PyDLL`` (which holds the GIL, so the sequence cannot
change during the call). Where nothing can be built (no compiler, no ``Python.h``) the same
answers come from Python.

Only ids are kept, never the objects: whoever keeps :class:`Identities` must know the objects
are alive for an id to prove identity (the prepared path holds weak references to them).
"""

from __future__ import annotations

import ctypes
import functools
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .backends import cxx_build
from .backends.cuda_source import kernel_dir
from .backends.nvrtc import cache_dir


class Identities:
    """The ids of a sequence's items: :meth:`match` tells whether another list or tuple holds
    the same objects in the same order."""

    __slots__ = ("_ids", "_pointer", "_count", "_tuple", "_helper")

    def __init__(self, items: Sequence[Any] = ()):
        self._ids = np.zeros(0, dtype=np.uintp)  # (the helper's copy)
        self._pointer = self._ids.ctypes.data
        self._tuple: tuple[int, ...] = ()  # (Python's copy)
        self._helper: _Helper | None = None
        self._count = -1  # nothing remembered: no sequence matches
        if len(items):
            self.remember(items)

    def remember(self, items: Sequence[Any]) -> None:
        """Keep the ids of ``items``, a list or tuple."""
        # One item (one array's update) is cheaper to check in Python than with a call into C.
        self._helper = native_helper() if len(items) > 1 else None
        if self._helper is None:
            self._tuple = tuple(map(id, items))
            self._count = len(items) if isinstance(items, (list, tuple)) else -1
            return
        if len(items) != len(self._ids):
            self._ids = np.zeros(len(items), dtype=np.uintp)
            self._pointer = self._ids.ctypes.data
        self._count = self._helper.read(items, self._pointer, len(items))

    def forget(self) -> None:
        self._count = -1

    def match(self, items: Sequence[Any]) -> bool:
        """Whether ``items`` (a list or tuple) holds the remembered objects, in order."""
        if self._count < 0:
            return False
        if self._helper is None:
            if self._count == 1:  # (one array's update: the cheapest test)
                return isinstance(items, (list, tuple)) and len(items) == 1 and id(items[0]) == self._tuple[0]
            return isinstance(items, (list, tuple)) and tuple(map(id, items)) == self._tuple
        return self._helper.same(items, self._pointer, self._count) == self._count

    def ids(self) -> tuple[int, ...] | None:
        """The remembered ids (None if none are)."""
        if self._count < 0:
            return None
        return self._tuple if self._helper is None else tuple(map(int, self._ids[: self._count]))


class _Helper:
    def __init__(self, library: ctypes.PyDLL):
        self.read = library.gpuopt_read_ids
        self.same = library.gpuopt_same_ids
        for function in (self.read, self.same):
            function.argtypes = [ctypes.py_object, ctypes.c_void_p, ctypes.c_ssize_t]
            function.restype = ctypes.c_ssize_t


@functools.cache
def native_helper() -> _Helper | None:
    """The built helper, or None where it cannot be built here (Python answers instead)."""
    include = sysconfig.get_paths().get("include")
    if not include or not (Path(include) / "Python.h").is_file():
        return None
    # The headers' interpreter is part of the cache key, through the source text.
    source = f"// for Python {sys.version} ({include})\n{(kernel_dir() / 'identities.cpp').read_text()}"
    library = cxx_build.host_helper("identities", source, [f"-I{include}"], cache_dir() / "host")
    return None if library is None else _Helper(library)
