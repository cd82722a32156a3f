"""The performance targets, evaluated on a report: met, not met or not measured.

Each target is one row: its id, the run that measures it (``cupy``: a GPU run, ``numpy``: a CPU
run), what it asks, its limit, and how its value is read from the report (None where the run
did not measure it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .workload import CHAIN

Value = Callable[[dict[str, Any]], "float | None"]
#: the host-time limits: microseconds per update call, and ratios to ADAM on GPT-2 small
HOST_US = {"same": 25.0, "new": 60.0}
MANY_RATIO, CHAIN_RATIO = 2.0, 1.3


def _row(report: dict[str, Any], rule: str, log2: int) -> dict[str, Any]:
    return next((r for r in report["results"] if r["rule"] == rule and r["log2"] == log2), {})


def _ratio(rule: str, log2: int, baseline: str) -> Value:
    """gpuopt's time for ``rule`` at 2^log2 as a multiple of ``baseline``'s in the same run."""
    return lambda report: _row(report, rule, log2).get("baselines", {}).get(baseline, {}).get("time_ratio")


def _model(variant: str) -> Value:
    """The model's one update call as a multiple of ``variant``'s time."""
    def value(report: dict[str, Any]) -> float | None:
        v = (report.get("model") or {}).get("variants") or {}
        ours, theirs = v.get("multi_tensor", {}).get("time_s"), v.get(variant, {}).get("time_s")
        return ours / theirs if ours and theirs else None
    return value


def _adam_copy(report: dict[str, Any]) -> float | None:
    row = _row(report, "ADAM", 28)
    return row["time_s"] / row["time_at_copy_bw_s"] if row else None


def _chain_adam(report: dict[str, Any]) -> float | None:
    """The chain's time as a multiple of ADAM's, at the largest size both ran."""
    sizes = sorted({r["log2"] for r in report["results"]})
    both = [(chain, adam) for chain, adam in ((_row(report, CHAIN, k), _row(report, "ADAM", k)) for k in sizes)
            if chain and adam]
    return both[-1][0]["time_s"] / both[-1][1]["time_s"] if both else None


def _worst_plain(report: dict[str, Any]) -> float | None:
    ratios = [r["baselines"].get("unfused", {}).get("time_ratio") for r in report["results"] if r["log2"] >= 16]
    return max((ratio for ratio in ratios if ratio is not None), default=None)


def _found(*path: str) -> Value:
    def value(report: dict[str, Any]) -> float | None:
        for key in path:
            report = report.get(key) or {}
        return report or None
    return value


#: (id, run, description, limit, value)
TARGETS: list[tuple[str, str, str, float, Value]] = [
    ("gpu_adam_copy_bandwidth", "cupy", "ADAM 2^28 float32 at most 1.1x the time of its bytes at copy bandwidth",
     1.1, _adam_copy),
    ("gpu_adam_vs_torch_fused", "cupy", "ADAM 2^28 float32 at most 1x the time of torch.optim.Adam(fused=True)",
     1.0, _ratio("ADAM", 28, "torch_fused")),
    ("gpu_model_vs_torch_fused", "cupy", "GPT-2 model ADAM at most 1x the time of torch.optim.Adam(fused=True)",
     1.0, _model("torch_fused")),
    ("gpu_model_vs_flat", "cupy", "150-tensor model at most 1.15x the time of one flat tensor of the same size",
     1.15, _model("flat")),
    ("gpu_host_time", "cupy", "host time per update call (multi-tensor model) at most 100 us",
     100.0, _found("model", "variants", "multi_tensor", "host_time_us")),
    ("gpu_chain_vs_adam", "cupy", f"{CHAIN} at most 1.05x the time of ADAM", 1.05, _chain_adam),
    ("cpu_adam_vs_torch_fused", "numpy", "ADAM 2^24 float32 at most 1x the time of torch.optim.Adam(fused=True)",
     1.0, _ratio("ADAM", 24, "torch_fused")),
    ("cpu_model_vs_torch_fused", "numpy", "GPT-2 model ADAM at most 1x the time of torch.optim.Adam(fused=True)",
     1.0, _model("torch_fused")),
    ("cpu_rules_vs_plain", "numpy", "every rule at every size from 2^16 at most 1x the time of its plain formula",
     1.0, _worst_plain),
    ("cpu_small_descent", "numpy", "Descent on 2^10 elements at most 8x the time of the plain formula",
     8.0, _ratio("Descent", 10, "unfused")),
    ("cpu_first_build", "numpy", "first build of a native module within 3 s", 3.0,
     _found("native_build", "first_build_s")),
    ("cpu_cached_start", "numpy", "a native module from the cache within 50 ms", 0.05,
     _found("native_build", "cached_start_s")),
    ("numpy_adam_vs_plain", "numpy", "ADAM 2^24 float32 at most 0.4x the time of the plain-NumPy formula",
     0.4, _ratio("ADAM", 24, "unfused")),
]


def target(tid: str, description: str, limit: float, value: float | None, why_not: str) -> dict[str, Any]:
    """One target's outcome: ``why_not`` says why a value of None was not measured."""
    status = "not measured" if value is None else "met" if value <= limit else "not met"
    return {"id": tid, "description": description, "status": status, "value": value, "limit": limit,
            "detail": why_not if value is None else ""}


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of a rules report as ``{"id", "description", "status", "value", "limit", "detail"}``."""
    backend, dtype = report["device"]["backend"], report["config"]["dtype"]
    where = {"cupy": "GPU", "numpy": "CPU"}
    out = []
    for tid, needs, description, limit, value in TARGETS:
        why_not = (f"needs a {where[needs]} ({needs}) run; this run used {backend}" if needs != backend else
                   f"defined for float32; this run used {dtype}" if dtype != "float32" else
                   "its sizes, rules or baselines were not in this run, or failed (see the notes)")
        measured = value(report) if needs == backend and dtype == "float32" else None
        out.append(target(tid, f"{where[needs]}: {description}", limit, measured, why_not))
    return out


def host_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The host-time targets of a ``--host`` report."""
    cases, config = report["cases"], report["config"]
    us = {name: case["host_time_us"] for name, case in cases.items()}

    def ratio(case: str, base: str) -> float | None:
        return us[case] / us[base] if case in us and base in us else None

    out = []
    for kind, limit in HOST_US.items():
        for prefix, who in (("", "arrays"), ("torch ", "PyTorch tensors")):
            out.append(target(f"host_{prefix.replace(' ', '_')}gpt2_adam_{kind}_grads_us",
                              f"host: GPT-2 small ({config['tensors']} tensors) ADAM, {kind} gradient {who} every "
                              f"step, at most {limit:g} us per update", limit, us.get(f"{prefix}ADAM/{kind}"),
                              "PyTorch is not importable" if prefix else "not measured"))
        out.append(target(f"host_{config['many']}_tensors_{kind}_grads_ratio", f"host: {config['many']} tensors at "
                          f"most {MANY_RATIO:g}x the time of GPT-2 small's ({kind} gradients)", MANY_RATIO,
                          ratio(f"ADAM/{kind}/{config['many']}", f"ADAM/{kind}"), "not measured"))
        for chain in config["rules"][1:]:
            out.append(target(f"host_{chain.lower().replace('+', '_')}_vs_adam_{kind}_grads_ratio",
                              f"host: {chain} at most {CHAIN_RATIO:g}x the time of ADAM ({kind} gradients)",
                              CHAIN_RATIO, ratio(f"{chain}/{kind}", f"ADAM/{kind}"), "not measured"))
    return out
