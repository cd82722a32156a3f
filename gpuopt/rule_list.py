"""``python -m gpuopt rules``: every rule in the registry (:data:`gpuopt.rules.BUILT_IN`) and
``Optimiser``, with its kind, its hyperparameters and their defaults, and what it does."""

from __future__ import annotations

import argparse
import inspect
import re
from typing import Any

from .chain import Optimiser
from .rules import OPTIMISERS, TRANSFORMS, WRAPPERS


def kinds() -> dict[str, tuple[str, type]]:
    """Every rule by name: (its kind, its class), in the registry's order."""
    groups = {"optimiser": OPTIMISERS, "transform": TRANSFORMS, "wrapper": WRAPPERS, "chain": (Optimiser,)}
    return {cls.__name__: (kind, cls) for kind, classes in groups.items() for cls in classes}


def signature(cls: type) -> str:
    """``ADAM(eta=0.001, beta=(0.9, 0.999); eps=1e-08)``: the constructor's parameters with
    their defaults, keyword-only ones after ``;``, ``rules...`` for any number of rules."""
    positional, keyword = [], []
    for p in inspect.signature(cls).parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            positional.append(f"{p.name}...")
        else:
            (keyword if p.kind is p.KEYWORD_ONLY else positional).append(
                p.name if p.default is p.empty else f"{p.name}={p.default!r}")
    return f"{cls.__name__}({', '.join(positional)}{'; ' if keyword else ''}{', '.join(keyword)})"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``rules`` on ``python -m gpuopt``'s subcommands."""
    parser = subparsers.add_parser("rules", help="list every rule with its hyperparameters and defaults",
                                   description=__doc__.split(": ", 1)[1])
    parser.set_defaults(func=run)
    return parser


def summary(cls: type) -> str:
    """The first sentence of ``cls``'s docstring."""
    paragraph = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
    return re.split(r"(?<=\.)\s", paragraph, maxsplit=1)[0]


def run(args: argparse.Namespace) -> int:
    """Print one line per rule: its signature, its kind, the first sentence of its docstring."""
    rows = [(signature(cls), kind, summary(cls)) for kind, cls in kinds().values()]
    width = max(len(row[0]) for row in rows)
    for text, kind, doc in rows:
        print(f"{text:<{width}}  {kind:<9}  {doc}")
    return 0
