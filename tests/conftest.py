"""Shared fixtures: the kernel backend on the CPU stand-in (tests/emulation). The case
catalogue and its helpers are tests/cases.py; tests/toolchain.py reports missing tools.

NumPy arrays run on the NumPy executor in the suite unless ``GPUOPT_CPU`` says otherwise
(each native module costs a compile; tests/test_native.py checks the native backend against
the executor), and native modules are built in a fresh cache folder per session unless
``GPUOPT_CACHE_DIR`` names one.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

import gpuopt.backends
from gpuopt.backends import numpy_backend
from gpuopt.backends.kernel_backend import KernelBackend

from .emulation import device as emulation
from .toolchain import missing

os.environ.setdefault("GPUOPT_CPU", "numpy")
if not os.environ.get("GPUOPT_CACHE_DIR"):
    os.environ["GPUOPT_CACHE_DIR"] = tempfile.mkdtemp(prefix="gpuopt-test-cache-")
    atexit.register(shutil.rmtree, os.environ["GPUOPT_CACHE_DIR"], True)


@pytest.fixture(scope="session")
def emulated_backend():
    if emulation.compiler() is None:
        missing("no C++ compiler is installed")
    return KernelBackend(emulation.EmulatedDevice())


@pytest.fixture
def on_kernels(emulated_backend, monkeypatch):
    """Run NumPy arrays through the kernel backend (generated CUDA compiled for the CPU)."""

    def use(flag: bool):
        backend = emulated_backend if flag else numpy_backend.NumpyBackend()
        monkeypatch.setattr(gpuopt.backends, "cpu_backend", lambda: backend)

    return use
