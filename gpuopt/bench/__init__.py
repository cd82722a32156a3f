"""``python -m gpuopt bench``: the time of update steps against memory bandwidth and baselines.

For each rule and size: time per step, GB/s (the bytes a step must move), the percentage of the
copy bandwidth, and gpuopt's time as a multiple of the rule's plain formula's and PyTorch's Adam
(0.23x: gpuopt takes 0.23 times as long), all measured in the same run; then GPT-2 small's 148
tensors and the performance targets. With --host: gpuopt's own host time per update call.

This module is the command line; its parts: devices (the machine: clock, copy bandwidth),
workload (what is timed), runner (a run of the rules, or of --host), targets, report (text, JSON,
PNG).
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from ..arguments import choose_backend, non_negative_int, parse_optimiser, positive_int
from ..rule import Rule
from .report import BenchError, format_report, matplotlib_pyplot, output_path, plot_report, write_json
from .runner import benchmark, host_benchmark
from .workload import ALIASES, RULES

__all__ = ["BenchError", "add_arguments", "add_parser", "benchmark", "config_from_args", "host_benchmark",
           "parse_rules", "parse_sizes", "run"]

#: per backend: log2 sizes, repeats, warm-up steps
DEFAULTS = {"cupy": ((16, 28), 20, 3), "numpy": ((16, 24), 5, 1)}


def parse_rules(text: str) -> list[tuple[str, Callable[[], Rule]]]:
    """``--rules``: ``all``, or a comma list of names from :data:`RULES` (case-insensitive;
    ``Clip+WD+ADAM`` is the chain) or optimiser expressions such as ``ClipNorm(1)+ADAM(1e-3)``
    (read by :func:`gpuopt.arguments.parse_optimiser`, never evaluated as Python)."""
    text = text.strip()
    if text.lower() == "all":
        return list(RULES.items())
    by_lower = {name.lower(): name for name in RULES} | ALIASES
    try:
        tree = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise argparse.ArgumentTypeError(f"--rules: cannot read {text[:100]!r}") from None
    chosen: dict[str, Callable[[], Rule]] = {}
    for node in tree.elts if isinstance(tree, ast.Tuple) else [tree]:
        item = ast.get_source_segment(text, node) or ""
        name = by_lower.get(item.replace(" ", "").lower())
        if name is None:
            try:
                parse_optimiser(item)
            except (ValueError, TypeError) as exc:
                raise argparse.ArgumentTypeError(f"{exc} (--rules takes 'all' or a comma list of "
                                                 f"{', '.join(RULES)} or optimiser expressions)") from None
        chosen.setdefault(name or item, RULES[name] if name else lambda item=item: parse_optimiser(item))
    return list(chosen.items())


def parse_sizes(text: str) -> list[int]:
    """``--sizes``: log2 element counts, a range (``16-28``), a list (``10,12``) or both."""
    sizes: set[int] = set()
    for item in filter(None, map(str.strip, text.split(","))):
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", item)
        if not match or int(match[1]) > int(match[2] or match[1]):
            raise argparse.ArgumentTypeError(f"bad size {item!r}: give log2 element counts as a range (16-28) or "
                                             "a comma list (10,12)")
        sizes.update(range(int(match[1]), int(match[2] or match[1]) + 1))
    if not sizes or max(sizes) > 34:
        raise argparse.ArgumentTypeError("--sizes are log2 element counts between 0 and 34")
    return sorted(sizes)


#: the options: (flags, argparse keywords); ON_OFF for a --x/--no-x switch
ON_OFF = {"action": argparse.BooleanOptionalAction, "default": True}
OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("--rules", dict(type=parse_rules, default="all", metavar="LIST", help="comma list of rules or optimiser "
                     f"expressions (default: all: {', '.join(RULES)})")),
    ("--sizes", dict(type=parse_sizes, metavar="LOG2", help="log2 element counts: a range (16-28) or a comma list "
                     "(10,12) (default: 16-28 on a GPU, 16-24 on NumPy)")),
    ("--dtype", dict(choices=("float32", "float16", "float64"), default="float32", help="parameter dtype")),
    ("--backend", dict(choices=("auto", "numpy", "cupy"), default="auto", help="auto: cupy where a GPU is usable")),
    ("--repeats", dict(type=positive_int, metavar="N", help="timed repeats, the median is reported (default: 20 "
                       "on a GPU, 5 on NumPy)")),
    ("--warmup", dict(type=non_negative_int, metavar="N", help="untimed steps first (default: 3 GPU, 1 NumPy)")),
    ("--json", dict(metavar="PATH", help="write the results as JSON (a directory: a file named by device and date)")),
    ("--plot", dict(metavar="PATH", help="write a PNG of GB/s against size (needs matplotlib), as for --json")),
    ("--model", dict(**ON_OFF, help="GPT-2 small's 148 tensors in one update call against a per-tensor loop, "
                     "one flat tensor and PyTorch")),
    ("--model-layers", dict(type=positive_int, default=12, metavar="N", help="the model's transformer blocks")),
    ("--model-width", dict(type=positive_int, default=768, metavar="N", help="the model's embedding width")),
    ("--baselines", dict(**ON_OFF, help="time each rule's plain formula (gpuopt.plain)")),
    ("--torch", dict(**ON_OFF, help="compare with torch.optim.Adam where PyTorch is importable")),
    ("--host", dict(action="store_true", help="time only gpuopt's host work per update call, with a device that "
                    "launches nothing (any machine)")),
    ("--host-calls", dict(type=positive_int, default=500, metavar="N", help="update calls per --host case")),
    ("--host-launches", dict(action="store_true", help="with --host: real launches on the GPU")),
    ("--host-many", dict(type=positive_int, default=1000, metavar="N", help="tensors of the --host many-tensor case")),
    ("--fail-on-targets", dict(action="store_true", help="exit with status 1 when a measured target is not met")),
    ("--quiet", dict(action="store_true", help="no progress lines")),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the benchmark's options on ``parser``."""
    for flag, keywords in OPTIONS:
        parser.add_argument(flag, **keywords)


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
            check_output_path(getattr(args, option), f"--{option}", suffix)
    return argparse.Namespace(**{
        **vars(args), "backend": backend, "sizes": args.sizes or list(range(lo, hi + 1)),
        "rules": parse_rules(args.rules) if isinstance(args.rules, str) else args.rules,
        "dtype": np.dtype(args.dtype), "repeats": args.repeats or repeats,
        "warmup": warmup if args.warmup is None else args.warmup})


def check_output_path(path: str, option: str, suffix: str) -> None:
    """BenchError now, before anything is measured, if ``path`` cannot be written later."""
    target, is_dir = output_path(path, suffix)
    folder = target if is_dir else os.path.dirname(target) or "."
    while is_dir and not os.path.exists(folder):  # a directory is made later, under one that exists
        folder = os.path.dirname(folder.rstrip(os.sep)) or "."
    if not os.path.isdir(folder):
        raise BenchError(f"{option}: directory {folder!r} does not exist")
    if not os.access(folder, os.W_OK) or (not is_dir and os.path.isdir(target)):
        raise BenchError(f"{option}: cannot write {target!r}")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench`` on ``python -m gpuopt``'s subcommands."""
    parser = subparsers.add_parser("bench", help=__doc__.splitlines()[0].split(": ", 1)[1].rstrip("."),
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
