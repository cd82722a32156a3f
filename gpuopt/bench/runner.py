"""A benchmark run: every rule and size and the model (:func:`benchmark`), or gpuopt's host time
per call (:func:`host_benchmark`, ``--host``)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..api import update
from ..backends import backend_override
from ..backends.kernel_backend import KernelBackend
from ..backends.noop import NoopDevice
from ..chain import Optimiser
from ..plain import Unfused
from ..prepared import PATHS
from ..rule import Rule
from ..rules import ADAM, ClipNorm
from .devices import Machine
from .report import run_record
from .targets import evaluate_targets, host_targets
from .workload import CHAIN, RULES, bytes_per_element, gpt2_shapes

#: a repeat runs this many seconds' worth of steps at least (so tiny sizes are not all noise)
REPEAT_TARGET_S = {"cupy": 2e-3, "numpy": 5e-3}
HOST_CALLS = 50  # update calls timed on the host for the model
#: the torch.optim.Adam baselines per machine: name -> keyword arguments
TORCH_ADAM = {"cupy": {"torch_fused": {"fused": True}, "torch_foreach": {"foreach": True}},
              "numpy": {"torch": {}, "torch_fused": {"fused": True}}}
Steps = tuple[Callable[[], Any], Any]  # (step, the CUDA event class that times it or None)
#: the chains whose host time is compared with ADAM's
CHAINS: dict[str, Callable[[], Rule]] = {"ClipNorm+ADAM": lambda: Optimiser(ClipNorm(1.0), ADAM()), CHAIN: RULES[CHAIN]}


class Run:
    """One benchmark run: its settings, the machine, the progress lines, notes and skips."""

    def __init__(self, config: argparse.Namespace, say: Callable[[str], None]) -> None:
        self.config, self.say = config, say
        self.machine = Machine(config.backend)
        self.torch = self.machine.torch() if config.torch else None
        self.notes: list[str] = []
        self.skipped: list[dict[str, Any]] = []  # sizes that did not fit in memory
        say("measuring copy bandwidth")
        self.copy, self.builds = self.machine.copy_bandwidth(config.repeats), self.machine.build_times()

    def timed(self, makers: dict[str, Callable[[], Steps]], where: str, ours: str) -> dict[str, dict[str, Any]]:
        """Seconds per step of each of ``makers``' steps, timed together (see Machine.time_steps),
        with ``ours``'s time as a multiple of each other's (``time_ratio``); then the steps are
        dropped and collected (a rule's state map is in a reference cycle). A baseline that fails
        to set up or to take a first step is recorded, not fatal."""
        c, ready, out = self.config, {}, {}
        try:
            for name, make in makers.items():
                try:
                    ready[name] = make()
                    ready[name][0]()  # (a first step: a baseline that cannot run fails here)
                except Exception as exc:
                    ready.pop(name, None)  # (not timed)
                    if name == ours:
                        raise
                    out[name] = {"error": _summary(exc)}
                    self.notes.append(f"{name} {where} failed: {out[name]['error']}")
                    self.say(f"note: {self.notes[-1]}")
            out.update(self.machine.time_steps(ready, c.repeats, c.warmup, REPEAT_TARGET_S[c.backend]))
        finally:
            ready.clear()
            self.machine.release()
        for entry in out.values():
            if "time_s" in entry and entry is not out[ours]:
                entry["time_ratio"] = out[ours]["time_s"] / entry["time_s"]
        return out

    @staticmethod
    def updates(rule: Rule, *calls: tuple[Any, Any]) -> Steps:
        """A step of ``update(rule, x, g)`` for each ``(x, g)`` of ``calls``."""
        return lambda: [update(rule, x, g) for x, g in calls], None

    def torch_steps(self, params: list[Any], grads: list[Any], make: Callable[[list[Any]], Any]) -> Steps:
        """``make(tensors).step()`` on tensors sharing the memory of ``params``, ``grads`` as their ``.grad``."""
        view = self.torch.from_dlpack if self.machine.gpu else self.torch.from_numpy
        tensors = [view(p) for p in params]
        for tensor, g in zip(tensors, grads):
            tensor.grad = view(g)
        return make(tensors).step, self.torch.cuda.Event

    def baselines(self, factory: Callable[[], Rule], params: list[Any], grads: list[Any]
                  ) -> dict[str, Callable[[], Steps]]:
        """The plain formula's and (for ADAM) PyTorch's steps on the same arrays."""
        out: dict[str, Callable[[], Steps]] = {}
        if self.config.baselines:
            xp = self.machine.xp
            out["unfused"] = lambda: (functools.partial(Unfused(factory(), xp).step_many, params, grads), None)
        if type(factory()) is ADAM and self.torch is not None:
            adam = self.torch.optim.Adam
            for name, kwargs in TORCH_ADAM[self.config.backend].items():
                out[name] = lambda kwargs=kwargs: self.torch_steps(
                    params, grads, lambda tensors: adam(tensors, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, **kwargs))
        return out

    def sizes(self) -> list[dict[str, Any]]:
        c, results = self.config, []
        for k in c.sizes:
            self.machine.release()  # a full collection (slow with torch loaded) per size
            try:
                x, g = (self.machine.random(1 << k, c.dtype, seed=seed) for seed in (k, 1000 + k))
                for i, (name, factory) in enumerate(c.rules, 1):
                    self.say(f"[{i}/{len(c.rules)}] 2^{k} {name}")
                    results.append(self.row(name, factory, k, x, g))
            except MemoryError as exc:  # (the rest of) this size does not fit
                self.skipped.append({"log2": k, "reason": _summary(exc)})
            x = g = None
        return results

    def row(self, name: str, factory: Callable[[], Rule], k: int, x: Any, g: Any) -> dict[str, Any]:
        """One rule at one size: gpuopt's time, GB/s, and the baselines' times in proportion."""
        baselines = self.timed({"gpuopt": lambda: self.updates(factory(), (x, g)), **self.baselines(factory, [x], [g])},
                               f"at 2^{k} {name}", ours="gpuopt")
        timing, bpe = baselines.pop("gpuopt"), bytes_per_element(factory(), self.config.dtype)
        gbps = (bpe << k) / timing["time_s"] / 1e9
        return {"rule": name, "log2": k, "elements": 1 << k, "dtype": self.config.dtype.name, "bytes_per_element": bpe,
                "bytes": bpe << k, **timing, "gbps": gbps, "pct_copy": 100 * gbps / self.copy["gbps"],
                "baselines": baselines}

    def model(self) -> dict[str, Any]:
        """ADAM on GPT-2 small's tensors: one update call against a per-tensor loop, one flat
        tensor of the same size, the plain formula and PyTorch."""
        c, machine = self.config, self.machine
        names, shapes = zip(*gpt2_shapes(c.model_layers, c.model_width))
        total, bpe = sum(map(math.prod, shapes)), bytes_per_element(ADAM(), c.dtype)
        machine.release()
        params = [machine.random(shape, c.dtype, seed=i) for i, shape in enumerate(shapes)]
        grads = [machine.random(shape, c.dtype, seed=10_000 + i) for i, shape in enumerate(shapes)]
        self.say(f"model ({len(shapes)} tensors): gpuopt and the baselines, in turn")
        host, opt = {}, ADAM()
        if machine.gpu:  # also the host time of one call (its launches queued, not waited for)
            host = host_times(lambda: functools.partial(update, opt, params, grads), HOST_CALLS, lambda: None)
            opt.reset()
        makers = {"multi_tensor": lambda: self.updates(ADAM(), (params, grads)),
                  "per_tensor_loop": lambda: self.updates(ADAM(), *zip(params, grads)),
                  **self.baselines(ADAM, params, grads),
                  "flat": lambda: self.updates(ADAM(), tuple(machine.random(total, c.dtype, seed=s) for s in (1, 2)))}
        if self.torch is not None:
            from ..torch import Optimizer

            makers["gpuopt_torch"] = lambda: self.torch_steps(params, grads, lambda tensors: Optimizer(tensors, ADAM()))
        variants = self.timed(makers, "on the model", ours="multi_tensor")
        variants["multi_tensor"].update(host)
        params = grads = []
        for v in variants.values():
            if "time_s" in v:
                v["gbps"] = bpe * total / v["time_s"] / 1e9
        drop_in, fused = variants.get("gpuopt_torch", {}), variants.get("torch_fused", {})
        if "time_s" in drop_in and "time_s" in fused:  # the drop-in replacement against torch's best
            drop_in["time_ratio_to_torch_fused"] = drop_in["time_s"] / fused["time_s"]
        return {"rule": "ADAM", "dtype": c.dtype.name, "tensors": len(shapes), "parameters": total,
                "layers": c.model_layers, "width": c.model_width, "bytes_per_element": bpe,
                "shapes": {name: list(shape) for name, shape in zip(names, shapes)}, "variants": variants}


def _summary(exc: BaseException) -> str:
    """An error in one short line, for notes and skipped sizes."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def benchmark(config: argparse.Namespace, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark with the settings of :func:`gpuopt.bench.config_from_args` and return the
    report (what ``--json`` writes); ``say`` shows progress."""
    started = time.perf_counter()
    run = Run(config, say or (lambda message: None))
    results, model = run.sizes(), run.model() if config.model else None
    report = run_record("rules", {"backend": config.backend, **run.machine.describe()}, {
        "rules": [name for name, _ in config.rules], "sizes_log2": config.sizes, "dtype": config.dtype.name,
        "repeats": config.repeats, "warmup": config.warmup, "model": config.model, "baselines": config.baselines,
        "torch": config.torch, "timer": "CUDA events" if run.machine.gpu else "time.perf_counter"})
    report.update(copy_bandwidth=run.copy, native_build=run.builds, results=results, skipped=run.skipped, model=model,
                  notes=run.notes, elapsed_s=time.perf_counter() - started)
    report["targets"] = evaluate_targets(report)
    return report


def host_times(next_call: Callable[[], Callable[[], Any]], calls: int, sync: Callable[[], None]) -> dict[str, Any]:
    """The host time of the calls ``next_call()`` returns (made untimed, such as new gradients):
    the median over ``calls`` calls after warm-up, and how many took the prepared path."""
    for _ in range(3):  # the first call creates state and prepares; the others warm up
        next_call()()
    before, times = PATHS["prepared"], []
    gc.disable()  # a collection inside one timed call would be noise, not gpuopt's cost
    try:
        for _ in range(calls):
            call = next_call()
            sync()  # an empty launch queue: a launch never waits for a free slot while timed
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    finally:
        gc.enable()
    prepared = PATHS["prepared"] - before
    return {"host_time_us": statistics.median(times) * 1e6, "host_time_min_us": min(times) * 1e6, "calls": calls,
            "prepared_calls": prepared, "full_calls": calls - prepared}


def host_benchmark(calls: int = 500, layers: int = 12, width: int = 768, many: int = 1000,
                   use_torch: bool = True, launches: bool = False) -> dict[str, Any]:
    """Every host-time case; returns the report (``targets`` included) that ``--json`` writes.
    Nothing is launched (a NoopDevice; CPU tensors stand in for CUDA ones), or with ``launches``
    real launches on the GPU. Gradients are the same every step (``.grad`` kept) or new ones."""
    started = time.perf_counter()
    machine = Machine("cupy" if launches else "numpy")
    shapes = [shape for _, shape in gpt2_shapes(layers, width)]
    xp, torch = machine.xp if launches else NoopDevice.xp, machine.torch() if use_torch else None

    # Gradients are made empty: zeroing them would flush the CPU's caches before each timed call,
    # which making them on a GPU does not.
    def arrays(shapes: list, params: bool = False) -> list:
        return [(xp.zeros if params else xp.empty)(shape, dtype=np.float32) for shape in shapes]

    def tensors(shapes: list, params: bool = False) -> list:
        device = "cuda" if launches else "cpu"
        made = [(torch.zeros if params else torch.empty)(shape, device=device) for shape in shapes]
        return [torch.nn.Parameter(t) for t in made] if params else made

    def calls_of(rule: Rule, shapes: list, make: Callable, new: bool, step: bool) -> Callable[[], Callable[[], Any]]:
        """The calls to time: ``update(rule, params, grads)``, or with ``step`` the step of a
        ``gpuopt.torch.Optimizer`` (the gradients set untimed before it)."""
        params, grads = make(shapes, params=True), make(shapes)
        if not step:
            return lambda: functools.partial(update, rule, params, make(shapes) if new else grads)
        from ..torch import Optimizer

        opt = Optimizer(params, rule)

        def set_grads() -> Callable[[], Any]:
            for p, g in zip(params, make(shapes) if new else grads):
                p.grad = g
            return opt.step
        return set_grads

    cases: dict[str, dict[str, Any]] = {}
    with contextlib.nullcontext() if launches else backend_override("numpy", KernelBackend(NoopDevice())):
        for kind in ("same", "new"):
            runs = {f"ADAM/{kind}": (ADAM, shapes, arrays, False),
                    f"ADAM/{kind}/{many}": (ADAM, [(4096,)] * many, arrays, False),
                    **{f"{name}/{kind}": (factory, shapes, arrays, False) for name, factory in CHAINS.items()},
                    **({f"torch ADAM/{kind}": (ADAM, shapes, tensors, False),
                        f"torch Optimizer.step/{kind}": (ADAM, shapes, tensors, True)} if torch is not None else {})}
            for name, (factory, case_shapes, make, step) in runs.items():
                next_call = calls_of(factory(), case_shapes, make, kind == "new", step)
                cases[name] = host_times(next_call, calls, machine.sync)
                del next_call  # its rule, state and arrays: freed (a reference cycle) before the next case's
                gc.collect()
    report = run_record("host", {"backend": "host-cupy" if launches else "host-noop", **machine.describe()}, {
        "calls": calls, "tensors": len(shapes), "layers": layers, "width": width, "many": many, "dtype": "float32",
        "parameters": sum(math.prod(s) for s in shapes), "rules": ["ADAM", *CHAINS],
        "timer": "time.perf_counter per call, median",
        "device": "CuPy, real launches" if launches else "NoopDevice (nothing launched)"})
    notes = ["PyTorch is not importable: the torch cases were not measured"] if use_torch and torch is None else []
    report.update(cases=cases, notes=notes, elapsed_s=time.perf_counter() - started)
    report["targets"] = host_targets(report)
    return report
