"""How gpuopt's CUDA modules are compiled: the NVRTC options (one place) and the compile call.

The CuPy backend and every compile test use :func:`nvrtc_options` and :func:`compile_module`,
so the tests compile exactly what a GPU runs. gpuopt calls NVRTC itself and loads the binary
with ``cupy.RawModule(path=...)``, because CuPy's own compile path appends ``-ftz=true`` to
every program: float32 subnormals would then flush to zero on the GPU but not in NumPy.

NVRTC works without a GPU. It is reached through NVIDIA's ``cuda-bindings`` package where
installed (the test extra installs it with the NVRTC library, whatever CUDA CuPy was built
for), else through the binding inside CuPy.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from pathlib import Path

#: The language and rounding options: C++17; no contraction into fused multiply-adds and no
#: flush-to-zero, IEEE division and square root, so the kernels round exactly as the NumPy
#: executor does (an update is memory-bound: none of these costs time that matters).
LANGUAGE_OPTIONS = ("-std=c++17", "--fmad=false", "-ftz=false", "-prec-div=true", "-prec-sqrt=true")


class NvrtcError(RuntimeError):
    """NVRTC rejected a module; the message ends with its log."""


@functools.lru_cache(maxsize=1)
def cuda_include_options() -> tuple[str, ...]:
    """``-I`` for the CUDA headers (cuda_fp16.h), found as CuPy 14 finds its toolkit:
    a pip-installed CUDA runtime, else CUDA_HOME / CUDA_PATH / the system toolkit."""
    try:
        from cuda import pathfinder

        include = pathfinder.find_nvidia_header_directory("cudart")
    except Exception:  # no pathfinder: NVRTC's own search path must do
        include = None
    return (f"-I{include}",) if include else ()


#: What CuPy's own compile appends to every program (after the caller's options, so it wins).
CUPY_APPENDED = ("-ftz=true",)


def nvrtc_options(arch: int, binary: bool = True, by_cupy: bool = False) -> tuple[str, ...]:
    """Every option a module is compiled with, for ``sm_<arch>`` (a cubin) or, with
    ``binary=False``, ``compute_<arch>`` (PTX, which the driver compiles on load).

    ``by_cupy``: the options a module compiled by CuPy itself ends up with (the strided path's
    ``cupy.ElementwiseKernel``): :func:`elementwise_options`, then what CuPy appends. That
    path flushes float32 subnormals to zero; every other kernel keeps them.
    """
    target = f"-arch=sm_{arch}" if binary else f"-arch=compute_{arch}"
    if by_cupy:
        return (target, *elementwise_options(), *CUPY_APPENDED)
    return (target, *LANGUAGE_OPTIONS, *cuda_include_options())


def elementwise_options() -> tuple[str, ...]:
    """What gpuopt gives ``cupy.ElementwiseKernel``: the language options but ``-ftz``, which
    CuPy sets itself (to true) after them."""
    return (*(o for o in LANGUAGE_OPTIONS if not o.startswith("-ftz")), *cuda_include_options())


class _CudaBindings:
    def __init__(self) -> None:
        from cuda.bindings import nvrtc

        self.nvrtc = nvrtc
        _, major, minor = nvrtc.nvrtcVersion()
        self.version = f"cuda-bindings NVRTC {major}.{minor}"

    def _check(self, result: tuple, program: object = None) -> tuple:
        if int(result[0]) != 0:
            log = self._log(program) if program is not None else ""
            raise NvrtcError(f"NVRTC: {result[0].name}\n{log}")
        return result[1:]

    def _log(self, program: object) -> str:
        (size,) = self._check(self.nvrtc.nvrtcGetProgramLogSize(program))
        buffer = b" " * size
        self.nvrtc.nvrtcGetProgramLog(program, buffer)
        return buffer.rstrip(b"\0 ").decode(errors="replace")

    def supported_archs(self) -> list[int]:
        return list(self._check(self.nvrtc.nvrtcGetSupportedArchs())[0])

    def compile(self, source: str, options: tuple[str, ...], binary: bool) -> bytes:
        nvrtc = self.nvrtc
        (program,) = self._check(nvrtc.nvrtcCreateProgram(source.encode(), b"gpuopt.cu", 0, [], []))
        try:
            encoded = [o.encode() for o in options]
            self._check(nvrtc.nvrtcCompileProgram(program, len(encoded), encoded), program)
            size_of, get = (nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN) if binary else \
                (nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX)
            (size,) = self._check(size_of(program))
            buffer = b" " * size
            self._check(get(program, buffer))
            return buffer if binary else buffer.rstrip(b"\0")  # (PTX: the size counts its terminator)
        finally:
            nvrtc.nvrtcDestroyProgram(program)


class _CupyBinding:
    def __init__(self) -> None:
        from cupy_backends.cuda.libs import nvrtc

        self.nvrtc = nvrtc
        major, minor = nvrtc.getVersion()
        self.version = f"CuPy NVRTC {major}.{minor}"

    def supported_archs(self) -> list[int]:
        return list(self.nvrtc.getSupportedArchs())

    def compile(self, source: str, options: tuple[str, ...], binary: bool) -> bytes:
        nvrtc = self.nvrtc
        program = nvrtc.createProgram(source, "gpuopt.cu", (), ())
        try:
            try:
                nvrtc.compileProgram(program, list(options))
            except Exception as error:
                raise NvrtcError(f"NVRTC: {error}\n{nvrtc.getProgramLog(program)}") from None
            data = nvrtc.getCUBIN(program) if binary else nvrtc.getPTX(program)
            return data.encode() if isinstance(data, str) else data
        finally:
            nvrtc.destroyProgram(program)


@functools.lru_cache(maxsize=2)
def binding(prefer_cupy: bool = False) -> _CudaBindings | _CupyBinding:
    """An NVRTC binding: cuda-bindings first, or CuPy's first when ``prefer_cupy`` (the GPU
    backend: CuPy's NVRTC matches the CUDA version CuPy runs on). Raises ImportError when
    neither is usable."""
    kinds = (_CupyBinding, _CudaBindings) if prefer_cupy else (_CudaBindings, _CupyBinding)
    errors = []
    for kind in kinds:
        try:
            return kind()
        except Exception as error:  # not installed, or the NVRTC library is missing
            errors.append(f"{kind.__name__.strip('_')}: {error}")
    raise ImportError("no usable NVRTC (install gpuopt[nvrtc] or CuPy): " + "; ".join(errors))


def target_arch(device_arch: int, prefer_cupy: bool = False) -> tuple[int, bool]:
    """(arch, binary) for a device: a cubin for its own arch where NVRTC supports it, else
    PTX for the newest arch NVRTC knows below it (the driver compiles that on load)."""
    supported = binding(prefer_cupy).supported_archs()
    if device_arch in supported:
        return device_arch, True
    return max([a for a in supported if a <= device_arch] or [min(supported)]), False


def compile_module(source: str, arch: int, binary: bool = True, prefer_cupy: bool = False,
                   by_cupy: bool = False) -> bytes:
    """The cubin (or PTX) of ``source``, compiled with :func:`nvrtc_options`."""
    return binding(prefer_cupy).compile(source, nvrtc_options(arch, binary, by_cupy), binary)


def cache_dir() -> Path:
    """gpuopt's per-user cache: ``$GPUOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/gpuopt``,
    else ``~/.cache/gpuopt``."""
    if os.environ.get("GPUOPT_CACHE_DIR"):
        return Path(os.environ["GPUOPT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gpuopt"


def cached_module_file(source: str, arch: int, binary: bool = True, prefer_cupy: bool = False) -> Path:
    """A file holding the compiled module, from the per-user cache when an identical compile
    (source, options, NVRTC version) is already there; written atomically."""
    nvrtc = binding(prefer_cupy)
    options = nvrtc_options(arch, binary)
    key = hashlib.sha256("\0".join([nvrtc.version, *options, source]).encode()).hexdigest()[:32]
    folder = cache_dir() / "cuda"
    path = folder / f"{key}.{'cubin' if binary else 'ptx'}"
    if not path.exists():
        data = nvrtc.compile(source, options, binary)
        folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".writing-", dir=folder)  # unique: threads, processes
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(data)
            os.replace(temporary, path)  # atomic: readers see all of it or nothing
        except BaseException:
            os.unlink(temporary)
            raise
    return path
