"""How a test reports a missing kernel toolchain: a skip, or a failure where CI requires the
tools (GPUOPT_REQUIRE_KERNEL_TOOLS=1: NVRTC, g++, the sanitizer runtime)."""

from __future__ import annotations

import os

import pytest

REQUIRED = os.environ.get("GPUOPT_REQUIRE_KERNEL_TOOLS") == "1"


def missing(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"{reason} (GPUOPT_REQUIRE_KERNEL_TOOLS=1)")
    pytest.skip(reason)
