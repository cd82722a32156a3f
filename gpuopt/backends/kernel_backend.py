"""The kernel backend: runs generated CUDA modules on a device, one or a few launches a step.

Launch policy for one ``update`` call, per (param dtype, grad dtype) group of arrays:
- one array whose chain needs no reduction: one ``gpuopt_elementwise`` launch, with the
  hyperparameters and host scalars as kernel arguments;
- otherwise (several arrays, or a chain with ``total()`` such as ClipNorm): one
  ``gpuopt_multi_reduce`` launch per reduction pass, then one ``gpuopt_multi_tensor``
  launch. Their table of pointers and sizes is rebuilt only when the arrays change.
- a collection update repeated on the same arrays (``prepare``): the multi-tensor kernels
  always, launched with nothing but the host scalars computed anew.

The host logic here is written against a :class:`Device`: CuPy on a GPU, or (in the tests)
the same CUDA text compiled for the CPU, so the tables and chunking are tested without a GPU.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..plan import Program
from .cuda_source import CHUNK, MAX_THREADS, TABLE_COLUMNS, VEC, module_source
from .numpy_backend import compute_dtype

THREADS_PER_BLOCK = MAX_THREADS  # the GPU launch shape (a power of two, at most MAX_THREADS)
MAX_BLOCKS = 1 << 20
ROW_ALIGN = 64  # state rows start every 64 elements: 256 bytes for float32, whole cache lines


class Device(Protocol):
    """Where kernels run: an array module, a compiler and a launcher."""

    xp: Any
    threads: int  # threads per block (a power of two, at most 256)
    max_blocks: int

    def kernel(self, source: str, name: str) -> Callable[[int, int, Sequence[Any]], None]: ...

    def pointer(self, array: Any) -> int: ...


@dataclass
class _Tables:
    """Device copies of one group's multi-tensor tables, reused while nothing changes."""

    host_table: np.ndarray | None = None
    table: Any = None
    chunk_start: Any = None
    totals: Any = None
    partials: Any = None
    done: Any = None
    chunks: int = 0


class LaunchCounter:
    """Counts kernel launches made through gpuopt while it is active."""

    def __init__(self) -> None:
        self.launches = 0
        self.names: list[str] = []


class KernelBackend:
    """Runs jobs with the generated kernels on ``device``."""

    def __init__(self, device: Device):
        self.device = device
        self.xp = device.xp
        self._tables: dict[str, _Tables] = {}  # by module source
        self._counters: list[LaunchCounter] = []
        self._null = None
        # The cached tables are shared by every thread: building or replacing them is one
        # thread at a time (launchers keep their own references, so launching needs no lock).
        self._lock = threading.RLock()

    # -- what the API layer needs --------------------------------------------------------

    def full_state(self, initial: Sequence[float], size: int, dtype: np.dtype) -> Any:
        # Rows padded to a multiple of ROW_ALIGN elements, so that every slot of an array of
        # any size starts aligned for vector access; the state is the unpadded view.
        padded = -(-size // ROW_ALIGN) * ROW_ALIGN
        state = self.xp.empty((len(initial), padded), dtype=dtype)[:, :size]
        for i, value in enumerate(initial):
            state[i].fill(value)
        return state

    def empty_like(self, x: Any) -> Any:
        return self.xp.empty(x.shape, dtype=x.dtype)

    def run(self, program: Program, jobs: Sequence[Any], apply: bool) -> None:
        # Every copy, table and kernel of every group first, then the launches: a failed
        # allocation or compile comes before anything is written.
        staged = []
        for (param, grad), positions in _dtype_groups(jobs).items():
            group = [jobs[i] for i in positions]
            flat = [(job, _contiguous(self.xp, job.x), _contiguous(self.xp, job.g)) for job in group]
            with self._lock:
                staged.append((group, flat, self._group_launcher(program, param, grad, flat, apply)))
        for group, flat, launch in staged:
            launch([job.scalars for job in group])
            for job, x, _ in flat:  # kernels need contiguous memory; others went through a copy
                if x is not job.x and not apply:
                    job.x[...] = x

    def prepare(self, program: Program, jobs: Sequence[Any]) -> PreparedLaunch | None:
        """Launches for repeating this update on the same parameters: tables are built now, and
        each call only launches, with one row of host scalars shared by every array (new
        gradient arrays of the same kind can be swapped in). None if an array needs a
        contiguous copy (those cannot be prepared)."""
        if not all(job.x.flags.c_contiguous and job.g.flags.c_contiguous for job in jobs):
            return None
        parts = []
        for (param, grad), positions in _dtype_groups(jobs).items():
            kept = [i for i in positions if jobs[i].x.size]
            if kept:
                # Always the multi-tensor kernel: its launcher holds device tables, not arrays.
                live = [(jobs[i], jobs[i].x, jobs[i].g) for i in kept]
                source = module_source(program, param, grad, False)
                with self._lock:
                    parts.append((self._multi_tensor(source, program, compute_dtype(param), live, False), kept))
        return PreparedLaunch(parts)

    @contextlib.contextmanager
    def count_launches(self) -> Iterator[LaunchCounter]:
        counter = LaunchCounter()
        self._counters.append(counter)
        try:
            yield counter
        finally:
            self._counters.remove(counter)

    # -- internals ------------------------------------------------------------------------

    def _launch(self, source: str, name: str, blocks: int, args: Sequence[Any]) -> None:
        for counter in tuple(self._counters):  # (a copy: another thread may leave its counter)
            counter.launches += 1
            counter.names.append(name)
        self.device.kernel(source, name)(blocks, self.device.threads, args)

    def _placeholder(self) -> Any:
        # Passed where a kernel takes a pointer it will not use (totals, out when updating).
        with self._lock:
            if self._null is None:
                self._null = self.xp.zeros(1, dtype=np.float64)
        return self._null

    def _group_launcher(self, program: Program, param: np.dtype, grad: np.dtype, flat: list[tuple],
                        apply: bool) -> Callable[[Sequence[Sequence[float]]], None]:
        """Everything but the launches, done once: returns ``launch(scalars per array)``."""
        kept = [i for i, entry in enumerate(flat) if entry[1].size]  # empty arrays need no work
        if not kept:
            return lambda rows: None
        live = [flat[i] for i in kept]
        source = module_source(program, param, grad, apply)
        ct = compute_dtype(param)
        single = len(live) == 1 and not program.levels
        names = ["gpuopt_elementwise"] if single else ["gpuopt_multi_reduce"] * bool(program.levels) + [
            "gpuopt_multi_tensor"]
        for name in names:  # compiled now, so that a failing compile comes before any write
            self.device.kernel(source, name)
        if single:
            launch = self._elementwise(source, ct, live[0], apply)
        else:
            launch = self._multi_tensor(source, program, ct, live, apply)
        if len(kept) == len(flat):
            return launch
        return lambda rows: launch([rows[i] for i in kept])

    def _elementwise(self, source: str, ct: np.dtype, entry: tuple, apply: bool) -> Callable:
        job, x, g = entry
        n = x.size
        groups = -(-n // VEC)
        blocks = max(1, min(-(-groups // self.device.threads), self.device.max_blocks))
        args = [np.int64(n), x, g, job.out if apply else x, self._placeholder(), *job.slots]

        def launch(rows: Sequence[Sequence[float]]) -> None:
            self._launch(source, "gpuopt_elementwise", blocks, [*args, *(ct.type(v) for v in rows[0])])

        return launch

    def _multi_tensor(self, source: str, program: Program, ct: np.dtype, live: list[tuple],
                      apply: bool) -> Callable:
        xp, device = self.xp, self.device
        host = np.empty((len(live), TABLE_COLUMNS + len(program.slots)), dtype=np.uint64)
        for row, (job, x, g) in zip(host, live):
            row[:4] = (device.pointer(x), device.pointer(g), device.pointer(job.out if apply else x), x.size)
            for k, slot in enumerate(job.slots):
                row[TABLE_COLUMNS + k] = device.pointer(slot)
        tables = self._tables.get(source)
        if tables is None:
            tables = self._tables[source] = _Tables()
        if tables.host_table is None or not np.array_equal(tables.host_table, host):
            sizes = host[:, 3].astype(np.int64)
            starts = np.zeros(len(live) + 1, dtype=np.int64)
            np.cumsum(-(-sizes // CHUNK), out=starts[1:])
            tables.host_table = host
            tables.table = xp.asarray(host)
            tables.chunk_start = xp.asarray(starts)
            tables.chunks = int(starts[-1])
            terms = max((len(program.totals_at(level)) for level in range(1, program.levels + 1)), default=0)
            if terms:
                tables.totals = xp.zeros((len(live), max(len(program.totals), 1)), dtype=np.float64)
                tables.partials = xp.zeros(tables.chunks * terms, dtype=np.float64)
                tables.done = xp.zeros(len(live), dtype=np.uint32)
            else:
                tables.totals = tables.partials = tables.done = self._placeholder()
        # The launcher keeps its own references: a later group with the same source but other
        # arrays replaces the cached tables, not these.
        table, chunk_start, chunks = tables.table, tables.chunk_start, tables.chunks
        totals, partials, done = tables.totals, tables.partials, tables.done
        blocks = max(1, min(chunks, device.max_blocks))
        tensors = len(live)
        nscalars = max(program.scalar_count, 1)
        placeholder = self._placeholder()
        upload: dict[str, Any] = {}

        host_now = tables.host_table

        def set_gradients(grads: Sequence[Any]) -> None:
            nonlocal table, host_now
            column = np.fromiter(map(device.pointer, grads), dtype=np.uint64, count=len(grads))
            if not np.array_equal(host_now[:, 1], column):
                host_now = host_now.copy()
                host_now[:, 1] = column
                table = xp.asarray(host_now)

        def launch(rows: Sequence[Sequence[float]]) -> None:
            first = rows[0]
            if rows.count(first) == len(rows):  # (identical rows compare by identity: fast)
                # One step count for all: scalars go by value, nothing is copied to the device.
                per_tensor, scalars, by_value = 0, placeholder, [ct.type(v) for v in first]
            else:
                matrix = np.zeros((len(rows), nscalars), dtype=ct)
                for i, row in enumerate(rows):
                    matrix[i, : len(row)] = row
                if "host" not in upload or not np.array_equal(upload["host"], matrix):
                    upload["host"], upload["device"] = matrix, xp.asarray(matrix)
                per_tensor, scalars = 1, upload["device"]
                by_value = [ct.type(0)] * program.scalar_count
            common = [np.int32(tensors), np.int64(chunks), table, chunk_start, np.int32(per_tensor), scalars]
            for level in range(1, program.levels + 1):
                self._launch(source, "gpuopt_multi_reduce", blocks,
                             [np.int32(level), *common, totals, partials, done, *by_value])
            self._launch(source, "gpuopt_multi_tensor", blocks, [*common, totals, *by_value])

        launch.set_gradients = set_gradients  # type: ignore[attr-defined]
        return launch


class PreparedLaunch:
    """The launches of a prepared update: one multi-tensor launcher per dtype group, each with
    the positions (in the prepared update's arrays) of its non-empty tensors."""

    def __init__(self, parts: list[tuple[Callable, list[int]]]):
        self.parts = parts

    def __call__(self, scalars: list[float]) -> None:
        for launch, positions in self.parts:
            launch([scalars] * len(positions))

    def set_gradients(self, grads: Sequence[Any]) -> None:
        """Point the tables at new gradient arrays (same dtypes, shapes and layout)."""
        for launch, positions in self.parts:
            launch.set_gradients([grads[i] for i in positions])


def _dtype_groups(jobs: Sequence[Any]) -> dict[tuple, list[int]]:
    """Positions of the jobs, grouped by (param dtype, grad dtype): one module each."""
    groups: dict[tuple, list[int]] = {}
    for position, job in enumerate(jobs):
        groups.setdefault((np.dtype(job.x.dtype), np.dtype(job.g.dtype)), []).append(position)
    return groups


def _contiguous(xp: Any, array: Any) -> Any:
    return array if array.flags.c_contiguous else xp.ascontiguousarray(array)
