"""The one dispatch point: which backend runs an array, and every check made before a write.

Policy, in order:
1. ``numpy.ndarray`` runs on the NumPy backend.
2. ``cupy.ndarray`` runs on the CuPy backend.
3. Any other object exposing ``__cuda_array_interface__``, or ``__dlpack__`` on a CUDA
   device (a PyTorch CUDA tensor), is viewed as a CuPy array without a copy and updated in
   place; one exposing ``__dlpack__`` on the CPU (a PyTorch CPU tensor) is viewed as a NumPy
   array without a copy.
4. Anything else is a ``TypeError``. So is a parameter whose gradient lives on another
   backend, and any dtype other than float16, bfloat16, float32 or float64.

A PyTorch bfloat16 tensor is viewed through its 16-bit patterns (NumPy, CuPy and DLPack
consumers have no bfloat16): the array is a ``uint16`` view and ``Resolved.element`` says
bfloat16 (see :mod:`gpuopt.dtypes`).

CuPy is imported only when a GPU object is seen, so the NumPy path never needs it.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from .dtypes import BFLOAT16, SUPPORTED

SUPPORTED_DTYPES = SUPPORTED
_DLPACK_CPU, _DLPACK_CUDA, _DLPACK_CUDA_HOST, _DLPACK_CUDA_MANAGED = 1, 2, 3, 13


@functools.lru_cache(maxsize=1)
def cupy_module() -> Any:
    """CuPy, or None where it is not installed (or cannot be imported)."""
    try:
        import cupy
    except Exception:  # ImportError, or a broken CUDA install raising at import
        return None
    return cupy


@functools.lru_cache(maxsize=1)
def gpu_available() -> bool:
    """Whether CuPy is importable and can see at least one usable GPU."""
    cupy = cupy_module()
    if cupy is None:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def type_name(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__.split('.')[0]}.{cls.__qualname__}"


@dataclass
class Resolved:
    """An argument as a backend array: ``array`` is a view of the user's object."""

    backend: str  # "numpy" or "cupy"
    array: Any
    framework: str = ""  # whose current stream orders GPU work on it: "cupy" or "torch"
    element: Any = None  # the element type: the array's dtype, or BFLOAT16 for a uint16 view

    def __post_init__(self) -> None:
        if self.element is None:
            self.element = np.dtype(self.array.dtype)


def resolve(obj: object, what: str) -> Resolved:
    """The backend array behind ``obj`` (no copy), or TypeError naming ``what``."""
    if isinstance(obj, np.ndarray):
        # np.matrix stays 2-D when flattened (every element would get element 0's step): it
        # is used as the plain array it views. Other subclasses keep their type.
        return Resolved("numpy", obj.view(np.ndarray) if isinstance(obj, np.matrix) else obj)
    cupy = cupy_module()
    if cupy is not None and isinstance(obj, cupy.ndarray):
        return Resolved("cupy", obj, "cupy")
    if getattr(obj, "requires_grad", False) and callable(getattr(obj, "detach", None)):
        # A torch Parameter refuses to export itself; its detached alias shares the storage,
        # and the optimiser's in-place write is not something autograd should record.
        obj = obj.detach()
    _check_torch_view(obj, what)
    bits = _bfloat16_bits(obj)
    exported = _export(obj if bits is None else bits, what)
    if exported is not None:
        if bits is not None:
            return Resolved(exported.backend, exported.array.view(np.uint16), exported.framework, BFLOAT16)
        return exported
    raise TypeError(
        f"{what} must be an array (numpy.ndarray, cupy.ndarray or a CUDA array such as a "
        f"torch CUDA tensor), got {type_name(obj)}"
    )


def _export(obj: object, what: str) -> Resolved | None:
    """``obj`` viewed through its CUDA array interface or DLPack (no copy), or None."""
    try:
        if hasattr(obj, "__cuda_array_interface__"):
            return Resolved("cupy", _need_cupy(obj, what).asarray(obj), stream_framework(obj))
        if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
            device = obj.__dlpack_device__()[0]
            if device in (_DLPACK_CUDA, _DLPACK_CUDA_HOST, _DLPACK_CUDA_MANAGED):
                return Resolved("cupy", _need_cupy(obj, what).from_dlpack(obj), stream_framework(obj))
            if device == _DLPACK_CPU:
                return Resolved("numpy", np.from_dlpack(obj), stream_framework(obj))
    except (RuntimeError, BufferError, ValueError) as exc:  # (TypeError passes: it is ours already)
        dtype = getattr(obj, "dtype", "?")
        raise TypeError(
            f"{what} ({type_name(obj)} of dtype {dtype}) cannot be viewed without a copy: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; expected float16, "
            "bfloat16, float32 or float64"
        ) from None
    return None


def _check_torch_view(obj: object, what: str) -> None:
    """A torch tensor with its negative or conjugate bit set (``z.conj().imag``) is a lazy view
    whose DLPack export drops the bit, so its values would be read with the wrong sign."""
    for bit, fix in (("is_neg", "resolve_neg"), ("is_conj", "resolve_conj")):
        flag = getattr(obj, bit, None)
        if callable(flag) and flag():
            raise TypeError(
                f"{what} is a torch tensor with its {bit[3:]} bit set (a lazy view such as z.conj().imag); "
                f"pass t.{fix}() (a copy) instead"
            )
    dtype = str(getattr(obj, "dtype", ""))
    if dtype.startswith("torch.") and dtype not in ("torch.float16", "torch.bfloat16", "torch.float32",
                                                    "torch.float64"):
        raise TypeError(f"{what} has dtype {dtype.removeprefix('torch.')}; expected float16, bfloat16, float32 or "
                        "float64")


def stream_framework(obj: object) -> str:
    """Whose current stream a GPU array's producer writes it on: PyTorch's for its tensors
    (their interface carries no stream), CuPy's for everything else."""
    return "torch" if type(obj).__module__.split(".")[0] == "torch" else "cupy"


def _bfloat16_bits(obj: object) -> Any:
    """A torch bfloat16 tensor's memory as int16 (no copy), else None. torch is not imported
    here: a torch tensor can only exist where torch already is."""
    if str(getattr(obj, "dtype", "")) != "torch.bfloat16" or type(obj).__module__.split(".")[0] != "torch":
        return None
    return obj.view(sys.modules["torch"].int16)


def _need_cupy(obj: object, what: str) -> Any:
    cupy = cupy_module()
    if cupy is None:
        raise TypeError(f"{what} is a GPU array ({type_name(obj)}) but CuPy is not installed")
    return cupy


def check_dtype(array: Any, what: str, element: Any = None) -> None:
    """TypeError unless the element type (``element``, else the array's dtype) is supported."""
    element = np.dtype(array.dtype) if element is None else element
    if element not in SUPPORTED_DTYPES:
        raise TypeError(f"{what} has dtype {array.dtype}; expected float16, bfloat16, float32 or float64")


def check_pair(x_obj: object, g_obj: object, name: str) -> tuple[Resolved, Resolved]:
    """Resolve and check a parameter and its gradient; raise before anything is written."""
    x = resolve(x_obj, name)
    g = resolve(g_obj, f"gradient of {name}")
    if x.backend != g.backend:
        raise TypeError(
            f"{name} is a {type_name(x_obj)} ({x.backend} backend) but its gradient is a "
            f"{type_name(g_obj)} ({g.backend} backend); both must be on the same backend"
        )
    check_dtype(x.array, name, x.element)
    check_dtype(g.array, f"gradient of {name}", g.element)
    if tuple(x.array.shape) != tuple(g.array.shape):
        raise ValueError(
            f"{name} has shape {tuple(x.array.shape)} but its gradient has shape "
            f"{tuple(g.array.shape)}; expected equal shapes"
        )
    if x.backend == "cupy" and x.array.device.id != g.array.device.id:
        raise ValueError(f"{name} is on GPU {x.array.device.id} but its gradient on GPU {g.array.device.id}")
    return x, g


def check_writable(x: Resolved, name: str) -> None:
    if x.backend == "numpy" and not x.array.flags.writeable:
        raise ValueError(f"{name} is a read-only array; update needs to write it in place")
