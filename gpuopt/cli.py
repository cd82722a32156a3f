"""What the ``gpuopt`` subcommands share: argument types and the choice of backend."""

from __future__ import annotations

import argparse

from .dispatch import cupy_module, gpu_available


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
