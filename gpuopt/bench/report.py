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


class BenchError(Exception):
    """A setting the benchmark cannot run with (no GPU for --backend cupy, no matplotlib...)."""


def output_path(path: str, suffix: str) -> tuple[str, bool]:
    """(where to write, whether it is a directory to put a generated file name in): a path that
    is a directory or ends in a separator is one; a file name without ``suffix`` gets it."""
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        return path, True
    return (path if path.lower().endswith(suffix) else path + suffix), False


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


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Aligned columns: the first to the left, the others to the right."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
    return [line(header), "-" * len(line(header)), *map(line, rows)]


def _ratio(entry: dict[str, Any], key: str) -> str:
    """``entry[key]`` as a multiple (``0.23x``), "error" for a baseline that failed, else "-"."""
    return f"{entry[key]:.2f}x" if key in entry else "error" if "error" in entry else "-"


def format_report(report: dict[str, Any]) -> str:
    """The human-readable summary of a report: its tables, the targets and the notes."""
    c, dev = report["config"], report["device"]
    if report["kind"] == "host":
        lines = [f"gpuopt host time per update call on {dev['name']}: {c['device']}, {c['tensors']} tensors "
                 f"({c['parameters'] / 1e6:.1f}M parameters), median of {c['calls']} calls", "", *_table(
                     ["case", "median", "fastest", "prepared/full"],
                     [[name, f"{case['host_time_us']:.1f} us", f"{case['host_time_min_us']:.1f} us",
                       f"{case['prepared_calls']}/{case['full_calls']}"] for name, case in report["cases"].items()])]
    else:
        lines = _rule_lines(report)
    lines += ["", "targets:"]
    for t in report["targets"]:
        value = "" if t["value"] is None else f" = {t['value']:.3g} (limit {t['limit']:g})"
        lines.append(f"  [{t['status']}] {t['id']}: {t['description']}{value}{': ' * bool(t['detail'])}{t['detail']}")
    return "\n".join(lines + [f"note: {note}" for note in report["notes"]])


def _rule_lines(report: dict[str, Any]) -> list[str]:
    c, dev, copy, builds = report["config"], report["device"], report["copy_bandwidth"], report["native_build"]
    rates = ", ".join(f"{method} {gbps:.1f}" for method, gbps in copy["gbps_by_method"].items())
    lines = [f"gpuopt bench: {dev['backend']} on {dev['name']}, {c['dtype']}, {c['timer']}, median of {c['repeats']} "
             f"repeats", f"copy bandwidth: {copy['gbps']:.1f} GB/s ({copy['method']}; {rates})"]
    if builds:
        lines.append(f"NumPy arrays on {dev['cpu_backend']}: a module builds in {builds['first_build_s']:.2f} s, "
                     f"loads from the cache in {builds['cached_start_s'] * 1e3:.1f} ms")
    results = report["results"]
    keys = list(dict.fromkeys(key for e in results for key in e["baselines"]))
    lines += ["", *_table(["rule", "size", "B/elem", "time/step", "GB/s", "% copy", *(f"x {LABELS[k]}" for k in keys)],
                          [[e["rule"], f"2^{e['log2']}", str(e["bytes_per_element"]), format_time(e["time_s"]),
                            f"{e['gbps']:.1f}", f"{e['pct_copy']:.1f}%",
                            *(_ratio(e["baselines"].get(k, {}), "time_ratio") for k in keys)] for e in results]),
              "x unfused, x torch ...: gpuopt's time per step as a multiple of that baseline's (below 1x: faster)"]
    lines += [f"skipped 2^{skip['log2']}: {skip['reason']}" for skip in report["skipped"]]
    model = report["model"]
    if model:
        lines += ["", f"model: GPT-2 small shapes ({model['tensors']} tensors, {model['parameters'] / 1e6:.1f}M "
                      f"parameters, {model['layers']} blocks, width {model['width']}), ADAM {model['dtype']}",
                  *_table(["", "time/step", "GB/s", "x one update call", "x torch fused", "host time/call"],
                          [[LABELS[name], format_time(v["time_s"]) if "time_s" in v else "error",
                            f"{v.get('gbps', 0):.1f}", _ratio(v, "time_ratio_to_multi_tensor"),
                            _ratio(v, "time_ratio_to_torch_fused"),
                            f"{v['host_time_us']:.1f} us" if "host_time_us" in v else "-"]
                           for name, v in model["variants"].items()])]
    return lines


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


def matplotlib_pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install matplotlib (or gpuopt[plot])") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
