"""Shared test helpers: building a gpuopt rule from a reference spec (see tests/reference.py)."""

from __future__ import annotations

import gpuopt


def build_gpuopt(spec: tuple) -> gpuopt.Rule:
    """The gpuopt object for ``spec``: ``(name, args, kwargs)`` or ``("Optimiser", [specs])``."""
    if spec[0] == "Optimiser":
        return gpuopt.Optimiser(*(build_gpuopt(s) for s in spec[1]))
    name, args, kwargs = spec
    return getattr(gpuopt, name)(*args, **kwargs)

