"""Shared fixtures: the kernel backend on the CPU stand-in (tests/emulation). The case
catalogue and its helpers are tests/cases.py; tests/toolchain.py reports missing tools."""

from __future__ import annotations

import pytest

from gpuopt.backends import numpy_backend
from gpuopt.backends.kernel_backend import KernelBackend

from .emulation import device as emulation
from .toolchain import missing


@pytest.fixture(scope="session")
def emulated_backend():
    if emulation.compiler() is None:
        missing("no C++ compiler is installed")
    return KernelBackend(emulation.EmulatedDevice())


@pytest.fixture
def on_kernels(emulated_backend, monkeypatch):
    """Run NumPy arrays through the kernel backend (generated CUDA compiled for the CPU)."""

    def use(flag: bool):
        monkeypatch.setattr(numpy_backend, "BACKEND", emulated_backend if flag else numpy_backend.NumpyBackend())

    return use
