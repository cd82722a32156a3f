"""The NumPy executor: runs a traced Program over cache-sized blocks with reused scratch.

Each graph node becomes one ufunc call with ``out=`` a scratch buffer of one block; buffers
are recycled as soon as their last reader has run, so a block's working set stays in cache
and, after the first call, a step allocates no array memory. Values that are the same for
every element (host scalars and what is computed from them) are evaluated once per call.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import numpy as np

from ..plan import Program
from ..expr import Node

#: elements per block: 16K float32 is 64 KiB per buffer, so a rule's live buffers fit in L2
BLOCK = 16384

_UFUNCS: dict[str, Callable[..., Any]] = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": np.divide,
    "max": np.fmax,  # fmax/fmin ignore a NaN operand, like C's fmaxf/fminf in the kernels
    "min": np.fmin,
    "neg": np.negative,
    "sqrt": np.sqrt,
    "abs": np.absolute,
    "gt": np.greater,
    "ge": np.greater_equal,
    "lt": np.less,
    "le": np.less_equal,
}


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """float16 is stored as float16 but computed (and its state kept) in float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _where(cond: Any, a: Any, b: Any, out: np.ndarray) -> None:
    np.copyto(out, b)
    np.copyto(out, a, where=cond)


def evaluate_uniform(nodes: Sequence[Node], values: dict[int, Any], ct: np.dtype,
                     scalars: Sequence[float], totals: Sequence[float]) -> None:
    """Evaluate the per-array nodes among ``nodes`` into ``values`` (in compute precision)."""
    for node in nodes:
        if not node.uniform or node.index in values:
            continue
        if node.op == "const":
            values[node.index] = ct.type(node.value)
        elif node.op == "scalar":
            values[node.index] = ct.type(scalars[node.value])
        elif node.op == "total_value":
            values[node.index] = ct.type(totals[node.value[0]])
        elif node.op == "where":
            c, a, b = (values[arg.index] for arg in node.args)
            values[node.index] = a if c else b
        else:
            values[node.index] = _UFUNCS[node.op](*(values[arg.index] for arg in node.args))


class _Pass:
    """One pass over the array: the ufunc schedule for the varying part of some roots."""

    def __init__(self, program: Program, roots: list[Node], ct: np.dtype, param_dtype: np.dtype,
                 grad_dtype: np.dtype):
        self.nodes = program.needed(roots)
        varying = [n for n in self.nodes if not n.uniform]
        last_use: dict[int, int] = {}
        for pos, node in enumerate(varying):
            for arg in node.args:
                last_use[arg.index] = pos
        keep = {r.index for r in roots}
        # Leaves that need a converted copy (float16 storage) also take a buffer.
        needs_buffer = {
            n.index for n in varying
            if n.op not in ("x", "g", "load")
            or (n.op == "x" and param_dtype != ct)
            or (n.op == "g" and grad_dtype != ct)
        }
        free: dict[bool, list[int]] = {False: [], True: []}
        self.buffer_kinds: list[bool] = []  # per buffer: holds booleans?
        self.buffer_of: dict[int, int] = {}
        for pos, node in enumerate(varying):
            if node.index in needs_buffer:
                pool = free[node.is_bool]
                if pool:
                    buf = pool.pop()
                else:
                    buf = len(self.buffer_kinds)
                    self.buffer_kinds.append(node.is_bool)
                self.buffer_of[node.index] = buf
            for arg in {a.index: a for a in node.args}.values():  # once each, as in d*d
                # freed after the output is allocated, so a ufunc never writes over its input
                if last_use.get(arg.index) == pos and arg.index in self.buffer_of and arg.index not in keep:
                    free[arg.is_bool].append(self.buffer_of[arg.index])
        self.varying = varying
        self.ct = ct


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
        if not apply:  # x - d needs x, converted to compute precision if stored as float16
            final_roots.append(next(n for n in program.graph.nodes if n.op == "x"))
        self.final_pass = _Pass(program, final_roots, self.ct, self.param_dtype, self.grad_dtype)
        self._scratch: dict[int, list[np.ndarray]] = {}
        self._x_index = final_roots[-1].index
        self._x_new = np.empty(BLOCK, self.ct) if self.param_dtype != self.ct else None

    def _buffers(self, p: _Pass) -> list[np.ndarray]:
        bufs = self._scratch.get(id(p))
        if bufs is None:
            bufs = [np.empty(BLOCK, dtype=bool if kind else self.ct) for kind in p.buffer_kinds]
            self._scratch[id(p)] = bufs
        return bufs

    def _run_block(self, p: _Pass, bufs: list[np.ndarray], vals: dict[int, Any], m: int,
                   x: np.ndarray, g: np.ndarray, slots: Sequence[np.ndarray]) -> None:
        for node in p.varying:
            op = node.op
            out = bufs[p.buffer_of[node.index]][:m] if node.index in p.buffer_of else None
            if op == "x" or op == "g":
                src = x if op == "x" else g
                if out is None:
                    vals[node.index] = src
                else:
                    np.copyto(out, src)
                    vals[node.index] = out
                continue
            if op == "load":
                vals[node.index] = slots[node.value]
                continue
            args = [vals[a.index] for a in node.args]
            if op == "where":
                _where(args[0], args[1], args[2], out)
            else:
                _UFUNCS[op](*args, out=out)
            vals[node.index] = out

    def run(self, x: np.ndarray, g: np.ndarray, slots: Sequence[np.ndarray],
            scalars: Sequence[float], out: np.ndarray | None = None) -> None:
        """One step over flat contiguous arrays: ``x -= d`` (or ``out = d`` when applying)."""
        n = x.shape[0]
        program = self.program
        totals = [0.0] * len(program.totals)
        with np.errstate(all="ignore"):  # NaN/inf propagate as in PyTorch; the unselected
            # branch of a where() may divide by zero without it mattering
            for level, p in enumerate(self.stage_passes, start=1):
                uniform: dict[int, Any] = {}
                evaluate_uniform(p.nodes, uniform, self.ct, scalars, totals)
                terms = program.totals_at(level)
                sums = [0.0] * len(terms)
                bufs = self._buffers(p)
                for start in range(0, n, BLOCK):
                    stop = min(start + BLOCK, n)
                    vals = dict(uniform)
                    self._run_block(p, bufs, vals, stop - start, x[start:stop], g[start:stop],
                                    [s[start:stop] for s in slots])
                    for k, term in enumerate(terms):
                        arg = term.args[0]
                        if not arg.uniform:
                            sums[k] += float(np.add.reduce(vals[arg.index], dtype=np.float64))
                for k, term in enumerate(terms):
                    arg = term.args[0]
                    totals[term.value[0]] = float(uniform[arg.index]) * n if arg.uniform else sums[k]
            p = self.final_pass
            uniform = {}
            evaluate_uniform(p.nodes, uniform, self.ct, scalars, totals)
            bufs = self._buffers(p)
            result = program.result.index
            stores = program.stores
            for start in range(0, n, BLOCK):
                stop = min(start + BLOCK, n)
                xb, sb = x[start:stop], [s[start:stop] for s in slots]
                vals = dict(uniform)
                self._run_block(p, bufs, vals, stop - start, xb, g[start:stop], sb)
                # Writes come last: every read of the old x and state has happened.
                staged = [(i, vals[node.index]) for i, node in stores]
                staged = [(i, v.copy() if node_is_slot_view(v, sb) else v) for i, v in staged]
                for i, value in staged:
                    np.copyto(sb[i], value)
                if self.apply:
                    np.copyto(out[start:stop], vals[result], casting="same_kind")
                elif self.param_dtype == self.ct:
                    np.subtract(xb, vals[result], out=xb)
                else:
                    x_new = self._x_new[: stop - start]
                    np.subtract(vals[self._x_index], vals[result], out=x_new)
                    np.copyto(xb, x_new, casting="same_kind")


def node_is_slot_view(value: Any, slots: Sequence[np.ndarray]) -> bool:
    """Whether a value to store is itself a state slot (a slot assigned another slot's old
    value); it is copied first so that the order of the writes cannot matter."""
    return isinstance(value, np.ndarray) and any(value is s for s in slots)


@functools.lru_cache(maxsize=512)
def executor(program: Program, param_dtype: np.dtype, grad_dtype: np.dtype, apply: bool) -> NumpyExecutor:
    """The memoised executor for a program and dtypes (its scratch buffers live with it)."""
    return NumpyExecutor(program, param_dtype, grad_dtype, apply)


class NumpyBackend:
    """Runs jobs with NumPy. Non-contiguous parameters are updated through a contiguous
    copy that is written back (one allocation per step for such arrays only)."""

    name = "numpy"

    @staticmethod
    def full_state(initial: Sequence[float], size: int, dtype: np.dtype) -> np.ndarray:
        state = np.empty((len(initial), size), dtype=dtype)
        for row, value in zip(state, initial):
            row.fill(value)
        return state

    @staticmethod
    def empty_like(x: np.ndarray) -> np.ndarray:
        return np.empty(x.shape, dtype=x.dtype)

    @staticmethod
    def run(program: Program, jobs: Sequence[Any], apply: bool) -> None:
        for job in jobs:
            x, g = job.x, job.g
            contiguous = x.flags.c_contiguous
            flat_x = (x if contiguous else np.ascontiguousarray(x)).reshape(-1)
            flat_g = np.ascontiguousarray(g).reshape(-1)
            out = job.out.reshape(-1) if apply else None
            executor(program, x.dtype, g.dtype, apply).run(flat_x, flat_g, job.slots, job.scalars, out)
            if not contiguous and not apply:
                np.copyto(x, flat_x.reshape(x.shape))


BACKEND = NumpyBackend()
