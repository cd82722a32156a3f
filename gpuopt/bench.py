"""``python -m gpuopt bench``: time update steps and set them against memory bandwidth and baselines.

For each rule (the twelve optimisers of the seed plus ``Optimiser(ClipValue(1), WeightDecay(1e-4),
ADAM())``) and each size it measures the time per step of :func:`gpuopt.update` and reports

- GB/s, from the bytes a step must move (:func:`bytes_per_element`, SPEC section 6);
- the percentage of the copy bandwidth measured in the same run (a device-to-device copy of a
  large buffer on the GPU, ``np.copyto`` on the CPU);
- the speedup over baselines measured in the same run: the same rule written as ordinary
  NumPy/CuPy array expressions (:class:`Unfused`, one whole-array operation at a time), and for
  ADAM ``torch.optim.Adam`` (``fused=True`` and ``foreach=True`` on CUDA; the default and
  ``fused=True`` on the CPU) where PyTorch is importable;
- a model with GPT-2 small's 148 parameter tensors (:func:`gpt2_shapes`, 124M parameters):
  one multi-tensor ``update`` call against a per-tensor loop, one flat tensor of the same size,
  the unfused loop and PyTorch, plus the host time of one ``update`` call;
- the targets of SPEC section 6, each reported as met, not met or not measured.

GPU times come from CUDA events after warm-up; CPU times from ``time.perf_counter``. Each
figure is the median over repeats, and each repeat runs enough steps to last a few
milliseconds. The command is wired into ``python -m gpuopt`` through :func:`add_parser` (or
:func:`add_arguments` and :func:`run`); :func:`benchmark` is the same as a Python call that
returns the report as a dict (the JSON written by ``--json``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .api import update
from .backends.numpy_backend import compute_dtype
from .chain import Optimiser
from .dispatch import cupy_module, gpu_available
from .plan import plan
from .rule import Rule
from .rules import (
    ADAM,
    ADAMW,
    NADAM,
    RADAM,
    ADADelta,
    ADAGrad,
    AdaMax,
    AMSGrad,
    ClipNorm,
    ClipValue,
    Descent,
    ExpDecay,
    InvDecay,
    Momentum,
    Nesterov,
    RMSProp,
    WeightDecay,
)

__all__ = [
    "RULES", "CHAIN", "SPEC_BYTES_FLOAT32", "BenchError", "Unfused", "add_arguments", "add_parser",
    "benchmark", "bytes_per_element", "check_spec_bytes", "format_report", "gpt2_shapes",
    "parse_rules", "parse_sizes", "plot_report", "run", "state_slots", "write_json",
]

# -- what is benchmarked -------------------------------------------------------------------

#: the fused chain of the issue: clipping and weight decay in front of ADAM, one kernel
CHAIN = "ClipValue+WeightDecay+ADAM"

#: every benchmarked rule by name, with a factory for a fresh instance (default hyperparameters)
RULES: dict[str, Callable[[], Rule]] = {
    "Descent": Descent,
    "Momentum": Momentum,
    "Nesterov": Nesterov,
    "RMSProp": RMSProp,
    "ADAM": ADAM,
    "RADAM": RADAM,
    "AdaMax": AdaMax,
    "ADAGrad": ADAGrad,
    "ADADelta": ADADelta,
    "AMSGrad": AMSGrad,
    "NADAM": NADAM,
    "ADAMW": ADAMW,
    CHAIN: lambda: Optimiser(ClipValue(1), WeightDecay(1e-4), ADAM()),
}
_ALIASES = {"clip+wd+adam": CHAIN, "chain": CHAIN}

#: SPEC section 6: bytes moved per element for float32 parameters
SPEC_BYTES_FLOAT32 = {
    "Descent": 12, "Momentum": 20, "Nesterov": 20, "RMSProp": 20, "ADAGrad": 20,
    "ADAM": 28, "RADAM": 28, "AdaMax": 28, "NADAM": 28, "ADADelta": 28, "AMSGrad": 36,
}

DTYPES = ("float32", "float16", "float64")
DEFAULT_SIZES = {"cupy": (16, 28), "numpy": (16, 24)}
DEFAULT_REPEATS = {"cupy": 20, "numpy": 5}
DEFAULT_WARMUP = {"cupy": 3, "numpy": 1}
#: a repeat runs this many seconds' worth of steps at least (so tiny sizes are not all noise)
REPEAT_TARGET_S = {"cupy": 2e-3, "numpy": 5e-3}
MAX_INNER = 1000
#: extra memory an unfused baseline needs besides its state, in compute-dtype arrays
UNFUSED_TEMPORARIES = 6
MEMORY_MARGIN = 256 << 20
#: bytes of the buffer whose copy gives the reference bandwidth
COPY_BYTES = {"cupy": 1 << 30, "numpy": 256 << 20}
HOST_CALLS = 50  # update calls timed on the host for the model


class BenchError(Exception):
    """A setting the benchmark cannot run with (no GPU for --backend cupy, no matplotlib...)."""


def state_slots(rule: Rule) -> int:
    """Number of per-element state arrays the rule (or chain) keeps per parameter."""
    return sum(len(leaf.state) for leaf in rule.leaves())


def bytes_per_element(rule: Rule, dtype: Any = "float32") -> int:
    """Bytes one step must move per parameter element.

    The element-wise pass reads ``x`` and ``g`` and writes ``x`` (parameter itemsize each) and
    reads and writes every state slot (state itemsize: 4 for float16 parameters, whose state
    is float32). A chain with reductions (``ClipNorm``) also reads, per reduction pass, what
    that pass needs. For float32 this reproduces SPEC section 6 (:data:`SPEC_BYTES_FLOAT32`).
    """
    dtype = np.dtype(dtype)
    p, s = dtype.itemsize, compute_dtype(dtype).itemsize
    total = 3 * p + 2 * s * state_slots(rule)
    program = plan(rule)
    for level in range(1, program.levels + 1):
        roots = [t.args[0] for t in program.totals_at(level)]
        for node in program.needed(roots):
            if node.op in ("x", "g"):
                total += p
            elif node.op == "load":
                total += s
    return total


def check_spec_bytes() -> dict[str, tuple[int, int]]:
    """Rules whose derived float32 bytes differ from SPEC section 6: name -> (derived, spec)."""
    wrong = {}
    for name, spec in SPEC_BYTES_FLOAT32.items():
        derived = bytes_per_element(RULES[name](), "float32")
        if derived != spec:
            wrong[name] = (derived, spec)
    return wrong


# -- the unfused baseline: each rule as ordinary array expressions -------------------------

_FORMULAS: dict[type, tuple[dict[str, Any], Callable[..., Any]]] = {}


def _formula(cls: type, **initial: Any) -> Callable:
    """Register the plain-expression step of ``cls``; ``initial`` gives each state array's
    starting value (a number, or a function of the rule such as ``lambda r: r.eps``)."""

    def register(fn: Callable) -> Callable:
        _FORMULAS[cls] = (initial, fn)
        return fn

    return register


# Each formula is (xp, r, s, x, d, t) -> new d: xp the array module, r the rule (read its
# hyperparameters), s a dict of this parameter's state arrays, x the parameter, d the incoming
# update, t the step (from 1). Host scalars are Python floats, computed in float64 as a user
# writing these by hand would; every array operation is one whole-array pass, with temporaries.


@_formula(Descent)
def _descent(xp, r, s, x, d, t):
    return r.eta * d


@_formula(Momentum, v=0.0)
def _momentum(xp, r, s, x, d, t):
    s["v"] = r.rho * s["v"] - r.eta * d
    return -s["v"]


@_formula(Nesterov, v=0.0)
def _nesterov(xp, r, s, x, d, t):
    dd = r.rho**2 * s["v"] - (1 + r.rho) * r.eta * d
    s["v"] = r.rho * s["v"] - r.eta * d
    return -dd


@_formula(RMSProp, acc=0.0)
def _rmsprop(xp, r, s, x, d, t):
    s["acc"] = r.rho * s["acc"] + (1 - r.rho) * d**2
    return d * r.eta / (xp.sqrt(s["acc"]) + r.eps)


@_formula(ADAM, m=0.0, v=0.0)
def _adam(xp, r, s, x, d, t):
    b1, b2 = r.beta
    s["m"] = b1 * s["m"] + (1 - b1) * d
    s["v"] = b2 * s["v"] + (1 - b2) * d**2
    return s["m"] / (1 - b1**t) / (xp.sqrt(s["v"] / (1 - b2**t)) + r.eps) * r.eta


@_formula(RADAM, m=0.0, v=0.0)
def _radam(xp, r, s, x, d, t):
    b1, b2 = r.beta
    s["m"] = b1 * s["m"] + (1 - b1) * d
    s["v"] = b2 * s["v"] + (1 - b2) * d**2
    rinf = 2 / (1 - b2) - 1
    rho = rinf - 2 * t * b2**t / (1 - b2**t)
    if rho > 4:
        rect = math.sqrt((rho - 4) * (rho - 2) * rinf / ((rinf - 4) * (rinf - 2) * rho))
        return s["m"] / (1 - b1**t) / (xp.sqrt(s["v"] / (1 - b2**t)) + r.eps) * r.eta * rect
    return s["m"] / (1 - b1**t) * r.eta


@_formula(AdaMax, m=0.0, u=0.0)
def _adamax(xp, r, s, x, d, t):
    b1, b2 = r.beta
    s["m"] = b1 * s["m"] + (1 - b1) * d
    s["u"] = xp.maximum(b2 * s["u"], xp.abs(d))
    return (r.eta / (1 - b1**t)) * s["m"] / (s["u"] + r.eps)


@_formula(ADAGrad, acc=lambda r: r.eps)
def _adagrad(xp, r, s, x, d, t):
    s["acc"] = s["acc"] + d**2
    return d * r.eta / (xp.sqrt(s["acc"]) + r.eps)


@_formula(ADADelta, acc=0.0, dacc=0.0)
def _adadelta(xp, r, s, x, d, t):
    s["acc"] = r.rho * s["acc"] + (1 - r.rho) * d**2
    d = d * xp.sqrt(s["dacc"] + r.eps) / xp.sqrt(s["acc"] + r.eps)
    s["dacc"] = r.rho * s["dacc"] + (1 - r.rho) * d**2
    return d


@_formula(AMSGrad, m=lambda r: r.eps, v=lambda r: r.eps, vhat=lambda r: r.eps)
def _amsgrad(xp, r, s, x, d, t):
    b1, b2 = r.beta
    s["m"] = b1 * s["m"] + (1 - b1) * d
    s["v"] = b2 * s["v"] + (1 - b2) * d**2
    s["vhat"] = xp.maximum(s["vhat"], s["v"])
    return r.eta * s["m"] / (xp.sqrt(s["vhat"]) + r.eps)


@_formula(NADAM, m=0.0, v=0.0)
def _nadam(xp, r, s, x, d, t):
    b1, b2 = r.beta
    s["m"] = b1 * s["m"] + (1 - b1) * d
    s["v"] = b2 * s["v"] + (1 - b2) * d**2
    return (b1 * s["m"] / (1 - b1 * b1**t) + (1 - b1) * d / (1 - b1**t)) / (
        xp.sqrt(s["v"] * b2 / (1 - b2**t)) + r.eps) * r.eta


@_formula(WeightDecay)
def _weight_decay(xp, r, s, x, d, t):
    return d + r.wd * x.astype(d.dtype, copy=False)


@_formula(ClipValue)
def _clip_value(xp, r, s, x, d, t):
    return xp.clip(d, -r.thresh, r.thresh)


@_formula(ClipNorm)
def _clip_norm(xp, r, s, x, d, t):
    norm = float(xp.linalg.norm(d))  # the usual hand-written form (a host sync on a GPU)
    return d * (r.thresh / norm) if norm > r.thresh else d


@_formula(InvDecay)
def _inv_decay(xp, r, s, x, d, t):
    return d / (1 + r.gamma * t)


@_formula(ExpDecay)
def _exp_decay(xp, r, s, x, d, t):
    eta = s.get("eta", r.eta)  # the baseline keeps its own decayed eta
    if t % r.decay_step == 0:
        eta = max(eta * r.decay, r.clip)
    s["eta"] = eta
    return eta * d


class Unfused:
    """``rule`` written as ordinary array expressions on ``xp`` (NumPy or CuPy): the baseline.

    Every operation is a separate pass over whole arrays with fresh temporaries, which is what
    the same formula costs without fusion. The rule object supplies hyperparameters only; the
    baseline keeps its own state (per parameter, created on first use) and step counts, so it
    can run beside gpuopt on a separate copy of the rule. A chain runs its members' formulas in
    order. Raises NotImplementedError for a rule without a formula here (a user-defined rule).
    """

    def __init__(self, rule: Rule, xp: Any):
        self.leaves = rule.leaves()
        missing = sorted({type(leaf).__name__ for leaf in self.leaves if type(leaf) not in _FORMULAS})
        if missing:
            raise NotImplementedError(f"no unfused baseline formula for {', '.join(missing)}")
        self.xp = xp
        self._params: dict[int, tuple[Any, list[int], list[dict[str, Any]]]] = {}

    def _state(self, x: Any) -> tuple[list[int], list[dict[str, Any]]]:
        entry = self._params.get(id(x))
        if entry is None or entry[0] is not x:
            ct = compute_dtype(x.dtype)
            states = []
            for leaf in self.leaves:
                initial = _FORMULAS[type(leaf)][0]
                states.append({
                    name: self.xp.full(x.shape, value(leaf) if callable(value) else value, dtype=ct)
                    for name, value in initial.items()
                })
            entry = self._params[id(x)] = (x, [0], states)
        return entry[1], entry[2]

    def step(self, x: Any, g: Any) -> None:
        """``x -= d`` for one step of the rule: ``x`` in place, ``g`` untouched."""
        count, states = self._state(x)
        count[0] += 1
        t = count[0]
        ct = compute_dtype(x.dtype)
        d = g if g.dtype == ct else g.astype(ct)  # float16: computed in float32, as gpuopt does
        for leaf, s in zip(self.leaves, states):
            d = _FORMULAS[type(leaf)][1](self.xp, leaf, s, x, d, t)
        x -= d

    def step_many(self, params: Sequence[Any], grads: Sequence[Any]) -> None:
        for x, g in zip(params, grads):
            self.step(x, g)


# -- the GPT-2 small model -------------------------------------------------------------------


def gpt2_shapes(n_layer: int = 12, n_embd: int = 768, vocab: int = 50257, n_ctx: int = 1024
                ) -> list[tuple[str, tuple[int, ...]]]:
    """The parameter tensors of GPT-2 small (148 tensors, 124,439,808 parameters by default),
    by their Hugging Face names; ``n_layer`` and ``n_embd`` scale it down for quick runs."""
    e = n_embd
    shapes: list[tuple[str, tuple[int, ...]]] = [("wte", (vocab, e)), ("wpe", (n_ctx, e))]
    for i in range(n_layer):
        h = f"h.{i}."
        shapes += [
            (h + "ln_1.weight", (e,)), (h + "ln_1.bias", (e,)),
            (h + "attn.c_attn.weight", (e, 3 * e)), (h + "attn.c_attn.bias", (3 * e,)),
            (h + "attn.c_proj.weight", (e, e)), (h + "attn.c_proj.bias", (e,)),
            (h + "ln_2.weight", (e,)), (h + "ln_2.bias", (e,)),
            (h + "mlp.c_fc.weight", (e, 4 * e)), (h + "mlp.c_fc.bias", (4 * e,)),
            (h + "mlp.c_proj.weight", (4 * e, e)), (h + "mlp.c_proj.bias", (e,)),
        ]
    shapes += [("ln_f.weight", (e,)), ("ln_f.bias", (e,))]
    return shapes


# -- devices: arrays, clocks and memory ------------------------------------------------------


@dataclass
class Timing:
    """Seconds per step: the median over ``repeats`` repeats of ``inner`` steps each."""

    median: float
    minimum: float
    repeats: int
    inner: int

    def as_dict(self) -> dict[str, Any]:
        return {"time_s": self.median, "time_min_s": self.minimum, "repeats": self.repeats,
                "steps_per_repeat": self.inner}


def _measure(elapsed: Callable[[Callable[[], None]], float], steps: Callable[[int], None],
             repeats: int, warmup: int, target_s: float) -> Timing:
    """Warm up, pick how many steps one repeat runs, then time ``repeats`` repeats."""
    if warmup:
        elapsed(lambda: steps(warmup))
    one = elapsed(lambda: steps(1))
    inner = max(1, min(MAX_INNER, math.ceil(target_s / max(one, 1e-7))))
    times = [elapsed(lambda: steps(inner)) / inner for _ in range(repeats)]
    return Timing(statistics.median(times), min(times), repeats, inner)


class NumpyDevice:
    """The CPU: NumPy arrays, ``perf_counter``, MemAvailable."""

    kind = "numpy"

    def __init__(self) -> None:
        self.xp = np

    def name(self) -> str:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                for line in f:
                    if line.lower().startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine() or "unknown CPU"

    def info(self) -> dict[str, Any]:
        return {"cpu_count": os.cpu_count(), "platform": platform.platform()}

    def sync(self) -> None:
        pass

    def elapsed(self, fn: Callable[[], None]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def random(self, shape: Any, dtype: np.dtype, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        if dtype == np.float16:
            return rng.standard_normal(shape, dtype=np.float32).astype(np.float16)
        return rng.standard_normal(shape, dtype=dtype)

    def free_bytes(self) -> int | None:
        try:
            with open("/proc/meminfo", encoding="utf-8") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        return None

    def release(self, collect: bool = False) -> None:
        if collect:
            gc.collect()

    def copy_bandwidth(self, repeats: int) -> dict[str, Any]:
        """GB/s of ``np.copyto`` between two 256 MiB buffers (bytes read + written): far larger
        than any cache, so it is memory bandwidth."""
        nbytes = COPY_BYTES["numpy"]
        free = self.free_bytes()
        if free is not None:
            nbytes = min(nbytes, max(free // 4, 1 << 20))
        n = nbytes // 4
        src = np.ones(n, dtype=np.float32)
        dst = np.zeros(n, dtype=np.float32)
        timing = _measure(self.elapsed, lambda m: [np.copyto(dst, src) for _ in range(m)],
                          max(repeats, 5), 1, 0.0)
        gbps = 2 * n * 4 / timing.median / 1e9
        return {"gbps": gbps, "method": "np.copyto", "buffer_bytes": n * 4, "time_s": timing.median}


class CupyDevice:
    """A CUDA GPU through CuPy: CUDA events, memGetInfo, the default memory pool."""

    kind = "cupy"

    def __init__(self) -> None:
        import cupy

        self.xp = cupy
        self.cupy = cupy

    def _props(self) -> dict[str, Any]:
        cupy = self.cupy
        return cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)

    def name(self) -> str:
        name = self._props()["name"]
        return name.decode() if isinstance(name, bytes) else str(name)

    def info(self) -> dict[str, Any]:
        cupy = self.cupy
        props = self._props()
        info: dict[str, Any] = {
            "device_id": cupy.cuda.Device().id,
            "total_memory_bytes": int(props.get("totalGlobalMem", 0)),
            "compute_capability": f"{props.get('major')}.{props.get('minor')}",
            "multiprocessors": props.get("multiProcessorCount"),
        }
        for key, fn in (("cuda_runtime", cupy.cuda.runtime.runtimeGetVersion),
                        ("cuda_driver", cupy.cuda.runtime.driverGetVersion)):
            try:
                info[key] = fn()
            except Exception:  # noqa: BLE001 - informational only
                info[key] = None
        return info

    def sync(self) -> None:
        self.cupy.cuda.Device().synchronize()

    def elapsed(self, fn: Callable[[], None]) -> float:
        cuda = self.cupy.cuda
        self.sync()
        start, end = cuda.Event(), cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return cuda.get_elapsed_time(start, end) / 1e3

    def random(self, shape: Any, dtype: np.dtype, seed: int) -> Any:
        rs = self.cupy.random.RandomState(seed)
        if dtype == np.float16:
            return rs.standard_normal(shape, dtype=np.float32).astype(np.float16)
        return rs.standard_normal(shape, dtype=dtype)

    def free_bytes(self) -> int | None:
        self.release()
        free, _total = self.cupy.cuda.runtime.memGetInfo()
        return int(free) + int(self.cupy.get_default_memory_pool().free_bytes())

    def release(self, collect: bool = False) -> None:
        if collect:
            gc.collect()
        self.cupy.get_default_memory_pool().free_all_blocks()
        self.cupy.get_default_pinned_memory_pool().free_all_blocks()
        torch = sys.modules.get("torch")
        if torch is not None:
            try:
                if torch.cuda.is_initialized():
                    torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001 - best effort
                pass

    def copy_bandwidth(self, repeats: int) -> dict[str, Any]:
        """GB/s of a device-to-device copy of a 1 GiB buffer (bytes read + written): both
        cudaMemcpy and a plain copy kernel are timed, and the faster is the reference."""
        cupy = self.cupy
        nbytes = COPY_BYTES["cupy"]
        free = self.free_bytes()
        if free is not None:
            nbytes = min(nbytes, max((free - MEMORY_MARGIN) // 3, 1 << 20))
        n = nbytes // 4
        src = cupy.ones(n, dtype=cupy.float32)
        dst = cupy.zeros(n, dtype=cupy.float32)
        kernel = cupy.ElementwiseKernel("T x", "T y", "y = x", "gpuopt_bench_copy")
        memcpy = _measure(self.elapsed, lambda m: [dst.data.copy_from_device_async(src.data, n * 4)
                                                    for _ in range(m)], max(repeats, 10), 3, 0.0)
        copy_kernel = _measure(self.elapsed, lambda m: [kernel(src, dst) for _ in range(m)],
                               max(repeats, 10), 3, 0.0)
        rates = {"cudaMemcpy": 2 * n * 4 / memcpy.median / 1e9,
                 "copy_kernel": 2 * n * 4 / copy_kernel.median / 1e9}
        best = max(rates, key=rates.get)
        return {"gbps": rates[best], "method": best, "memcpy_gbps": rates["cudaMemcpy"],
                "copy_kernel_gbps": rates["copy_kernel"], "buffer_bytes": n * 4,
                "time_s": (memcpy if best == "cudaMemcpy" else copy_kernel).median}


def _torch_module(cuda: bool) -> Any:
    """PyTorch, if importable (and with CUDA when ``cuda``), else None."""
    try:
        import torch
    except Exception:  # noqa: BLE001 - an optional comparison
        return None
    if cuda:
        try:
            if not torch.cuda.is_available():
                return None
        except Exception:  # noqa: BLE001
            return None
    return torch


def _torch_elapsed(torch: Any, device: Any) -> Callable[[Callable[[], None]], float]:
    if device.kind == "numpy":
        return device.elapsed

    def elapsed(fn: Callable[[], None]) -> float:
        device.sync()
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    return elapsed


def _torch_view(torch: Any, array: Any) -> Any:
    """A PyTorch tensor sharing ``array``'s memory (DLPack on the GPU, from_numpy on the CPU)."""
    if isinstance(array, np.ndarray):
        return torch.from_numpy(array)
    return torch.from_dlpack(array)


def _torch_variants(device: Any) -> list[tuple[str, dict[str, Any]]]:
    """(name, Adam keyword arguments) of the PyTorch baselines on this device."""
    if device.kind == "cupy":
        return [("torch_fused", {"fused": True}), ("torch_foreach", {"foreach": True})]
    return [("torch", {}), ("torch_fused", {"fused": True})]


# -- progress --------------------------------------------------------------------------------


class Progress:
    """One updating line on a terminal; plain lines otherwise (logs, CI). Writes to stderr."""

    def __init__(self, stream: Any = None, enabled: bool = True):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        try:
            self.tty = bool(self.stream.isatty())
        except (AttributeError, ValueError):
            self.tty = False
        self._width = 0

    def __call__(self, message: str, minor: bool = False) -> None:
        """Show ``message``; a ``minor`` one (a phase within a step) only on a terminal."""
        if not self.enabled or (minor and not self.tty):
            return
        if self.tty:
            columns = shutil.get_terminal_size((100, 20)).columns - 1
            line = message[:columns]
            self.stream.write("\r" + line + " " * max(0, self._width - len(line)))
            self._width = len(line)
        else:
            self.stream.write(message + "\n")
        self.stream.flush()

    def note(self, message: str) -> None:
        """A line that stays (a skipped size, a failed baseline)."""
        if not self.enabled:
            return
        self.close()
        self.stream.write(message + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


# -- parsing options -----------------------------------------------------------------------


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside parentheses: ``"ADAM(1e-3, (0.9, 0.99)),Descent"`` is two items."""
    items, depth, current = [], 0, []
    for ch in text:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def parse_rules(text: str) -> list[tuple[str, Callable[[], Rule]]]:
    """``--rules``: ``all``, or a comma list of names from :data:`RULES` (case-insensitive;
    ``Clip+WD+ADAM`` is the chain) or optimiser expressions such as ``ClipNorm(1)+ADAM(1e-3)``
    (read by :func:`gpuopt.demo.parse_optimiser`, never evaluated as Python)."""
    if text.strip().lower() == "all":
        return list(RULES.items())
    by_lower = {name.lower(): name for name in RULES}
    chosen: list[tuple[str, Callable[[], Rule]]] = []
    for item in _split_top_level(text):
        key = item.lower()
        name = _ALIASES.get(key) or by_lower.get(key)
        if name is not None:
            factory = RULES[name]
        else:
            from .demo import parse_optimiser

            try:
                parse_optimiser(item)
            except (ValueError, TypeError) as exc:
                raise argparse.ArgumentTypeError(
                    f"{exc} (--rules takes 'all' or a comma list of {', '.join(RULES)} "
                    "or optimiser expressions)") from None
            name = item

            def factory(text: str = item) -> Rule:
                return parse_optimiser(text)
        if name not in (n for n, _ in chosen):
            chosen.append((name, factory))
    if not chosen:
        raise argparse.ArgumentTypeError("--rules is empty")
    return chosen


def parse_sizes(text: str) -> list[int]:
    """``--sizes``: log2 of the element counts, ``16-28`` (a range) or ``10,12,20`` (a list),
    or a mix (``10,16-20``)."""
    sizes: set[int] = set()
    for item in _split_top_level(text):
        match = re.fullmatch(r"(\d+)\s*-\s*(\d+)", item)
        try:
            if match:
                lo, hi = int(match.group(1)), int(match.group(2))
                if lo > hi:
                    raise ValueError
                sizes.update(range(lo, hi + 1))
            else:
                sizes.add(int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bad size {item!r}: give log2 element counts as a range (16-28) or a comma "
                "list (10,12)") from None
    if not sizes:
        raise argparse.ArgumentTypeError("--sizes is empty")
    if min(sizes) < 0 or max(sizes) > 34:
        raise argparse.ArgumentTypeError("--sizes are log2 element counts between 0 and 34")
    return sorted(sizes)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the benchmark's options on ``parser``."""
    parser.add_argument("--rules", type=parse_rules, default="all", metavar="LIST",
                        help=f"comma list of rules or optimiser expressions (default: all: "
                             f"{', '.join(RULES)})")
    parser.add_argument("--sizes", type=parse_sizes, default=None, metavar="LOG2",
                        help="log2 element counts: a range (16-28) or a comma list (10,12) "
                             "(default: 16-28 on a GPU, 16-24 on NumPy)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="parameter dtype (default: float32)")
    parser.add_argument("--backend", choices=("auto", "numpy", "cupy"), default="auto",
                        help="array backend; auto picks cupy only where a GPU is usable (default: auto)")
    parser.add_argument("--repeats", type=_positive_int, default=None, metavar="N",
                        help="timed repeats per measurement, the median is reported "
                             "(default: 20 on a GPU, 5 on NumPy)")
    parser.add_argument("--warmup", type=_non_negative_int, default=None, metavar="N",
                        help="untimed steps before timing (default: 3 on a GPU, 1 on NumPy)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="write the results as JSON to PATH (a directory: a file named by "
                             "device and date inside it, e.g. benchmarks/results/)")
    parser.add_argument("--plot", default=None, metavar="PATH",
                        help="write a PNG of GB/s against size (needs matplotlib: gpuopt[plot])")
    parser.add_argument("--model", action=argparse.BooleanOptionalAction, default=True,
                        help="compare one multi-tensor update of GPT-2 small's 148 tensors with a "
                             "per-tensor loop, one flat tensor and PyTorch (default: on)")
    parser.add_argument("--model-layers", type=_positive_int, default=12, metavar="N",
                        help="transformer blocks of the model (default: 12, GPT-2 small)")
    parser.add_argument("--model-width", type=_positive_int, default=768, metavar="N",
                        help="embedding width of the model (default: 768, GPT-2 small)")
    parser.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                        help="time the unfused array-expression baselines (default: on)")
    parser.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True,
                        help="compare with torch.optim.Adam where PyTorch is importable (default: on)")
    parser.add_argument("--fail-on-targets", action="store_true",
                        help="exit with status 1 when a measured SPEC target is not met")
    parser.add_argument("--quiet", action="store_true", help="no progress display")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench`` on ``python -m gpuopt``'s subcommands."""
    p = subparsers.add_parser(
        "bench",
        help="time update steps per rule and size against copy bandwidth and baselines",
        description=(
            "Time gpuopt.update for each rule and size (CUDA events on a GPU, perf_counter on "
            "NumPy) and report time per step, GB/s, the percentage of the copy bandwidth "
            "measured in the same run, speedups over the unfused array-expression formula and "
            "PyTorch's Adam, a GPT-2-small model comparison and the SPEC section 6 targets."
        ),
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Config:
    backend: str
    rules: list[tuple[str, Callable[[], Rule]]]
    sizes: list[int]
    dtype: np.dtype
    repeats: int
    warmup: int
    model: bool = True
    model_layers: int = 12
    model_width: int = 768
    baselines: bool = True
    torch: bool = True
    options: dict[str, Any] = field(default_factory=dict)


def _pick_backend(name: str) -> str:
    if name == "auto":
        return "cupy" if gpu_available() else "numpy"
    if name == "cupy" and not gpu_available():
        why = ("CuPy is not installed (pip install 'gpuopt[cuda12]')" if cupy_module() is None
               else "CuPy cannot see a usable CUDA GPU")
        raise BenchError(f"--backend cupy needs a GPU, but {why}; use --backend numpy or auto")
    if name not in ("numpy", "cupy"):
        raise BenchError(f"unknown backend {name!r}; expected auto, numpy or cupy")
    return name


def _config(args: argparse.Namespace) -> Config:
    backend = _pick_backend(getattr(args, "backend", "auto"))
    rules = args.rules if not isinstance(args.rules, str) else parse_rules(args.rules)
    sizes = args.sizes
    if sizes is None:
        lo, hi = DEFAULT_SIZES[backend]
        sizes = list(range(lo, hi + 1))
    elif isinstance(sizes, str):
        sizes = parse_sizes(sizes)
    if getattr(args, "plot", None):
        _matplotlib()  # fail now, not after the whole run
    return Config(
        backend=backend, rules=rules, sizes=sizes, dtype=np.dtype(args.dtype),
        repeats=args.repeats or DEFAULT_REPEATS[backend],
        warmup=DEFAULT_WARMUP[backend] if args.warmup is None else args.warmup,
        model=args.model, model_layers=args.model_layers, model_width=args.model_width,
        baselines=args.baselines, torch=args.torch,
    )


def _versions() -> dict[str, Any]:
    from . import __version__

    versions: dict[str, Any] = {"gpuopt": __version__, "numpy": np.__version__,
                                "python": platform.python_version()}
    cupy = cupy_module()
    versions["cupy"] = getattr(cupy, "__version__", None) if cupy is not None else None
    try:
        versions["torch"] = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        versions["torch"] = None
    return versions


class _Runner:
    """One benchmark run: owns the device, the progress display and the report being built."""

    def __init__(self, config: Config, progress: Progress):
        self.config = config
        self.progress = progress
        self.device: Any = CupyDevice() if config.backend == "cupy" else NumpyDevice()
        self.target_s = REPEAT_TARGET_S[config.backend]
        self.notes: list[str] = []
        self._torch: Any = False  # not looked up yet

    # -- helpers ------------------------------------------------------------------------

    def note(self, message: str) -> None:
        self.notes.append(message)
        self.progress.note(f"note: {message}")

    def torch(self) -> Any:
        if self._torch is False:
            self._torch = _torch_module(self.config.backend == "cupy") if self.config.torch else None
        return self._torch

    def measure(self, steps: Callable[[int], None], elapsed: Callable | None = None) -> Timing:
        c = self.config
        return _measure(elapsed or self.device.elapsed, steps, c.repeats, c.warmup, self.target_s)

    def attempt(self, what: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run a baseline; a failure is recorded (and shown) instead of ending the run."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - a baseline must not end the benchmark
            message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            self.note(f"{what} failed: {message}")
            return {"error": message}
        finally:
            self.device.release()

    @staticmethod
    def _gpuopt_steps(rule: Rule, x: Any, g: Any) -> Callable[[int], None]:
        def steps(m: int) -> None:
            for _ in range(m):
                update(rule, x, g)
        return steps

    def _torch_adam(self, params: list[Any], grads: list[Any], kwargs: dict[str, Any]) -> Timing:
        torch = self.torch()
        tparams = [_torch_view(torch, p) for p in params]
        for tp, g in zip(tparams, grads):
            tp.grad = _torch_view(torch, g)
        opt = torch.optim.Adam(tparams, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, **kwargs)

        def steps(m: int) -> None:
            for _ in range(m):
                opt.step()

        try:
            return self.measure(steps, _torch_elapsed(torch, self.device))
        finally:  # free its state now rather than at the next garbage collection
            opt.state.clear()
            for tp in tparams:
                tp.grad = None

    # -- the phases -----------------------------------------------------------------------

    def sizes(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        results: list[dict[str, Any]] = []
        skipped: list[dict[str, Any]] = []
        self._done, self._total = 0, len(self.config.sizes) * len(self.config.rules)
        for k in self.config.sizes:
            self.device.release(collect=True)  # a full collection (slow with torch loaded) per size
            self._one_size(k, results, skipped)
        return results, skipped

    def _one_size(self, k: int, results: list[dict[str, Any]], skipped: list[dict[str, Any]]) -> None:
        c, device = self.config, self.device
        n = 1 << k
        free = device.free_bytes()
        data = 2 * n * c.dtype.itemsize + (n * 4 if c.dtype == np.float16 else 0)
        if free is not None and data + MEMORY_MARGIN > free:
            reason = f"x and g need {data / 2**30:.2f} GiB but {free / 2**30:.2f} GiB is free"
            skipped.append({"log2": k, "elements": n, "reason": reason})
            self.note(f"skipping 2^{k}: {reason}")
            self._done += len(c.rules)
            return
        x = device.random(n, c.dtype, seed=k)
        g = device.random(n, c.dtype, seed=1000 + k)
        for name, factory in c.rules:
            self._done += 1
            entry = self._one_rule(k, name, factory, x, g, skipped)
            device.release()
            if entry is not None:
                results.append(entry)

    def _one_rule(self, k: int, name: str, factory: Callable[[], Rule], x: Any, g: Any,
                  skipped: list[dict[str, Any]]) -> dict[str, Any] | None:
        c, device = self.config, self.device
        n = 1 << k
        where = f"[{self._done}/{self._total}] 2^{k} {name}"
        s_size = compute_dtype(c.dtype).itemsize
        probe = factory()
        slots = state_slots(probe)
        bpe = bytes_per_element(probe, c.dtype)
        is_adam = type(probe) is ADAM
        free = device.free_bytes()
        need = slots * s_size * n + MEMORY_MARGIN
        if free is not None and need > free:
            reason = f"its state needs {need / 2**30:.2f} GiB but {free / 2**30:.2f} GiB is free"
            skipped.append({"log2": k, "elements": n, "rule": name, "reason": reason})
            self.note(f"skipping {name} at 2^{k}: {reason}")
            return None
        self.progress(f"{where}: gpuopt")
        rule = factory()
        timing = self.measure(self._gpuopt_steps(rule, x, g))
        rule.reset()  # frees its state now (the state map is in a reference cycle)
        device.release()
        entry: dict[str, Any] = {
            "rule": name, "log2": k, "elements": n, "dtype": c.dtype.name, "bytes_per_element": bpe,
            "bytes": bpe * n, **timing.as_dict(), "gbps": bpe * n / timing.median / 1e9, "baselines": {},
        }
        baselines = entry["baselines"]
        if c.baselines:
            free = device.free_bytes()
            need = (slots + UNFUSED_TEMPORARIES) * s_size * n + MEMORY_MARGIN
            if free is not None and need > free:
                baselines["unfused"] = {"error": "skipped: not enough free memory"}
                self.note(f"unfused baseline for {name} at 2^{k} skipped: not enough memory")
            else:
                self.progress(f"{where}: unfused {device.xp.__name__} expressions", minor=True)
                baselines["unfused"] = self.attempt(
                    f"unfused {name} at 2^{k}", lambda: self._unfused(factory, x, g))
        if is_adam and self.torch() is not None:
            for variant, kwargs in _torch_variants(device):
                self.progress(f"{where}: {variant}", minor=True)
                baselines[variant] = self.attempt(
                    f"{variant} at 2^{k}", lambda kwargs=kwargs: self._torch_adam([x], [g], kwargs).as_dict())
        for base in baselines.values():
            if "time_s" in base:
                base["speedup"] = base["time_s"] / timing.median
        return entry

    def _unfused(self, factory: Callable[[], Rule], x: Any, g: Any) -> dict[str, Any]:
        try:
            plain = Unfused(factory(), self.device.xp)
        except NotImplementedError as exc:
            return {"error": str(exc)}
        return self.measure(lambda m: [plain.step(x, g) for _ in range(m)]).as_dict()

    def model(self) -> dict[str, Any]:
        c, device = self.config, self.device
        shapes = gpt2_shapes(c.model_layers, c.model_width)
        total = sum(math.prod(shape) for _, shape in shapes)
        bpe = bytes_per_element(ADAM(), c.dtype)
        info: dict[str, Any] = {
            "rule": "ADAM", "dtype": c.dtype.name, "tensors": len(shapes), "parameters": total,
            "layers": c.model_layers, "width": c.model_width, "bytes_per_element": bpe,
            "shapes": {name: list(shape) for name, shape in shapes},
        }
        device.release(collect=True)
        free = device.free_bytes()
        s_size = compute_dtype(c.dtype).itemsize
        need = total * (2 * c.dtype.itemsize + (2 + UNFUSED_TEMPORARIES) * s_size) + MEMORY_MARGIN
        if free is not None and need > free:
            info["skipped"] = f"needs about {need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free"
            self.note(f"model comparison skipped: {info['skipped']}")
            return info
        variants: dict[str, dict[str, Any]] = {}

        def record(name: str, timing: Timing | dict[str, Any]) -> dict[str, Any]:
            """Store a variant's timing (or the error a baseline failed with)."""
            if isinstance(timing, Timing):
                variants[name] = {**timing.as_dict(), "gbps": bpe * total / timing.median / 1e9}
            else:
                variants[name] = timing
            return variants[name]

        label = f"model ({len(shapes)} tensors, {total / 1e6:.1f}M parameters)"
        self._model_tensors(shapes, label, record)
        device.release(collect=True)
        self.progress(f"{label}: one flat tensor of the same size", minor=True)
        x = device.random(total, c.dtype, seed=1)
        g = device.random(total, c.dtype, seed=2)
        opt = ADAM()
        record("flat", self.measure(self._gpuopt_steps(opt, x, g)))
        opt.reset()
        x = g = None
        device.release(collect=True)

        multi = variants["multi_tensor"]["time_s"]
        for name, v in variants.items():
            if name != "multi_tensor" and "time_s" in v:
                v["ratio_to_multi_tensor"] = v["time_s"] / multi
        info["variants"] = variants
        return info

    def _model_tensors(self, shapes: list[tuple[str, tuple[int, ...]]], label: str,
                       record: Callable[[str, Timing | dict[str, Any]], dict[str, Any]]) -> None:
        """Every variant that runs on the model's separate tensors (freed on return)."""
        c, device = self.config, self.device
        params = [device.random(shape, c.dtype, seed=i) for i, (_, shape) in enumerate(shapes)]
        grads = [device.random(shape, c.dtype, seed=10_000 + i) for i, (_, shape) in enumerate(shapes)]

        self.progress(f"{label}: gpuopt multi-tensor update")
        opt = ADAM()
        entry = record("multi_tensor", self.measure(lambda m: [update(opt, params, grads) for _ in range(m)]))
        if device.kind == "cupy":
            self.progress(f"{label}: host time per update call", minor=True)
            device.sync()
            host = []
            for _ in range(HOST_CALLS):
                start = time.perf_counter()
                update(opt, params, grads)
                host.append(time.perf_counter() - start)
            device.sync()
            entry["host_time_s"] = statistics.median(host)
            entry["host_time_min_s"] = min(host)
            entry["host_calls"] = HOST_CALLS
        opt.reset()
        device.release(collect=True)  # a prepared collection update sits in a reference cycle

        self.progress(f"{label}: gpuopt per-tensor loop", minor=True)
        loop_opt = ADAM()

        def loop(m: int) -> None:
            for _ in range(m):
                for p, q in zip(params, grads):
                    update(loop_opt, p, q)

        record("per_tensor_loop", self.measure(loop))
        loop_opt.reset()
        device.release(collect=True)

        if c.baselines:
            self.progress(f"{label}: unfused loop", minor=True)

            def unfused() -> dict[str, Any]:
                plain = Unfused(ADAM(), device.xp)
                return record("unfused_loop", self.measure(
                    lambda m: [plain.step_many(params, grads) for _ in range(m)]))

            outcome = self.attempt("unfused model loop", unfused)
            if "error" in outcome:
                record("unfused_loop", outcome)
        if self.torch() is not None:
            for variant, kwargs in _torch_variants(device):
                self.progress(f"{label}: {variant}", minor=True)
                outcome = self.attempt(f"{variant} on the model",
                                       lambda variant=variant, kwargs=kwargs: record(
                                           variant, self._torch_adam(params, grads, kwargs)))
                if "error" in outcome:
                    record(variant, outcome)


def benchmark(config: Config | argparse.Namespace, progress: Progress | None = None) -> dict[str, Any]:
    """Run the benchmark and return the report (what ``--json`` writes)."""
    if isinstance(config, argparse.Namespace):
        config = _config(config)
    progress = progress or Progress(enabled=False)
    wrong = check_spec_bytes()
    if wrong:  # the derivation and the SPEC table disagree: say so, loudly, in the report
        progress.note(f"warning: bytes per element differ from SPEC section 6: {wrong}")
    runner = _Runner(config, progress)
    device = runner.device
    started = time.perf_counter()
    try:
        progress("measuring copy bandwidth")
        copy = device.copy_bandwidth(config.repeats)
        device.release()
        results, skipped = runner.sizes()
        model = runner.model() if config.model else None
    finally:
        progress.close()
    for entry in results:
        entry["pct_copy"] = 100.0 * entry["gbps"] / copy["gbps"]
        entry["time_at_copy_bw_s"] = entry["bytes"] / (copy["gbps"] * 1e9)
    report: dict[str, Any] = {
        "schema": 1,
        "device": {"name": device.name(), "backend": config.backend, **device.info()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "config": {
            "rules": [name for name, _ in config.rules], "sizes_log2": config.sizes,
            "dtype": config.dtype.name, "repeats": config.repeats, "warmup": config.warmup,
            "model": config.model, "baselines": config.baselines, "torch": config.torch,
            "timer": "CUDA events" if config.backend == "cupy" else "time.perf_counter",
        },
        "bytes_per_element_check": {"spec_section_6_float32": "ok" if not wrong else
                                    {k: {"derived": d, "spec": s} for k, (d, s) in wrong.items()}},
        "copy_bandwidth": copy,
        "results": results,
        "skipped": skipped,
        "model": model,
        "notes": runner.notes,
        "elapsed_s": time.perf_counter() - started,
    }
    report["targets"] = evaluate_targets(report)
    return report


# -- targets (SPEC section 6 and the issue) ------------------------------------------------


def _find(report: dict[str, Any], rule: str, log2: int | None = None) -> dict[str, Any] | None:
    matches = [r for r in report["results"] if r["rule"] == rule and (log2 is None or r["log2"] == log2)]
    return max(matches, key=lambda r: r["log2"]) if matches else None


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target as ``{"id", "description", "status", "value", "limit", "detail"}``, where
    status is ``met``, ``not met`` or ``not measured`` (with the reason in ``detail``)."""
    backend = report["device"]["backend"]
    dtype = report["config"]["dtype"]
    model = report.get("model") or {}
    variants = model.get("variants") or {}
    targets: list[dict[str, Any]] = []

    def target(tid: str, description: str, needs: str, check: Callable[[], tuple[float, str] | str],
               limit: float, strict: bool = False) -> None:
        value, detail = None, ""
        if needs != backend:
            status = "not measured"
            detail = f"needs a {'GPU (cupy)' if needs == 'cupy' else 'NumPy'} run; this run used {backend}"
        elif dtype != "float32":
            status, detail = "not measured", f"defined for float32; this run used {dtype}"
        else:
            outcome = check()
            if isinstance(outcome, str):
                status, detail = "not measured", outcome
            else:
                value, detail = outcome
                ok = value < limit if strict else value <= limit
                status = "met" if ok else "not met"
        targets.append({"id": tid, "description": description, "status": status, "value": value,
                        "limit": limit, "detail": detail})

    def adam_copy() -> tuple[float, str] | str:
        r = _find(report, "ADAM", 28)
        if r is None:
            return "ADAM at 2^28 was not measured (--sizes must include 28, --rules ADAM)"
        ratio = r["time_s"] / r["time_at_copy_bw_s"]
        return ratio, (f"{_fmt_time(r['time_s'])} per step vs {_fmt_time(r['time_at_copy_bw_s'])} "
                       f"at copy bandwidth ({r['pct_copy']:.1f}% of copy)")

    def adam_torch() -> tuple[float, str] | str:
        r = _find(report, "ADAM", 28)
        if r is None:
            return "ADAM at 2^28 was not measured"
        base = r["baselines"].get("torch_fused", {})
        if "time_s" not in base:
            why = base.get("error", "PyTorch with CUDA not importable")
            return f"torch.optim.Adam(fused=True) not measured ({why})"
        return r["time_s"] / base["time_s"], (f"gpuopt {_fmt_time(r['time_s'])} vs torch fused "
                                              f"{_fmt_time(base['time_s'])}")

    def model_torch() -> tuple[float, str] | str:
        if "multi_tensor" not in variants or "time_s" not in variants.get("torch_fused", {}):
            return "model comparison with torch fused Adam not measured"
        a, b = variants["multi_tensor"]["time_s"], variants["torch_fused"]["time_s"]
        return a / b, f"gpuopt {_fmt_time(a)} vs torch fused {_fmt_time(b)} ({model['tensors']} tensors)"

    def model_flat() -> tuple[float, str] | str:
        if "multi_tensor" not in variants or "flat" not in variants:
            return "model comparison not measured (--model)"
        a, b = variants["multi_tensor"]["time_s"], variants["flat"]["time_s"]
        return a / b, f"{model['tensors']} tensors {_fmt_time(a)} vs one flat tensor {_fmt_time(b)}"

    def host_time() -> tuple[float, str] | str:
        host = variants.get("multi_tensor", {}).get("host_time_s")
        if host is None:
            return "host time not measured (--model)"
        return host * 1e6, f"median host time of update() on {model['tensors']} tensors, no sync"

    def chain_adam() -> tuple[float, str] | str:
        common = {r["log2"] for r in report["results"] if r["rule"] == "ADAM"} & {
            r["log2"] for r in report["results"] if r["rule"] == CHAIN}
        if not common:
            return f"ADAM and {CHAIN} not both measured"
        k = max(common)
        a, b = _find(report, CHAIN, k)["time_s"], _find(report, "ADAM", k)["time_s"]
        return a / b, f"at 2^{k}: chain {_fmt_time(a)} vs ADAM {_fmt_time(b)}"

    def numpy_plain() -> tuple[float, str] | str:
        r = _find(report, "ADAM", 24)
        if r is None:
            return "ADAM at 2^24 was not measured (--sizes must include 24)"
        base = r["baselines"].get("unfused", {})
        if "time_s" not in base:
            return "plain NumPy formula not measured (--baselines)"
        return r["time_s"] / base["time_s"], (f"gpuopt {_fmt_time(r['time_s'])} vs plain NumPy "
                                              f"{_fmt_time(base['time_s'])}")

    target("gpu_adam_copy_bandwidth", "GPU: ADAM 2^28 float32 within 1.1x of bytes moved / copy bandwidth",
           "cupy", adam_copy, 1.1)
    target("gpu_adam_vs_torch_fused", "GPU: ADAM 2^28 float32 no slower than torch.optim.Adam(fused=True)",
           "cupy", adam_torch, 1.0)
    target("gpu_model_vs_torch_fused", "GPU: GPT-2 model ADAM no slower than torch.optim.Adam(fused=True)",
           "cupy", model_torch, 1.0)
    target("gpu_model_vs_flat", "GPU: 150-tensor model within 1.15x of one flat tensor of the same size",
           "cupy", model_flat, 1.15)
    target("gpu_host_time", "GPU: host time per update call (multi-tensor model) under 100 us",
           "cupy", host_time, 100.0, strict=True)
    target("gpu_chain_vs_adam", f"GPU: {CHAIN} within 1.05x of ADAM",
           "cupy", chain_adam, 1.05)
    target("numpy_adam_vs_plain", "NumPy: ADAM 2^24 float32 at most 0.4x the time of the plain-NumPy formula",
           "numpy", numpy_plain, 0.4)
    return targets


# -- output ----------------------------------------------------------------------------------


def _fmt_time(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds:.3f} s"


def _speedup(entry: dict[str, Any], key: str) -> str:
    base = entry.get("baselines", {}).get(key)
    if not base:
        return ""
    if "speedup" not in base:
        return "error" if "error" in base else ""
    return f"{base['speedup']:.2f}x"


def format_report(report: dict[str, Any]) -> str:
    """The human-readable summary: header, per rule and size table, model, targets."""
    dev, copy = report["device"], report["copy_bandwidth"]
    lines = [
        f"gpuopt bench: {dev['backend']} on {dev['name']}, {report['config']['dtype']}, "
        f"{report['config']['timer']}, median of {report['config']['repeats']} repeats",
        f"copy bandwidth: {copy['gbps']:.1f} GB/s ({copy['method']}"
        + (f"; cudaMemcpy {copy['memcpy_gbps']:.1f}, copy kernel {copy['copy_kernel_gbps']:.1f}"
           if "memcpy_gbps" in copy else "") + ")",
        "",
    ]
    baseline_keys: list[str] = []
    for entry in report["results"]:
        for key in entry["baselines"]:
            if key not in baseline_keys:
                baseline_keys.append(key)
    names = {"unfused": "vs unfused", "torch": "vs torch", "torch_fused": "vs torch fused",
             "torch_foreach": "vs torch foreach"}
    width = max([len(e["rule"]) for e in report["results"]] + [4])
    header = (f"{'rule':<{width}}  {'size':>5}  {'B/elem':>6}  {'time/step':>11}  {'GB/s':>8}  "
              f"{'% copy':>6}" + "".join(f"  {names.get(k, k):>16}" for k in baseline_keys))
    lines += [header, "-" * len(header)]
    for e in report["results"]:
        lines.append(
            f"{e['rule']:<{width}}  {'2^' + str(e['log2']):>5}  {e['bytes_per_element']:>6}  "
            f"{_fmt_time(e['time_s']):>11}  {e['gbps']:>8.1f}  {e['pct_copy']:>5.1f}%"
            + "".join(f"  {_speedup(e, k):>16}" for k in baseline_keys))
    if not report["results"]:
        lines.append("(no results)")
    lines.append("speedup = baseline time / gpuopt time (above 1: gpuopt is faster)")
    for skip in report["skipped"]:
        what = f"{skip['rule']} at " if "rule" in skip else ""
        lines.append(f"skipped {what}2^{skip['log2']}: {skip['reason']}")
    model = report.get("model")
    if model:
        lines += ["", f"model: GPT-2 small shapes ({model['tensors']} tensors, "
                      f"{model['parameters'] / 1e6:.1f}M parameters, {model['layers']} blocks, width "
                      f"{model['width']}), ADAM {model['dtype']}"]
        if "skipped" in model:
            lines.append(f"  skipped: {model['skipped']}")
        labels = {"multi_tensor": "gpuopt, one update call", "per_tensor_loop": "gpuopt, per-tensor loop",
                  "flat": "gpuopt, one flat tensor", "unfused_loop": "unfused expressions, loop",
                  "torch": "torch.optim.Adam", "torch_fused": "torch Adam(fused=True)",
                  "torch_foreach": "torch Adam(foreach=True)"}
        for name, v in (model.get("variants") or {}).items():
            ratio = v.get("ratio_to_multi_tensor")
            extra = f"  {ratio:.2f}x the one-call time" if ratio is not None else ""
            if "host_time_s" in v:
                extra += f"  (host time per call {_fmt_time(v['host_time_s'])})"
            if "time_s" not in v:
                lines.append(f"  {labels.get(name, name):<28} error: {v.get('error', '?')}")
                continue
            gbps = f"{v['gbps']:>8.1f} GB/s" if "gbps" in v else ""
            lines.append(f"  {labels.get(name, name):<28} {_fmt_time(v['time_s']):>11}  {gbps}{extra}")
    lines += ["", "targets:"]
    for t in report["targets"]:
        value = "" if t["value"] is None else f" = {t['value']:.3g} (limit {t['limit']:g})"
        detail = f": {t['detail']}" if t["detail"] else ""
        lines.append(f"  [{t['status']}] {t['description']}{value}{detail}")
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def write_json(report: dict[str, Any], path: str) -> str:
    """Write ``report`` to ``path``; a directory (existing, or ending in a separator) gets a
    file named by device, backend, dtype and date. Returns the path written."""
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        os.makedirs(path, exist_ok=True)
        name = (f"{_slug(report['device']['name'])}-{report['device']['backend']}-"
                f"{report['config']['dtype']}-{report['date'][:10]}.json")
        path = os.path.join(path, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_finite(report), f, indent=2, allow_nan=False)
        f.write("\n")
    return path


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        return _finite(value.item())
    return value


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install matplotlib (or gpuopt[plot])") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_report(report: dict[str, Any], path: str) -> str:
    """A PNG of GB/s against size, one line per rule, the copy bandwidth as a reference line."""
    plt = _matplotlib()
    fig, ax = plt.subplots(figsize=(10, 6))
    rules: dict[str, list[tuple[int, float]]] = {}
    for e in report["results"]:
        rules.setdefault(e["rule"], []).append((e["elements"], e["gbps"]))
    for name, points in rules.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=name)
    copy = report["copy_bandwidth"]["gbps"]
    ax.axhline(copy, color="black", linestyle="--", linewidth=1, label=f"copy bandwidth ({copy:.0f} GB/s)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("elements per parameter array")
    ax.set_ylabel("GB/s (bytes a step must move / time per step)")
    dev = report["device"]
    ax.set_title(f"gpuopt update: {dev['backend']} on {dev['name']}, {report['config']['dtype']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    """Run ``bench`` from parsed arguments: 0 on success, 2 on a setting that cannot run,
    1 with ``--fail-on-targets`` when a measured target is not met."""
    try:
        config = _config(args)
    except BenchError as exc:
        print(f"gpuopt bench: error: {exc}", file=sys.stderr)
        return 2
    report = benchmark(config, Progress(enabled=not getattr(args, "quiet", False)))
    print(format_report(report), flush=True)
    if args.json:
        print(f"wrote {write_json(report, args.json)}")
    if args.plot:
        print(f"wrote {plot_report(report, args.plot)}")
    if getattr(args, "fail_on_targets", False) and any(t["status"] == "not met" for t in report["targets"]):
        return 1
    return 0
