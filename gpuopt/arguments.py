"""What the ``gpuopt`` subcommands' arguments mean: integer types, the choice of backend, the
benchmark's rules and sizes, and optimiser expressions (``ADAM``, ``ADAM(1e-3)``, ``ClipNorm(1)+ADAM(1e-3)``,
``Optimiser(ExpDecay(0.01), Momentum())``).

:func:`parse_optimiser` walks the syntax tree itself and never calls ``eval``: only gpuopt
rule names, numbers, tuples, keyword arguments and ``+`` (chaining) are accepted.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import re
from collections.abc import Callable
from typing import Any

from .chain import Optimiser
from .dispatch import cupy_module, gpu_available
from .rule import Rule

__all__ = ["parse_optimiser", "rule_names", "positive_int", "at_least_two", "non_negative_int", "choose_backend",
           "parse_rules", "parse_sizes"]


def _integer(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:  # (also a number with more digits than int() takes)
        value = None
    if value is None or value < least:
        shown = text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"
        raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {shown!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _integer(text, 1)


def at_least_two(text: str) -> int:
    """argparse type: an integer >= 2."""
    return _integer(text, 2)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _integer(text, 0)


def choose_backend(name: str) -> str:
    """``--backend``: ``auto`` is CuPy only where a GPU is usable; ``cupy`` without one, or an
    unknown name, is a ValueError that says what to do instead."""
    if name == "auto":
        return "cupy" if gpu_available() else "numpy"
    if name == "cupy" and not gpu_available():
        why = ("CuPy is not installed (pip install 'gpuopt[cuda12]')" if cupy_module() is None
               else "CuPy cannot see a usable CUDA GPU")
        raise ValueError(f"--backend cupy needs a GPU, but {why}; use --backend numpy or auto")
    if name not in ("numpy", "cupy"):
        raise ValueError(f"unknown backend {name!r}; expected auto, numpy or cupy")
    return name


def parse_sizes(text: str) -> list[int]:
    """``bench --sizes``: log2 element counts, a range (``16-28``), a list (``10,12``) or both."""
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


def parse_rules(text: str) -> list[tuple[str, Callable[[], Rule]]]:
    """``bench --rules``: ``all``, or a comma list of names from the benchmark's rule table
    (case-insensitive; ``Clip+WD+ADAM`` is its chain) or optimiser expressions such as
    ``ClipNorm(1)+ADAM(1e-3)`` (read by :func:`parse_optimiser`); each with a factory of fresh rules."""
    from .bench.workload import ALIASES, RULES  # (gpuopt.bench imports this module)

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


# -- optimiser expressions ----------------------------------------------------------------

#: longest expression accepted: the parser recurses, so bound the input before parsing it
MAX_EXPRESSION = 1000


def rule_names() -> dict[str, type[Rule]]:
    """Every rule class by the names gpuopt exports: the registry's built-in rules, their
    aliases (``Adam``) and ``Optimiser``."""
    from . import ALIASES
    from .rules import BUILT_IN

    return {**BUILT_IN, **{alias: BUILT_IN[name] for alias, name in ALIASES.items()}, "Optimiser": Optimiser}


def _lookup(name: str) -> type[Rule]:
    names = rule_names()
    if name in names:
        return names[name]
    # Case-insensitive when it is unambiguous ("adam", "rmsprop", "sgd"): aliases of one
    # class are not ambiguous.
    matches = {cls for known, cls in names.items() if known.lower() == name.lower()}
    if len(matches) == 1:
        return matches.pop()
    close = difflib.get_close_matches(name, list(names), n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise ValueError(f"unknown rule name {name!r}{hint} (known: {', '.join(sorted(names))})")


def _chain(left: Rule, right: Rule) -> Optimiser:
    # ``a + b + c`` is one flat chain; only plain Optimisers are flattened (ADAMW is a rule).
    members = []
    for part in (left, right):
        members.extend(part.rules if type(part) is Optimiser else [part])
    return Optimiser(*members)


_ALLOWED = (
    "only rule names (ADAM, Momentum, ...), calls of them, numbers, tuples, keyword "
    "arguments and + between rules are allowed"
)


def _evaluate(node: ast.AST, source: str) -> Any:
    """Value of one node of an optimiser expression; ValueError for anything not allowed."""
    def text(n: ast.AST) -> str:
        whole = ast.get_source_segment(source, n) or ast.dump(n)
        return whole if len(whole) <= 60 else f"{whole[:40]}...{whole[-12:]}"

    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        raise ValueError(f"{text(node)!r} is not allowed: {_ALLOWED}")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand, source)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{text(node)!r}: a sign applies to numbers, not to {_kind(value)}")
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, (ast.Tuple, ast.List)):
        values = tuple(_evaluate(e, source) for e in node.elts)
        if any(isinstance(v, Rule) for v in values):
            raise ValueError(
                f"{text(node)!r}: rules cannot go in a tuple; chain them with + or Optimiser(...)")
        return values
    if isinstance(node, ast.Name):
        return _construct(_lookup(node.id), [], {}, text(node))  # a bare name: the defaults
    if isinstance(node, ast.Call):
        if isinstance(node.func, ast.Attribute):
            raise ValueError(f"{text(node.func)!r}: attribute access is not allowed; {_ALLOWED}")
        if not isinstance(node.func, ast.Name):
            raise ValueError(f"{text(node.func)!r} cannot be called: {_ALLOWED}")
        cls = _lookup(node.func.id)  # an unknown name fails before its arguments are read
        args = []
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                raise ValueError(f"{text(arg)!r}: *arguments are not allowed")
            args.append(_evaluate(arg, source))
        kwargs = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise ValueError(f"{text(kw)!r}: **arguments are not allowed")
            if kw.arg in kwargs:
                raise ValueError(f"{text(node)!r}: keyword argument {kw.arg!r} repeated")
            kwargs[kw.arg] = _evaluate(kw.value, source)
        return _construct(cls, args, kwargs, text(node))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _evaluate(node.left, source), _evaluate(node.right, source)
        for side, value in ((node.left, left), (node.right, right)):
            if not isinstance(value, Rule):
                raise ValueError(f"{text(node)!r}: + chains rules, but {text(side)!r} is not a rule")
        return _chain(left, right)
    if isinstance(node, ast.Attribute):
        raise ValueError(f"{text(node)!r}: attribute access is not allowed; {_ALLOWED}")
    raise ValueError(f"{text(node)!r} is not allowed: {_ALLOWED}")


def _kind(value: Any) -> str:
    return "rules" if isinstance(value, Rule) else "tuples" if isinstance(value, tuple) else type(value).__name__


def _construct(cls: type[Rule], args: list[Any], kwargs: dict[str, Any], where: str) -> Rule:
    try:
        return cls(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def parse_optimiser(text: str) -> Rule:
    """Build an optimiser from an expression such as ``"ClipNorm(1) + ADAM(1e-3)"``.

    Allowed: gpuopt rule names (alone for the defaults, or called), numeric literals (with a
    sign), tuples, keyword arguments and ``+`` to chain rules into an :class:`Optimiser`.
    Anything else (attribute access, other names, strings, operators) is a ``ValueError``;
    the text is parsed with :mod:`ast` and never evaluated as Python.
    """
    if not isinstance(text, str):
        raise TypeError(f"an optimiser expression is a string, got {type(text).__name__}")
    source = text.strip()
    if not source:
        raise ValueError("empty optimiser expression")
    if len(source) > MAX_EXPRESSION:
        raise ValueError(f"optimiser expression is longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(source, mode="eval")
        value = _evaluate(tree.body, source)
    except SyntaxError as exc:
        raise ValueError(f"cannot parse optimiser {source!r}: {exc.msg}") from None
    except RecursionError:
        raise ValueError("optimiser expression is nested too deeply") from None
    if not isinstance(value, Rule):
        raise ValueError(f"{source!r} is not an optimiser (it is the value {value!r})")
    return value
