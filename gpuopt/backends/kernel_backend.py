"""The kernel backend: runs generated CUDA modules on a device, one or a few launches a step.

Launch policy for one ``update`` call, per (param dtype, grad dtype) group of arrays:
- one array whose chain needs no reduction: one ``gpuopt_elementwise`` launch, with the
  hyperparameters and host scalars as kernel arguments;
- otherwise (several arrays, or a chain with ``total()`` such as ClipNorm): one
  ``gpuopt_multi_reduce`` launch per reduction pass, then one ``gpuopt_multi_tensor``
  launch. Their table of pointers and sizes is rebuilt only when the arrays change.

The host logic here is written against a :class:`Device`: CuPy on a GPU, or (in the tests)
the same CUDA text compiled for the CPU, so the tables and chunking are tested without a GPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np

from ..plan import Program
from .cuda_source import module_source
from .numpy_backend import compute_dtype

CHUNK = 65536  # elements per chunk of the multi-tensor kernels (GPUOPT_CHUNK in kernels/)
VEC = 4  # elements per thread per iteration (GPUOPT_VEC)


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
    host_scalars: np.ndarray | None = None
    scalars: Any = None
    totals: Any = None
    partials: Any = None
    done: Any = None
    chunks: int = 0
    keepalive: list = field(default_factory=list)


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
        self._tables: dict[tuple, _Tables] = {}
        self._counters: list[LaunchCounter] = []
        self._null = None

    # -- what the API layer needs --------------------------------------------------------

    def full_state(self, initial: Sequence[float], size: int, dtype: np.dtype) -> Any:
        state = self.xp.empty((len(initial), size), dtype=dtype)
        for i, value in enumerate(initial):
            state[i].fill(value)
        return state

    def empty_like(self, x: Any) -> Any:
        return self.xp.empty(x.shape, dtype=x.dtype)

    def run(self, program: Program, jobs: Sequence[Any], apply: bool) -> None:
        groups: dict[tuple, list[Any]] = {}
        for job in jobs:
            groups.setdefault((np.dtype(job.x.dtype), np.dtype(job.g.dtype)), []).append(job)
        for (param, grad), group in groups.items():
            self._run_group(program, param, grad, group, apply)

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
        for counter in self._counters:
            counter.launches += 1
            counter.names.append(name)
        self.device.kernel(source, name)(blocks, self.device.threads, args)

    def _placeholder(self) -> Any:
        # Passed where a kernel takes a pointer it will not use (totals, out when updating).
        if self._null is None:
            self._null = self.xp.zeros(1, dtype=np.float64)
        return self._null

    def _run_group(self, program: Program, param: np.dtype, grad: np.dtype, jobs: list[Any], apply: bool) -> None:
        xp = self.xp
        # Kernels need contiguous memory: other layouts go through a copy that is written back.
        flat = []
        for job in jobs:
            x = job.x if job.x.flags.c_contiguous else xp.ascontiguousarray(job.x)
            g = job.g if job.g.flags.c_contiguous else xp.ascontiguousarray(job.g)
            flat.append((job, x, g))
        live = [(job, x, g) for job, x, g in flat if x.size]
        if live:
            source = module_source(program, param, grad, apply)
            ct = compute_dtype(param)
            if len(live) == 1 and not program.levels:
                self._elementwise(source, ct, live[0], apply)
            else:
                self._multi_tensor(source, program, ct, live, apply)
        for job, x, _ in flat:
            if x is not job.x and not apply:
                job.x[...] = x

    def _elementwise(self, source: str, ct: np.dtype, entry: tuple, apply: bool) -> None:
        job, x, g = entry
        n = x.size
        groups = -(-n // VEC)
        blocks = max(1, min(-(-groups // self.device.threads), self.device.max_blocks))
        out = job.out if apply else x
        args = [np.int64(n), x, g, out, self._placeholder(), *job.slots, *(ct.type(v) for v in job.scalars)]
        self._launch(source, "gpuopt_elementwise", blocks, args)

    def _multi_tensor(self, source: str, program: Program, ct: np.dtype, live: list[tuple], apply: bool) -> None:
        xp, device = self.xp, self.device
        nslots = len(program.slots)
        width = 4 + nslots
        host = np.empty((len(live), width), dtype=np.uint64)
        for row, (job, x, g) in zip(host, live):
            row[0] = device.pointer(x)
            row[1] = device.pointer(g)
            row[2] = device.pointer(job.out if apply else x)
            row[3] = x.size
            for k, slot in enumerate(job.slots):
                row[4 + k] = device.pointer(slot)
        key = (source, len(live))
        tables = self._tables.get(key)
        if tables is None:
            tables = self._tables[key] = _Tables()
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
                tables.totals = self._placeholder()
        tables.keepalive = [entry[1:] for entry in live]  # the tables point into these arrays
        nscalars = max(len(program.scalars), 1)
        host_scalars = np.zeros((len(live), nscalars), dtype=ct)
        for row, (job, _, _) in zip(host_scalars, live):
            row[: len(job.scalars)] = job.scalars
        if tables.host_scalars is None or not np.array_equal(tables.host_scalars, host_scalars):
            tables.host_scalars = host_scalars
            tables.scalars = xp.asarray(host_scalars)
        blocks = max(1, min(tables.chunks, device.max_blocks))
        common = [np.int32(len(live)), np.int64(tables.chunks), tables.table, tables.chunk_start, tables.scalars]
        for level in range(1, program.levels + 1):
            self._launch(source, "gpuopt_multi_reduce", blocks,
                         [np.int32(level), *common, tables.totals, tables.partials, tables.done])
        self._launch(source, "gpuopt_multi_tensor", blocks, [*common, tables.totals])
