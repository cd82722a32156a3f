"""The element-wise expression language that every rule's step is written in.

A rule's ``step`` is ordinary Python arithmetic on :class:`Expr` values. Running it once
with symbolic inputs (tracing) records a small dataflow graph of :class:`Node` objects.
That graph is the one definition of the rule's math: the NumPy executor evaluates it
block by block and the CUDA printer turns it into C statements.

Primitives: ``+ - * /``, unary ``-``, ``abs``, ``**`` with a small non-negative integer
exponent, comparisons ``> >= < <=``, and the functions :func:`sqrt`, :func:`maximum`,
:func:`minimum`, :func:`where`, :func:`clamp` and :func:`total` (a sum over the whole array,
which splits the fused pass into a reduction plus an element-wise pass).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import NamedTuple, Union

# Operators and their arity. Comparisons produce booleans that only `where` consumes.
UNARY = ("neg", "sqrt", "abs")
BINARY = ("add", "sub", "mul", "div", "max", "min")
TERNARY = ("clamp",)
COMPARE = ("gt", "ge", "lt", "le")


@dataclass(eq=False)
class Node:
    """One operation of a traced step. Nodes are hash-consed by :class:`Graph`."""

    op: str
    args: tuple[Node, ...] = ()
    # Leaf payload: slot index (load), scalar index (scalar), float (const), Total (total_value).
    value: object = None
    index: int = -1  # position in Graph.nodes, i.e. a topological order
    uniform: bool = True  # same value for every element of the array
    level: int = 0  # how many reductions must finish before this node can be computed
    is_bool: bool = False


class Total(NamedTuple):
    """What a ``total_value`` node holds: which total it is, and the reduction pass (from 1)
    after which it is known."""

    number: int
    level: int


@dataclass
class Graph:
    """A hash-consed DAG: equal sub-expressions are one node, built in topological order."""

    nodes: list[Node] = field(default_factory=list)
    _memo: dict[tuple, Node] = field(default_factory=dict)

    def make(self, op: str, args: tuple[Node, ...] = (), value: object = None) -> Node:
        key = (op, tuple(a.index for a in args), value if op != "const" else repr(value))
        found = self._memo.get(key)
        if found is not None:
            return found
        uniform = op not in ("x", "g", "load") and all(a.uniform for a in args)
        level = max((a.level for a in args), default=0)
        if op == "total_value":  # one value per array, known once its reduction has run
            uniform, level = True, value.level
        node = Node(op, args, value, len(self.nodes), uniform, level, op in COMPARE)
        self.nodes.append(node)
        self._memo[key] = node
        return node


class _Tracing(threading.local):
    """Per thread: the graphs being traced into (a stack, for re-entrancy). Threads tracing
    at the same time each build their own graph."""

    def __init__(self) -> None:
        self.stack: list[Graph] = []


_current = _Tracing()


def _graph() -> Graph:
    stack = _current.stack
    if not stack:
        raise RuntimeError("gpuopt expressions can only be built while a rule is traced")
    return stack[-1]


Operand = Union["Expr", float, int]


def _lift(value: Operand) -> Node:
    if isinstance(value, Expr):
        return value.node
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"cannot use {type(value).__name__} in a gpuopt rule expression")
    return _graph().make("const", value=float(value))


def _apply(op: str, *operands: Operand) -> Expr:
    args = tuple(_lift(o) for o in operands)
    if op in UNARY + BINARY + TERNARY and any(a.is_bool for a in args):
        raise TypeError("a comparison can only be used as the condition of where()")
    return Expr(_graph().make(op, args))


class Expr:
    """A symbolic per-element (or per-array) value inside a rule's step."""

    __slots__ = ("node",)
    __array_priority__ = 1000  # so numpy scalars defer to our reflected operators

    def __init__(self, node: Node):
        self.node = node

    def __add__(self, o: Operand) -> Expr:
        return _apply("add", self, o)

    def __radd__(self, o: Operand) -> Expr:
        return _apply("add", o, self)

    def __sub__(self, o: Operand) -> Expr:
        return _apply("sub", self, o)

    def __rsub__(self, o: Operand) -> Expr:
        return _apply("sub", o, self)

    def __mul__(self, o: Operand) -> Expr:
        return _apply("mul", self, o)

    def __rmul__(self, o: Operand) -> Expr:
        return _apply("mul", o, self)

    def __truediv__(self, o: Operand) -> Expr:
        return _apply("div", self, o)

    def __rtruediv__(self, o: Operand) -> Expr:
        return _apply("div", o, self)

    def __neg__(self) -> Expr:
        return _apply("neg", self)

    def __pos__(self) -> Expr:
        return self

    def __abs__(self) -> Expr:
        return _apply("abs", self)

    def __pow__(self, exponent: int) -> Expr:
        # Only small integer powers: they become products, which every backend rounds alike.
        if not isinstance(exponent, int) or not 0 <= exponent <= 8:
            raise TypeError("Expr ** n needs an integer 0 <= n <= 8; use sqrt() for roots")
        result: Operand = 1.0
        for _ in range(exponent):
            result = self if isinstance(result, float) else result * self
        return result if isinstance(result, Expr) else Expr(_lift(result))

    def __gt__(self, o: Operand) -> Expr:
        return _apply("gt", self, o)

    def __ge__(self, o: Operand) -> Expr:
        return _apply("ge", self, o)

    def __lt__(self, o: Operand) -> Expr:
        return _apply("lt", self, o)

    def __le__(self, o: Operand) -> Expr:
        return _apply("le", self, o)

    def __bool__(self) -> bool:
        raise TypeError(
            "a traced value has no truth value: use where(cond, a, b) instead of if/else "
            "(conditions that depend only on the step count belong in Rule.extra_scalars)"
        )

    __hash__ = None  # type: ignore[assignment]


def sqrt(a: Operand) -> Expr:
    """Square root, element-wise."""
    return _apply("sqrt", a)


def maximum(a: Operand, b: Operand) -> Expr:
    """Element-wise maximum (a NaN operand yields the other operand, as C's fmax)."""
    return _apply("max", a, b)


def minimum(a: Operand, b: Operand) -> Expr:
    """Element-wise minimum (a NaN operand yields the other operand, as C's fmin)."""
    return _apply("min", a, b)


def clamp(a: Operand, lo: Operand, hi: Operand) -> Expr:
    """``a`` limited to ``[lo, hi]`` (for ``lo <= hi``); a NaN stays NaN, as in Julia and
    PyTorch, so non-finite gradients still propagate through clipping."""
    return _apply("clamp", a, lo, hi)


def where(cond: Expr, a: Operand, b: Operand) -> Expr:
    """``a`` where ``cond`` holds, else ``b`` (``cond`` is a comparison)."""
    if not (isinstance(cond, Expr) and cond.node.is_bool):
        raise TypeError("where() needs a comparison such as `n > h.thresh` as its condition")
    args = (cond.node, _lift(a), _lift(b))
    if any(x.is_bool for x in args[1:]):
        raise TypeError("where() branches must be numbers, not comparisons")
    return Expr(_graph().make("where", args))


def total(a: Operand) -> Expr:
    """The sum of ``a`` over every element of the array (a per-array value).

    Using it makes the step need a reduction pass before the element-wise pass; the
    reduction recomputes everything ``a`` depends on, so nothing extra is stored.
    """
    arg = _lift(a)
    graph = _graph()
    slot = sum(1 for n in graph.nodes if n.op == "total_value")
    return Expr(graph.make("total_value", (arg,), Total(slot, arg.level + 1)))


class tracing:
    """Context manager that makes expression functions record into ``graph``."""

    def __init__(self, graph: Graph):
        self.graph = graph

    def __enter__(self) -> Graph:
        _current.stack.append(self.graph)
        return self.graph

    def __exit__(self, *exc: object) -> None:
        _current.stack.pop()
