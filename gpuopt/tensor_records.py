"""PyTorch tensors' layouts and addresses read in one call to C++, for the prepared path.

A prepared update checks each new gradient tensor against the one it replaces (dtype, shape,
device, contiguity) and reads its address; it also rereads each parameter's, whose storage
``p.data = ...`` may replace. Through torch's Python getters that costs about 0.23 us a tensor
(``shape`` alone 72 ns). ``Tensor._cdata``, the address of the tensor's C++ object, costs
46 ns, and :file:`kernels/tensor_records.cpp` reads the rest from it through c10's accessors:
about 0.08 us a tensor in all. The helper is built once per torch version against torch's own
headers with the system C++ compiler, cached like the native modules, and called through
``ctypes.PyDLL`` (holding the GIL: no tensor of the list can be freed during the call). Where
it cannot be built, :func:`reader` is None and the caller reads the attributes in Python.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Sequence
from operator import attrgetter
from pathlib import Path
from typing import Any

import numpy as np

from .backends import cxx_build
from .backends.cuda_source import kernel_dir
from .backends.nvrtc import cache_dir

#: int64 fields per record: address, scalar type (-1: not describable), device type, device
#: index, contiguous, dimensions, then 8 sizes (as in kernels/tensor_records.cpp)
WIDTH = 14
_cdata = attrgetter("_cdata")


class Reader:
    """Records of tensors (:meth:`records`), and their addresses where their layouts are as
    expected (:meth:`take`)."""

    def __init__(self, library: ctypes.PyDLL):
        self._records, self._take = library.gpuopt_tensor_records, library.gpuopt_tensor_take
        self._records.argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_void_p]
        self._records.restype = ctypes.c_int
        self._take.argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_void_p, ctypes.c_void_p]
        self._take.restype = ctypes.c_longlong

    def records(self, tensors: Sequence[Any]) -> np.ndarray:
        """One record per tensor, as an ``(n, WIDTH)`` int64 array."""
        impls = np.fromiter(map(_cdata, tensors), dtype=np.int64, count=len(tensors))
        records = np.empty((len(tensors), WIDTH), dtype=np.int64)
        self._records(impls.ctypes.data, len(tensors), records.ctypes.data)
        return records

    def take(self, tensors: Sequence[Any], expected: np.ndarray) -> np.ndarray | None:
        """The addresses of ``tensors`` (int64) if their records but the address equal
        ``expected`` (a C-contiguous ``(n, WIDTH - 1)`` int64 array), else None."""
        impls = np.fromiter(map(_cdata, tensors), dtype=np.int64, count=len(tensors))
        pointers = np.empty(len(tensors), dtype=np.int64)
        taken = self._take(impls.ctypes.data, len(tensors), expected.ctypes.data, pointers.ctypes.data)
        return pointers if taken == len(tensors) else None


def reader() -> Reader | None:
    """The built helper for the torch in this process, or None where there is none (torch
    not imported, no compiler, no headers, a failed build)."""
    torch = sys.modules.get("torch")
    return None if torch is None else _built(torch.__version__)


@functools.cache
def _built(version: str) -> Reader | None:
    torch = sys.modules["torch"]
    root = Path(torch.__file__).parent
    include, lib = root / "include", root / "lib"
    if not (include / "c10" / "core" / "TensorImpl.h").is_file():
        return None
    # torch's version and place are part of the cache key, through the source text.
    source = f"// for torch {version} ({root})\n{(kernel_dir() / 'tensor_records.cpp').read_text()}"
    abi = int(getattr(torch, "compiled_with_cxx11_abi", lambda: True)())
    flags = ["-std=c++17", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{include}"]
    library = cxx_build.host_helper("tensor_records", source, flags, cache_dir() / "host",
                                    link=[f"-L{lib}", "-lc10", f"-Wl,-rpath,{lib}"])
    return None if library is None else Reader(library)
