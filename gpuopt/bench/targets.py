"""The performance targets, evaluated on a report: met, not met or not measured."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .report import format_time
from .workload import CHAIN


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
        return ratio, (f"{format_time(r['time_s'])} per step vs {format_time(r['time_at_copy_bw_s'])} "
                       f"at copy bandwidth ({r['pct_copy']:.1f}% of copy)")

    def against(rule: str, log2: int, baseline: str, name: str, why: str, extra: str = ""
                ) -> Callable[[], tuple[float, str] | str]:
        """gpuopt's time for ``rule`` at 2^log2 as a multiple of ``baseline``'s (``name``)."""
        def check() -> tuple[float, str] | str:
            r = _find(report, rule, log2)
            if r is None:
                return f"{rule} at 2^{log2} was not measured (--sizes must include {log2}, --rules {rule})"
            base = r["baselines"].get(baseline, {})
            if "time_s" not in base:
                return f"{name} not measured ({base.get('error', why)})"
            return r["time_s"] / base["time_s"], (f"gpuopt {format_time(r['time_s'])} vs {name} "
                                                  f"{format_time(base['time_s'])}{extra}")
        return check

    def model_torch() -> tuple[float, str] | str:
        if "multi_tensor" not in variants or "time_s" not in variants.get("torch_fused", {}):
            return "model comparison with torch fused Adam not measured"
        a, b = variants["multi_tensor"]["time_s"], variants["torch_fused"]["time_s"]
        return a / b, f"gpuopt {format_time(a)} vs torch fused {format_time(b)} ({model['tensors']} tensors)"

    def model_flat() -> tuple[float, str] | str:
        if "multi_tensor" not in variants or "flat" not in variants:
            return "model comparison not measured (--model)"
        a, b = variants["multi_tensor"]["time_s"], variants["flat"]["time_s"]
        return a / b, f"{model['tensors']} tensors {format_time(a)} vs one flat tensor {format_time(b)}"

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
        return a / b, f"at 2^{k}: chain {format_time(a)} vs ADAM {format_time(b)}"

    def cpu_rules_plain() -> tuple[float, str] | str:
        rows = [r for r in report["results"] if r["log2"] >= 16 and "time_s" in r["baselines"].get("unfused", {})]
        if not rows:
            return "no rule measured with its plain formula from 2^16 up"
        worst = max(rows, key=lambda r: r["time_s"] / r["baselines"]["unfused"]["time_s"])
        ratio = worst["time_s"] / worst["baselines"]["unfused"]["time_s"]
        return ratio, f"slowest relative to its plain formula: {worst['rule']} at 2^{worst['log2']} ({len(rows)} rows)"

    def cpu_build(which: str) -> Callable[[], tuple[float, str] | str]:
        def check() -> tuple[float, str] | str:
            builds = report.get("native_build")
            if not builds:
                return "NumPy arrays did not run on native code in this run"
            return builds[which], "one ADAM module, a fresh cache folder" if which == "first_build_s" else \
                "ADAM module from the cache, compiler version asked anew"
        return check

    threads = report["device"].get("threads")
    target("gpu_adam_copy_bandwidth", "GPU: ADAM 2^28 float32 at most 1.1x the time of its bytes at copy bandwidth",
           "cupy", adam_copy, 1.1)
    target("gpu_adam_vs_torch_fused", "GPU: ADAM 2^28 float32 at most 1x the time of torch.optim.Adam(fused=True)",
           "cupy", against("ADAM", 28, "torch_fused", "torch fused", "PyTorch with CUDA not importable"), 1.0)
    target("gpu_model_vs_torch_fused", "GPU: GPT-2 model ADAM at most 1x the time of torch.optim.Adam(fused=True)",
           "cupy", model_torch, 1.0)
    target("gpu_model_vs_flat", "GPU: 150-tensor model at most 1.15x the time of one flat tensor of the same size",
           "cupy", model_flat, 1.15)
    target("gpu_host_time", "GPU: host time per update call (multi-tensor model) under 100 us",
           "cupy", host_time, 100.0, strict=True)
    target("gpu_chain_vs_adam", f"GPU: {CHAIN} at most 1.05x the time of ADAM",
           "cupy", chain_adam, 1.05)
    target("cpu_adam_vs_torch_fused", "CPU: ADAM 2^24 float32 at most 1x the time of torch.optim.Adam(fused=True)",
           "numpy", against("ADAM", 24, "torch_fused", "torch fused", "PyTorch not importable",
                            f", {threads} threads each"), 1.0)
    target("cpu_model_vs_torch_fused", "CPU: GPT-2 model ADAM at most 1x the time of torch.optim.Adam(fused=True)",
           "numpy", model_torch, 1.0)
    target("cpu_rules_vs_plain", "CPU: every rule at every size from 2^16 at most 1x the time of its plain formula",
           "numpy", cpu_rules_plain, 1.0)
    target("cpu_small_descent", "CPU: Descent on 2^10 elements at most 8x the time of the plain formula",
           "numpy", against("Descent", 10, "unfused", "plain NumPy", "--baselines"), 8.0)
    target("cpu_first_build", "CPU: first build of a native module within 3 s",
           "numpy", cpu_build("first_build_s"), 3.0)
    target("cpu_cached_start", "CPU: a native module from the cache within 50 ms",
           "numpy", cpu_build("cached_start_s"), 0.05)
    target("numpy_adam_vs_plain", "NumPy: ADAM 2^24 float32 at most 0.4x the time of the plain-NumPy formula",
           "numpy", against("ADAM", 24, "unfused", "plain NumPy", "--baselines"), 0.4)
    return targets

