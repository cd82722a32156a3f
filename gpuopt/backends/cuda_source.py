"""The CUDA printer: a traced Program becomes the C++ of one module of kernels.

The module is the generated preamble (types, sizes, and the element-wise functions
``gpuopt_step`` and ``gpuopt_terms`` printed from the program's graph) followed by the raw
kernel sources of ``kernels/``: the single-array update, and the multi-tensor update and
segmented reduction (which also serve one array whose chain needs a reduction).
Hyperparameters and host scalars are never printed: they are kernel arguments, so the text
depends only on the chain's structure and dtypes.

The kernels are raw CUDA rather than ``cupy.ElementwiseKernel`` so that the module is the
whole text NVRTC compiles: :func:`kernel_source` returns it as is, and the tests compile that
very text for the CPU. Non-contiguous arrays go through a ``cupy.ElementwiseKernel`` built
around the same preamble and step function instead (:mod:`.strided`).
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .. import dtypes
from ..expr import Node
from ..plan import Program
from .numpy_backend import compute_dtype

#: kernel template files, in the order they are appended to the preamble
KERNEL_FILES = ("common.cuh", "elementwise.cu", "table.cuh", "multi_tensor.cu")

#: Sizes the host code and the kernels must agree on: defined here once, printed into every
#: module as #defines (GPUOPT_VEC, GPUOPT_CHUNK, ...), and imported by the host code.
VEC = 4  # elements per thread per iteration: one 128-bit access for float32
CHUNK = 65536  # elements per chunk of the multi-tensor kernels; a multiple of VEC, so vector
#                groups never straddle chunks
MAX_THREADS = 256  # threads per block the block reduction's shared memory is sized for
TABLE_COLUMNS = 4  # a tensor's row in the multi-tensor table: x, g, out, n, then its state slots

_C_TYPES = {
    np.dtype(np.float16): "__half",
    dtypes.BFLOAT16: "__nv_bfloat16",
    np.dtype(np.float32): "float",
    np.dtype(np.float64): "double",
}
# storage types read and written through float conversions (round to nearest even)
_TO_FLOAT = {np.dtype(np.float16): "__half2float", dtypes.BFLOAT16: "__bfloat162float"}
_FROM_FLOAT = {np.dtype(np.float16): "__float2half_rn", dtypes.BFLOAT16: "__float2bfloat16_rn"}
_BINARY = {"add": "+", "sub": "-", "mul": "*", "div": "/", "gt": ">", "ge": ">=", "lt": "<", "le": "<="}
_FUNCTIONS = {  # (float, double) spellings, so nothing silently goes through double
    "sqrt": ("sqrtf", "sqrt"),
    "abs": ("fabsf", "fabs"),
    "max": ("fmaxf", "fmax"),
    "min": ("fminf", "fmin"),
}


def kernel_dir() -> Path:
    """Where the raw kernel sources are: inside the installed wheel, else the source tree."""
    packaged = resources.files("gpuopt") / "kernels"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "kernels"


@functools.cache
def _template(name: str) -> str:
    return (kernel_dir() / name).read_text()


def _const(value: float) -> str:
    text = repr(float(value))
    return f"gpuopt_compute_t({text})"


def _expression(program: Program, node: Node, double: bool) -> str:
    if node.index in program.hoisted_index:
        return f"h[{program.hoisted_index[node.index]}]"
    a = [f"v{arg.index}" for arg in node.args]
    op = node.op
    if op == "x":
        return "x"
    if op == "g":
        return "g"
    if op == "load":
        return f"s[{node.value}]"
    if op == "scalar":
        return f"h[{node.value}]"
    if op == "const":
        return _const(node.value)
    if op == "total_value":
        return f"gpuopt_compute_t(totals[{node.value.number}])"
    if op == "neg":
        return f"-{a[0]}"
    if op in _BINARY:
        return f"{a[0]} {_BINARY[op]} {a[1]}"
    if op in _FUNCTIONS:
        return f"{_FUNCTIONS[op][double]}({', '.join(a)})"
    if op == "where":
        return f"{a[0]} ? {a[1]} : {a[2]}"
    if op == "clamp":  # comparisons, not fminf/fmaxf, so that a NaN stays NaN
        return f"{a[0]} < {a[1]} ? {a[1]} : ({a[0]} > {a[2]} ? {a[2]} : {a[0]})"
    raise ValueError(f"no CUDA spelling for operation {op!r}")


def _describe(program: Program, node: Node) -> str:
    """A hoisted value in words, for the module's header comment: ``1.0 - ADAM.b1``."""
    if node.op == "scalar":
        ref = program.scalars[node.value]
        return f"{program.rule_names[ref.rule]}.{ref.name}"
    if node.op == "const":
        return repr(node.value)
    args = [_describe(program, a) for a in node.args]
    if node.op in _BINARY:
        return f"({args[0]} {_BINARY[node.op]} {args[1]})"
    if node.op == "where":
        return f"({args[0]} ? {args[1]} : {args[2]})"
    return f"{'-' if node.op == 'neg' else node.op}({', '.join(args)})"


def _statements(program: Program, roots: list[Node], double: bool) -> list[str]:
    lines = []
    for node in program.needed(roots):
        ctype = "bool" if node.is_bool else "gpuopt_compute_t"
        lines.append(f"    const {ctype} v{node.index} = {_expression(program, node, double)};")
    return lines


def _step_function(program: Program, double: bool) -> list[str]:
    roots = [program.result] + [node for _, node in program.stores]
    lines = [
        "#define GPUOPT_HAS_STEP",
        "// The fused element-wise step: returns d; assigns the new state in s.",
        "__device__ __forceinline__ gpuopt_compute_t gpuopt_step(",
        "    const gpuopt_compute_t x, const gpuopt_compute_t g, gpuopt_compute_t (&s)[GPUOPT_SLOTS_ALLOC],",
        "    const gpuopt_compute_t* h, const double* totals) {",
    ]
    lines += _statements(program, roots, double)
    lines += [f"    s[{slot}] = v{node.index};" for slot, node in program.stores]
    lines += [f"    return v{program.result.index};", "}"]
    # The parameter's new value, from x, d and the new state: x - d, or the master copy.
    new_x = "x - d" if program.new_x is None else f"s[{next(i for i, n in program.stores if n is program.new_x)}]"
    lines += [
        "__device__ __forceinline__ gpuopt_compute_t gpuopt_new_param(",
        "    const gpuopt_compute_t x, const gpuopt_compute_t d, const gpuopt_compute_t (&s)[GPUOPT_SLOTS_ALLOC]) {",
        f"    return {new_x};",
        "}",
    ]
    return lines


def _terms_functions(program: Program, double: bool) -> list[str]:
    """gpuopt_terms(level, ...) adds each element's share of the sums of reduction pass
    `level`; gpuopt_store_terms(level, ...) files the finished sums into totals."""
    width = max(len(program.totals_at(level)) for level in range(1, program.levels + 1))
    terms = [
        "#define GPUOPT_HAS_TERMS",
        f"#define GPUOPT_TERMS {width}",
        "__device__ __forceinline__ void gpuopt_terms(",
        "    const int level, const gpuopt_compute_t x, const gpuopt_compute_t g,",
        "    const gpuopt_compute_t (&s)[GPUOPT_SLOTS_ALLOC], const gpuopt_compute_t* h, const double* totals,",
        "    double (&acc)[GPUOPT_TERMS]) {",
        "    switch (level) {",
    ]
    store = [
        "__device__ __forceinline__ void gpuopt_store_terms(",
        "    const int level, double* totals, const double (&acc)[GPUOPT_TERMS]) {",
        "    switch (level) {",
    ]
    for level in range(1, program.levels + 1):
        nodes = program.totals_at(level)
        terms.append(f"    case {level}: {{")
        terms += ["    " + line for line in _statements(program, [t.args[0] for t in nodes], double)]
        terms += [f"        acc[{j}] += double(v{t.args[0].index});" for j, t in enumerate(nodes)]
        terms += ["        break;", "    }"]
        store.append(f"    case {level}:")
        store += [f"        totals[{t.value.number}] = acc[{j}];" for j, t in enumerate(nodes)]
        store.append("        break;")
    terms += ["    }", "}"]
    store += ["    }", "}"]
    return terms + store


def _conversions(param: np.dtype, grad: np.dtype) -> list[str]:
    def load(dtype: np.dtype, name: str) -> str:
        value = f"{_TO_FLOAT[dtype]}(v)" if dtype in _TO_FLOAT else "v"
        return (f"__device__ __forceinline__ gpuopt_compute_t gpuopt_from_{name}(const gpuopt_{name}_t v) "
                f"{{ return gpuopt_compute_t({value}); }}")

    to_param = f"{_FROM_FLOAT[param]}(v)" if param in _FROM_FLOAT else "gpuopt_param_t(v)"
    return [
        load(param, "param"),
        load(grad, "grad"),
        f"__device__ __forceinline__ gpuopt_param_t gpuopt_to_param(const gpuopt_compute_t v) {{ return {to_param}; }}",
    ]


def _preamble(program: Program, param: np.dtype, grad: np.dtype, apply: bool) -> str:
    ct = compute_dtype(param)
    double = ct == np.float64
    nslots, nscalars = len(program.slots), program.scalar_count
    lines = [
        f"// gpuopt fused kernels for: {program.description}",
        f"// x stored as {dtypes.name(param)}, g as {dtypes.name(grad)}; state and arithmetic in {ct}"
        + ("; this module applies (out = d)" if apply else "; this module updates (x -= d)"),
    ]
    lines += [f"//   s[{i}] = {program.rule_names[ref.rule]}.{ref.name}"
              for i, ref in enumerate(program.slots)]
    lines += [f"//   h[{i}] = {program.rule_names[ref.rule]}.{ref.name}"
              for i, ref in enumerate(program.scalars)]
    lines += [f"//   h[{program.hoisted_index[node.index]}] = {_describe(program, node)}  (float64, on the host)"
              for node in program.hoisted]
    if np.dtype(np.float16) in (param, grad):
        lines.append("#include <cuda_fp16.h>")
    if dtypes.BFLOAT16 in (param, grad):
        lines.append("#include <cuda_bf16.h>")
    lines += [
        f"typedef {_C_TYPES[param]} gpuopt_param_t;",
        f"typedef {_C_TYPES[grad]} gpuopt_grad_t;",
        f"typedef {_C_TYPES[ct]} gpuopt_state_t;",
        f"typedef {_C_TYPES[ct]} gpuopt_compute_t;",
        f"#define GPUOPT_VEC {VEC}",
        f"#define GPUOPT_CHUNK {CHUNK}",
        f"#define GPUOPT_MAX_THREADS {MAX_THREADS}",
        f"#define GPUOPT_TABLE_COLUMNS {TABLE_COLUMNS}",
        "#define GPUOPT_TABLE_WIDTH (GPUOPT_TABLE_COLUMNS + GPUOPT_SLOTS)",
        f"#define GPUOPT_APPLY {int(apply)}",
        f"#define GPUOPT_SLOTS {nslots}",
        f"#define GPUOPT_SLOTS_ALLOC {max(nslots, 1)}",
        f"#define GPUOPT_SCALARS {nscalars}",
        f"#define GPUOPT_SCALARS_ALLOC {max(nscalars, 1)}",
        f"#define GPUOPT_TOTALS_ALLOC {max(len(program.totals), 1)}",
        "#define GPUOPT_SLOT_PARAMS " + "".join(f", gpuopt_state_t* s{i}" for i in range(nslots)),
        "#define GPUOPT_SLOT_LIST {" + (", ".join(f"s{i}" for i in range(nslots)) or "nullptr") + "}",
        "#define GPUOPT_SCALAR_PARAMS " + "".join(f", const gpuopt_compute_t h{i}" for i in range(nscalars)),
        "#define GPUOPT_SCALAR_LIST {" + (", ".join(f"h{i}" for i in range(nscalars)) or "gpuopt_compute_t(0)")
        + "}",
    ]
    lines += _conversions(param, grad)
    lines += _step_function(program, double)
    if program.levels:
        lines += _terms_functions(program, double)
    return "\n".join(lines) + "\n"


@functools.lru_cache(maxsize=512)
def step_source(program: Program, param: np.dtype, grad: np.dtype, apply: bool) -> str:
    """The generated part of a module (types, sizes, gpuopt_step and gpuopt_terms), which the
    native CPU modules share with the CUDA ones."""
    return _preamble(program, np.dtype(param), np.dtype(grad), apply)


@functools.lru_cache(maxsize=512)
def module_source(program: Program, param: np.dtype, grad: np.dtype, apply: bool) -> str:
    """The complete CUDA source of one program's kernels, exactly as NVRTC compiles it."""
    parts = [step_source(program, param, grad, apply)]
    parts += [f"// ---- kernels/{name} ----\n{_template(name)}" for name in KERNEL_FILES]
    return "\n".join(parts)


def kernel_source(opt: Any, dtype: Any = "float32", grad_dtype: Any = None, *, apply: bool = False,
                  strided: bool = False) -> str:
    """The complete CUDA source of the kernels ``update(opt, x, dx)`` runs for arrays of
    ``dtype`` (gradients of ``grad_dtype``, default the same; ``"bfloat16"`` is accepted),
    exactly as NVRTC compiles it.

    One module holds them all: ``gpuopt_elementwise`` (one array, one launch),
    ``gpuopt_multi_tensor`` (many arrays in one launch) and, for chains with a reduction such
    as ClipNorm, ``gpuopt_multi_reduce``. Compile it with NVRTC and the options of
    ``gpuopt.backends.nvrtc.nvrtc_options(arch)`` to read, profile or reuse it.

    ``strided=True`` gives instead the ``cupy.ElementwiseKernel`` that updates non-contiguous
    arrays in place (chains without a reduction): its preamble and operation, wrapped in a
    kernel that binds them as CuPy does (:func:`gpuopt.backends.strided.strided_source`).
    """
    from ..dispatch import SUPPORTED_DTYPES
    from ..plan import plan
    from ..rule import Rule

    if not isinstance(opt, Rule):
        raise TypeError(f"opt must be a gpuopt rule or Optimiser, got {type(opt).__name__}")
    param = dtypes.as_element_type(dtype)
    grad = dtypes.as_element_type(grad_dtype) if grad_dtype is not None else param
    for d in (param, grad):
        if d not in SUPPORTED_DTYPES:
            raise TypeError(f"dtype {d} is not supported; expected float16, bfloat16, float32 or float64")
    if strided:
        from .strided import strided_source

        return strided_source(plan(opt), param, grad, apply)
    return module_source(plan(opt), param, grad, apply)
