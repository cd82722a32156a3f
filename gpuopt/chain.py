"""Optimiser: a chain of rules, itself a rule, each feeding its ``d`` to the next."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, overload

from .rule import IdentityWeakMap, Rule, repeated_rule_message


def _check_rule(rule: Any, where: str) -> Rule:
    if not isinstance(rule, Rule):
        raise TypeError(f"{where} must be a gpuopt rule, got {type(rule).__name__}")
    return rule


class Optimiser(Rule):
    """Runs its rules in order; each produces a modified update that is fed into the next.

    The whole chain is fused into one pass over memory (plus one reduction pass per
    ``ClipNorm``-style rule). It behaves like a list: indexing, slicing (a new chain of the
    same rule objects, sharing their state), ``len``, iteration, ``append``, ``extend``,
    ``insert``.

    One rule object may appear only once in a chain (also through nested chains): its state
    has one step count per parameter, so running it twice per step would advance it twice.
    Use two instances to apply a rule twice.

    >>> opt = Optimiser(ExpDecay(0.001, 0.1, 1000, 1e-4), Descent())
    """

    def __init__(self, *rules: Rule):
        self.rules: list[Rule] = [_check_rule(r, f"Optimiser argument {i}") for i, r in enumerate(rules)]
        self._state = IdentityWeakMap()
        self._check_distinct()

    def _check_distinct(self) -> None:
        leaves = self.leaves()
        if len({id(leaf) for leaf in leaves}) != len(leaves):
            raise ValueError(repeated_rule_message(leaves))

    def _changed(self, before: list[Rule]) -> None:
        try:
            self._check_distinct()
        except ValueError:
            self.rules[:] = before  # the failed change is undone
            raise

    def leaves(self) -> tuple[Rule, ...]:
        found: tuple[Rule, ...] = ()
        for rule in self.rules:  # (called on every update: a loop is twice as fast as a generator)
            found += rule.leaves()
        return found

    @overload
    def __getitem__(self, index: int) -> Rule: ...
    @overload
    def __getitem__(self, index: slice) -> Optimiser: ...
    def __getitem__(self, index: int | slice) -> Rule | Optimiser:
        if isinstance(index, slice):
            return Optimiser(*self.rules[index])
        return self.rules[index]

    def __setitem__(self, index: int, rule: Rule) -> None:
        before = list(self.rules)
        self.rules[index] = _check_rule(rule, "an Optimiser member")
        self._changed(before)

    def __delitem__(self, index: int | slice) -> None:
        del self.rules[index]

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def append(self, rule: Rule) -> None:
        before = list(self.rules)
        self.rules.append(_check_rule(rule, "an appended rule"))
        self._changed(before)

    def extend(self, rules: Any) -> None:
        before = list(self.rules)
        added = [_check_rule(rule, "an appended rule") for rule in rules]
        self.rules.extend(added)
        self._changed(before)

    def insert(self, index: int, rule: Rule) -> None:
        before = list(self.rules)
        self.rules.insert(index, _check_rule(rule, "an inserted rule"))
        self._changed(before)

    def __repr__(self) -> str:
        return f"Optimiser({', '.join(repr(r) for r in self.rules)})"
