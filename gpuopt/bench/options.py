"""The benchmark's options: parsing ``--rules`` and ``--sizes``, the argparse arguments, and
:class:`Config`, the settings of one run."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..arguments import choose_backend, non_negative_int, positive_int
from ..rule import Rule
from .workload import ALIASES, RULES

DTYPES = ("float32", "float16", "float64")
DEFAULT_SIZES = {"cupy": (16, 28), "numpy": (16, 24)}
DEFAULT_REPEATS = {"cupy": 20, "numpy": 5}
DEFAULT_WARMUP = {"cupy": 3, "numpy": 1}


class BenchError(Exception):
    """A setting the benchmark cannot run with (no GPU for --backend cupy, no matplotlib...)."""



def _split_top_level(text: str) -> list[str]:
    """Split on commas outside parentheses: ``"ADAM(1e-3, (0.9, 0.99)),Descent"`` is two items."""
    items, depth, current = [], 0, []
    for ch in text:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def parse_rules(text: str) -> list[tuple[str, Callable[[], Rule]]]:
    """``--rules``: ``all``, or a comma list of names from :data:`RULES` (case-insensitive;
    ``Clip+WD+ADAM`` is the chain) or optimiser expressions such as ``ClipNorm(1)+ADAM(1e-3)``
    (read by :func:`gpuopt.arguments.parse_optimiser`, never evaluated as Python)."""
    if text.strip().lower() == "all":
        return list(RULES.items())
    by_lower = {name.lower(): name for name in RULES}
    chosen: list[tuple[str, Callable[[], Rule]]] = []
    for item in _split_top_level(text):
        key = item.lower()
        name = ALIASES.get(key) or by_lower.get(key)
        if name is not None:
            factory = RULES[name]
        else:
            from ..arguments import parse_optimiser

            try:
                parse_optimiser(item)
            except (ValueError, TypeError) as exc:
                raise argparse.ArgumentTypeError(
                    f"{exc} (--rules takes 'all' or a comma list of {', '.join(RULES)} "
                    "or optimiser expressions)") from None
            name = item

            def factory(text: str = item) -> Rule:
                return parse_optimiser(text)
        if name not in (n for n, _ in chosen):
            chosen.append((name, factory))
    if not chosen:
        raise argparse.ArgumentTypeError("--rules is empty")
    return chosen


def parse_sizes(text: str) -> list[int]:
    """``--sizes``: log2 of the element counts, ``16-28`` (a range) or ``10,12,20`` (a list),
    or a mix (``10,16-20``)."""
    sizes: set[int] = set()
    for item in _split_top_level(text):
        match = re.fullmatch(r"(\d+)\s*-\s*(\d+)", item)
        try:
            if match:
                lo, hi = int(match.group(1)), int(match.group(2))
                if lo > hi:
                    raise ValueError
                sizes.update(range(lo, hi + 1))
            else:
                sizes.add(int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bad size {item!r}: give log2 element counts as a range (16-28) or a comma "
                "list (10,12)") from None
    if not sizes:
        raise argparse.ArgumentTypeError("--sizes is empty")
    if min(sizes) < 0 or max(sizes) > 34:
        raise argparse.ArgumentTypeError("--sizes are log2 element counts between 0 and 34")
    return sorted(sizes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the benchmark's options on ``parser``."""
    parser.add_argument("--rules", type=parse_rules, default="all", metavar="LIST",
                        help=f"comma list of rules or optimiser expressions (default: all: "
                             f"{', '.join(RULES)})")
    parser.add_argument("--sizes", type=parse_sizes, default=None, metavar="LOG2",
                        help="log2 element counts: a range (16-28) or a comma list (10,12) "
                             "(default: 16-28 on a GPU, 16-24 on NumPy)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="parameter dtype (default: float32)")
    parser.add_argument("--backend", choices=("auto", "numpy", "cupy"), default="auto",
                        help="array backend; auto picks cupy only where a GPU is usable (default: auto)")
    parser.add_argument("--repeats", type=positive_int, default=None, metavar="N",
                        help="timed repeats per measurement, the median is reported "
                             "(default: 20 on a GPU, 5 on NumPy)")
    parser.add_argument("--warmup", type=non_negative_int, default=None, metavar="N",
                        help="untimed steps before timing (default: 3 on a GPU, 1 on NumPy)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="write the results as JSON to PATH (a directory: a file named by "
                             "device and date inside it, e.g. benchmarks/results/)")
    parser.add_argument("--plot", default=None, metavar="PATH",
                        help="write a PNG of GB/s against size (needs matplotlib: gpuopt[plot])")
    parser.add_argument("--model", action=argparse.BooleanOptionalAction, default=True,
                        help="compare one multi-tensor update of GPT-2 small's 148 tensors with a "
                             "per-tensor loop, one flat tensor and PyTorch (default: on)")
    parser.add_argument("--model-layers", type=positive_int, default=12, metavar="N",
                        help="transformer blocks of the model (default: 12, GPT-2 small)")
    parser.add_argument("--model-width", type=positive_int, default=768, metavar="N",
                        help="embedding width of the model (default: 768, GPT-2 small)")
    parser.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                        help="time the unfused array-expression baselines (default: on)")
    parser.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True,
                        help="compare with torch.optim.Adam where PyTorch is importable (default: on)")
    parser.add_argument("--host", action="store_true",
                        help="measure only the host time of one update call (GPT-2 small, 1000 tensors, chains, "
                             "PyTorch tensors) with a device that launches nothing; runs on any machine")
    parser.add_argument("--host-calls", type=positive_int, default=500, metavar="N",
                        help="update calls timed per --host case, the median is reported (default: 500)")
    parser.add_argument("--host-launches", action="store_true",
                        help="with --host: run on the GPU with real launches instead of the no-op device")
    parser.add_argument("--host-many", type=positive_int, default=1000, metavar="N",
                        help="tensors of the --host case that compares many tensors with GPT-2's (default: 1000)")
    parser.add_argument("--fail-on-targets", action="store_true",
                        help="exit with status 1 when a measured performance target is not met")
    parser.add_argument("--quiet", action="store_true", help="no progress display")



@dataclass
class Config:
    backend: str
    rules: list[tuple[str, Callable[[], Rule]]]
    sizes: list[int]
    dtype: np.dtype
    repeats: int
    warmup: int
    model: bool = True
    model_layers: int = 12
    model_width: int = 768
    baselines: bool = True
    torch: bool = True


def _pick_backend(name: str) -> str:
    try:
        return choose_backend(name)
    except ValueError as exc:
        raise BenchError(str(exc)) from None


def config_from_args(args: argparse.Namespace) -> Config:
    backend = _pick_backend(getattr(args, "backend", "auto"))
    rules = args.rules if not isinstance(args.rules, str) else parse_rules(args.rules)
    sizes = args.sizes
    if sizes is None:
        lo, hi = DEFAULT_SIZES[backend]
        sizes = list(range(lo, hi + 1))
    elif isinstance(sizes, str):
        sizes = parse_sizes(sizes)
    if getattr(args, "plot", None):
        matplotlib_pyplot()  # fail now, not after the whole run
    for option in ("json", "plot"):
        if getattr(args, option, None):
            check_output_path(getattr(args, option), f"--{option}")
    return Config(
        backend=backend, rules=rules, sizes=sizes, dtype=np.dtype(args.dtype),
        repeats=args.repeats or DEFAULT_REPEATS[backend],
        warmup=DEFAULT_WARMUP[backend] if args.warmup is None else args.warmup,
        model=args.model, model_layers=args.model_layers, model_width=args.model_width,
        baselines=args.baselines, torch=args.torch,
    )



def output_path(path: str, suffix: str) -> tuple[str, bool]:
    """(where to write, whether it is a directory to put a generated file name in): a path that
    is a directory or ends in a separator is one; a file name without ``suffix`` gets it."""
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        return path, True
    return (path if path.lower().endswith(suffix) else path + suffix), False


def check_output_path(path: str, option: str) -> None:
    """BenchError now, before anything is measured, if ``path`` cannot be written later."""
    suffix = ".json" if option == "--json" else ".png"
    target, is_dir = output_path(path, suffix)
    directory = target if is_dir else (os.path.dirname(target) or ".")
    existing = directory
    while existing and not os.path.exists(existing):  # a directory may be created, under one that exists
        if not is_dir:
            raise BenchError(f"{option}: directory {directory!r} does not exist")
        existing = os.path.dirname(existing.rstrip(os.sep)) or "."
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise BenchError(f"{option}: cannot write in {existing!r}")
    if not is_dir and os.path.isdir(target):
        raise BenchError(f"{option}: {target!r} is a directory")


def matplotlib_pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install matplotlib (or gpuopt[plot])") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
