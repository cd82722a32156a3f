"""What every ``update`` and ``apply`` runs inside: one call at a time per optimiser, and
all-or-nothing for what lives on the host.

A call checks everything and allocates everything (state, contiguous copies, scratch
buffers, kernels) before it writes the first array. Host-side changes made on the way (new
state entries, ExpDecay's schedule, the prepared-update record) are undone if the call raises,
so a call that raises leaves the optimiser exactly as it was.
"""

from __future__ import annotations

from typing import Any

from . import rule as _rule
from .rule import Rule, holding


def check_optimiser(opt: object) -> Rule:
    """``opt`` if it is a rule; TypeError otherwise (with a hint for a rule class)."""
    if isinstance(opt, Rule):
        return opt
    if isinstance(opt, type) and issubclass(opt, Rule):
        raise TypeError(
            f"opt is the class {opt.__name__}, not an optimiser: create one first, as in {opt.__name__}()"
        )
    raise TypeError(f"opt must be a gpuopt rule or Optimiser, got {type(opt).__name__}")


class guarded:
    """``with guarded(opt):`` holds ``opt``'s locks and restores its host state on an error."""

    __slots__ = ("rule", "lock", "saved", "outer")

    def __init__(self, opt: object):
        self.rule = check_optimiser(opt)
        self.lock = holding(self.rule)
        self.saved: list[tuple[Rule, dict]] = []
        self.outer: Any = None

    def __enter__(self) -> tuple[Rule, ...]:
        """Returns ``opt.leaves()``: the rules whose locks it holds."""
        self.lock.__enter__()
        # Under the lock, no other call is changing these rules. Attributes are copied (a few
        # each); state maps only log what this call adds, which is nothing on a repeated step.
        self.saved = [(r, r.__dict__.copy()) for r in self.lock.rules]
        self.outer = _rule.changes.log
        _rule.changes.log = []
        return self.lock.leaves

    def __exit__(self, kind: type | None, *exc: object) -> None:
        log = _rule.changes.log
        _rule.changes.log = self.outer
        try:
            if kind is not None:
                _rule.undo(log)
                for rule, attributes in self.saved:
                    rule.__dict__.clear()
                    rule.__dict__.update(attributes)
            elif self.outer is not None:
                self.outer.extend(log)  # (a call inside another: the outer one may still undo it)
        finally:
            self.lock.__exit__()
