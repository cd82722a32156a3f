"""The performance targets, evaluated on a report: met, not met or not measured.

Each target is one row: its id, the run that measures it (``cupy``, ``numpy``, ``host``), what
it asks, its limit, and how its value is read from the report: ``(value, detail)``, or the
reason it was not measured.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .workload import CHAIN

Outcome = tuple[float, str] | str
#: the host-time limits: microseconds per update call, and ratios to ADAM on GPT-2 small
HOST_US = {"same": 25.0, "new": 60.0}
MANY_RATIO, CHAIN_RATIO = 2.0, 1.3


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us"


def _find(report: dict[str, Any], rule: str, log2: int | None = None) -> dict[str, Any] | None:
    rows = [r for r in report["results"] if r["rule"] == rule and (log2 is None or r["log2"] == log2)]
    return max(rows, key=lambda r: r["log2"]) if rows else None


def _against(rule: str, log2: int, baseline: str) -> Callable[[dict[str, Any]], Outcome]:
    """gpuopt's time for ``rule`` at 2^log2 as a multiple of ``baseline``'s in the same row."""
    def value(report: dict[str, Any]) -> Outcome:
        r = _find(report, rule, log2)
        if r is None:
            return f"{rule} at 2^{log2} was not measured (--sizes must include {log2}, --rules {rule})"
        base = r["baselines"].get(baseline, {})
        if "time_s" not in base:
            return f"{baseline} not measured ({base.get('error', 'switched off, or PyTorch not importable')})"
        return r["time_s"] / base["time_s"], f"gpuopt {us(r['time_s'])} vs {baseline} {us(base['time_s'])}"
    return value


def _model(variant: str) -> Callable[[dict[str, Any]], Outcome]:
    """The model's one update call as a multiple of ``variant``'s time."""
    def value(report: dict[str, Any]) -> Outcome:
        v = (report.get("model") or {}).get("variants") or {}
        if "time_s" not in v.get("multi_tensor", {}) or "time_s" not in v.get(variant, {}):
            return f"model and its {variant} variant not both measured"
        a, b = v["multi_tensor"]["time_s"], v[variant]["time_s"]
        return a / b, f"one update call {us(a)} vs {variant} {us(b)}"
    return value


def _adam_copy(report: dict[str, Any]) -> Outcome:
    r = _find(report, "ADAM", 28)
    if r is None:
        return "ADAM at 2^28 was not measured (--sizes must include 28, --rules ADAM)"
    return r["time_s"] / r["time_at_copy_bw_s"], f"{us(r['time_s'])} per step, {r['pct_copy']:.1f}% of copy"


def _host_time(report: dict[str, Any]) -> Outcome:
    host = ((report.get("model") or {}).get("variants") or {}).get("multi_tensor", {}).get("host_time_us")
    return "host time not measured (--model)" if host is None else (host, "median host time of update(), no sync")


def _chain_adam(report: dict[str, Any]) -> Outcome:
    both = {r["log2"] for r in report["results"] if r["rule"] == "ADAM"} & {
        r["log2"] for r in report["results"] if r["rule"] == CHAIN}
    if not both:
        return f"ADAM and {CHAIN} not both measured"
    a, b = _find(report, CHAIN, max(both))["time_s"], _find(report, "ADAM", max(both))["time_s"]
    return a / b, f"at 2^{max(both)}: chain {us(a)} vs ADAM {us(b)}"


def _rules_plain(report: dict[str, Any]) -> Outcome:
    rows = [r for r in report["results"] if r["log2"] >= 16 and "time_ratio" in r["baselines"].get("unfused", {})]
    if not rows:
        return "no rule measured with its plain formula from 2^16 up"
    worst = max(rows, key=lambda r: r["baselines"]["unfused"]["time_ratio"])
    return worst["baselines"]["unfused"]["time_ratio"], f"slowest: {worst['rule']} at 2^{worst['log2']}"


def _build(which: str) -> Callable[[dict[str, Any]], Outcome]:
    def value(report: dict[str, Any]) -> Outcome:
        builds = report.get("native_build")
        return (builds[which], "one ADAM module") if builds else "NumPy arrays did not run on native code"
    return value


#: (id, run, description, limit, value)
TARGETS: list[tuple[str, str, str, float, Callable[[dict[str, Any]], Outcome]]] = [
    ("gpu_adam_copy_bandwidth", "cupy", "ADAM 2^28 float32 at most 1.1x the time of its bytes at copy bandwidth",
     1.1, _adam_copy),
    ("gpu_adam_vs_torch_fused", "cupy", "ADAM 2^28 float32 at most 1x the time of torch.optim.Adam(fused=True)",
     1.0, _against("ADAM", 28, "torch_fused")),
    ("gpu_model_vs_torch_fused", "cupy", "GPT-2 model ADAM at most 1x the time of torch.optim.Adam(fused=True)",
     1.0, _model("torch_fused")),
    ("gpu_model_vs_flat", "cupy", "150-tensor model at most 1.15x the time of one flat tensor of the same size",
     1.15, _model("flat")),
    ("gpu_host_time", "cupy", "host time per update call (multi-tensor model) at most 100 us", 100.0, _host_time),
    ("gpu_chain_vs_adam", "cupy", f"{CHAIN} at most 1.05x the time of ADAM", 1.05, _chain_adam),
    ("cpu_adam_vs_torch_fused", "numpy", "ADAM 2^24 float32 at most 1x the time of torch.optim.Adam(fused=True)",
     1.0, _against("ADAM", 24, "torch_fused")),
    ("cpu_model_vs_torch_fused", "numpy", "GPT-2 model ADAM at most 1x the time of torch.optim.Adam(fused=True)",
     1.0, _model("torch_fused")),
    ("cpu_rules_vs_plain", "numpy", "every rule at every size from 2^16 at most 1x the time of its plain formula",
     1.0, _rules_plain),
    ("cpu_small_descent", "numpy", "Descent on 2^10 elements at most 8x the time of the plain formula",
     8.0, _against("Descent", 10, "unfused")),
    ("cpu_first_build", "numpy", "first build of a native module within 3 s", 3.0, _build("first_build_s")),
    ("cpu_cached_start", "numpy", "a native module from the cache within 50 ms", 0.05, _build("cached_start_s")),
    ("numpy_adam_vs_plain", "numpy", "ADAM 2^24 float32 at most 0.4x the time of the plain-NumPy formula",
     0.4, _against("ADAM", 24, "unfused")),
]


def _target(tid: str, description: str, limit: float, outcome: Outcome) -> dict[str, Any]:
    value, detail = (None, outcome) if isinstance(outcome, str) else outcome
    status = "not measured" if value is None else "met" if value <= limit else "not met"
    return {"id": tid, "description": description, "status": status, "value": value, "limit": limit, "detail": detail}


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of a rules report as ``{"id", "description", "status", "value", "limit", "detail"}``."""
    backend, dtype = report["device"]["backend"], report["config"]["dtype"]
    where = {"cupy": "GPU", "numpy": "CPU"}
    out = []
    for tid, needs, description, limit, value in TARGETS:
        outcome = (f"needs a {where[needs]} ({needs}) run; this run used {backend}" if needs != backend else
                   f"defined for float32; this run used {dtype}" if dtype != "float32" else value(report))
        out.append(_target(tid, f"{where[needs]}: {description}", limit, outcome))
    return out


def host_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The host-time targets of a ``--host`` report."""
    cases, config = report["cases"], report["config"]

    def ratio(case: str, base: str) -> Outcome:
        if case not in cases or base not in cases:
            return f"{case} and {base} not both measured"
        a, b = cases[case]["host_time_us"], cases[base]["host_time_us"]
        return a / b, f"{a:.1f} us vs {b:.1f} us"

    out = []
    for kind, limit in HOST_US.items():
        for prefix, who in (("", "arrays"), ("torch ", "PyTorch tensors")):
            case = cases.get(f"{prefix}ADAM/{kind}")
            out.append(_target(f"host_{prefix.strip() + '_' if prefix else ''}gpt2_adam_{kind}_grads_us",
                               f"host: GPT-2 small ({config['tensors']} tensors) ADAM, {kind} gradient {who} every "
                               f"step, at most {limit:g} us per update", limit,
                               (case["host_time_us"], config["device"]) if case else f"{prefix}ADAM not measured"))
        out.append(_target(f"host_{config['many']}_tensors_{kind}_grads_ratio", f"host: {config['many']} tensors at "
                           f"most {MANY_RATIO:g}x the time of GPT-2 small's ({kind} gradients)", MANY_RATIO,
                           ratio(f"ADAM/{kind}/{config['many']}", f"ADAM/{kind}")))
        for chain in config["rules"][1:]:
            out.append(_target(f"host_{chain.lower().replace('+', '_')}_vs_adam_{kind}_grads_ratio",
                               f"host: {chain} at most {CHAIN_RATIO:g}x the time of ADAM ({kind} gradients)",
                               CHAIN_RATIO, ratio(f"{chain}/{kind}", f"ADAM/{kind}")))
    return out
