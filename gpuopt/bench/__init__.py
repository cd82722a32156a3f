"""``python -m gpuopt bench``: time update steps and set them against memory bandwidth and baselines.

For each rule (the twelve optimisers plus ``Optimiser(ClipValue(1), WeightDecay(1e-4), ADAM())``)
and size it reports the time per step of :func:`gpuopt.update`, GB/s from the bytes a step must
move (:mod:`.workload`), the percentage of the copy bandwidth measured in the same run, and
gpuopt's time as a multiple of baselines measured in the same run (``0.23x``: gpuopt takes 0.23
times as long): the rule's plain formula (:class:`gpuopt.plain.Unfused`) and, for ADAM,
``torch.optim.Adam``; then GPT-2 small's 148 tensors (:mod:`.runner`) and the performance
targets (:mod:`.targets`). ``--host`` times gpuopt's host work per call instead (:mod:`.host`).
GPU times come from CUDA events, CPU times from ``perf_counter``: each the median over repeats.

Its parts: options (the command line), devices (the machine: clock, memory, copy bandwidth),
workload, runner, host, targets, report (text, JSON, PNG).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .host import host_benchmark
from .options import BenchError, add_arguments, config_from_args
from .report import format_report, plot_report, write_json
from .runner import benchmark

__all__ = ["BenchError", "add_arguments", "add_parser", "benchmark", "host_benchmark", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench`` on ``python -m gpuopt``'s subcommands."""
    parser = subparsers.add_parser("bench", help="time update steps per rule and size against copy bandwidth "
                                   "and baselines", description=__doc__.split("\n\n")[1])
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``bench`` from parsed arguments: 0 on success, 2 on a setting that cannot run,
    1 with ``--fail-on-targets`` when a measured target is not met."""
    try:
        config = config_from_args(args)
    except BenchError as exc:
        print(f"gpuopt bench: error: {exc}", file=sys.stderr)
        return 2
    if args.host:
        report = host_benchmark(calls=args.host_calls, layers=args.model_layers, width=args.model_width,
                                many=args.host_many, use_torch=args.torch, launches=args.host_launches)
    else:
        report = benchmark(config, None if args.quiet else lambda message: print(message, file=sys.stderr))
    print(format_report(report), flush=True)
    if args.json:
        print(f"wrote {write_json(report, args.json)}")
    if args.plot and not args.host:
        print(f"wrote {plot_report(report, args.plot)}")
    return int(args.fail_on_targets and any(t["status"] == "not met" for t in report["targets"]))
