"""How many update calls took the prepared path and how many the full one, counted over a
block (``gpuopt.prepared.PATHS``): the tests of the prepared path count calls, not results."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from gpuopt.prepared import PATHS


@contextlib.contextmanager
def counted_paths() -> Iterator[dict[str, int]]:
    """``{"prepared": n, "full": n}`` for the calls made inside the block, filled in as it ends
    (also when it raises)."""
    before, taken = dict(PATHS), {}
    try:
        yield taken
    finally:
        taken.update({k: PATHS[k] - before.get(k, 0) for k in ("prepared", "full")})
