"""A Device for gpuopt's kernel backend that runs the generated CUDA text on the CPU.

The module source is compiled, byte for byte as NVRTC would get it, by g++ with a small
header (cuda_shim.h) standing in for the CUDA built-ins; NumPy arrays stand in for device
memory. The host logic of the kernel backend (tables, chunking, launch counts) runs as is.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
_CTYPES = {
    np.dtype(np.int32): ctypes.c_int32,
    np.dtype(np.int64): ctypes.c_int64,
    np.dtype(np.float32): ctypes.c_float,
    np.dtype(np.float64): ctypes.c_double,
}
_BUILD_DIR = Path(tempfile.gettempdir()) / f"gpuopt-emulated-{os.getuid()}"


def compiler() -> str | None:
    return shutil.which("g++")


_FLAGS = [
    "g++", "-std=c++20", "-O1", "-fPIC", "-pthread",
    "-ffp-contract=off",  # as NumPy: no fused multiply-add
    "-Wall", "-Wno-unknown-pragmas", "-Werror=return-type",
]


def _shim_header() -> Path:
    """cuda_shim.h with a precompiled copy beside it: the standard headers it pulls in
    (<thread>, <barrier>) cost more to parse than a whole kernel module."""
    text = (HERE / "cuda_shim.h").read_text()
    digest = hashlib.sha256((text + " ".join(_FLAGS)).encode()).hexdigest()[:16]
    header = _BUILD_DIR / f"shim-{digest}" / "cuda_shim.h"
    if not (header.parent / "cuda_shim.h.gch").exists():
        header.parent.mkdir(parents=True, exist_ok=True)
        header.write_text(text)
        tmp = header.parent / f"cuda_shim.h.gch.{os.getpid()}"
        subprocess.run([*_FLAGS, "-x", "c++-header", str(header), "-o", str(tmp)], check=True,
                       capture_output=True)
        os.replace(tmp, header.parent / "cuda_shim.h.gch")
    return header


def build(source: str) -> Path:
    """Compile a module's source for the CPU (cached on the text); returns the library."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:24]
    library = _BUILD_DIR / f"{digest}.so"
    if library.exists():
        return library
    _BUILD_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=_BUILD_DIR))
    (work / "module.cu").write_text(source)
    entries = "\n".join(_entry_points(source))
    (work / "entry.cpp").write_text(f'#include "module.cu"\n{entries}\n')
    command = [
        *_FLAGS, "-shared", "-include", str(_shim_header()), "-I", str(HERE / "include"),
        str(work / "entry.cpp"), "-o", str(work / "module.so"),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"g++ failed on the kernel source:\n{result.stderr[-6000:]}")
    os.replace(work / "module.so", library)
    shutil.rmtree(work, ignore_errors=True)
    return library


def _entry_points(source: str) -> list[str]:
    """One C entry per kernel, inside the same #ifdef as the kernel itself."""
    entries, conditions = [], []
    for line in source.splitlines():
        if line.startswith("#if"):
            conditions.append(line)
        elif line.startswith("#endif"):
            conditions.pop()
        found = re.match(r'extern "C" __global__ void (\w+)\(', line)
        if found:
            k = found.group(1)
            entry = (f'extern "C" void emulate_{k}(unsigned g, unsigned b, void** argv) '
                     f'{{ gpuopt_emulate({k}, g, b, argv); }}')
            entries.append("\n".join([*conditions, entry, *["#endif"] * len(conditions)]))
    return entries


class EmulatedDevice:
    """Runs kernels on the CPU: NumPy arrays are the device memory."""

    xp = np
    threads = 8  # small blocks keep the thread count low; any power of two works
    max_blocks = 3  # few blocks, so grid-stride loops and cross-block sums are exercised

    def __init__(self) -> None:
        self._libraries: dict[str, ctypes.CDLL] = {}
        self.launched: list[str] = []

    def kernel(self, source: str, name: str) -> Callable[[int, int, Sequence[Any]], None]:
        library = self._libraries.get(source)
        if library is None:
            library = self._libraries[source] = ctypes.CDLL(str(build(source)))
        entry = getattr(library, f"emulate_{name}")

        def launch(blocks: int, threads: int, args: Sequence[Any]) -> None:
            holders = []
            for arg in args:
                if isinstance(arg, np.ndarray):
                    holders.append(ctypes.c_void_p(arg.ctypes.data))
                else:
                    holders.append(_CTYPES[np.dtype(type(arg))](arg))
            argv = (ctypes.c_void_p * len(holders))(*[ctypes.cast(ctypes.pointer(h), ctypes.c_void_p) for h in holders])
            self.launched.append(name)
            entry(ctypes.c_uint(blocks), ctypes.c_uint(threads), argv)

        return launch

    @staticmethod
    def pointer(array: np.ndarray) -> int:
        return array.ctypes.data
