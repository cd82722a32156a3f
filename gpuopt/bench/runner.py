"""A benchmark run: every rule and size and the model (:func:`benchmark`), or the host time of one
``update`` call (:func:`host_benchmark`, ``--host``).

The host run uses :class:`~gpuopt.backends.noop.NoopDevice`, which launches nothing, so what is
timed is gpuopt's own work per call without CuPy's launch cost, on any machine: GPT-2 small's
tensors with ADAM, the same gradient arrays every step (PyTorch's persistent ``.grad``) and new
ones (a CuPy backward pass, or ``zero_grad(set_to_none=True)``); the same with PyTorch tensors
(CPU tensors standing in for CUDA ones: the prepared path reads them the same way); 1000
tensors; and two chains. Each figure is the median over many calls.
"""

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
from .devices import TORCH_ADAM, Machine, measure_steps, torch_view
from .report import run_record
from .targets import evaluate_targets, host_targets
from .workload import CHAIN, RULES, bytes_per_element, gpt2_shapes

#: a repeat runs this many seconds' worth of steps at least (so tiny sizes are not all noise)
REPEAT_TARGET_S = {"cupy": 2e-3, "numpy": 5e-3}
HOST_CALLS = 50  # update calls timed on the host for the model


class Run:
    """One benchmark run: its settings, the machine, the progress lines, notes and skips."""

    def __init__(self, config: argparse.Namespace, say: Callable[[str], None]) -> None:
        self.config, self.say = config, say
        self.machine = Machine(config.backend)
        self.torch = self.machine.torch() if config.torch else None
        self.notes: list[str] = []
        self.skipped: list[dict[str, Any]] = []  # sizes that did not fit in memory

    def measure(self, steps: Callable[[int], None], elapsed: Callable | None = None) -> dict[str, Any]:
        c = self.config
        return measure_steps(elapsed or self.machine.elapsed, steps, c.repeats, c.warmup, REPEAT_TARGET_S[c.backend])

    def attempt(self, what: str, timing: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """A baseline's timing; a failure is recorded (and shown) instead of ending the run."""
        try:
            return timing()
        except Exception as exc:  # noqa: BLE001 - a baseline must not end the benchmark
            message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            self.notes.append(f"{what} failed: {message}")
            self.say(f"note: {self.notes[-1]}")
            return {"error": message}
        finally:
            self.machine.release()

    def updates(self, rule: Rule, x: Any, g: Any, one_call: bool = True) -> dict[str, Any]:
        """gpuopt's time per ``update(rule, x, g)`` (or one call per tensor of ``x`` and ``g``);
        the rule's state is freed afterwards."""
        calls = [(x, g)] if one_call else list(zip(x, g))
        try:
            return self.measure(lambda m: [update(rule, p, q) for _ in range(m) for p, q in calls])
        finally:
            rule.reset()  # frees its state now (the state map is in a reference cycle)
            self.machine.release(collect=True)

    def torch_steps(self, params: list[Any], grads: list[Any], make: Callable[[list[Any]], Any]) -> dict[str, Any]:
        """Time ``make(tensors).step()`` on torch views of ``params`` with ``grads`` as ``.grad``."""
        torch, tensors = self.torch, [torch_view(self.torch, p) for p in params]
        for tensor, g in zip(tensors, grads):
            tensor.grad = torch_view(torch, g)
        opt = make(tensors)
        try:
            return self.measure(lambda m: [opt.step() for _ in range(m)],
                                lambda fn: self.machine.elapsed(fn, torch.cuda.Event))
        finally:  # free its state now rather than at the next garbage collection
            opt.state.clear()
            for group in opt.param_groups:  # gpuopt.torch.Optimizer keeps its state in its rules
                if "rule" in group:
                    group["rule"].reset()

    def baselines(self, factory: Callable[[], Rule], params: list[Any], grads: list[Any], where: str
                  ) -> dict[str, dict[str, Any]]:
        """The plain formula's and (for ADAM) PyTorch's times on the same arrays."""
        def unfused() -> dict[str, Any]:
            plain = Unfused(factory(), self.machine.xp)
            return self.measure(lambda m: [plain.step_many(params, grads) for _ in range(m)])

        out = {"unfused": self.attempt(f"unfused {where}", unfused)} if self.config.baselines else {}
        if type(factory()) is ADAM and self.torch is not None:
            adam = self.torch.optim.Adam
            for name, kwargs in TORCH_ADAM[self.config.backend].items():
                out[name] = self.attempt(f"{name} {where}", lambda kwargs=kwargs: self.torch_steps(
                    params, grads, lambda tensors: adam(tensors, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, **kwargs)))
        return out

    def sizes(self) -> list[dict[str, Any]]:
        c, results = self.config, []
        for k in c.sizes:
            self.machine.release(collect=True)  # a full collection (slow with torch loaded) per size
            try:
                x, g = (self.machine.random(1 << k, c.dtype, seed=seed) for seed in (k, 1000 + k))
                for i, (name, factory) in enumerate(c.rules, 1):
                    self.say(f"[{i}/{len(c.rules)}] 2^{k} {name}")
                    results.append(self.row(name, factory, k, x, g))
            except MemoryError as exc:  # (the rest of) this size does not fit
                self.skipped.append({"log2": k, "reason": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]})
            x = g = None
        return results

    def row(self, name: str, factory: Callable[[], Rule], k: int, x: Any, g: Any) -> dict[str, Any]:
        """One rule at one size: gpuopt's time, GB/s, and the baselines' times in proportion."""
        timing, bpe = self.updates(factory(), x, g), bytes_per_element(factory(), self.config.dtype)
        baselines = self.baselines(factory, [x], [g], f"{name} at 2^{k}")
        for base in baselines.values():
            if "time_s" in base:  # gpuopt's time as a multiple of the baseline's
                base["time_ratio"] = timing["time_s"] / base["time_s"]
        return {"rule": name, "log2": k, "elements": 1 << k, "dtype": self.config.dtype.name, "bytes_per_element": bpe,
                "bytes": bpe << k, **timing, "gbps": (bpe << k) / timing["time_s"] / 1e9, "baselines": baselines}

    def model(self) -> dict[str, Any]:
        """ADAM on GPT-2 small's tensors: one update call against a per-tensor loop, one flat
        tensor of the same size, the plain formula and PyTorch."""
        c = self.config
        shapes = gpt2_shapes(c.model_layers, c.model_width)
        total, bpe = sum(math.prod(shape) for _, shape in shapes), bytes_per_element(ADAM(), c.dtype)
        variants = self.model_variants([shape for _, shape in shapes])
        for name, v in variants.items():
            if "time_s" in v:
                v["gbps"] = bpe * total / v["time_s"] / 1e9
                if name != "multi_tensor":
                    v["time_ratio_to_multi_tensor"] = v["time_s"] / variants["multi_tensor"]["time_s"]
        ours, fused = variants.get("gpuopt_torch", {}), variants.get("torch_fused", {})
        if "time_s" in ours and "time_s" in fused:  # the drop-in replacement against torch's best
            ours["time_ratio_to_torch_fused"] = ours["time_s"] / fused["time_s"]
        return {"rule": "ADAM", "dtype": c.dtype.name, "tensors": len(shapes), "parameters": total,
                "layers": c.model_layers, "width": c.model_width, "bytes_per_element": bpe,
                "shapes": {name: list(shape) for name, shape in shapes}, "variants": variants}

    def model_variants(self, shapes: list[tuple[int, ...]]) -> dict[str, dict[str, Any]]:
        c, machine = self.config, self.machine
        machine.release(collect=True)
        params = [machine.random(shape, c.dtype, seed=i) for i, shape in enumerate(shapes)]
        grads = [machine.random(shape, c.dtype, seed=10_000 + i) for i, shape in enumerate(shapes)]
        self.say(f"model ({len(shapes)} tensors): gpuopt, then the baselines")
        # On the GPU also the host time of one call (its launches queued, not waited for).
        host = time_calls(ADAM(), params, grads, HOST_CALLS, lambda: None) if machine.gpu else {}
        variants = {"multi_tensor": {**self.updates(ADAM(), params, grads), **host},
                    "per_tensor_loop": self.updates(ADAM(), params, grads, one_call=False),
                    **self.baselines(ADAM, params, grads, "on the model")}
        if self.torch is not None:
            from ..torch import Optimizer

            variants["gpuopt_torch"] = self.attempt("gpuopt.torch.Optimizer", lambda: self.torch_steps(
                params, grads, lambda tensors: Optimizer(tensors, ADAM())))
        params = grads = []
        machine.release(collect=True)
        flat = [machine.random(sum(map(math.prod, shapes)), c.dtype, seed=seed) for seed in (1, 2)]
        return {**variants, "flat": self.updates(ADAM(), *flat)}


def benchmark(config: argparse.Namespace, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark with the settings of :func:`gpuopt.bench.config_from_args` and return the
    report (what ``--json`` writes); ``say`` shows progress."""
    started = time.perf_counter()
    run = Run(config, say or (lambda message: None))
    machine = run.machine
    run.say("measuring copy bandwidth")
    copy, builds = machine.copy_bandwidth(config.repeats), machine.build_times()
    results, model = run.sizes(), run.model() if config.model else None
    for entry in results:
        entry["pct_copy"] = 100.0 * entry["gbps"] / copy["gbps"]
        entry["time_at_copy_bw_s"] = entry["bytes"] / (copy["gbps"] * 1e9)
    report = run_record("rules", {"backend": config.backend, **machine.describe()}, {
        "rules": [name for name, _ in config.rules], "sizes_log2": config.sizes, "dtype": config.dtype.name,
        "repeats": config.repeats, "warmup": config.warmup, "model": config.model, "baselines": config.baselines,
        "torch": config.torch, "timer": "CUDA events" if machine.gpu else "time.perf_counter"})
    report.update(copy_bandwidth=copy, native_build=builds, results=results, skipped=run.skipped, model=model,
                  notes=run.notes, elapsed_s=time.perf_counter() - started)
    report["targets"] = evaluate_targets(report)
    return report


CHAINS: dict[str, Callable[[], Rule]] = {"ClipNorm+ADAM": lambda: Optimiser(ClipNorm(1.0), ADAM()), CHAIN: RULES[CHAIN]}


def time_calls(opt: Rule, params: list, grads: list, calls: int, sync: Callable[[], None],
               new_grads: Callable[[], list] | None = None) -> dict[str, Any]:
    """The host time of ``update(opt, params, grads)``: the median over ``calls`` calls after
    warm-up, with gradients from ``new_grads()`` before each call where it is given, and how
    many calls took the prepared path. ``opt``'s state is freed afterwards."""
    for _ in range(3):  # the first call creates state and prepares; the others warm up
        update(opt, params, grads)
    before, times = PATHS["prepared"], []
    gc.disable()  # a collection inside one timed call would be noise, not gpuopt's cost
    try:
        for _ in range(calls):
            if new_grads is not None:
                grads = new_grads()
            sync()  # an empty launch queue: a launch never waits for a free slot while timed
            start = time.perf_counter()
            update(opt, params, grads)
            times.append(time.perf_counter() - start)
    finally:
        gc.enable()
        opt.reset()
    prepared = PATHS["prepared"] - before
    return {"host_time_us": statistics.median(times) * 1e6, "host_time_min_us": min(times) * 1e6, "calls": calls,
            "prepared_calls": prepared, "full_calls": calls - prepared}


def host_benchmark(calls: int = 500, layers: int = 12, width: int = 768, many: int = 1000,
                   use_torch: bool = True, launches: bool = False) -> dict[str, Any]:
    """Every host-time case; returns the report (``targets`` included) that ``--json`` writes.
    ``launches`` runs them on the GPU with real launches (synchronised before each timed call)."""
    started = time.perf_counter()
    machine = Machine("cupy" if launches else "numpy")
    shapes = [shape for _, shape in gpt2_shapes(layers, width)]
    xp, torch = machine.xp if launches else NoopDevice.xp, machine.torch() if use_torch else None

    def arrays(shapes: list, params: bool = False) -> list:  # (params or gradients: the same)
        return [xp.zeros(shape, dtype=np.float32) for shape in shapes]

    def tensors(shapes: list, params: bool = False) -> list:
        made = [torch.zeros(shape, device="cuda" if launches else "cpu") for shape in shapes]
        return [torch.nn.Parameter(t) for t in made] if params else made

    cases: dict[str, dict[str, Any]] = {}
    with contextlib.nullcontext() if launches else backend_override("numpy", KernelBackend(NoopDevice())):
        for kind in ("same", "new"):
            runs = {f"ADAM/{kind}": (ADAM, shapes, arrays), f"ADAM/{kind}/{many}": (ADAM, [(4096,)] * many, arrays),
                    **{f"{name}/{kind}": (factory, shapes, arrays) for name, factory in CHAINS.items()},
                    **({f"torch ADAM/{kind}": (ADAM, shapes, tensors)} if torch is not None else {})}
            for name, (factory, case_shapes, make) in runs.items():
                new_grads = functools.partial(make, case_shapes) if kind == "new" else None
                cases[name] = time_calls(factory(), make(case_shapes, params=True), make(case_shapes),
                                         calls, machine.sync, new_grads)
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
