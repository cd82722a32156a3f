"""What every ``update`` and ``apply`` runs inside: one call at a time per optimiser, and
all-or-nothing for what lives on the host.

A call checks everything and allocates everything (state, contiguous copies, scratch
buffers, kernels) before it writes the first array. Host-side changes made on the way (new
state entries, ExpDecay's schedule, the prepared-update record) are undone if the call raises,
so a call that raises leaves the optimiser exactly as it was.
"""

from __future__ import annotations

from typing import Any

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

    __slots__ = ("rule", "lock", "saved")

    def __init__(self, opt: object):
        self.rule = check_optimiser(opt)
        self.lock = holding(self.rule)
        self.saved: list[tuple[Any, ...]] = []

    def _remember(self, rule: Rule) -> None:
        for r in {id(r): r for r in (rule, *rule.leaves())}.values():
            state = r.__dict__.get("_state")
            maps = (dict(state._items), dict(state._memory)) if state is not None else None
            self.saved.append((r, dict(r.__dict__), state, maps))

    def __enter__(self) -> None:
        self.lock.__enter__()
        self._remember(self.rule)  # (under the lock: no other call is changing it)

    def __exit__(self, kind: type | None, *exc: object) -> None:
        try:
            if kind is not None:
                self._restore()
        finally:
            self.lock.__exit__()

    def _restore(self) -> None:
        for rule, attributes, state, maps in self.saved:
            rule.__dict__.clear()
            rule.__dict__.update(attributes)
            if maps is not None:
                state._items.clear()
                state._items.update(maps[0])
                state._memory.clear()
                state._memory.update(maps[1])
