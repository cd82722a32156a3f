"""``python -m gpuopt bench``: the time of update steps against memory bandwidth and baselines.

For each rule and size: time per step, GB/s (the bytes a step must move), the percentage of the
copy bandwidth, and gpuopt's time as a multiple of the rule's plain formula's and PyTorch's Adam
(0.23x: gpuopt takes 0.23 times as long), all measured in the same run; then GPT-2 small's 148
tensors and the performance targets. With --host: gpuopt's own host time per update call.

Its parts: options (the command line), devices (the machine: clock, copy bandwidth), workload,
runner (one run), host (--host), targets, report (text, JSON, PNG).
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
    parser = subparsers.add_parser("bench", help=__doc__.splitlines()[0].split(": ", 1)[1],
                                   description=__doc__.split("\n\n")[1])
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``bench``: 0 on success, 2 on a setting that cannot run, 1 with ``--fail-on-targets``
    when a measured target is not met."""
    try:
        config = config_from_args(args)
    except BenchError as exc:
        print(f"gpuopt bench: error: {exc}", file=sys.stderr)
        return 2
    if args.host:
        report = host_benchmark(args.host_calls, args.model_layers, args.model_width, args.host_many, args.torch,
                                args.host_launches)
    else:
        report = benchmark(config, None if args.quiet else lambda message: print(message, file=sys.stderr))
    print(format_report(report), flush=True)
    if args.json:
        print(f"wrote {write_json(report, args.json)}")
    if args.plot and not args.host:
        print(f"wrote {plot_report(report, args.plot)}")
    return int(args.fail_on_targets and any(t["status"] == "not met" for t in report["targets"]))
