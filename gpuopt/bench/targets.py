"""The performance targets, evaluated on a report: met, not met or not measured. Each is one row:
its id, the run that measures it (``cupy``: a GPU run, ``numpy``: a CPU run), what it asks, its
limit, and how its value is read from a report (None where the run did not measure it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .workload import CHAIN

Value = Callable[[dict[str, Any]], "float | None"]
#: the host-time limits: microseconds per update call, and ratios to ADAM on GPT-2 small
HOST_US = {"same": 25.0, "new": 60.0}
MANY_RATIO, CHAIN_RATIO = 2.0, 1.3


def _get(entry: dict[str, Any], *path: str) -> Any:
    """``entry[path[0]][path[1]]...``, None where a key is missing."""
    for key in path:
        entry = entry.get(key) or {}
    return entry or None


def _at(*path: str) -> Value:
    return lambda report: _get(report, *path)


def _row(report: dict[str, Any], rule: str, log2: int) -> dict[str, Any]:
    return next((r for r in report["results"] if r["rule"] == rule and r["log2"] == log2), {})


def _ratio(rule: str, log2: int, baseline: str) -> Value:
    """gpuopt's time for ``rule`` at 2^log2 as a multiple of ``baseline``'s in the same run."""
    return lambda report: _get(_row(report, rule, log2), "baselines", baseline, "time_ratio")


def _adam_copy(report: dict[str, Any]) -> float | None:
    pct = _get(_row(report, "ADAM", 28), "pct_copy")
    return 100 / pct if pct else None


def _chain_adam(report: dict[str, Any]) -> float | None:
    """The chain's time as a multiple of ADAM's, at the largest size both ran."""
    sizes = sorted({r["log2"] for r in report["results"]})
    both = [(chain, adam) for chain, adam in ((_row(report, CHAIN, k), _row(report, "ADAM", k)) for k in sizes)
            if chain and adam]
    return both[-1][0]["time_s"] / both[-1][1]["time_s"] if both else None


def _worst_plain(report: dict[str, Any]) -> float | None:
    ratios = [_get(r, "baselines", "unfused", "time_ratio") for r in report["results"] if r["log2"] >= 16]
    return max((ratio for ratio in ratios if ratio is not None), default=None)


#: (id, run, limit, what is measured, value): a target is met where its value is at most its limit
TARGETS: list[tuple[str, str, float, str, Value]] = [
    ("gpu_adam_copy_bandwidth", "cupy", 1.1, "ADAM 2^28 time / the time of its bytes at copy bandwidth", _adam_copy),
    ("gpu_adam_vs_torch_fused", "cupy", 1.0, "ADAM 2^28 time / torch fused Adam's", _ratio("ADAM", 28, "torch_fused")),
    ("gpu_model_vs_torch_fused", "cupy", 1.0, "GPT-2 model time / torch fused Adam's",
     _at("model", "variants", "torch_fused", "time_ratio")),
    ("gpu_model_vs_flat", "cupy", 1.15, "GPT-2 model time / one flat tensor's of the same size",
     _at("model", "variants", "flat", "time_ratio")),
    ("gpu_host_time", "cupy", 100.0, "GPT-2 model host time per update call, us",
     _at("model", "variants", "multi_tensor", "host_time_us")),
    ("gpu_chain_vs_adam", "cupy", 1.05, f"{CHAIN} time / ADAM's", _chain_adam),
    ("cpu_adam_vs_torch_fused", "numpy", 1.0, "ADAM 2^24 time / torch fused Adam's", _ratio("ADAM", 24, "torch_fused")),
    ("cpu_model_vs_torch_fused", "numpy", 1.0, "GPT-2 model time / torch fused Adam's",
     _at("model", "variants", "torch_fused", "time_ratio")),
    ("cpu_rules_vs_plain", "numpy", 1.0, "every rule's time / its plain formula's, from 2^16", _worst_plain),
    ("cpu_small_descent", "numpy", 8.0, "Descent 2^10 time / its plain formula's", _ratio("Descent", 10, "unfused")),
    ("cpu_first_build", "numpy", 3.0, "first build of a native module, s", _at("native_build", "first_build_s")),
    ("cpu_cached_start", "numpy", 0.05, "a native module from the cache, s", _at("native_build", "cached_start_s")),
    ("numpy_adam_vs_plain", "numpy", 0.4, "ADAM 2^24 time / the plain NumPy formula's", _ratio("ADAM", 24, "unfused")),
]


def target(tid: str, description: str, limit: float, value: float | None, why_not: str = "not measured"
           ) -> dict[str, Any]:
    """One target's outcome: ``why_not`` says why a value of None was not measured."""
    status = "not measured" if value is None else "met" if value <= limit else "not met"
    return {"id": tid, "description": description, "status": status, "value": value, "limit": limit,
            "detail": why_not if value is None else ""}


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of a rules report as ``{"id", "description", "status", "value", "limit", "detail"}``."""
    backend, dtype = report["device"]["backend"], report["config"]["dtype"]
    where = {"cupy": "GPU", "numpy": "CPU"}
    out = []
    for tid, needs, limit, description, value in TARGETS:
        why_not = (f"needs a {where[needs]} ({needs}) run; this run used {backend}" if needs != backend else
                   f"defined for float32; this run used {dtype}" if dtype != "float32" else
                   "its sizes, rules or baselines were not in this run, or failed (see the notes)")
        measured = value(report) if needs == backend and dtype == "float32" else None
        out.append(target(tid, f"{where[needs]}: {description}", limit, measured, why_not))
    return out


def host_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The host-time targets of a ``--host`` report."""
    us = {name: case["host_time_us"] for name, case in report["cases"].items()}
    many = report["config"]["many"]

    def ratio(case: str, base: str) -> float | None:
        return us[case] / us[base] if case in us and base in us else None

    out = []
    for kind, limit in HOST_US.items():
        for prefix, who in (("", "arrays"), ("torch ", "PyTorch tensors")):
            out.append(target(f"host_{prefix.replace(' ', '_')}gpt2_adam_{kind}_grads_us", f"host: GPT-2 small ADAM, "
                              f"{kind} gradient {who} every step, us per update", limit, us.get(f"{prefix}ADAM/{kind}"),
                              "PyTorch is not importable" if prefix else "not measured"))
        out.append(target(f"host_{many}_tensors_{kind}_grads_ratio", f"host: {many} tensors' time / GPT-2 small's "
                          f"({kind} gradients)", MANY_RATIO, ratio(f"ADAM/{kind}/{many}", f"ADAM/{kind}")))
        out += [target(f"host_{chain.lower().replace('+', '_')}_vs_adam_{kind}_grads_ratio", f"host: {chain} time / "
                       f"ADAM's ({kind} gradients)", CHAIN_RATIO, ratio(f"{chain}/{kind}", f"ADAM/{kind}"))
                for chain in report["config"]["rules"][1:]]
    return out
