"""``python -m gpuopt bench``: its options and the run they choose. The parts: devices (the
machine), workload (what is timed), runner (a run), targets, report (text, JSON, PNG)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from ..arguments import choose_backend, non_negative_int, parse_rules, parse_sizes, positive_int
from .report import BenchError, check_output, format_report, matplotlib_pyplot, plot_report, write_json
from .runner import benchmark, host_benchmark
from .workload import RULES

__all__ = ["BenchError", "add_parser", "benchmark", "config_from_args", "host_benchmark", "run"]

#: per backend: log2 sizes, repeats, warm-up steps
DEFAULTS = {"cupy": ((16, 28), 20, 3), "numpy": ((16, 24), 5, 1)}
ON_OFF = {"action": argparse.BooleanOptionalAction, "default": True}  # a --x/--no-x switch
OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("--rules", dict(type=parse_rules, default="all", metavar="LIST", help="comma list of rules or optimiser "
                     f"expressions (default: all: {', '.join(RULES)})")),
    ("--sizes", dict(type=parse_sizes, metavar="LOG2", help="log2 element counts: 16-28 or 10,12 (default: 16-28 "
                     "on a GPU, 16-24 on NumPy)")),
    ("--dtype", dict(choices=("float32", "float16", "float64"), default="float32", help="parameter dtype")),
    ("--backend", dict(choices=("auto", "numpy", "cupy"), default="auto", help="auto: cupy where a GPU is usable")),
    ("--repeats", dict(type=positive_int, metavar="N", help="timed repeats, the median is reported (default: 20 "
                       "GPU, 5 NumPy)")),
    ("--warmup", dict(type=non_negative_int, metavar="N", help="untimed steps first (default: 3 GPU, 1 NumPy)")),
    ("--json", dict(metavar="PATH", help="write the results as JSON (a directory: a file named by device and date)")),
    ("--plot", dict(metavar="PATH", help="write a PNG of GB/s against size, as for --json (needs matplotlib)")),
    ("--model", dict(**ON_OFF, help="GPT-2 small's tensors: one update call, a loop, one flat tensor, PyTorch")),
    ("--model-layers", dict(type=positive_int, default=12, metavar="N", help="the model's transformer blocks")),
    ("--model-width", dict(type=positive_int, default=768, metavar="N", help="the model's embedding width")),
    ("--baselines", dict(**ON_OFF, help="time each rule's plain formula (gpuopt.plain)")),
    ("--torch", dict(**ON_OFF, help="compare with PyTorch where it is importable")),
    ("--host", dict(action="store_true", help="time only gpuopt's host work per call, launching nothing")),
    ("--host-calls", dict(type=positive_int, default=500, metavar="N", help="update calls per --host case")),
    ("--host-launches", dict(action="store_true", help="with --host: real launches on the GPU")),
    ("--host-many", dict(type=positive_int, default=1000, metavar="N", help="tensors of the --host many-tensor case")),
    ("--fail-on-targets", dict(action="store_true", help="exit with status 1 when a measured target is not met")),
    ("--quiet", dict(action="store_true", help="no progress lines")),
]


def config_from_args(args: argparse.Namespace) -> argparse.Namespace:
    """The run's settings, defaults filled in for the backend (``auto`` resolved); BenchError,
    before anything is measured, for a setting that cannot run."""
    from .. import dispatch

    if args.host and args.host_launches and not dispatch.gpu_available():
        raise BenchError("--host-launches needs CuPy and a usable CUDA GPU")
    try:
        backend = choose_backend(args.backend)
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    (lo, hi), repeats, warmup = DEFAULTS[backend]
    if args.plot:
        matplotlib_pyplot()  # fail now, not after the whole run
    for option, suffix in (("json", ".json"), ("plot", ".png")):
        if getattr(args, option):
            check_output(getattr(args, option), f"--{option}", suffix)
    return argparse.Namespace(**{
        **vars(args), "backend": backend, "sizes": args.sizes or list(range(lo, hi + 1)), "dtype": np.dtype(args.dtype),
        "repeats": args.repeats or repeats, "warmup": warmup if args.warmup is None else args.warmup})


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench`` on ``python -m gpuopt``'s subcommands."""
    parser = subparsers.add_parser(
        "bench", help="the time of update steps against memory bandwidth and baselines",
        description="Time per step, GB/s and the copy bandwidth, against the plain formulas and PyTorch, for each "
                    "rule and size and GPT-2 small's tensors; with --host, gpuopt's own host time per call.")
    for flag, keywords in OPTIONS:
        parser.add_argument(flag, **keywords)
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
