"""The NumPy executor: runs a traced Program over cache-sized blocks with reused scratch.

Each graph node becomes one ufunc call with ``out=`` a scratch buffer of one block; buffers
are recycled as soon as their last reader has run, so a block's working set stays in cache
and, after the first call, a step allocates no array memory. Values that are the same for
every element (host scalars and what is computed from them) are evaluated once per call.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from .. import dtypes
from ..expr import Node
from ..plan import Program

#: elements per block. 64K float32 is 256 KiB per scratch buffer: a block's working set
#: stays in L2 while each ufunc call is long enough that Python's per-call cost is small
#: (measured on a 2-core EPYC VM: 16K, 32K, 64K elements gave ADAM at 2^24 in 71, 61, 55 ms)
BLOCK = 65536

_UFUNCS: dict[str, Callable[..., Any]] = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": np.divide,
    "max": np.fmax,  # fmax/fmin ignore a NaN operand, like C's fmaxf/fminf in the kernels
    "min": np.fmin,
    "clamp": np.clip,  # NaN stays NaN, like the kernels' comparison form
    "neg": np.negative,
    "sqrt": np.sqrt,
    "abs": np.absolute,
    "gt": np.greater,
    "ge": np.greater_equal,
    "lt": np.less,
    "le": np.less_equal,
}


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """float16 and bfloat16 are stored as such but computed (and their state kept) in float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _where(cond: Any, a: Any, b: Any, out: np.ndarray) -> None:
    np.copyto(out, b)
    np.copyto(out, a, where=cond)


def evaluate_uniform(program: Program, nodes: Sequence[Node], values: dict[int, Any], ct: np.dtype,
                     scalars: Sequence[float], totals: Sequence[float]) -> None:
    """Evaluate the per-array nodes among ``nodes`` into ``values`` (in compute precision);
    ``scalars`` holds the host scalars and then the hoisted values, as the kernels get them."""
    hoisted = program.hoisted_index
    for node in nodes:
        if not node.uniform or node.index in values:
            continue
        if node.index in hoisted:
            values[node.index] = ct.type(scalars[hoisted[node.index]])
        elif node.op == "const":
            values[node.index] = ct.type(node.value)
        elif node.op == "scalar":
            values[node.index] = ct.type(scalars[node.value])
        elif node.op == "total_value":
            values[node.index] = ct.type(totals[node.value.number])
        elif node.op == "where":
            c, a, b = (values[arg.index] for arg in node.args)
            values[node.index] = a if c else b
        else:
            values[node.index] = _UFUNCS[node.op](*(values[arg.index] for arg in node.args))


# Instruction kinds of a pass, decided once when the pass is built.
_ALIAS, _CONVERT, _UFUNC, _WHERE = range(4)


class _Pass:
    """One pass over the array: the ufunc schedule for the varying part of some roots.

    Every varying node gets a scratch buffer, recycled after its last reader; a node whose
    value is stored in a state slot is written straight into that slot instead, when nothing
    reads the slot's old value after it (so ADAM's new m and v cost no extra copy).
    """

    def __init__(self, program: Program, roots: list[Node], ct: np.dtype, param_dtype: np.dtype,
                 grad_dtype: np.dtype, stores: Sequence[tuple[int, Node]] = ()):
        self.nodes = program.needed(roots)
        self.param_dtype, self.grad_dtype = param_dtype, grad_dtype
        varying = [n for n in self.nodes if not n.uniform]
        position = {n.index: pos for pos, n in enumerate(varying)}
        last_use: dict[int, int] = {}
        for pos, node in enumerate(varying):
            for arg in node.args:
                last_use[arg.index] = pos
        for root in roots:  # read once the schedule has run: stores, the result, x
            last_use[root.index] = len(varying)
        loads = {n.value: n for n in varying if n.op == "load"}
        self.direct: dict[int, int] = {}  # node index -> the slot it is computed into
        for slot, node in stores:
            old = loads.get(slot)
            if (node.uniform or node.op in ("x", "g", "load") or node.index in self.direct
                    or (old is not None and last_use.get(old.index, -1) > position[node.index])):
                continue
            self.direct[node.index] = slot
        stored = {slot for slot, _ in stores}
        self.copies = [(slot, node.index, node.op == "load" and node.value in stored)
                       for slot, node in stores if self.direct.get(node.index) != slot]

        self.buffer_kinds: list[bool] = []  # per scratch buffer: does it hold booleans?
        buffer_of: dict[int, int] = {}
        free: dict[bool, list[int]] = {False: [], True: []}
        self.instructions: list[tuple] = []
        for pos, node in enumerate(varying):
            op = node.op
            converts = (op == "x" and param_dtype != ct) or (op == "g" and grad_dtype != ct)
            if op in ("x", "g", "load") and not converts:
                self.instructions.append((_ALIAS, op, node.value, None, node.index))
            else:
                if node.index in self.direct:
                    target = ("slot", self.direct[node.index])
                else:
                    pool = free[node.is_bool]
                    if pool:
                        buf = pool.pop()
                    else:
                        buf = len(self.buffer_kinds)
                        self.buffer_kinds.append(node.is_bool)
                    buffer_of[node.index] = buf
                    target = ("buffer", buf)
                if converts:
                    self.instructions.append((_CONVERT, op, None, target, node.index))
                else:
                    kind = _WHERE if op == "where" else _UFUNC
                    args = tuple(a.index for a in node.args)
                    self.instructions.append((kind, _UFUNCS.get(op), args, target, node.index))
            for arg in {a.index: a for a in node.args}.values():  # once each, as in d*d
                # freed after the output is allocated, so a ufunc never writes over its input
                if last_use.get(arg.index) == pos and arg.index in buffer_of:
                    free[arg.is_bool].append(buffer_of[arg.index])

    def run_block(self, vals: list, buffers: Sequence[np.ndarray], x: np.ndarray, g: np.ndarray,
                  slots: Sequence[np.ndarray]) -> None:
        """Evaluate the schedule on one block; ``buffers`` are already cut to its length."""
        for kind, what, args, target, index in self.instructions:
            if kind == _ALIAS:
                vals[index] = x if what == "x" else g if what == "g" else slots[args]
                continue
            out = buffers[target[1]] if target[0] == "buffer" else slots[target[1]]
            if kind == _UFUNC:
                what(*[vals[a] for a in args], out=out)
            elif kind == _WHERE:
                _where(vals[args[0]], vals[args[1]], vals[args[2]], out)
            elif (self.param_dtype if what == "x" else self.grad_dtype) == dtypes.BFLOAT16:
                dtypes.widen(x if what == "x" else g, out)
            else:
                np.copyto(out, x if what == "x" else g)
            vals[index] = out


class NumpyExecutor:
    """A Program compiled for NumPy for one (param dtype, grad dtype, mode)."""

    def __init__(self, program: Program, param_dtype: np.dtype, grad_dtype: np.dtype, apply: bool):
        self.program = program
        self.param_dtype = np.dtype(param_dtype)
        self.grad_dtype = np.dtype(grad_dtype)
        self.ct = compute_dtype(param_dtype)
        self.apply = apply
        self.stage_passes = [
            _Pass(program, [t.args[0] for t in program.totals_at(level)], self.ct, self.param_dtype,
                  self.grad_dtype)
            for level in range(1, program.levels + 1)
        ]
        final_roots = [program.result] + [node for _, node in program.stores]
        if not apply and program.new_x is None:  # x - d needs x, in compute precision
            final_roots.append(next(n for n in program.graph.nodes if n.op == "x"))
        self.final_pass = _Pass(program, final_roots, self.ct, self.param_dtype, self.grad_dtype,
                                program.stores)
        self._x_index = final_roots[-1].index
        self._passes = [*self.stage_passes, self.final_pass]
        self._local = threading.local()  # scratch memory per thread: threads never share buffers

    def scratch(self) -> _Scratch:
        """This thread's scratch buffers (allocated on its first call: call this before
        writing anything, so that a failed allocation happens before the first write)."""
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = _Scratch(self)
        return scratch

    def _blocks(self, scratch: _Scratch, p: _Pass, n: int) -> Iterator[tuple[int, int, list[np.ndarray]]]:
        full = scratch.buffers[id(p)]
        for start in range(0, n, BLOCK):
            stop = min(start + BLOCK, n)
            yield start, stop, full if stop - start == BLOCK else [b[: stop - start] for b in full]

    def run(self, x: np.ndarray, g: np.ndarray, slots: Sequence[np.ndarray],
            scalars: Sequence[float], out: np.ndarray | None = None) -> None:
        """One step over flat contiguous arrays: ``x -= d`` (or ``out = d`` when applying)."""
        scratch = self.scratch()
        try:
            self._run(scratch, x, g, slots, scalars, out)
        finally:
            # Drop this call's views: a cached executor must not keep a parameter (whose
            # state is held weakly) or its state alive after the caller lets it go.
            scratch.vals[:] = scratch.no_vals

    def _run(self, scratch: _Scratch, x: np.ndarray, g: np.ndarray, slots: Sequence[np.ndarray],
             scalars: Sequence[float], out: np.ndarray | None) -> None:
        n = x.shape[0]
        program = self.program
        vals = scratch.vals
        totals = [0.0] * len(program.totals)
        with np.errstate(all="ignore"):  # NaN/inf propagate as in PyTorch; the unselected
            # branch of a where() may divide by zero without it mattering
            for level, p in enumerate(self.stage_passes, start=1):
                uniform: dict[int, Any] = {}
                evaluate_uniform(program, p.nodes, uniform, self.ct, scalars, totals)
                for index, value in uniform.items():
                    vals[index] = value
                terms = [t.args[0] for t in program.totals_at(level)]
                sums = [0.0] * len(terms)
                for start, stop, buffers in self._blocks(scratch, p, n):
                    p.run_block(vals, buffers, x[start:stop], g[start:stop], [s[start:stop] for s in slots])
                    for k, arg in enumerate(terms):
                        if not arg.uniform:
                            term = vals[arg.index]
                            if scratch.wide is not None:
                                wide = scratch.wide[: stop - start]
                                np.copyto(wide, term)
                                term = wide
                            sums[k] += float(np.add.reduce(term))
                for k, term in enumerate(program.totals_at(level)):
                    arg = term.args[0]
                    totals[term.value.number] = float(uniform[arg.index]) * n if arg.uniform else sums[k]
            p = self.final_pass
            uniform = {}
            evaluate_uniform(program, p.nodes, uniform, self.ct, scalars, totals)
            for index, value in uniform.items():
                vals[index] = value
            result = program.result.index
            for start, stop, buffers in self._blocks(scratch, p, n):
                xb, sb = x[start:stop], [s[start:stop] for s in slots]
                p.run_block(vals, buffers, xb, g[start:stop], sb)
                # The remaining writes come last: every read of the old x and state is done.
                staged = []
                for k, (slot, index, swap) in enumerate(p.copies):
                    value = vals[index]
                    if swap:  # a slot's old value stored into another slot: keep it aside first
                        kept = scratch.swaps[k][: stop - start]
                        np.copyto(kept, value)
                        value = kept
                    staged.append((slot, value))
                for slot, value in staged:
                    np.copyto(sb[slot], value)
                if self.apply:
                    self._store(scratch, out[start:stop], vals[result])
                elif program.new_x is not None:  # the rounding of the master copy
                    self._store(scratch, xb, vals[program.new_x.index])
                elif self.param_dtype == self.ct:
                    np.subtract(xb, vals[result], out=xb)
                else:
                    x_new = scratch.x_new[: stop - start]
                    np.subtract(vals[self._x_index], vals[result], out=x_new)
                    self._store(scratch, xb, x_new)

    def _store(self, scratch: _Scratch, target: np.ndarray, values: np.ndarray) -> None:
        """Compute-precision ``values`` into parameter storage, rounded to nearest (even)."""
        if self.param_dtype == dtypes.BFLOAT16:
            n = target.shape[0]
            dtypes.narrow(values, target, scratch.bits[:n], scratch.nan[:n])
        else:
            np.copyto(target, values, casting="same_kind")


class _Scratch:
    """One thread's working memory for one executor: a block of each buffer the passes use."""

    def __init__(self, ex: NumpyExecutor):
        ct = ex.ct
        self.buffers = {id(p): [np.empty(BLOCK, dtype=bool if kind else ct) for kind in p.buffer_kinds]
                        for p in ex._passes}
        self.x_new = np.empty(BLOCK, ct) if ex.param_dtype != ct else None
        # float32 terms are summed in float64 through this buffer: a reduce with dtype=float64
        # would allocate a casting buffer on every call
        self.wide = np.empty(BLOCK, np.float64) if ct != np.float64 and ex.program.totals else None
        self.swaps = [np.empty(BLOCK, ct) if swap else None for _, _, swap in ex.final_pass.copies]
        # bfloat16 results are rounded through these (nothing allocated per step)
        narrowing = ex.param_dtype == dtypes.BFLOAT16
        self.bits = np.empty(BLOCK, np.uint32) if narrowing else None
        self.nan = np.empty(BLOCK, bool) if narrowing else None
        self.vals: list[Any] = [None] * len(ex.program.graph.nodes)
        self.no_vals: list[Any] = [None] * len(ex.program.graph.nodes)


@functools.lru_cache(maxsize=512)
def executor(program: Program, param_dtype: np.dtype, grad_dtype: np.dtype, apply: bool) -> NumpyExecutor:
    """The memoised executor for a program and dtypes (its scratch buffers live with it)."""
    return NumpyExecutor(program, param_dtype, grad_dtype, apply)


class NumpyBackend:
    """Runs jobs with NumPy. Non-contiguous parameters are updated through a contiguous
    copy that is written back (one allocation per step for such arrays only)."""

    name = "numpy"

    @staticmethod
    def full_state(initial: Sequence[float], size: int, dtype: np.dtype, like: Any = None) -> np.ndarray:
        state = np.empty((len(initial), size), dtype=dtype)
        for row, value in zip(state, initial):
            row.fill(value)
        return state

    @staticmethod
    def state_from(values: np.ndarray, dtype: np.dtype, like: Any) -> np.ndarray:
        return np.array(values, dtype=dtype, order="C")

    @staticmethod
    def empty_like(x: np.ndarray) -> np.ndarray:
        return np.empty(x.shape, dtype=x.dtype)

    @staticmethod
    def queue_of(like: Any, framework: str) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()  # (NumPy runs now, on the calling thread)

    @staticmethod
    def check_launchable(arrays: Sequence[Any], framework: str) -> None:
        pass  # NumPy runs now, on the calling thread

    @staticmethod
    def prepare(program: Program, jobs: Sequence[Any], one_array: bool = False) -> None:
        return None  # NumPy has no tables or launches worth keeping

    @staticmethod
    def run(program: Program, jobs: Sequence[Any], apply: bool) -> None:
        # Every copy, executor and scratch buffer first: a failed allocation (MemoryError)
        # must come before the first array is written.
        staged = []
        for job in jobs:
            x, g = job.x, job.g
            contiguous = x.flags.c_contiguous
            flat_x = (x if contiguous else np.ascontiguousarray(x)).reshape(-1)
            flat_g = np.ascontiguousarray(g).reshape(-1)
            out = job.out.reshape(-1) if apply else None
            ex = executor(program, job.x_type, job.g_type, apply)
            ex.scratch()
            staged.append((job, ex, flat_x, flat_g, out, contiguous))
        for job, ex, flat_x, flat_g, out, contiguous in staged:
            ex.run(flat_x, flat_g, job.slots, job.scalars, out)
            if not contiguous and not apply:
                np.copyto(job.x, flat_x.reshape(job.x.shape))


BACKEND = NumpyBackend()
