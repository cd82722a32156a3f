"""One benchmark run: every rule and size, the model comparison, and the report they make."""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import math
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..api import update
from ..backends.numpy_backend import compute_dtype
from ..dispatch import cupy_module
from ..plain import Unfused
from ..rule import Rule
from ..rules import ADAM
from .devices import (
    MEMORY_MARGIN,
    CupyDevice,
    NumpyDevice,
    Timing,
    measure_steps,
    torch_elapsed,
    torch_module,
    torch_variants,
    torch_view,
)
from .options import Config, config_from_args
from .progress import Progress
from .targets import evaluate_targets
from .workload import bytes_per_element, check_counted_bytes, gpt2_shapes, state_slots

#: a repeat runs this many seconds' worth of steps at least (so tiny sizes are not all noise)
REPEAT_TARGET_S = {"cupy": 2e-3, "numpy": 5e-3}
#: extra memory an unfused baseline needs besides its state, in compute-dtype arrays
UNFUSED_TEMPORARIES = 6
HOST_CALLS = 50  # update calls timed on the host for the model


def software_versions() -> dict[str, Any]:
    from .. import __version__

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
            self._torch = torch_module(self.config.backend == "cupy") if self.config.torch else None
            if self._torch is not None and self.config.backend == "numpy":
                self._torch.set_num_threads(self.device.threads())  # the same threads as gpuopt
        return self._torch

    def measure(self, steps: Callable[[int], None], elapsed: Callable | None = None) -> Timing:
        c = self.config
        return measure_steps(elapsed or self.device.elapsed, steps, c.repeats, c.warmup, self.target_s)

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
        return self._torch_steps(params, grads, lambda tparams: torch.optim.Adam(
            tparams, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, **kwargs))

    def _gpuopt_torch(self, params: list[Any], grads: list[Any]) -> Timing:
        """``gpuopt.torch.Optimizer(..., ADAM()).step()`` on torch views of the same arrays,
        timed as torch's optimisers are: what a PyTorch training loop pays per step, host
        and device together."""
        from ..torch import Optimizer

        return self._torch_steps(params, grads, lambda tparams: Optimizer(tparams, ADAM()))

    def _torch_steps(self, params: list[Any], grads: list[Any], make: Callable[[list[Any]], Any]) -> Timing:
        """Time ``make(tensors).step()`` on torch views of ``params`` with ``grads`` as ``.grad``."""
        torch = self.torch()
        tparams = [torch_view(torch, p) for p in params]
        for tp, g in zip(tparams, grads):
            tp.grad = torch_view(torch, g)
        opt = make(tparams)

        def steps(m: int) -> None:
            for _ in range(m):
                opt.step()

        try:
            return self.measure(steps, torch_elapsed(torch, self.device))
        finally:  # free its state now rather than at the next garbage collection
            opt.state.clear()
            for group in opt.param_groups:  # gpuopt.torch.Optimizer keeps its state in its rules
                if "rule" in group:
                    group["rule"].reset()
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
            for variant, kwargs in torch_variants(device):
                self.progress(f"{where}: {variant}", minor=True)
                baselines[variant] = self.attempt(
                    f"{variant} at 2^{k}", lambda kwargs=kwargs: self._torch_adam([x], [g], kwargs).as_dict())
        for base in baselines.values():
            if "time_s" in base:  # gpuopt's time as a multiple of the baseline's
                base["time_ratio"] = timing.median / base["time_s"]
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
                v["time_ratio_to_multi_tensor"] = v["time_s"] / multi
        ours, fused = variants.get("gpuopt_torch", {}), variants.get("torch_fused", {})
        if "time_s" in ours and "time_s" in fused:  # the drop-in replacement against torch's best
            ours["time_ratio_to_torch_fused"] = ours["time_s"] / fused["time_s"]
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

        def baseline(name: str, what: str, timing: Callable[[], Timing]) -> None:
            """A baseline's timing, or the error it failed with (the run goes on)."""
            self.progress(f"{label}: {what}", minor=True)
            outcome = self.attempt(f"{what} on the model", lambda: record(name, timing()))
            if "error" in outcome:
                record(name, outcome)

        if c.baselines:
            plain = Unfused(ADAM(), device.xp)
            baseline("unfused_loop", "unfused loop",
                     lambda: self.measure(lambda m: [plain.step_many(params, grads) for _ in range(m)]))
        if self.torch() is not None:
            for variant, kwargs in torch_variants(device):
                baseline(variant, variant, lambda kwargs=kwargs: self._torch_adam(params, grads, kwargs))
            baseline("gpuopt_torch", "gpuopt.torch.Optimizer", lambda: self._gpuopt_torch(params, grads))

def benchmark(config: Config | argparse.Namespace, progress: Progress | None = None) -> dict[str, Any]:
    """Run the benchmark and return the report (what ``--json`` writes)."""
    if isinstance(config, argparse.Namespace):
        config = config_from_args(config)
    progress = progress or Progress(enabled=False)
    wrong = check_counted_bytes()
    if wrong:  # the derivation and the hand count disagree: say so, loudly, in the report
        progress.note(f"warning: bytes per element differ from the hand count: {wrong}")
    runner = _Runner(config, progress)
    device = runner.device
    started = time.perf_counter()
    try:
        progress("measuring copy bandwidth")
        copy = device.copy_bandwidth(config.repeats)
        device.release()
        builds = device.build_times() if config.backend == "numpy" else None
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
        "versions": software_versions(),
        "config": {
            "rules": [name for name, _ in config.rules], "sizes_log2": config.sizes,
            "dtype": config.dtype.name, "repeats": config.repeats, "warmup": config.warmup,
            "model": config.model, "baselines": config.baselines, "torch": config.torch,
            "timer": "CUDA events" if config.backend == "cupy" else "time.perf_counter",
        },
        "bytes_per_element_check": {"counted_float32": "ok" if not wrong else
                                    {k: {"derived": d, "counted": s} for k, (d, s) in wrong.items()}},
        "copy_bandwidth": copy,
        "native_build": builds,
        "results": results,
        "skipped": skipped,
        "model": model,
        "notes": runner.notes,
        "elapsed_s": time.perf_counter() - started,
    }
    report["targets"] = evaluate_targets(report)
    return report

