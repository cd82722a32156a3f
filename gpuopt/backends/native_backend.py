"""The native CPU backend: NumPy arrays updated by C++ compiled from the printed step.

A module is ``kernels/native_prelude.h``, the generated part of the CUDA module for the same
program and dtypes (:func:`cuda_source.step_source`: nothing of a rule is written twice), and
``kernels/native.cpp``, whose entry points mirror the CUDA kernels. It is built by the system
C++ compiler (:mod:`cxx_build`: cached per user on disk, keyed on the text, the flags and the
compiler's version, safe when several threads or processes build it at once) and loaded with
ctypes. The host logic is the kernel backend's: one call per dtype group over a table of
pointers and sizes, reused while the arrays stay, and the prepared repeat of an update.

Flags: optimised, vectorised (OpenMP's simd loops), no fast-math and no FMA contraction, so that every
result equals the NumPy executor's bit for bit. ``-march=native`` is used where the compiler
accepts it; the CPU it builds for is part of the cache key.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..plan import Program, plan
from . import cxx_build
from .cuda_source import _template, step_source
from .nvrtc import cache_dir  # the one per-user cache folder (native modules go in native/)

#: the flags every native module is built with: bit-identical to NumPy (no fast-math, no
#: contraction into FMA; -fno-math-errno only lets sqrt be an instruction), optimised and
#: vectorised
BASE_FLAGS = ("-std=c++17", "-O3", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-fno-math-errno",
              "-w")
#: tried in order until one builds: this CPU's instruction set and OpenMP's simd loops (no
#: OpenMP runtime: the threads are the driver's own), then each left out
OPTIONAL_FLAGS = (("-march=native", "-fopenmp-simd"), ("-fopenmp-simd",), ())


def cpu_threads() -> int:
    """Threads per update: ``$GPUOPT_CPU_THREADS``, else the CPUs this process may run on (its
    affinity, capped by a container's CPU quota: more threads than that only wait their turn)."""
    text = os.environ.get("GPUOPT_CPU_THREADS", "")
    if text.strip().isdigit() and int(text) > 0:
        return int(text)
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cpus


@functools.lru_cache(maxsize=1)
def _target() -> str:
    """The CPU that -march=native builds for (machine and instruction-set flags)."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}\n{flags}"


class NativeDevice:
    """The CPU as a device of the kernel backend: NumPy arrays, native modules, its own threads."""

    xp = np
    threads = 1  # (the kernel backend's launch geometry means nothing here)
    max_blocks = 1 << 30

    def __init__(self, compiler: str, cache: Path | None = None):
        self.compiler = compiler
        self.cache = cache or cache_dir() / "native"
        self.cpu_threads = cpu_threads()
        self.builds = 0  # modules this process built or loaded (tests check eta never adds one)
        self._flags: tuple[str, ...] | None = None  # the first of OPTIONAL_FLAGS that worked
        self._libraries: dict[str, ctypes.CDLL] = {}
        self._functions: dict[tuple[str, str], Callable] = {}
        self._locks: dict[str, threading.Lock] = {}  # (other processes: cxx_build makes them safe)

    # -- the Device protocol -----------------------------------------------------------------

    @staticmethod
    @functools.lru_cache(maxsize=512)
    def module_source(program: Program, param: np.dtype, grad: np.dtype, apply: bool) -> str:
        """The complete C++ of one native module, as the compiler gets it."""
        return "\n".join([
            f"// ---- kernels/native_prelude.h ----\n{_template('native_prelude.h')}",
            step_source(program, param, grad, apply),
            f"// ---- kernels/table.cuh ----\n{_template('table.cuh')}",
            f"// ---- kernels/native.cpp ----\n{_template('native.cpp')}",
        ])

    def kernel(self, source: str, name: str) -> Callable[[int, int, Sequence[Any]], None]:
        launch = self._functions.get((source, name))
        if launch is None:
            launch = self._functions[(source, name)] = self._launcher(self.library(source), name)
        return launch

    @staticmethod
    def pointer(array: np.ndarray) -> int:
        return _pointer_reader()(array)

    def prepare_one(self, backend: Any, program: Program, job: Any) -> Any:
        """The repeat of one array's update (contiguous and aligned, see
        ``KernelBackend.prepare``): one call with its arguments packed in advance, where the
        chain needs no reduction; else the kernel backend's prepared multi-tensor launches."""
        if program.levels:
            return backend.prepare(program, [job])
        source = self.module_source(program, np.dtype(job.x_type), np.dtype(job.g_type), False)
        self.library(source)  # (built now: a failing build comes before any write)
        return PreparedElementwise(self, source, program, job, backend._placeholder(0))

    # -- building --------------------------------------------------------------------------------

    def library(self, source: str) -> ctypes.CDLL:
        """The loaded module for ``source``, built first if no build is cached."""
        library = self._libraries.get(source)
        if library is None:
            with self._locks.setdefault(source, threading.Lock()):  # one build per module here
                library = self._libraries.get(source)
                if library is None:
                    library = self._libraries[source] = ctypes.CDLL(str(self._build(source) / "module.so"))
                    self.builds += 1
        return library

    def _build(self, source: str) -> Path:
        files = {"module.cpp": source, "cuda_fp16.h": _template("native_fp16.h"),
                 "cuda_bf16.h": _template("native_bf16.h"), "target.txt": _target()}
        choices = [self._flags] if self._flags is not None else list(OPTIONAL_FLAGS)
        for k, extra in enumerate(choices):
            command = [self.compiler, *BASE_FLAGS, *extra, "-I.", "module.cpp", "-o", "module.so"]
            try:
                folder = cxx_build.build([command], files, self.cache)
            except cxx_build.BuildError:
                if k == len(choices) - 1:
                    raise
                continue
            self._flags = extra
            return folder
        raise AssertionError("unreachable")

    def _launcher(self, library: ctypes.CDLL, name: str) -> Callable[[int, int, Sequence[Any]], None]:
        function = getattr(library, name)
        function.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_char_p]
        function.restype = ctypes.c_int
        pack, ndarray, floating = struct.pack, np.ndarray, (float, np.floating)
        objects = _data_offset()
        address = id if objects >= 0 else _data_pointer

        def launch(blocks: int, threads: int, args: Sequence[Any]) -> None:
            # One 8-byte word per argument: arrays (see kernels/native.cpp), floats as doubles,
            # integers. The arrays stay referenced by ``args`` for the whole call.
            codes, words = [], []
            for arg in args:
                if isinstance(arg, ndarray):
                    codes.append("Q")
                    words.append(address(arg))
                elif isinstance(arg, floating):
                    codes.append("d")
                    words.append(arg)
                else:
                    codes.append("q")
                    words.append(arg)
            if function(self.cpu_threads, objects, pack("".join(codes), *words)):
                raise MemoryError(f"{name}: out of memory")

        return launch

    # -- what reports say about it (the benchmark) -------------------------------------------

    def copies(self, dst: np.ndarray, src: np.ndarray) -> dict[str, Callable[[], None]]:
        """``dst[...] = src`` (contiguous, the same size) with the update's threads, by name: the
        reference for an update's bandwidth. (Every module has the copy: Descent's is built.)"""
        launch = self.kernel(self.module_source(*_float32_module("Descent")), "gpuopt_copy")
        return {f"native copy, {self.cpu_threads} threads": lambda: launch(1, 1, [dst, src, np.int64(src.nbytes)])}

    def build_times(self) -> dict[str, float]:
        """Seconds to build one module (ADAM's) from nothing, in a fresh cache folder, and to load
        it again as a new process would (the cache on disk, the compiler's version asked anew)."""
        times = {}
        with tempfile.TemporaryDirectory(prefix="gpuopt-build-time-") as folder:
            for what in ("first_build_s", "cached_start_s"):
                cxx_build.compiler_identity.cache_clear()
                start = time.perf_counter()
                device = type(self)(self.compiler, Path(folder))
                device.library(device.module_source(*_float32_module("ADAM")))
                times[what] = time.perf_counter() - start
        return times


def _float32_module(rule: str) -> tuple[Program, np.dtype, np.dtype, bool]:
    """The arguments of ``module_source`` for a built-in rule (by name, with its defaults) on
    float32 arrays."""
    from .. import rules  # (here: the rules' module imports the backends)

    return plan(getattr(rules, rule)()), np.dtype(np.float32), np.dtype(np.float32), False


class PreparedElementwise:
    """One array's repeated update on the native device (a
    :class:`~gpuopt.backends.protocol.PreparedLaunch`): ``gpuopt_elementwise`` with every
    argument but the host scalars packed once, by data pointer.

    The scalars go as doubles, which the module rounds to its compute type: the value that
    the full path's ``ct.type(v)`` passes. Pointers stay right while the prepared update
    holds (it checks the parameter's layout, and a gradient's, before each call).
    """

    def __init__(self, device: NativeDevice, source: str, program: Program, job: Any, placeholder: np.ndarray):
        self.pointer = device.pointer
        # Its own function object, called without argument conversion (ctypes' argtypes cost
        # more than the call): every argument is made a C type here.
        self.function = device.library(source)["gpuopt_elementwise"]
        self.function.restype = ctypes.c_int
        self.threads, self.by_pointer = ctypes.c_int(device.cpu_threads), ctypes.c_longlong(-1)
        self.x = job.x.ctypes.data
        self.rest = struct.pack(f"{1 + len(job.slots)}Q", placeholder.ctypes.data,
                                *(slot.ctypes.data for slot in job.slots))
        self.size = job.x.size
        self.pack_scalars = struct.Struct(f"{program.scalar_count}d").pack
        self.set_gradient_pointers([job.g.ctypes.data])

    def check_launchable(self) -> None:
        pass  # (the CPU runs it now, on the calling thread and its helpers)

    def set_gradient_pointers(self, pointers: Sequence[int]) -> None:
        self.words = struct.pack("qQQQ", self.size, self.x, pointers[0], self.x) + self.rest

    def __call__(self, scalars: list[float]) -> None:
        self.function(self.threads, self.by_pointer, self.words + self.pack_scalars(*scalars))


def _data_pointer(array: np.ndarray) -> int:
    return array.ctypes.data


@functools.lru_cache(maxsize=1)
def _pointer_reader() -> Callable[[np.ndarray], int]:
    """A NumPy array's data pointer, read from the object where its layout is known (a
    fraction of ``array.ctypes.data``'s cost)."""
    offset = _data_offset()
    if offset < 0:
        return _data_pointer
    read = ctypes.c_void_p.from_address

    def pointer(array: np.ndarray) -> int:
        return read(id(array) + offset).value or 0

    return pointer


@functools.lru_cache(maxsize=1)
def _data_offset() -> int:
    """Where a NumPy array object keeps its data pointer, counted from the object's address
    (``id`` in CPython): right after the object header. Checked on a probe array; -1 (pass
    pointers) where that does not hold."""
    if platform.python_implementation() != "CPython":
        return -1
    probe = np.arange(3.0)
    offset = object.__basicsize__
    if ctypes.c_void_p.from_address(id(probe) + offset).value != probe.ctypes.data:
        return -1
    return offset


def native_backend() -> tuple[Any, str | None]:
    """``(backend, None)`` where a compiler builds and loads native modules here, else
    ``(None, why not)``. The check builds one small module (cached like any other)."""
    from ..plan import plan
    from ..rules import Descent
    from .kernel_backend import KernelBackend

    compiler = cxx_build.find_compiler()
    if compiler is None:
        wanted = os.environ.get("CXX") or "c++, g++ or clang++"
        return None, f"no C++ compiler found ({wanted})"
    device = NativeDevice(compiler)
    try:
        float32 = np.dtype(np.float32)
        device.library(device.module_source(plan(Descent()), float32, float32, False))
    except (cxx_build.BuildError, OSError, subprocess.SubprocessError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return None, f"{Path(compiler).name} could not build a module ({first})"
    return KernelBackend(device), None
