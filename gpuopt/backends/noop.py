"""A kernel-backend device that launches nothing (:class:`NoopDevice`): the host work of an
update alone, on any machine. The host-time benchmark (``python -m gpuopt bench --host``) and
the tests of the kernel backend's host logic (tables, prepared launches, placement) run on it.

Its arrays are NumPy memory wrapped as :class:`DeviceMemory`, whose address is read as cheaply
as a CuPy array's (``ndarray.ctypes.data`` costs a microsecond, ``cupy.ndarray.data.ptr`` a
few dozen nanoseconds).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from operator import attrgetter
from types import SimpleNamespace
from typing import Any

import numpy as np

from ..prepared import POINTER_READERS
from .kernel_backend import Device


class DeviceMemory(np.ndarray):
    """A NumPy array that knows its address as an attribute, as a CuPy array does."""

    ptr: int

    def __array_finalize__(self, obj: Any) -> None:
        self.ptr = self.ctypes.data


POINTER_READERS[DeviceMemory] = attrgetter("ptr")


class NoopDevice(Device):
    """A :class:`~gpuopt.backends.kernel_backend.Device` that counts the launches it is asked for
    and makes none."""

    xp = SimpleNamespace(empty=lambda shape, dtype=np.float32: np.empty(shape, dtype).view(DeviceMemory),
                         zeros=lambda shape, dtype=np.float32: np.zeros(shape, dtype).view(DeviceMemory),
                         asarray=lambda array: np.asarray(array).view(DeviceMemory),
                         ascontiguousarray=np.ascontiguousarray)
    threads = 256
    max_blocks = 1 << 20

    def __init__(self) -> None:
        self.launches = 0

    def kernel(self, source: str, name: str) -> Callable[[int, int, Sequence[Any]], None]:
        def launch(blocks: int, threads: int, args: Sequence[Any]) -> None:
            self.launches += 1

        return launch

    @staticmethod
    def pointer(array: Any) -> int:
        return array.ptr if type(array) is DeviceMemory else array.ctypes.data
