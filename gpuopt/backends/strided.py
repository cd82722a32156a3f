"""The strided path: a ``cupy.ElementwiseKernel`` around the same printed step function.

A parameter or gradient that is not C-contiguous (a transposed weight, a slice) is updated in
place by one element-wise launch that indexes every array by its own strides: no contiguous
copy, no write-back, no allocation. The kernel's preamble is the module preamble of
:mod:`.cuda_source` (types and ``gpuopt_step``), and its operation only loads the element, calls
``gpuopt_step`` and stores the results, as the raw kernels do. Chains with a reduction
(``ClipNorm``) need the multi-tensor reduction over contiguous memory and keep the copy.

Type placeholders ``P`` (parameter), ``G`` (gradient) and ``S`` (state and arithmetic) are bound
by CuPy from the arguments and declared as typedefs in the code it generates.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np

from ..plan import Program
from .cuda_source import _preamble, module_source


@dataclass(frozen=True)
class StridedKernel:
    """The arguments of one ``cupy.ElementwiseKernel``; its call takes the inputs (``x`` when
    applying, ``g``, the host scalars) then the outputs (``out`` or ``x``, the state rows)."""

    in_params: str
    out_params: str
    operation: str
    name: str
    preamble: str


@functools.lru_cache(maxsize=512)
def strided_kernel(program: Program, param: np.dtype, grad: np.dtype, apply: bool) -> StridedKernel:
    if program.levels:
        raise ValueError(f"{program.description} needs a reduction: no strided element-wise kernel")
    nslots, nscalars = len(program.slots), program.scalar_count
    slots = [f"s{i}" for i in range(nslots)]
    scalars = [f"h{j}" for j in range(nscalars)]
    inputs = (["P x"] if apply else []) + ["G g"] + [f"S {h}" for h in scalars]
    outputs = (["P out"] if apply else ["P x"]) + [f"S {s}" for s in slots]
    lines = [
        f"gpuopt_compute_t gpuopt_s[GPUOPT_SLOTS_ALLOC] = {{{', '.join(slots) or 'gpuopt_compute_t(0)'}}};",
        f"const gpuopt_compute_t gpuopt_h[GPUOPT_SCALARS_ALLOC] = {{{', '.join(scalars) or 'gpuopt_compute_t(0)'}}};",
        "const gpuopt_compute_t gpuopt_x = gpuopt_compute_t(x);",
        "const gpuopt_compute_t gpuopt_d = gpuopt_step(gpuopt_x, gpuopt_compute_t(g), gpuopt_s, gpuopt_h, nullptr);",
        *[f"{s} = gpuopt_s[{i}];" for i, s in enumerate(slots)],
        # (x - d, or MixedPrecision's new master copy: as the raw kernels store it)
        "out = P(gpuopt_d);" if apply else "x = P(gpuopt_new_param(gpuopt_x, gpuopt_d, gpuopt_s));",
    ]
    digest = hashlib.sha256(module_source(program, param, grad, apply).encode()).hexdigest()[:12]
    return StridedKernel(
        in_params=", ".join(inputs),
        out_params=", ".join(outputs),
        operation="\n".join(lines),
        name=f"gpuopt_strided_{digest}",
        preamble=_preamble(program, np.dtype(param), np.dtype(grad), apply),
    )


def strided_source(program: Program, param: np.dtype, grad: np.dtype, apply: bool) -> str:
    """The strided kernel as one CUDA text (:func:`wrapped_source`), for reading and for
    compiling with NVRTC on any machine."""
    return wrapped_source(strided_kernel(program, np.dtype(param), np.dtype(grad), apply))


def wrapped_source(kernel: StridedKernel) -> str:
    """The kernel's preamble, then its operation inside a kernel named ``kernel.name`` that
    takes ``n``, then one pointer per array (each indexed by ``i``) and the scalars by value,
    in the order of the call, and binds each name to its element the way CuPy's generated
    code does (a reference per array). CuPy's own loop and indexing by strides replace this
    wrapper when it builds the kernel; the CPU stand-in runs the wrapper."""
    types = {"P": "gpuopt_param_t", "G": "gpuopt_grad_t", "S": "gpuopt_state_t"}
    params, binds = ["const long long n"], []
    for spec in kernel.in_params.split(", "):
        kind, name = spec.split()
        if name.startswith("h"):
            params.append(f"const {kind} {name}")
        else:
            params.append(f"const {kind}* {name}_array")
            binds.append(f"const {kind} {name} = {name}_array[i];")
    for spec in kernel.out_params.split(", "):
        kind, name = spec.split()
        params.append(f"{kind}* {name}_array")
        binds.append(f"{kind}& {name} = {name}_array[i];")
    body = "\n".join("        " + line for line in [*binds, *kernel.operation.splitlines()])
    return "\n".join([
        kernel.preamble,
        *[f"typedef {c} {t};" for t, c in types.items()],
        f"// cupy.ElementwiseKernel(in_params={kernel.in_params!r}, out_params={kernel.out_params!r},",
        f"//                        name={kernel.name!r}, preamble=<the text above>), operation:",
        f'extern "C" __global__ void {kernel.name}({", ".join(params)}) {{',
        "    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;",
        "         i += (long long)blockDim.x * gridDim.x) {",
        body,
        "    }",
        "}",
        "",
    ])
