"""Tracing a rule or chain into a Program: the one graph that every backend executes."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .expr import Expr, Graph, Node, tracing
from .rule import Rule


@dataclass(frozen=True)
class SlotRef:
    rule: int  # index among the chain's leaves
    name: str
    position: int  # row in that rule's state array


@dataclass(frozen=True)
class ScalarRef:
    rule: int
    name: str


@dataclass(frozen=True, eq=False)  # identity: programs are cached, one per structure
class Program:
    """A traced chain: its graph, what it reads and what it writes."""

    graph: Graph
    rule_names: tuple[str, ...]  # the class of each rule it runs, in order
    slots: tuple[SlotRef, ...]  # every state slot of every rule, in kernel order
    scalars: tuple[ScalarRef, ...]  # the host scalars the step reads, in kernel order
    stores: tuple[tuple[int, Node], ...]  # (slot index, new value) for slots the step assigns
    result: Node  # the final d
    totals: tuple[Node, ...]  # total_value nodes, by their slot number
    # Per-array values computed from host scalars and constants only (ADAM's 1 - b1): the
    # host computes them in float64 once per step and passes them after the scalars.
    hoisted: tuple[Node, ...] = ()
    hoisted_index: dict[int, int] = field(default_factory=dict)  # node index -> scalar index
    # The parameter's new value when a rule keeps a master copy (MixedPrecision): the stored
    # parameter becomes its rounding. None: the new value is x - result.
    new_x: Node | None = None

    @property
    def description(self) -> str:
        """e.g. "ClipValue > WeightDecay > ADAM", for messages and comments in kernels."""
        return " > ".join(self.rule_names) or "identity"

    @functools.cached_property
    def scalar_sources(self) -> tuple[tuple[int, str], ...]:
        """(rule, name) of each host scalar, in kernel order."""
        return tuple((ref.rule, ref.name) for ref in self.scalars)

    @property
    def scalar_count(self) -> int:
        """How many scalars the kernels take: the rules' host scalars, then hoisted values."""
        return len(self.scalars) + len(self.hoisted)

    def kernel_scalars(self, values: list[float]) -> list[float]:
        """``values`` (one per entry of ``scalars``) followed by the hoisted values, in float64."""
        return self._hoisted_function(values)

    @functools.cached_property
    def _hoisted_function(self) -> Callable[[list[float]], list[float]]:
        """:meth:`kernel_scalars` as one Python function, printed from the hoisted values'
        graph once (interpreting the graph on every step cost more than the step's other host
        work for a chain like ClipNorm > ADAM)."""
        steps, hoisted = self._hoisted_program
        names: dict[str, Any] = {}

        def operand(a: int | tuple) -> str:
            if isinstance(a, tuple):  # a constant
                names[f"c{len(names)}"] = a[0]
                return f"c{len(names) - 1}"
            return f"values[{a}]" if a < len(self.scalars) else f"r{a}"

        lines = ["def kernel_scalars(values):"]
        for k, (op, args) in enumerate(steps):
            names[f"op{k}"] = op
            lines.append(f"    r{len(self.scalars) + k} = op{k}({', '.join(map(operand, args))})")
        lines.append(f"    return [*values, {''.join(f'float({operand(a)}), ' for a in hoisted)}]")
        exec("\n".join(lines), names)  # (our own text: operations and positions only)
        return names["kernel_scalars"]

    @functools.cached_property
    def _hoisted_program(self) -> tuple[list[tuple[Any, tuple]], list[int | tuple]]:
        """The hoisted values' graph in evaluation order, built once: steps (operation,
        arguments) and where each hoisted value ends up. An argument is a position in the
        results (host scalars first, then step results) or a constant in a 1-tuple."""
        position: dict[int, int] = {}
        steps: list[tuple[Any, tuple]] = []

        def arg(node: Node) -> int | tuple:
            if node.op == "scalar":
                return node.value
            if node.op == "const":
                return (node.value,)
            if node.index not in position:
                args = tuple(arg(a) for a in node.args)
                steps.append((_HOST_OPS[node.op], args))
                position[node.index] = len(self.scalars) + len(steps) - 1
            return position[node.index]

        return steps, [arg(node) for node in self.hoisted]

    @property
    def levels(self) -> int:
        """Number of reduction passes needed before the element-wise pass."""
        return max((t.level for t in self.totals), default=0)

    def totals_at(self, level: int) -> tuple[Node, ...]:
        return tuple(t for t in self.totals if t.level == level)

    def needed(self, roots: list[Node]) -> list[Node]:
        """The nodes that ``roots`` depend on, in topological order (totals and hoisted
        values are inputs: their arguments are not needed)."""
        seen: set[int] = set()
        stack = list(roots)
        while stack:
            node = stack.pop()
            if node.index in seen:
                continue
            seen.add(node.index)
            if node.op != "total_value" and node.index not in self.hoisted_index:
                stack.extend(node.args)
        return [n for n in self.graph.nodes if n.index in seen]


class _StateView:
    """What ``s`` is inside a step: reads give the current value, assignments record one."""

    def __init__(self, rule: Rule, first_slot: int, graph: Graph, values: dict):
        object.__setattr__(self, "_names", {n: first_slot + i for i, n in enumerate(rule.state)})
        object.__setattr__(self, "_rule", type(rule).__name__)
        object.__setattr__(self, "_graph", graph)
        object.__setattr__(self, "_values", values)

    def _slot(self, name: str) -> int:
        try:
            return self._names[name]
        except KeyError:
            raise AttributeError(f"{self._rule} has no state slot {name!r}; declare it in `state`") from None

    def __getattr__(self, name: str) -> Expr:
        return Expr(self._values[self._slot(name)])

    def __setattr__(self, name: str, value: Any) -> None:
        slot = self._slot(name)
        if isinstance(value, Expr):
            node = value.node
        else:
            node = Expr(self._graph.make("const", value=float(value))).node
        if node.is_bool:
            raise TypeError(f"state slot {name!r} of {self._rule} cannot hold a comparison")
        self._values[slot] = node


class _ScalarView:
    """What ``h`` is inside a step: each name becomes a host scalar of the kernel."""

    def __init__(self, rule: Rule, rule_index: int, graph: Graph, used: dict):
        self._rule, self._index, self._graph, self._used = rule, rule_index, graph, used
        self._names = set(rule.scalars(1))

    def __getattr__(self, name: str) -> Expr:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._names:
            raise AttributeError(
                f"{type(self._rule).__name__} has no host scalar {name!r}: use a numeric "
                "hyperparameter or a key returned by extra_scalars()"
            )
        ref = ScalarRef(self._index, name)
        if ref not in self._used:
            self._used[ref] = len(self._used)
        return Expr(self._graph.make("scalar", value=self._used[ref]))


def structure_key(rule: Rule) -> tuple:
    """What a traced program depends on: the classes of the rules it runs, in order."""
    return tuple(map(type, rule.leaves()))


def _trace(leaves: tuple[Rule, ...]) -> Program:
    graph = Graph()
    slots: list[SlotRef] = []
    used: dict[ScalarRef, int] = {}
    with tracing(graph):
        x = Expr(graph.make("x"))
        d = Expr(graph.make("g"))
        initial: dict[int, Node] = {}
        for ri, rule in enumerate(leaves):
            first = len(slots)
            for pos, name in enumerate(rule.state):
                slots.append(SlotRef(ri, name, pos))
                initial[first + pos] = graph.make("load", value=first + pos)
        values = dict(initial)
        seen_x = x  # what the rules see as the parameter: x, or from a master copy on
        master = None
        for ri, rule in enumerate(leaves):
            first = next((i for i, s in enumerate(slots) if s.rule == ri), len(slots))
            out = rule.step(
                d, seen_x, _StateView(rule, first, graph, values), _ScalarView(rule, ri, graph, used)
            )
            if not isinstance(out, Expr):
                if isinstance(out, bool) or not isinstance(out, (int, float)):
                    raise TypeError(
                        f"{type(rule).__name__}.step must return an expression or a number"
                    )
                out = Expr(graph.make("const", value=float(out)))
            if out.node.is_bool:
                raise TypeError(f"{type(rule).__name__}.step returned a comparison")
            d = out
            if rule.master_slot is not None:
                if master is not None:
                    raise TypeError("a chain can keep only one master copy of the parameter (one MixedPrecision)")
                master = first + list(rule.state).index(rule.master_slot)
                seen_x = Expr(values[master])
        new_x = None
        if master is not None:  # the chain's step goes to the master copy
            new_x = (Expr(values[master]) - d).node
            values[master] = new_x
    stores = tuple((i, node) for i, node in values.items() if node is not initial[i])
    totals = tuple(sorted((n for n in graph.nodes if n.op == "total_value"), key=lambda n: n.value.number))
    names = tuple(type(r).__name__ for r in leaves)
    scalars = tuple(sorted(used, key=used.get))
    roots = [d.node] + [node for _, node in stores]
    hoisted = _hoistable(graph, roots)
    index = {node.index: len(scalars) + k for k, node in enumerate(hoisted)}
    return Program(graph, names, tuple(slots), scalars, stores, d.node, totals, hoisted, index, new_x)


def _host_computable(node: Node) -> bool:
    return node.uniform and node.level == 0 and not node.is_bool and node.op not in ("scalar", "const")


def _hoistable(graph: Graph, roots: list[Node]) -> tuple[Node, ...]:
    """The host-computable nodes that something computed per element (or a root) reads."""
    consumers: dict[int, list[Node]] = {}
    for node in graph.nodes:
        for arg in node.args:
            consumers.setdefault(arg.index, []).append(node)
    root_ids = {r.index for r in roots}
    return tuple(
        node for node in graph.nodes
        if _host_computable(node)
        and (node.index in root_ids or any(not _host_computable(c) for c in consumers.get(node.index, [])))
    )


# float64 host arithmetic for hoisted values: the same operations as the kernels' (fmax/fmin
# ignore NaN), evaluated in double precision once per step.
def _ieee(function: Any, *args: float) -> float:
    """A NumPy ufunc on floats, quietly: x/0 is inf or nan, sqrt(-1) nan, not an exception."""
    with np.errstate(all="ignore"):
        return float(function(*args))


def _div(a: float, b: float) -> float:
    return a / b if b else _ieee(np.divide, a, b)


def _sqrt(a: float) -> float:
    return math.sqrt(a) if a >= 0 else _ieee(np.sqrt, a)


def _fmax(a: float, b: float) -> float:  # a NaN operand is ignored, as fmax does
    return b if a != a else a if b != b else (a if a >= b else b)


def _fmin(a: float, b: float) -> float:
    return b if a != a else a if b != b else (a if a <= b else b)


_HOST_OPS = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": _div,
    "max": _fmax,
    "min": _fmin,
    "neg": lambda a: -a,
    "sqrt": _sqrt,
    "abs": abs,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "where": lambda c, a, b: a if c else b,
    "clamp": lambda a, lo, hi: _ieee(np.clip, a, lo, hi),
}


_programs: dict[tuple, Program] = {}


def plan(rule: Rule) -> Program:
    """The traced program of ``rule``, cached on its structure, never on hyperparameter values."""
    leaves = rule.leaves()
    key = tuple(map(type, leaves))  # (structure_key, without asking for the leaves twice)
    program = _programs.get(key)
    if program is None:
        # Threads may trace the same structure at once (each into its own graph): the first
        # stored wins, so every caller runs one Program object.
        program = _programs.setdefault(key, _trace(leaves))
    return program
