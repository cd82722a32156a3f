"""The kernel backend: runs generated CUDA modules on a device, one or a few launches a step.

Launch policy for one ``update`` call, per (param dtype, grad dtype) group of arrays:
- one array whose chain needs no reduction: one ``gpuopt_elementwise`` launch, with the
  hyperparameters and host scalars as kernel arguments;
- otherwise (several arrays, or a chain with ``total()`` such as ClipNorm): one
  ``gpuopt_multi_reduce`` launch per reduction pass, then one ``gpuopt_multi_tensor``
  launch. Their table of pointers and sizes is rebuilt only when the arrays change.
- a collection update repeated on the same arrays (``prepare``): the multi-tensor kernels
  always, launched with nothing but the host scalars computed anew;
- a non-contiguous array, where the device builds element-wise kernels (:class:`StridedDevice`)
  and the chain needs no reduction: one strided launch, in place (:mod:`.strided`); otherwise
  the kernels run on a contiguous copy that is written back.

Work goes to the GPU that holds each parameter, on the stream its framework currently uses
there, and is refused during CUDA graph capture (:class:`Placement`).

The host logic here is written against a :class:`Device`: CuPy on a GPU, or (in the tests)
the same CUDA text compiled for the CPU, fake GPUs and streams, or a device that launches
nothing (the host-time benchmark), so tables, chunking and placement are tested without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..dtypes import BFLOAT16
from ..plan import Program
from .cuda_source import CHUNK, MAX_THREADS, TABLE_COLUMNS, VEC, module_source
from .numpy_backend import compute_dtype
from .protocol import Job, PreparedLaunch
from .strided import StridedKernel, strided_kernel

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


@runtime_checkable
class Placement(Protocol):
    """Which GPU and which stream a call's work goes to (a :class:`Device` with several GPUs
    or streams implements it too; one whose memory is the host's needs none)."""

    def device_of(self, array: Any) -> int:
        """The device that holds ``array``."""
        ...

    def caller_stream(self, framework: str, device: int) -> Any:
        """The stream ``framework`` ("cupy", "torch") currently queues its work on, on ``device``."""
        ...

    def is_capturing(self, stream: Any) -> bool:
        """Whether ``stream`` is capturing a CUDA graph."""
        ...

    def scope(self, device: int, stream: Any) -> contextlib.AbstractContextManager[Any]:
        """Make ``device`` and ``stream`` current (allocations and launches go there)."""
        ...

    def follow(self, earlier: Any, stream: Any) -> None:
        """Order ``stream`` after the work queued so far on ``earlier``."""
        ...

    def upload(self, target: Any, host: np.ndarray) -> None:
        """Copy ``host`` into the contiguous device array ``target``, queued on the current
        stream; ``host`` may be changed as soon as this returns."""
        ...


@runtime_checkable
class StridedDevice(Protocol):
    """A device that builds ``cupy.ElementwiseKernel``-like kernels, which index each array by
    its strides: non-contiguous arrays are then updated in place (see :mod:`.strided`)."""

    def elementwise(self, kernel: StridedKernel) -> Callable[..., None]:
        """The kernel, called with its inputs then its outputs (arrays of one shape, scalars)."""
        ...


class HostMemory:
    """The placement of a device whose memory is the host's: one device, no streams."""

    @staticmethod
    def device_of(array: Any) -> int:
        return 0

    @staticmethod
    def caller_stream(framework: str, device: int) -> Any:
        return None

    @staticmethod
    def is_capturing(stream: Any) -> bool:
        return False

    @staticmethod
    def scope(device: int, stream: Any) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    @staticmethod
    def follow(earlier: Any, stream: Any) -> None:
        pass

    @staticmethod
    def upload(target: Any, host: np.ndarray) -> None:
        np.copyto(target, host)


class GraphCaptureError(RuntimeError):
    """An update was called while its stream captures a CUDA graph."""


@dataclass
class _Tables:
    """Device copies of one group's multi-tensor tables."""

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
    """Runs jobs with the generated kernels on ``device``: each parameter's work on the GPU that
    holds it, queued on the stream its framework currently uses there."""

    def __init__(self, device: Device):
        self.device = device
        self.xp = device.xp
        self.placement: Placement = device if isinstance(device, Placement) else HostMemory()
        self._has_strided_kernels = isinstance(device, StridedDevice)  # (a Protocol check costs microseconds)
        # A device may compile its own text from the same printed step (the native CPU one).
        self._source = getattr(device, "module_source", module_source)
        self._tables: dict[tuple[str, int], _Tables] = {}  # by module source and device
        self._counters: list[LaunchCounter] = []
        self._null: dict[int, Any] = {}
        # The cached tables are shared by every thread: building or replacing them is one
        # thread at a time (launchers keep their own references, so launching needs no lock).
        self._lock = threading.RLock()

    # -- what the API layer needs --------------------------------------------------------

    def full_state(self, initial: Sequence[float], size: int, dtype: np.dtype, like: Any = None) -> Any:
        # Rows padded to a multiple of ROW_ALIGN elements and the first one starting on a multiple
        # of ROW_ALIGN elements' bytes, so that every slot of an array of any size starts aligned
        # for vector access (a large NumPy array starts 16 bytes into a page: AVX-512 loads and
        # stores of it would each touch two cache lines); the state is the unpadded view.
        padded = -(-size // ROW_ALIGN) * ROW_ALIGN
        place = self.placement
        with contextlib.nullcontext() if like is None else place.scope(place.device_of(like), None):
            memory = self.xp.empty(len(initial) * padded + ROW_ALIGN, dtype=dtype)
            itemsize = np.dtype(dtype).itemsize
            start = (-self.device.pointer(memory) % (ROW_ALIGN * itemsize)) // itemsize
            state = memory[start:start + len(initial) * padded].reshape(len(initial), padded)[:, :size]
            for i, value in enumerate(initial):
                state[i].fill(value)
        return state

    def state_from(self, values: np.ndarray, dtype: np.dtype, like: Any) -> Any:
        state = self.full_state([0.0] * len(values), values.shape[1], dtype, like)
        with self.placement.scope(self.placement.device_of(like), None):
            for row, saved in zip(state, values):
                self.placement.upload(row, np.ascontiguousarray(saved, dtype=dtype))
        return state

    def empty_like(self, x: Any) -> Any:
        with self.placement.scope(self.placement.device_of(x), None):
            return self.xp.empty(x.shape, dtype=x.dtype)

    def queue_of(self, like: Any, framework: str) -> contextlib.AbstractContextManager[Any]:
        # (a PyTorch side stream does not wait for CuPy's: state filled there could be read
        # by the update, on torch's stream, before it is written)
        device = self.placement.device_of(like)
        return self.placement.scope(device, self.placement.caller_stream(framework, device))

    def check_launchable(self, arrays: Sequence[Any], framework: str) -> None:
        place = self.placement
        for device in sorted({place.device_of(a) for a in arrays}):
            self._check_stream(device, place.caller_stream(framework, device))

    def run(self, program: Program, jobs: Sequence[Job], apply: bool) -> None:
        # Every copy, table and kernel of every group first, then the launches: a failed
        # allocation or compile comes before anything is written.
        place = self.placement
        staged = []
        for (device, framework), placed in _placement_groups(place, jobs).items():
            stream = place.caller_stream(framework, device)
            launches: list[Callable[[], None]] = []
            with place.scope(device, stream):
                for (param, grad), positions in _dtype_groups(placed).items():
                    group = [placed[i] for i in positions]
                    # (bfloat16 lives in uint16 views, which CuPy's element-wise kernels would
                    # convert as numbers: those keep the contiguous copy)
                    if self._has_strided_kernels and not program.levels and BFLOAT16 not in (param, grad):
                        contiguous = []
                        for job in group:  # strided arrays in place, one launch each
                            if job.x.flags.c_contiguous and job.g.flags.c_contiguous:
                                contiguous.append(job)
                            else:
                                launches.append(functools.partial(self._strided, program, param, grad, job, apply))
                        group = contiguous
                    flat = [(job, _contiguous(self.xp, job.x), _contiguous(self.xp, job.g)) for job in group]
                    with self._lock:
                        launch = self._group_launcher(program, param, grad, flat, apply, device)
                    launches.append(functools.partial(_launch_group, launch, group, flat, apply))
            staged.append((device, stream, launches))
        for device, stream, launches in staged:
            with place.scope(device, stream):
                for run_launch in launches:
                    run_launch()

    def prepare(self, program: Program, jobs: Sequence[Job], one_array: bool = False) -> PreparedLaunch | None:
        """Launches for repeating this update on the same parameters: tables are built now
        (owned by the launchers), and each call only launches, with one row of host scalars
        shared by every array. None if an array needs a contiguous copy.

        ``one_array`` (an update of one array, not a collection): prepared only by a device
        with a launch of its own for it (the native CPU's ``prepare_one``); a GPU keeps one
        element-wise launch on the full path."""
        if not all(_direct(job.x) and _direct(job.g) for job in jobs):
            return None
        if one_array:
            prepare_one = getattr(self.device, "prepare_one", None)
            return None if prepare_one is None else prepare_one(self, program, jobs[0])
        place = self.placement
        index = {id(job): i for i, job in enumerate(jobs)}
        parts = []
        for (device, framework), placed in _placement_groups(place, jobs).items():
            launchers = []
            with place.scope(device, place.caller_stream(framework, device)):
                for (param, grad), positions in _dtype_groups(placed).items():
                    kept = [index[id(placed[i])] for i in positions if placed[i].x.size]
                    if kept:
                        live = [(jobs[i], jobs[i].x, jobs[i].g) for i in kept]
                        source = self._source(program, param, grad, False)
                        launcher = _MultiTensor(self, source, program, compute_dtype(param), live, False,
                                                device, owned=True)
                        launchers.append((launcher, kept))
            parts.append(_PreparedPart(device, framework, launchers))
        return PreparedKernels(self, parts, len(jobs))

    @contextlib.contextmanager
    def count_launches(self) -> Iterator[LaunchCounter]:
        counter = LaunchCounter()
        self._counters.append(counter)
        try:
            yield counter
        finally:
            self._counters.remove(counter)

    # -- internals ------------------------------------------------------------------------

    def _check_stream(self, device: int, stream: Any) -> None:
        try:
            capturing = self.placement.is_capturing(stream)
        except Exception as error:  # the query itself is illegal while another stream captures
            raise GraphCaptureError(
                f"params: cannot queue work on GPU {device} while a CUDA graph is being captured ({error})"
            ) from None
        if capturing:
            raise GraphCaptureError(
                f"params: the stream of GPU {device} is capturing a CUDA graph; gpuopt.update cannot be "
                "captured (its host scalars and step counts would replay unchanged), call it outside the graph"
            )

    def _launch(self, source: str, name: str, blocks: int, args: Sequence[Any]) -> None:
        for counter in tuple(self._counters):  # (a copy: another thread may leave its counter)
            counter.launches += 1
            counter.names.append(name)
        self.device.kernel(source, name)(blocks, self.device.threads, args)

    def _placeholder(self, device: int) -> Any:
        # Passed where a kernel takes a pointer it will not use (totals, out when updating).
        with self._lock:
            null = self._null.get(device)
            if null is None:
                with self.placement.scope(device, None):
                    null = self._null[device] = self.xp.zeros(1, dtype=np.float64)
        return null

    def _group_launcher(self, program: Program, param: np.dtype, grad: np.dtype, flat: list[tuple],
                        apply: bool, device: int) -> Callable[[Sequence[Sequence[float]]], None]:
        """Everything but the launches, done once: returns ``launch(scalars per array)``."""
        kept = [i for i, entry in enumerate(flat) if entry[1].size]  # empty arrays need no work
        if not kept:
            return lambda rows: None
        live = [flat[i] for i in kept]
        source = self._source(program, param, grad, apply)
        ct = compute_dtype(param)
        single = len(live) == 1 and not program.levels
        names = ["gpuopt_elementwise"] if single else ["gpuopt_multi_reduce"] * bool(program.levels) + [
            "gpuopt_multi_tensor"]
        for name in names:  # compiled now, so that a failing compile comes before any write
            self.device.kernel(source, name)
        if single:
            launch = self._elementwise(source, ct, live[0], apply, device)
        else:
            launch = _MultiTensor(self, source, program, ct, live, apply, device).launch
        if len(kept) == len(flat):
            return launch
        return lambda rows: launch([rows[i] for i in kept])

    def _strided(self, program: Program, param: np.dtype, grad: np.dtype, job: Job, apply: bool) -> None:
        """One non-contiguous array, updated in place by one element-wise launch."""
        if not job.x.size:
            return
        ct = compute_dtype(param)
        kernel = self.device.elementwise(strided_kernel(program, param, grad, apply))  # type: ignore[attr-defined]
        shape = job.x.shape
        scalars = [ct.type(v) for v in job.scalars]
        slots = [slot.reshape(shape) for slot in job.slots]
        inputs = [job.x, job.g, *scalars] if apply else [job.g, *scalars]
        outputs = [job.out if apply else job.x, *slots]
        for counter in tuple(self._counters):
            counter.launches += 1
            counter.names.append("gpuopt_strided")
        kernel(*inputs, *outputs)

    def _elementwise(self, source: str, ct: np.dtype, entry: tuple, apply: bool, device: int) -> Callable:
        job, x, g = entry
        n = x.size
        groups = -(-n // VEC)
        blocks = max(1, min(-(-groups // self.device.threads), self.device.max_blocks))
        args = [np.int64(n), x, g, job.out if apply else x, self._placeholder(device), *job.slots]

        def launch(rows: Sequence[Sequence[float]]) -> None:
            self._launch(source, "gpuopt_elementwise", blocks, [*args, *(ct.type(v) for v in rows[0])])

        return launch


class _MultiTensor:
    """The multi-tensor launches of one dtype group on one device: a table of pointers and
    sizes, its chunk starts, and the reduction buffers.

    Built for one call, it shares the backend's cached tables (rebuilt only when the arrays
    change); ``owned`` (a prepared update) gives it tables of its own, whose gradient column
    :meth:`set_gradient_pointers` changes and the next launch uploads in one copy.
    """

    def __init__(self, backend: KernelBackend, source: str, program: Program, ct: np.dtype, live: list[tuple],
                 apply: bool, device: int, owned: bool = False):
        self.backend, self.source, self.ct, self.device = backend, source, ct, device
        self.levels = program.levels
        self.nscalars = max(program.scalar_count, 1)
        self.scalar_count = program.scalar_count
        pointer = backend.device.pointer
        host = np.empty((len(live), TABLE_COLUMNS + len(program.slots)), dtype=np.uint64)
        for row, (job, x, g) in zip(host, live):
            row[:4] = (pointer(x), pointer(g), pointer(job.out if apply else x), x.size)
            for k, slot in enumerate(job.slots):
                row[TABLE_COLUMNS + k] = pointer(slot)
        tables = None if owned else backend._tables.get((source, device))
        if tables is None or not np.array_equal(tables.host_table, host):
            # Always a new object, filled before it is published: a launcher being built in
            # another thread keeps the consistent set it read.
            tables = _Tables()
            self._build(tables, host, program)
            if not owned:
                backend._tables[(source, device)] = tables
        # Its own references: a later group with the same source but other arrays replaces
        # the cached tables, not these.
        self.host = tables.host_table
        self.table, self.chunk_start, self.chunks = tables.table, tables.chunk_start, tables.chunks
        self.totals, self.partials, self.done = tables.totals, tables.partials, tables.done
        self.blocks = max(1, min(self.chunks, backend.device.max_blocks))
        self.tensors = len(live)
        self.placeholder = backend._placeholder(device)
        self.stale_table = False  # the host table changed since the last upload
        self._upload: dict[str, Any] = {}
        self._uniform_args = self._kernel_args(self._common(0, self.placeholder))  # (the table is refreshed in place)

    def _build(self, tables: _Tables, host: np.ndarray, program: Program) -> None:
        xp = self.backend.xp
        sizes = host[:, 3].astype(np.int64)
        starts = np.zeros(len(host) + 1, dtype=np.int64)
        np.cumsum(-(-sizes // CHUNK), out=starts[1:])
        tables.host_table = host
        tables.table = xp.asarray(host)
        tables.chunk_start = xp.asarray(starts)
        tables.chunks = int(starts[-1])
        terms = max((len(program.totals_at(level)) for level in range(1, program.levels + 1)), default=0)
        if terms:
            tables.totals = xp.zeros((len(host), max(len(program.totals), 1)), dtype=np.float64)
            tables.partials = xp.zeros(tables.chunks * terms, dtype=np.float64)
            tables.done = xp.zeros(len(host), dtype=np.uint32)
        else:
            tables.totals = tables.partials = tables.done = self.backend._placeholder(self.device)

    def set_gradient_pointers(self, column: Any) -> None:
        self.host[:, 1] = column
        self.stale_table = True

    def launch_uniform(self, scalars: Sequence[float]) -> None:
        """Every tensor at the same step: the scalars go by value, nothing else is copied."""
        if self.stale_table:
            self.backend.placement.upload(self.table, self.host)
            self.stale_table = False
        self._launches(self._uniform_args, list(np.array(scalars, dtype=self.ct)))  # (faster than one by one)

    def launch(self, rows: Sequence[Sequence[float]]) -> None:
        first = rows[0]
        if rows.count(first) == len(rows):  # (identical rows compare by identity: fast)
            self.launch_uniform(first)
            return
        matrix = np.zeros((len(rows), self.nscalars), dtype=self.ct)
        for i, row in enumerate(rows):
            matrix[i, : len(row)] = row
        upload = self._upload
        if "host" not in upload or not np.array_equal(upload["host"], matrix):
            upload["host"], upload["device"] = matrix, self.backend.xp.asarray(matrix)
        self._launches(self._kernel_args(self._common(1, upload["device"])), [self.ct.type(0)] * self.scalar_count)

    def _common(self, per_tensor: int, scalars: Any) -> list[Any]:
        return [np.int32(self.tensors), np.int64(self.chunks), self.table, self.chunk_start,
                np.int32(per_tensor), scalars]

    def _kernel_args(self, common: list[Any]) -> list[tuple[str, list[Any]]]:
        """Each launch's kernel and its arguments before the scalars: the reductions, then the
        element-wise pass."""
        reductions = [("gpuopt_multi_reduce", [np.int32(level), *common, self.totals, self.partials, self.done])
                      for level in range(1, self.levels + 1)]
        return [*reductions, ("gpuopt_multi_tensor", [*common, self.totals])]

    def _launches(self, kernel_args: list[tuple[str, list[Any]]], by_value: list[Any]) -> None:
        launch, source, blocks = self.backend._launch, self.source, self.blocks
        for name, args in kernel_args:
            launch(source, name, blocks, args + by_value)


@dataclass
class _PreparedPart:
    """A prepared update's launchers on one device for one framework's stream, each with the
    positions (in the prepared update's arrays) of its non-empty tensors."""

    device: int
    framework: str
    launchers: list[tuple[_MultiTensor, list[int]]]
    last_stream: Any = None


class PreparedKernels:
    """The launches of a prepared update (:class:`~gpuopt.backends.protocol.PreparedLaunch`)."""

    def __init__(self, backend: KernelBackend, parts: list[_PreparedPart], arrays: int):
        self.backend = backend
        self.parts = parts
        self.pointer = backend.device.pointer
        self._streams: list[Any] = [None] * len(parts)
        launchers = [entry for part in parts for entry in part.launchers]
        self._everything = len(launchers) == 1 and launchers[0][1] == list(range(arrays))

    def check_launchable(self) -> None:
        """Find each part's stream now, and refuse one that is capturing a graph."""
        place = self.backend.placement
        for i, part in enumerate(self.parts):
            stream = self._streams[i] = place.caller_stream(part.framework, part.device)
            self.backend._check_stream(part.device, stream)

    def __call__(self, scalars: list[float]) -> None:
        place = self.backend.placement
        for part, stream in zip(self.parts, self._streams):
            with place.scope(part.device, stream):
                if part.last_stream is not None and stream is not part.last_stream:
                    place.follow(part.last_stream, stream)  # the tables and state were last used there
                part.last_stream = stream
                for launcher, _ in part.launchers:
                    launcher.launch_uniform(scalars)

    def set_gradient_pointers(self, pointers: Sequence[int]) -> None:
        if self._everything:  # one launcher over every array, in order: no reordering needed
            self.parts[0].launchers[0][0].set_gradient_pointers(pointers)
            return
        column = np.array(pointers, dtype=np.uint64)
        for part in self.parts:
            for launcher, positions in part.launchers:
                launcher.set_gradient_pointers(column[positions])


def _placement_groups(place: Placement, jobs: Sequence[Job]) -> dict[tuple[int, str], list[Job]]:
    """The jobs grouped by the device that holds their parameter and whose stream orders them."""
    groups: dict[tuple[int, str], list[Job]] = {}
    for job in jobs:
        groups.setdefault((place.device_of(job.x), job.framework), []).append(job)
    return groups


def _launch_group(launch: Callable, group: list[Job], flat: list[tuple], apply: bool) -> None:
    launch([job.scalars for job in group])
    for job, x, _ in flat:  # kernels need contiguous memory; others went through a copy
        if x is not job.x and not apply:
            job.x[...] = x


def _dtype_groups(jobs: Sequence[Any]) -> dict[tuple, list[int]]:
    """Positions of the jobs, grouped by (param, grad) element type: one module each."""
    groups: dict[tuple, list[int]] = {}
    for position, job in enumerate(jobs):
        groups.setdefault((np.dtype(job.x_type), np.dtype(job.g_type)), []).append(position)
    return groups


def _direct(array: Any) -> bool:
    """Whether kernels can use the array's memory as is: contiguous and aligned to its element
    size (a NumPy array can be neither; a CuPy array is always aligned)."""
    return array.flags.c_contiguous and getattr(array.flags, "aligned", True)


def _contiguous(xp: Any, array: Any) -> Any:
    if not array.flags.c_contiguous:
        return xp.ascontiguousarray(array)
    return array if _direct(array) else array.copy()  # (a copy is aligned)
