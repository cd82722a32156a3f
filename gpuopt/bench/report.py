"""The benchmark's output: the text summary, the JSON file and the PNG plot."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
from typing import Any

import numpy as np

from .. import __version__
from ..dispatch import cupy_module
from .options import matplotlib_pyplot, output_path


def run_record(kind: str, device: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The fields every report starts with: what ran where, when, with which versions."""
    versions = {"gpuopt": __version__, "numpy": np.__version__, "python": platform.python_version(),
                "cupy": getattr(cupy_module(), "__version__", None), "torch": None}
    try:
        versions["torch"] = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        pass
    return {"schema": 1, "kind": kind, "device": device, "versions": versions, "config": config,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


#: column and line labels of the baselines and model variants
LABELS = {"unfused": "unfused", "torch": "torch", "torch_fused": "torch fused", "torch_foreach": "torch foreach",
          "multi_tensor": "gpuopt, one update call", "per_tensor_loop": "gpuopt, per-tensor loop",
          "flat": "gpuopt, one flat tensor", "gpuopt_torch": "gpuopt.torch.Optimizer"}


def format_time(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.3f} ms"


def format_report(report: dict[str, Any]) -> str:
    """The human-readable summary of a report: its table, the model, the targets and notes."""
    lines = (_host_lines if report.get("kind") == "host" else _rule_lines)(report)
    lines += ["", "targets:"]
    for t in report["targets"]:
        value = "" if t["value"] is None else f" = {t['value']:.3g} (limit {t['limit']:g})"
        lines.append(f"  [{t['status']}] {t['id']}: {t['description']}{value}{': ' * bool(t['detail'])}{t['detail']}")
    return "\n".join(lines + [f"note: {note}" for note in report.get("notes", [])])


def _host_lines(report: dict[str, Any]) -> list[str]:
    c = report["config"]
    lines = [f"gpuopt host time per update call on {report['device']['name']} ({report['date']})",
             f"{c['device']}, {c['tensors']} tensors ({c['parameters'] / 1e6:.1f}M parameters), median of "
             f"{c['calls']} calls", "", f"{'case':<40} {'median':>10} {'min':>10} {'prepared/full':>14}"]
    return lines + [f"{name:<40} {case['host_time_us']:>8.1f}us {case['host_time_min_us']:>8.1f}us "
                    f"{case['prepared_calls']:>7}/{case['full_calls']:<6}" for name, case in report["cases"].items()]


def _rule_lines(report: dict[str, Any]) -> list[str]:
    dev, copy, config = report["device"], report["copy_bandwidth"], report["config"]
    rates = ", ".join(f"{method} {gbps:.1f}" for method, gbps in copy.get("gbps_by_method", {}).items())
    lines = [f"gpuopt bench: {dev['backend']} on {dev['name']}, {config['dtype']}, {config['timer']}, "
             f"median of {config['repeats']} repeats",
             f"copy bandwidth: {copy['gbps']:.1f} GB/s ({copy['method']}{'; ' * bool(rates)}{rates})"]
    if "cpu_backend" in dev:
        lines.append(f"NumPy arrays on: {dev['cpu_backend']}")
    if report.get("native_build"):
        b = report["native_build"]
        lines.append(f"native module: first build {b['first_build_s']:.2f} s, cached start "
                     f"{b['cached_start_s'] * 1e3:.1f} ms")
    results = report["results"]
    keys = list(dict.fromkeys(key for e in results for key in e["baselines"]))
    width = max([len(e["rule"]) for e in results] + [4])
    header = (f"{'rule':<{width}}  {'size':>5}  {'B/elem':>6}  {'time/step':>11}  {'GB/s':>8}  {'% copy':>6}"
              + "".join(f"  {'x ' + LABELS.get(k, k):>16}" for k in keys))
    lines += ["", header, "-" * len(header)]
    for e in results:
        ratios = [_ratio(e["baselines"].get(k, {})) for k in keys]
        lines.append(f"{e['rule']:<{width}}  {'2^' + str(e['log2']):>5}  {e['bytes_per_element']:>6}  "
                     f"{format_time(e['time_s']):>11}  {e['gbps']:>8.1f}  {e['pct_copy']:>5.1f}%"
                     + "".join(f"  {ratio:>16}" for ratio in ratios))
    lines.append("x unfused, x torch ...: gpuopt's time per step as a multiple of that baseline's "
                 "(below 1x: gpuopt is faster)" if results else "(no results)")
    lines += [f"skipped {skip}" for skip in report["skipped"]]
    model = report.get("model")
    if model:
        lines += ["", f"model: GPT-2 small shapes ({model['tensors']} tensors, {model['parameters'] / 1e6:.1f}M "
                      f"parameters, {model['layers']} blocks, width {model['width']}), ADAM {model['dtype']}"]
        for name, v in (model.get("variants") or {}).items():
            label = f"  {LABELS.get(name, name):<28} "
            if "time_s" not in v:
                lines.append(f"{label}error: {v.get('error', '?')}")
                continue
            lines.append(label + f"{format_time(v['time_s']):>11}  {v['gbps']:>8.1f} GB/s" + "".join(
                text.format(v[key]) for key, text in (
                    ("time_ratio_to_multi_tensor", "  {:.2f}x the time of one update call"),
                    ("time_ratio_to_torch_fused", ", {:.2f}x the time of torch Adam(fused=True)"),
                    ("host_time_us", "  (host time per call {:.1f} us)")) if key in v))
    return lines


def _ratio(baseline: dict[str, Any]) -> str:
    return f"{baseline['time_ratio']:.2f}x" if "time_ratio" in baseline else "error" * ("error" in baseline)


def write_json(report: dict[str, Any], path: str) -> str:
    """Write ``report`` to ``path``; a directory (existing, or ending in a separator) gets a
    file named by device, backend, dtype and date. Returns the path written."""
    path = _output(report, path, ".json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, allow_nan=False)  # (valid JSON: no NaN)
        f.write("\n")
    return path


def _output(report: dict[str, Any], path: str, suffix: str) -> str:
    """The file to write: in a directory, one named by device, backend, dtype and date; a file
    name gets ``suffix`` if it lacks it (so the name printed is the name written)."""
    target, is_dir = output_path(path, suffix)
    if not is_dir:
        return target
    os.makedirs(target, exist_ok=True)
    device = re.sub(r"[^a-z0-9]+", "-", report["device"]["name"].lower()).strip("-") or "device"
    return os.path.join(target, f"{device}-{report['device']['backend']}-{report['config']['dtype']}-"
                                f"{report['date'][:10]}{suffix}")


def plot_report(report: dict[str, Any], path: str) -> str:
    """A PNG of GB/s against size, one line per rule, the copy bandwidth as a reference line.
    ``path`` is a file (``.png`` is added if missing) or a directory, as for :func:`write_json`.
    Returns the path written."""
    path = _output(report, path, ".png")
    plt = matplotlib_pyplot()
    fig, ax = plt.subplots(figsize=(10, 6))
    for rule in dict.fromkeys(e["rule"] for e in report["results"]):
        points = sorted((e["elements"], e["gbps"]) for e in report["results"] if e["rule"] == rule)
        ax.plot(*zip(*points), marker="o", markersize=3, label=rule)
    copy = report["copy_bandwidth"]["gbps"]
    ax.axhline(copy, color="black", linestyle="--", linewidth=1, label=f"copy bandwidth ({copy:.0f} GB/s)")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="elements per parameter array", ylabel="GB/s (bytes a step must move / time per step)",
           title=f"gpuopt update: {report['device']['backend']} on {report['device']['name']}, "
                 f"{report['config']['dtype']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
