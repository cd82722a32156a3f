"""The benchmark's output: the text summary, the JSON file and the PNG plot."""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import numpy as np

from .options import matplotlib_pyplot, output_path


def format_time(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds:.3f} s"


def _time_ratio(entry: dict[str, Any], key: str) -> str:
    base = entry.get("baselines", {}).get(key)
    if not base:
        return ""
    if "time_ratio" not in base:
        return "error" if "error" in base else ""
    return f"{base['time_ratio']:.2f}x"


def format_report(report: dict[str, Any]) -> str:
    """The human-readable summary: header, per rule and size table, model, targets."""
    dev, copy = report["device"], report["copy_bandwidth"]
    lines = [
        f"gpuopt bench: {dev['backend']} on {dev['name']}, {report['config']['dtype']}, "
        f"{report['config']['timer']}, median of {report['config']['repeats']} repeats",
        f"copy bandwidth: {copy['gbps']:.1f} GB/s ({copy['method']}"
        + (f"; cudaMemcpy {copy['memcpy_gbps']:.1f}, copy kernel {copy['copy_kernel_gbps']:.1f}"
           if "memcpy_gbps" in copy else "")
        + (f"; np.copyto {copy['np_copyto_gbps']:.1f}" if "np_copyto_gbps" in copy else "") + ")",
    ]
    if "cpu_backend" in dev:
        lines.append(f"NumPy arrays on: {dev['cpu_backend']}")
    if report.get("native_build"):
        b = report["native_build"]
        lines.append(f"native module: first build {b['first_build_s']:.2f} s, cached start "
                     f"{b['cached_start_s'] * 1e3:.1f} ms")
    lines.append("")
    baseline_keys: list[str] = []
    for entry in report["results"]:
        for key in entry["baselines"]:
            if key not in baseline_keys:
                baseline_keys.append(key)
    names = {"unfused": "x unfused", "torch": "x torch", "torch_fused": "x torch fused",
             "torch_foreach": "x torch foreach"}
    width = max([len(e["rule"]) for e in report["results"]] + [4])
    header = (f"{'rule':<{width}}  {'size':>5}  {'B/elem':>6}  {'time/step':>11}  {'GB/s':>8}  "
              f"{'% copy':>6}" + "".join(f"  {names.get(k, k):>16}" for k in baseline_keys))
    lines += [header, "-" * len(header)]
    for e in report["results"]:
        lines.append(
            f"{e['rule']:<{width}}  {'2^' + str(e['log2']):>5}  {e['bytes_per_element']:>6}  "
            f"{format_time(e['time_s']):>11}  {e['gbps']:>8.1f}  {e['pct_copy']:>5.1f}%"
            + "".join(f"  {_time_ratio(e, k):>16}" for k in baseline_keys))
    if not report["results"]:
        lines.append("(no results)")
    lines.append("x unfused, x torch ...: gpuopt's time per step as a multiple of that baseline's "
                 "(below 1x: gpuopt is faster)")
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
                  "torch_foreach": "torch Adam(foreach=True)", "gpuopt_torch": "gpuopt.torch.Optimizer"}
        for name, v in (model.get("variants") or {}).items():
            ratio = v.get("time_ratio_to_multi_tensor")
            extra = f"  {ratio:.2f}x the time of one update call" if ratio is not None else ""
            if "time_ratio_to_torch_fused" in v:
                extra += f", {v['time_ratio_to_torch_fused']:.2f}x the time of torch Adam(fused=True)"
            if "host_time_s" in v:
                extra += f"  (host time per call {format_time(v['host_time_s'])})"
            if "time_s" not in v:
                lines.append(f"  {labels.get(name, name):<28} error: {v.get('error', '?')}")
                continue
            gbps = f"{v['gbps']:>8.1f} GB/s" if "gbps" in v else ""
            lines.append(f"  {labels.get(name, name):<28} {format_time(v['time_s']):>11}  {gbps}{extra}")
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
    path = _output(report, path, ".json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_finite(report), f, indent=2, allow_nan=False)
        f.write("\n")
    return path


def _output(report: dict[str, Any], path: str, suffix: str) -> str:
    """The file to write: in a directory, one named by device, backend, dtype and date; a file
    name gets ``suffix`` if it lacks it (so the name printed is the name written)."""
    target, is_dir = output_path(path, suffix)
    if not is_dir:
        return target
    os.makedirs(target, exist_ok=True)
    name = (f"{_slug(report['device']['name'])}-{report['device']['backend']}-"
            f"{report['config']['dtype']}-{report['date'][:10]}{suffix}")
    return os.path.join(target, name)


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


def plot_report(report: dict[str, Any], path: str) -> str:
    """A PNG of GB/s against size, one line per rule, the copy bandwidth as a reference line.
    ``path`` is a file (``.png`` is added if missing) or a directory, as for :func:`write_json`.
    Returns the path written."""
    path = _output(report, path, ".png")
    plt = matplotlib_pyplot()
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

