"""``python -m gpuopt bench``: time update steps and set them against memory bandwidth and baselines.

For each rule (Flux.Optimise's twelve optimisers plus ``Optimiser(ClipValue(1), WeightDecay(1e-4),
ADAM())``) and each size it measures the time per step of :func:`gpuopt.update` and reports

- GB/s, from the bytes a step must move (:func:`gpuopt.bench.workload.bytes_per_element`);
- the percentage of the copy bandwidth measured in the same run (a device-to-device copy of a
  large buffer on the GPU, a copy on the update's threads on the CPU);
- gpuopt's time as a multiple of baselines measured in the same run (``0.23x``: gpuopt takes
  0.23 times as long): the same rule as plain NumPy/CuPy array code
  (:class:`gpuopt.plain.Unfused`, one whole-array operation at a time), and for ADAM
  ``torch.optim.Adam`` (``fused=True`` and ``foreach=True`` on CUDA; the default and
  ``fused=True`` on the CPU) where PyTorch is importable;
- a model with GPT-2 small's 148 parameter tensors (:func:`gpuopt.bench.workload.gpt2_shapes`):
  one multi-tensor ``update`` call against a per-tensor loop, one flat tensor of the same size,
  the unfused loop and PyTorch, each as a multiple of the time of one call, plus the host time
  of one ``update`` call, and ``gpuopt.torch.Optimizer``'s ``step()`` on the same tensors (host
  and device, as a PyTorch training loop pays it) against ``torch.optim.Adam(fused=True)``;
- the performance targets (:mod:`gpuopt.bench.targets`), each met, not met or not measured.

GPU times come from CUDA events after warm-up; CPU times from ``time.perf_counter``. Each
figure is the median over repeats, and each repeat runs enough steps to last a few
milliseconds. The command is wired into ``python -m gpuopt`` through :func:`add_parser` (or
:func:`add_arguments` and :func:`run`); :func:`benchmark` is the same as a Python call that
returns the report as a dict (the JSON written by ``--json``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .options import BenchError, add_arguments, config_from_args
from .progress import Progress
from .report import format_report, plot_report, write_json
from .runner import benchmark

# Its parts: workload (rules, bytes, the model), options, devices (clocks, memory, copy
# bandwidth), runner (one run), targets, report (text, JSON, PNG), host (--host), progress.
__all__ = ["BenchError", "add_arguments", "add_parser", "benchmark", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench`` on ``python -m gpuopt``'s subcommands."""
    p = subparsers.add_parser(
        "bench",
        help="time update steps per rule and size against copy bandwidth and baselines",
        description=(
            "Time gpuopt.update for each rule and size (CUDA events on a GPU, perf_counter on "
            "NumPy) and report time per step, GB/s, the percentage of the copy bandwidth "
            "measured in the same run, the time as a multiple of the unfused formula's and "
            "PyTorch's Adam, a GPT-2-small model comparison and the performance targets."
        ),
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p



def _run_host(args: argparse.Namespace) -> int:
    from ..dispatch import gpu_available
    from .host import format_host_report, host_benchmark

    if args.host_launches and not gpu_available():
        print("gpuopt bench: error: --host-launches needs CuPy and a usable CUDA GPU", file=sys.stderr)
        return 2
    report = host_benchmark(calls=args.host_calls, layers=args.model_layers, width=args.model_width,
                            many=args.host_many, use_torch=args.torch, launches=args.host_launches)
    print(format_host_report(report), flush=True)
    if args.json:
        print(f"wrote {write_json(report, args.json)}")
    if getattr(args, "fail_on_targets", False) and any(t["status"] == "not met" for t in report["targets"]):
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``bench`` from parsed arguments: 0 on success, 2 on a setting that cannot run,
    1 with ``--fail-on-targets`` when a measured target is not met."""
    if getattr(args, "host", False):
        return _run_host(args)
    try:
        config = config_from_args(args)
    except BenchError as exc:
        print(f"gpuopt bench: error: {exc}", file=sys.stderr)
        return 2
    report = benchmark(config, Progress(enabled=not getattr(args, "quiet", False)))
    print(format_report(report), flush=True)
    if args.json:
        print(f"wrote {write_json(report, args.json)}")
    if args.plot:
        print(f"wrote {plot_report(report, args.plot)}")
    if getattr(args, "fail_on_targets", False) and any(t["status"] == "not met" for t in report["targets"]):
        return 1
    return 0
