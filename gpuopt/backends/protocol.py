"""What the API layer hands a backend (:class:`Job`) and what it expects back (:class:`Backend`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..plan import Program


@dataclass
class Job:
    """One parameter's step, ready for a backend: its arrays, its state rows and host scalars."""

    key: object  # the user's parameter object: state is keyed on its identity
    x: Any  # the parameter as a backend array (a view of the user's object)
    g: Any
    slots: list[Any]  # one row per state slot of the chain, in program order
    scalars: list[float]
    out: Any = None  # apply(): where the step goes
    framework: str = ""  # whose stream orders the work ("cupy", "torch"; "" on the CPU)
    x_type: Any = None  # element types: the arrays' dtypes, or BFLOAT16 for uint16 views
    g_type: Any = None

    def __post_init__(self) -> None:
        self.x_type = self.x.dtype if self.x_type is None else self.x_type
        self.g_type = self.g.dtype if self.g_type is None else self.g_type


class PreparedLaunch(Protocol):
    """The launches of a collection update prepared for repeating (see :mod:`gpuopt.prepared`)."""

    pointer: Callable[[Any], int]  # the address of one of the backend's arrays

    def check_launchable(self) -> None:
        """Raise if the next call cannot queue its work now (see :meth:`Backend.check_launchable`)."""
        ...

    def __call__(self, scalars: list[float]) -> None: ...

    def set_gradient_pointers(self, pointers: Sequence[int]) -> None:
        """Point the tables at new gradient arrays (same dtypes, shapes and layout), in the
        prepared update's order."""
        ...


class Backend(Protocol):
    """A kind of array memory and how an update step runs on it."""

    def full_state(self, initial: Sequence[float], size: int, dtype: np.dtype, like: Any = None) -> Any:
        """Fresh state rows, one per initial value, next to the parameter ``like``."""
        ...

    def state_from(self, values: np.ndarray, dtype: np.dtype, like: Any) -> Any:
        """State rows holding ``values`` (host memory), laid out exactly as :meth:`full_state`."""
        ...

    def empty_like(self, x: Any) -> Any: ...

    def queue_of(self, like: Any, framework: str) -> AbstractContextManager[Any]:
        """Where the API layer's own device work goes (new state and its master copy, apply's
        output, checkpoint copies): the device holding the parameter ``like`` and the stream
        ``framework`` queues its work on, so that it is ordered with the updates."""
        ...

    def check_launchable(self, arrays: Sequence[Any], framework: str) -> None:
        """Raise, before anything is written, if work on ``arrays`` (parameters of
        ``framework``) cannot be queued now: during CUDA graph capture, for one."""
        ...

    def run(self, program: Program, jobs: Sequence[Job], apply: bool) -> None: ...

    def prepare(self, program: Program, jobs: Sequence[Job], one_array: bool = False) -> PreparedLaunch | None:
        """Launches that repeat this update with new host scalars only, or None where
        repeating costs nothing worth saving (NumPy) or cannot be prepared. ``one_array``:
        the update of one array, not of a collection of one."""
        ...
