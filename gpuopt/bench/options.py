"""The benchmark's options: ``--rules`` and ``--sizes``, the argparse arguments, and the settings
of one run they make (:func:`config_from_args`), checked before anything is measured."""

from __future__ import annotations

import argparse
import ast
import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from ..arguments import choose_backend, non_negative_int, parse_optimiser, positive_int
from ..rule import Rule
from .workload import ALIASES, RULES

#: per backend: log2 sizes, repeats, warm-up steps
DEFAULTS = {"cupy": ((16, 28), 20, 3), "numpy": ((16, 24), 5, 1)}


class BenchError(Exception):
    """A setting the benchmark cannot run with (no GPU for --backend cupy, no matplotlib...)."""


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


def output_path(path: str, suffix: str) -> tuple[str, bool]:
    """(where to write, whether it is a directory to put a generated file name in): a path that
    is a directory or ends in a separator is one; a file name without ``suffix`` gets it."""
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        return path, True
    return (path if path.lower().endswith(suffix) else path + suffix), False


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


def matplotlib_pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install matplotlib (or gpuopt[plot])") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
