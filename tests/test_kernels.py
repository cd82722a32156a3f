"""The generated CUDA, checked on any machine: NVRTC compiles every module for sm_80 and sm_90,
and the same text, compiled for the CPU, matches the NumPy backend step for step.

These run in CI (no GPU). They skip only where the toolchain is missing, and CI sets
GPUOPT_REQUIRE_KERNEL_TOOLS=1 so that a missing toolchain fails instead.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import gpuopt
from gpuopt import dtypes
from gpuopt.backends import nvrtc
from gpuopt.backends.cuda_source import module_source
from gpuopt.backends.kernel_backend import CHUNK
from gpuopt.plan import plan

from .cases import ALL, CHAINS, OPTIMISERS, RULES, SignMomentum
from .emulation import device as emulation
from .paths import counted_paths
from .test_rules import CLIPNORM_OVERFLOW, clipnorm_overflow_check
from .toolchain import missing as _missing

DTYPES = [np.dtype(np.float16), dtypes.BFLOAT16, np.dtype(np.float32), np.dtype(np.float64)]


# -- NVRTC ------------------------------------------------------------------------------------


def _nvrtc():
    try:
        nvrtc.binding()
    except ImportError as error:
        _missing(str(error))
    if not nvrtc.cuda_include_options():
        _missing("the CUDA headers (cuda_fp16.h) were not found")


def nvrtc_compile(source: str, arch: int, binary: bool = True, by_cupy: bool = False) -> bytes:
    """Compile exactly as the CuPy backend does (gpuopt.backends.nvrtc; ``by_cupy``: as CuPy
    compiles the strided path's ElementwiseKernel); returns the cubin (or PTX) or raises."""
    _nvrtc()
    try:
        return nvrtc.compile_module(source, arch, binary, by_cupy=by_cupy)
    except nvrtc.NvrtcError as error:
        raise AssertionError(f"NVRTC sm_{arch}: {error}") from None


def _compile_cases() -> dict[str, gpuopt.Rule]:
    cases = {f"{name} alone": factory for name, factory in RULES.items()}
    for name in OPTIMISERS + ["SignMomentum"]:
        cases[f"{name} after WeightDecay, ClipValue"] = (
            lambda f=RULES[name]: gpuopt.Optimiser(gpuopt.WeightDecay(1e-3), gpuopt.ClipValue(1.0), f())
        )
    # Two reduction passes, and nesting (the other chains add nothing NVRTC has not seen).
    cases.update({f"chain {name}": CHAINS[name] for name in ("ClipNorm+ClipNorm+Descent", "nested")})
    cases["MixedPrecision of ClipNorm+ADAM"] = lambda: gpuopt.MixedPrecision(CHAINS["ClipNorm+ADAM"]())
    return cases


COMPILE_CASES = _compile_cases()


@pytest.fixture(scope="module")
def nvrtc_results():
    """Every (case, dtype, arch) compiled once, two at a time (NVRTC runs outside the GIL)."""
    _nvrtc()
    jobs = []
    for name, factory in COMPILE_CASES.items():
        for dtype in DTYPES:
            source = module_source(plan(factory()), dtype, dtype, False)
            jobs += [((name, dtypes.name(dtype), arch), source, arch) for arch in (80, 90)]

    def run(job):
        key, source, arch = job
        try:
            return key, len(nvrtc_compile(source, arch)), None
        except AssertionError as error:
            return key, 0, str(error)

    with ThreadPoolExecutor(2) as pool:
        return {key: (size, error) for key, size, error in pool.map(run, jobs)}


@pytest.mark.parametrize("dtype", [dtypes.name(d) for d in DTYPES])
@pytest.mark.parametrize("case", list(COMPILE_CASES))
def test_nvrtc_compiles_every_module(nvrtc_results, case, dtype):
    for arch in (80, 90):
        size, error = nvrtc_results[(case, dtype, arch)]
        assert error is None, error
        assert size > 1000  # a real cubin, not an empty module


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_nvrtc_compiles_apply_modules_and_mixed_dtypes(dtype):
    opt = CHAINS["ClipNorm+ADAM"]()
    nvrtc_compile(gpuopt.kernel_source(opt, dtype, apply=True), 90)
    nvrtc_compile(gpuopt.kernel_source(opt, dtype, "float16" if dtype != "float16" else "float32"), 80)
    nvrtc_compile(gpuopt.kernel_source(opt, dtype, "bfloat16" if dtype != "bfloat16" else "float32"), 80)


def test_module_holds_every_kernel_the_update_runs():
    plain = gpuopt.kernel_source(gpuopt.ADAM(), "float32")
    clipped = gpuopt.kernel_source(CHAINS["ClipNorm+ADAM"](), "float32")
    for name in ("gpuopt_elementwise", "gpuopt_multi_tensor"):
        assert f"void {name}(" in plain and f"void {name}(" in clipped
    assert "#define GPUOPT_HAS_TERMS" in clipped and "#define GPUOPT_HAS_TERMS" not in plain
    assert "#include <cuda_fp16.h>" in gpuopt.kernel_source(gpuopt.ADAM(), "float16")
    bf16 = gpuopt.kernel_source(gpuopt.ADAM(), "bfloat16")
    assert "#include <cuda_bf16.h>" in bf16 and "typedef __nv_bfloat16 gpuopt_param_t;" in bf16
    assert "typedef float gpuopt_state_t;" in bf16 and "__float2bfloat16_rn(v)" in bf16
    assert "return x - d;" in plain  # the parameter's new value; a master copy's otherwise
    assert "return x - d;" not in gpuopt.kernel_source(gpuopt.MixedPrecision(gpuopt.ADAM()), "bfloat16")


def test_source_depends_on_structure_and_dtype_only():
    a, b = gpuopt.ADAM(1e-3, (0.9, 0.999)), gpuopt.ADAM(0.5, (0.1, 0.2), eps=1e-3)
    assert gpuopt.kernel_source(a) == gpuopt.kernel_source(b)
    a.eta = 7.0
    assert gpuopt.kernel_source(a) == gpuopt.kernel_source(b)
    assert "0.999" not in gpuopt.kernel_source(b) and "0.2" not in gpuopt.kernel_source(b)
    assert gpuopt.kernel_source(a, "float32") != gpuopt.kernel_source(a, "float64")
    assert gpuopt.kernel_source(a) != gpuopt.kernel_source(gpuopt.AMSGrad())


def test_kernel_source_rejects_bad_arguments():
    with pytest.raises(TypeError, match="int32"):
        gpuopt.kernel_source(gpuopt.ADAM(), "int32")
    with pytest.raises(TypeError, match="rule"):
        gpuopt.kernel_source("ADAM")


# -- the same CUDA text on the CPU ------------------------------------------------------------


EMULATION_DTYPES = {"float32": 1e-6, "float64": 1e-12}
SIZES = [1001, 7, 0, CHUNK + 4099, 3, 1]  # odd sizes, an empty one, one across two chunks


@pytest.fixture(scope="module", autouse=False)
def prebuilt(emulated_backend):
    """Compile every module these tests need, two g++ at a time."""
    sources = [
        module_source(plan(factory()), np.dtype(dt), np.dtype(dt), False)
        for factory in ALL.values() for dt in EMULATION_DTYPES
    ]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(emulation.build, sources))


def _trajectory(factory, dtype, use_kernels, on_kernels, steps=20, collection=True, seed=0):
    on_kernels(use_kernels)
    opt = factory()
    rng = np.random.default_rng(seed)
    base = [rng.standard_normal(n + 1).astype(dtype) for n in SIZES]
    params = [b[1:] for b in base]  # views one element in: misaligned for vector access
    if not collection:
        params = params[:1]
    history = []
    for _ in range(steps):
        grads = [(2 * rng.standard_normal(p.shape)).astype(dtype) for p in params]
        gpuopt.update(opt, params if collection else params[0], grads if collection else grads[0])
        history.append([p.copy() for p in params])
    states = [leaf.state_for(p).slots for leaf in opt.leaves() for p in params if leaf.state]
    return history, states, opt


@pytest.mark.usefixtures("prebuilt")
@pytest.mark.parametrize("dtype", list(EMULATION_DTYPES))
@pytest.mark.parametrize("case", list(ALL))
def test_cuda_text_on_cpu_matches_numpy(case, dtype, on_kernels):
    rtol = EMULATION_DTYPES[dtype]
    for collection in (False, True):
        kernels, kernel_state, _ = _trajectory(ALL[case], dtype, True, on_kernels, collection=collection)
        numpy, numpy_state, _ = _trajectory(ALL[case], dtype, False, on_kernels, collection=collection)
        for step, (a, b) in enumerate(zip(kernels, numpy)):
            for i, (x, y) in enumerate(zip(a, b)):
                np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * 1e-3,
                                           err_msg=f"{case} step {step + 1} array {i}")
        for x, y in zip(kernel_state, numpy_state):
            np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * 1e-3, err_msg=f"{case} state")


def _torch_bfloat16_trajectory(factory, use_kernels, on_kernels, steps=8):
    """bfloat16 parameters and gradients (PyTorch CPU tensors: their uint16 views reach the
    backend) stepped through the kernels or NumPy; returns the parameters and state."""
    torch = pytest.importorskip("torch")
    on_kernels(use_kernels)
    opt = factory()
    generator = torch.Generator().manual_seed(5)
    params = [torch.randn(n, generator=generator).to(torch.bfloat16) for n in (1001, 7, 70001)]
    for _ in range(steps):
        grads = [(2 * torch.randn(p.shape, generator=generator)).to(torch.bfloat16) for p in params]
        gpuopt.update(opt, params, grads)
        gpuopt.update(opt, params[1], grads[1])  # one array alone: the single-array kernel
    states = [leaf.state_for(p).slots for leaf in opt.leaves() for p in params if leaf.state]
    return params, states


BFLOAT16_CASES = {
    "ADAM": RULES["ADAM"],
    "ClipNorm+ADAM": CHAINS["ClipNorm+ADAM"],
    "MixedPrecision of ClipValue+WeightDecay+ADAM": lambda: gpuopt.MixedPrecision(
        CHAINS["ClipValue+WeightDecay+ADAM"]()),
}


@pytest.mark.parametrize("case", list(BFLOAT16_CASES))
def test_bfloat16_storage_on_cpu_matches_numpy(case, on_kernels):
    """The printed __nv_bfloat16 module (the stand-in header rounds as cuda_bf16.h does) and
    the NumPy executor's rounding give the same bits."""
    kernels, ks = _torch_bfloat16_trajectory(BFLOAT16_CASES[case], True, on_kernels)
    numpy, ns = _torch_bfloat16_trajectory(BFLOAT16_CASES[case], False, on_kernels)
    for a, b in zip(kernels, numpy):
        assert a.dtype == b.dtype and a.equal(b)
    for a, b in zip(ks, ns):
        assert a.dtype == np.float32 and np.array_equal(a, b)


@pytest.mark.parametrize("case", ["ADAM", "ClipNorm+ADAM", "AMSGrad", "SignMomentum"])
def test_float16_storage_on_cpu_matches_numpy(case, on_kernels):
    factory = ALL[case]
    kernels, ks, _ = _trajectory(factory, np.float16, True, on_kernels, steps=8)
    numpy, ns, _ = _trajectory(factory, np.float16, False, on_kernels, steps=8)
    for a, b in zip(kernels[-1] + ks, numpy[-1] + ns):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=2e-3, atol=1e-4)
    assert all(s.dtype == np.float32 for s in ks)  # float16 parameters keep float32 state


def test_one_array_and_collection_give_identical_results(on_kernels):
    on_kernels(True)
    for factory in (RULES["ADAM"], CHAINS["ClipNorm+ADAM"], CHAINS["ClipValue+WeightDecay+ADAM"]):
        rng = np.random.default_rng(3)
        params = [rng.standard_normal(n).astype(np.float32) for n in (5000, 13, 70001)]
        singles = [p.copy() for p in params]
        together, alone = factory(), factory()
        for _ in range(5):
            grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
            gpuopt.update(together, params, grads)
            for p, g in zip(singles, grads):
                gpuopt.update(alone, p, g)
        for a, b in zip(params, singles):
            assert np.array_equal(a, b)


def test_fused_chain_equals_rules_applied_one_by_one(on_kernels):
    on_kernels(True)
    rng = np.random.default_rng(4)
    x = rng.standard_normal(3000).astype(np.float64)
    y = x.copy()
    rules = [gpuopt.ClipValue(0.7), gpuopt.WeightDecay(1e-2), gpuopt.ClipNorm(10.0), gpuopt.ADAM(0.01)]
    chain = gpuopt.Optimiser(*[type(r)(**r.hyperparameters()) for r in rules])
    for _ in range(10):
        g = rng.standard_normal(x.shape)
        gpuopt.update(chain, x, g)
        d = g
        for rule in rules:
            d = gpuopt.apply(rule, y, d)
        y -= d
    np.testing.assert_allclose(x, y, rtol=1e-12)


def test_apply_through_kernels_leaves_inputs_alone(on_kernels):
    on_kernels(True)
    rng = np.random.default_rng(5)
    x, g = rng.standard_normal(999), rng.standard_normal(999)
    x0, g0 = x.copy(), g.copy()
    step = gpuopt.apply(CHAINS["ClipNorm+ADAM"](), x, g)
    on_kernels(False)
    expected = gpuopt.apply(CHAINS["ClipNorm+ADAM"](), x, g)
    assert np.array_equal(x, x0) and np.array_equal(g, g0)
    np.testing.assert_allclose(step, expected, rtol=1e-12)


@pytest.mark.parametrize(
    "factory, count, names",
    [
        (RULES["ADAM"], 1, ["gpuopt_elementwise"]),
        (CHAINS["ClipValue+WeightDecay+ADAM"], 1, ["gpuopt_elementwise"]),
        (CHAINS["ClipNorm+ADAM"], 2, ["gpuopt_multi_reduce", "gpuopt_multi_tensor"]),
        (CHAINS["ClipNorm+ClipNorm+Descent"], 3, ["gpuopt_multi_reduce"] * 2 + ["gpuopt_multi_tensor"]),
    ],
)
def test_launch_counts(factory, count, names, on_kernels, emulated_backend):
    on_kernels(True)
    opt = factory()
    x, g = np.ones(4096, np.float32), np.full(4096, 0.5, np.float32)
    gpuopt.update(opt, x, g)  # first step creates state
    for _ in range(3):  # repeated: one array keeps its launches (no prepared multi-tensor one)
        with counted_paths() as taken, emulated_backend.count_launches() as counter:
            gpuopt.update(opt, x, g)
        assert (counter.launches, counter.names) == (count, names)
        assert taken["prepared"] == 0
    # A whole model: the count does not grow with the number of tensors.
    params = [np.ones(n, np.float32) for n in range(1, 151)]
    grads = [np.full(p.shape, 0.5, np.float32) for p in params]
    gpuopt.update(opt, params, grads)
    with emulated_backend.count_launches() as counter:
        gpuopt.update(opt, params, grads)
    multi = ["gpuopt_multi_reduce"] * (count - 1) + ["gpuopt_multi_tensor"]
    assert counter.names == multi


def test_mixed_dtypes_in_one_call_launch_once_per_group(on_kernels, emulated_backend):
    on_kernels(True)
    opt = gpuopt.ADAM()
    params = [np.ones(10, dt) for dt in (np.float32, np.float64, np.float32, np.float16)]
    grads = [np.full(10, 0.1, p.dtype) for p in params]
    with emulated_backend.count_launches() as counter:
        gpuopt.update(opt, params, grads)
    assert sorted(counter.names) == ["gpuopt_elementwise", "gpuopt_elementwise", "gpuopt_multi_tensor"]
    with emulated_backend.count_launches() as counter:  # repeated: the prepared update
        gpuopt.update(opt, params, grads)
    assert counter.names == ["gpuopt_multi_tensor"] * 3
    on_kernels(False)
    reference = [np.ones(10, p.dtype) for p in params]
    ref_opt = gpuopt.ADAM()
    for _ in range(2):
        gpuopt.update(ref_opt, reference, [np.full(10, 0.1, p.dtype) for p in reference])
    for a, b in zip(params, reference):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_pointer_table_is_reused_while_arrays_stay(on_kernels, emulated_backend):
    on_kernels(True)
    opt = gpuopt.Momentum()
    params = [np.ones(n, np.float32) for n in (3, 70000, 5)]
    grads = [np.full(p.shape, 0.5, np.float32) for p in params]
    gpuopt.update(opt, params, grads)
    tables = next(t for t in emulated_backend._tables.values() if t.host_table is not None
                  and t.host_table[0, 0] == params[0].ctypes.data)
    device_table = tables.table
    gpuopt.update(opt, params, grads)
    assert tables.table is device_table  # same arrays: the table was not rebuilt
    np.testing.assert_array_equal(tables.host_table[:, 3], [3, 70000, 5])
    assert tables.chunks == 1 + 2 + 1  # 70000 elements span two chunks of CHUNK
    fresh = [np.full(p.shape, 0.25, np.float32) for p in params]
    with counted_paths() as taken:
        gpuopt.update(opt, params, fresh)  # new gradient arrays: swapped into the prepared tables
    assert taken["prepared"] == 1
    on_kernels(False)
    expected = [np.ones(n, np.float32) for n in (3, 70000, 5)]
    reference = gpuopt.Momentum()
    for value in (0.5, 0.5, 0.25):
        gpuopt.update(reference, expected, [np.full(p.shape, value, np.float32) for p in expected])
    for a, b in zip(params, expected):
        np.testing.assert_array_equal(a, b)  # the new gradients, not the old ones, were read


def test_fresh_gradient_arrays_each_step_match_numpy(on_kernels):
    """A CuPy training loop makes new gradient arrays every step; the prepared update takes
    them as long as each is like the one it replaces, and falls back when one is not."""
    results = []
    for use_kernels in (True, False):
        on_kernels(use_kernels)
        opt = CHAINS["ClipNorm+ADAM"]()
        rng = np.random.default_rng(21)
        params = [rng.standard_normal(n).astype(np.float32) for n in (300, 70001, 0, 5)]
        for step in range(8):
            grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
            if step == 5:
                grads[1] = grads[1].astype(np.float64)  # another dtype: the full path
            if step == 6:
                grads[3] = None  # skipped this step: the full path
            with counted_paths() as taken:
                gpuopt.update(opt, params, grads)
            if use_kernels and step in (2, 3, 4):  # these steps took the prepared path
                assert taken["prepared"] == 1
        results.append(params)
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def test_changing_hyperparameters_never_rebuilds_a_module(on_kernels, emulated_backend):
    on_kernels(True)
    opt = gpuopt.Optimiser(gpuopt.ClipNorm(1.0), SignMomentum())
    x, g = np.ones(100), np.full(100, 0.3)
    gpuopt.update(opt, x, g)
    built = len(emulated_backend.device._libraries)
    for eta in (0.5, 0.25, 0.125):
        opt[1].eta = eta
        opt[0].thresh = eta
        gpuopt.update(opt, x, g)
    assert len(emulated_backend.device._libraries) == built


# -- repeating an update on the same arrays (the prepared fast path) --------------------------


def _reference_run(factory, sizes, steps, on_kernels, schedule):
    """Run ``schedule(step) -> indices of the arrays to update`` on NumPy and on kernels."""
    results = []
    for use_kernels in (True, False):
        on_kernels(use_kernels)
        opt = factory()
        rng = np.random.default_rng(7)
        params = [rng.standard_normal(n).astype(np.float32) for n in sizes]
        grads = [np.empty_like(p) for p in params]
        for step in range(steps):
            for g in grads:  # the same gradient arrays every step, refilled in place
                g[...] = rng.standard_normal(g.shape)
            chosen = schedule(step)
            if len(chosen) == 1:
                gpuopt.update(opt, params[chosen[0]], grads[chosen[0]])
            else:
                gpuopt.update(opt, [params[i] for i in chosen], [grads[i] for i in chosen])
        prepared = "_prepared" in vars(opt)  # (looked at while the gradients are alive)
        results.append((params, opt, prepared))
    return results


@pytest.mark.parametrize("case", ["ADAM", "ClipNorm+ADAM", "ExpDecay+ADAM", "ClipNorm+ClipNorm+Descent"])
def test_repeated_collection_update_matches_numpy(case, on_kernels):
    (kernels, opt, prepared), (numpy, ref, _) = _reference_run(ALL[case], [300, 70001, 5], 12, on_kernels,
                                                               lambda step: [0, 1, 2])
    assert prepared  # the fast path was taken
    for a, b in zip(kernels, numpy):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    for leaf, ref_leaf in zip(opt.leaves(), ref.leaves()):
        assert leaf.hyperparameters() == ref_leaf.hyperparameters()  # ExpDecay decayed alike


def test_prepared_update_notices_other_updates_and_step_counts(on_kernels):
    # Array 1 alone on some steps; array 2 joins late (its step count differs from the rest).
    def schedule(step):
        if step % 4 == 3:
            return [1]
        return [0, 1] if step < 6 else [0, 1, 2]

    (kernels, _, _), (numpy, _, _) = _reference_run(RULES["ADAM"], [300, 1000, 70], 14, on_kernels, schedule)
    for a, b in zip(kernels, numpy):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def test_prepared_update_sees_new_hyperparameters_and_reset(on_kernels, emulated_backend):
    on_kernels(True)
    opt = gpuopt.Descent(0.5)
    params = [np.ones(10, np.float32), np.ones(20, np.float32)]
    grads = [np.ones(10, np.float32), np.ones(20, np.float32)]
    gpuopt.update(opt, params, grads)
    gpuopt.update(opt, params, grads)
    opt.eta = 0.25
    gpuopt.update(opt, params, grads)
    np.testing.assert_allclose(params[1], 1 - 0.5 - 0.5 - 0.25)
    adam = gpuopt.ADAM(0.1)
    for _ in range(3):
        gpuopt.update(adam, params, grads)
    adam.reset()
    before = params[0].copy()
    gpuopt.update(adam, params, grads)  # a fresh first step: ADAM's first step is eta*sign(g)
    np.testing.assert_allclose(before - params[0], 0.1, rtol=1e-5)
    assert adam.leaves()[0].state_for(params[0]).t == 1


def test_prepared_update_keeps_state_weakly_held(on_kernels):
    import gc

    on_kernels(True)
    opt = gpuopt.ADAM()
    params = [np.ones(10, np.float32), np.ones(20, np.float32)]
    grads = [np.ones(10, np.float32), np.ones(20, np.float32)]
    for _ in range(3):
        gpuopt.update(opt, params, grads)
    assert "_prepared" in vars(opt) and len(opt._state) == 2
    del params
    gc.collect()
    assert len(opt._state) == 0 and "_prepared" not in vars(opt)


def test_prepared_update_never_mistakes_a_none_gradient_for_a_dead_one(on_kernels):
    import gc

    on_kernels(True)
    opt = gpuopt.Descent(0.5)
    params = [np.ones(10, np.float32), np.ones(20, np.float32)]
    grads = [np.ones(10, np.float32), np.ones(20, np.float32)]
    gpuopt.update(opt, params, grads)
    gpuopt.update(opt, params, grads)  # prepared on these gradient arrays
    del grads
    gc.collect()
    gpuopt.update(opt, params, [None, np.ones(20, np.float32)])  # the first is skipped now
    np.testing.assert_array_equal(params[0], 0.0)
    np.testing.assert_array_equal(params[1], -0.5)


@pytest.mark.parametrize("param, grad", [("float32", "float16"), ("float64", "float32"), ("float16", "float32")])
def test_gradient_dtype_other_than_the_parameters(param, grad, on_kernels):
    results = []
    for use_kernels in (True, False):
        on_kernels(use_kernels)
        opt = CHAINS["ClipNorm+ADAM"]()
        rng = np.random.default_rng(11)
        params = [rng.standard_normal(n).astype(param) for n in (1001, 17)]
        for _ in range(6):
            grads = [rng.standard_normal(p.shape).astype(grad) for p in params]
            gpuopt.update(opt, params, grads)
            gpuopt.update(opt, params[0], grads[0])
        results.append(params)
    for a, b in zip(*results):
        assert a.dtype == np.dtype(param)
        np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=1e-6, atol=1e-7)


def test_state_rows_start_aligned_for_any_size(emulated_backend):
    for size in (1, 7, 1001, 70001):
        state = emulated_backend.full_state([0.0, 1.0, 2.0], size, np.dtype(np.float32))
        assert state.shape == (3, size)
        assert all(row.ctypes.data % 256 == 0 for row in state)  # (whole cache lines, and 64-byte vectors)
        np.testing.assert_array_equal(state[:, -1], [0.0, 1.0, 2.0])


def test_prepared_update_outlives_its_gradients(on_kernels):
    """A loop's gradients die every step: the record stays, and the next ones are checked
    and read by address, whatever ids they get."""
    import gc

    on_kernels(True)
    opt = gpuopt.Momentum(0.5, 0.0)
    params = [np.ones(10, np.float32), np.ones(20, np.float32)]
    grads = [np.ones(10, np.float32), np.ones(20, np.float32)]
    gpuopt.update(opt, params, grads)
    assert "_prepared" in vars(opt)
    del grads
    gc.collect()
    assert "_prepared" in vars(opt)
    gpuopt.update(opt, params, [np.full(10, 2.0, np.float32), np.full(20, 4.0, np.float32)])
    np.testing.assert_array_equal(params[0], 1 - 0.5 - 1.0)
    np.testing.assert_array_equal(params[1], 1 - 0.5 - 2.0)


# -- the options a GPU compiles with ----------------------------------------------------------


def test_compiled_code_keeps_subnormals_and_never_fuses_multiply_adds():
    """nvrtc_options is the one set of options (the CuPy backend compiles through it, not through
    CuPy's compile, which would add -ftz=true): no flush-to-zero, no FMA contraction."""
    options = nvrtc.nvrtc_options(90)
    assert {"-ftz=false", "--fmad=false", "-arch=sm_90"} <= set(options)
    ptx = nvrtc_compile(gpuopt.kernel_source(CHAINS["ClipNorm+ADAM"](), "float32"), 90, binary=False).decode()
    assert "div.rn.f32" in ptx or "sqrt.rn.f32" in ptx  # float32 arithmetic is there...
    assert ".ftz" not in ptx and "fma." not in ptx  # ...without flushing or fusing


@pytest.mark.parametrize("prefer_cupy", [False, True], ids=["cuda-bindings", "CuPy's binding"])
def test_each_nvrtc_binding_gives_cubin_and_ptx(prefer_cupy):
    _nvrtc()
    binding = nvrtc.binding(prefer_cupy)
    if ("CuPy" in binding.version) != prefer_cupy:
        pytest.skip(f"only {binding.version} is installed")
    source = gpuopt.kernel_source(gpuopt.ADAM(), "float32")
    cubin = nvrtc.compile_module(source, 90, True, prefer_cupy=prefer_cupy)
    ptx = nvrtc.compile_module(source, 90, False, prefer_cupy=prefer_cupy)
    assert cubin[:4] == b"\x7fELF" and b".entry gpuopt_multi_tensor" in ptx and not ptx.endswith(b"\0")
    assert nvrtc.target_arch(90, prefer_cupy) == (90, True)  # a cubin for an arch NVRTC knows
    assert nvrtc.target_arch(91, prefer_cupy) == (90, False)  # else PTX for the newest below it


class _FakeCupy:
    """Just enough of CuPy for CupyDevice to compile and load a module without a GPU."""

    class cuda:  # noqa: N801 - mirrors cupy.cuda
        class Device:
            def __init__(self, index: int):
                self.compute_capability = "90"

        class runtime:  # noqa: N801
            @staticmethod
            def getDevice() -> int:
                return 0

    class RawModule:
        loaded: list[bytes] = []

        def __init__(self, path: str):
            _FakeCupy.RawModule.loaded.append(open(path, "rb").read())

        def get_function(self, name: str) -> str:
            return name


def test_cupy_backend_loads_what_nvrtc_options_compile(monkeypatch, tmp_path):
    from gpuopt.backends.cupy_backend import CupyDevice

    _nvrtc()
    monkeypatch.setenv("GPUOPT_CACHE_DIR", str(tmp_path))
    device = CupyDevice.__new__(CupyDevice)
    device.xp, device.compiles = _FakeCupy, 0
    source = gpuopt.kernel_source(gpuopt.ADAM(), "float32")
    device.kernel(source, "gpuopt_elementwise")
    device.kernel(source, "gpuopt_multi_tensor")  # the same module: compiled and loaded once
    assert device.compiles == 1 and len(_FakeCupy.RawModule.loaded) == 1
    cubin = _FakeCupy.RawModule.loaded[0]
    assert cubin[:4] == b"\x7fELF" and cubin.rstrip(b"\0") == nvrtc_compile(source, 90).rstrip(b"\0")
    assert len(list((tmp_path / "cuda").glob("*.cubin"))) == 1  # kept for the next process


def test_subnormal_state_is_kept_as_numpy_keeps_it(on_kernels):
    """Gradients of 1e-20 make ADAM's second moment subnormal in float32 (1e-3 * 1e-40): the
    kernels keep it, as NumPy does, instead of flushing it to zero."""
    results = []
    for use_kernels in (True, False):
        on_kernels(use_kernels)
        opt, x = gpuopt.ADAM(), np.ones(1001, np.float32)
        for _ in range(3):
            gpuopt.update(opt, x, np.full(x.shape, 1e-20, np.float32))
        results.append((x, opt.state_for(x).slots))
    (x_kernels, s_kernels), (x_numpy, s_numpy) = results
    v = s_numpy[1]
    assert np.all((v > 0) & (v < np.finfo(np.float32).tiny))  # subnormal, not zero
    assert np.array_equal(s_kernels, s_numpy) and np.array_equal(x_kernels, x_numpy)
@pytest.mark.parametrize("dtype, size, thresh", CLIPNORM_OVERFLOW,
                         ids=[f"{np.dtype(c[0]).name}-{c[1]:g}" for c in CLIPNORM_OVERFLOW])
def test_clipnorm_norm_never_overflows_in_the_cuda_text(dtype, size, thresh, on_kernels):
    on_kernels(True)
    clipnorm_overflow_check(dtype, size, thresh)


def test_prepared_update_refuses_new_gradients_that_share_memory(on_kernels):
    """New gradient arrays swapped into a prepared update are checked against the parameters:
    one inside a parameter sends the call through the full check, which refuses it."""
    on_kernels(True)
    opt = gpuopt.ADAM(0.1)
    params = [np.ones(64, np.float32), np.ones(32, np.float32)]
    grads = [np.full(64, 0.5, np.float32), np.full(32, 0.5, np.float32)]
    gpuopt.update(opt, params, grads)
    gpuopt.update(opt, params, grads)
    assert "_prepared" in vars(opt)
    before, t = [p.copy() for p in params], opt.state_for(params[0]).t
    bad = [np.full(64, 0.5, np.float32), params[0][:32]]  # like the old one, but inside params[0]
    with pytest.raises(ValueError, match=r"params\[0\] shares memory with the gradient of params\[1\]"):
        gpuopt.update(opt, params, bad)
    assert all(np.array_equal(a, b) for a, b in zip(params, before)) and opt.state_for(params[0]).t == t
    fresh = [np.full(64, 0.25, np.float32), np.full(32, 0.25, np.float32)]
    with counted_paths() as taken:
        gpuopt.update(opt, params, fresh)  # new arrays of their own: taken by the prepared update
    assert taken["prepared"] == 1
    assert opt.state_for(params[0]).t == t + 1


def test_threads_through_the_kernel_backend_match_sequential(on_kernels):
    """Separate optimisers in several threads, through the kernel backend (the CUDA text on
    the CPU) and its shared table and module caches: exactly the sequential results."""
    import threading

    on_kernels(True)

    def run(i: int, out: list) -> None:
        rng = np.random.default_rng(i)
        opt = CHAINS["ClipNorm+ADAM"]()
        params = [rng.standard_normal(n).astype(np.float32) for n in (300 + i, 70, 5000)]
        for _ in range(4):
            gpuopt.update(opt, params, [rng.standard_normal(p.shape).astype(np.float32) for p in params])
        out.append(params)

    expected: list = []
    for i in range(4):
        run(i, expected)
    got: list[list] = [[] for _ in range(4)]
    threads = [threading.Thread(target=run, args=(i, got[i])) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for want, have in zip(expected, got):
        assert len(have) == 1
        for a, b in zip(want, have[0]):
            np.testing.assert_array_equal(a, b)
