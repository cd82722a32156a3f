"""The native CPU backend: C++ compiled from the printed step equals the NumPy executor bit for
bit (every rule and chain, float16/32/64, empty, 0-d, strided and misaligned arrays,
collections, any thread count), one call per dtype group, builds shared safely between
processes, and the NumPy executor with a one-line notice where no compiler works. One array
updated again and again takes the prepared path, with the full path's results, and any change
after it takes the full path (or raises its error, changing nothing).

Modules are built once per session (in the session's GPUOPT_CACHE_DIR, see conftest.py),
two at a time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import gpuopt
import gpuopt.backends
from gpuopt.backends import cxx_build, numpy_backend
from gpuopt.backends.kernel_backend import CHUNK, KernelBackend
from gpuopt.backends.native_backend import NativeDevice, cache_dir
from gpuopt.plan import plan

from .cases import ALL, CHAINS, RULES
from .paths import counted_paths

REQUIRED = os.environ.get("GPUOPT_REQUIRE_KERNEL_TOOLS") == "1"
DTYPES = ["float16", "float32", "float64"]
SIZES = [1001, 7, 0, CHUNK + 4099, 3, 1]  # odd sizes, an empty one, one across two chunks
EXECUTOR = numpy_backend.BACKEND


@pytest.fixture(scope="module")
def device():
    compiler = cxx_build.find_compiler()
    if compiler is None:
        if REQUIRED:
            pytest.fail("no C++ compiler (GPUOPT_REQUIRE_KERNEL_TOOLS=1)")
        pytest.skip("no C++ compiler")
    device = NativeDevice(compiler)
    modules = [device.module_source(plan(factory()), np.dtype(dt), np.dtype(dt), False)
               for factory in ALL.values() for dt in DTYPES]
    with ThreadPoolExecutor(2) as pool:  # every module of the table, two compilers at a time
        list(pool.map(device.library, modules))
    return device


@pytest.fixture(scope="module")
def native(device):
    return KernelBackend(device)


@pytest.fixture
def use(native, monkeypatch):
    """``use(True)``: NumPy arrays on the native backend; ``use(False)``: on the executor."""

    def select(on_native: bool) -> None:
        backend = native if on_native else EXECUTOR
        monkeypatch.setattr(gpuopt.backends, "cpu_backend", lambda: backend)

    return select


def _trajectory(factory, dtype, use, on_native, steps=8, seed=0):
    """Collection updates, then one array alone (the single-array entry) at every step."""
    use(on_native)
    opt = factory()
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(n + 1).astype(dtype)[1:] for n in SIZES]  # one element in: misaligned
    history = []
    for _ in range(steps):
        grads = [(2 * rng.standard_normal(p.shape)).astype(dtype) for p in params]
        gpuopt.update(opt, params, grads)
        gpuopt.update(opt, params[0], grads[0])
        history.append([p.copy() for p in params])
    states = [leaf.state_for(p).slots for leaf in opt.leaves() for p in params if leaf.state]
    return history, states


def _same_bits(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    bits = [np.ascontiguousarray(v).reshape(-1).view(np.uint8) for v in (a, b)]
    assert np.array_equal(*bits) or np.array_equal(a, b, equal_nan=True), (
        f"{what}: largest difference {np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(ALL))
def test_native_equals_the_numpy_executor_bit_for_bit(case, dtype, use):
    native, native_state = _trajectory(ALL[case], dtype, use, True)
    executor, executor_state = _trajectory(ALL[case], dtype, use, False)
    for step, (a, b) in enumerate(zip(native, executor)):
        for i, (x, y) in enumerate(zip(a, b)):
            _same_bits(x, y, f"{case} {dtype} step {step + 1} array {i}")
    for x, y in zip(native_state, executor_state):
        _same_bits(x, y, f"{case} {dtype} state")


def test_chunks_are_the_executors_blocks():
    # Reductions are bit-identical because native code sums the same blocks in the same order.
    assert CHUNK == numpy_backend.BLOCK


def _unaligned(values: np.ndarray) -> np.ndarray:
    """A copy of ``values`` whose address is one byte past an element boundary."""
    buffer = np.empty(values.nbytes + 1, np.uint8)
    array = np.frombuffer(buffer.data, dtype=values.dtype, count=values.size, offset=1).reshape(values.shape)
    array[...] = values
    assert not array.flags.aligned
    return array


LAYOUTS = {
    "0-d": lambda rng, dt: np.array(rng.standard_normal(), dtype=dt),
    "strided": lambda rng, dt: rng.standard_normal((40, 30)).astype(dt)[::3, 1::2],
    "transposed": lambda rng, dt: rng.standard_normal((50, 70)).astype(dt).T,
    "unaligned": lambda rng, dt: _unaligned(rng.standard_normal(999).astype(dt)),
    "empty": lambda rng, dt: np.empty((0, 3), dt),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", ["ADAM", "ClipNorm+ADAM"])
def test_any_layout_updates_and_applies_in_place_like_the_executor(case, layout, use):
    results = []
    for on_native in (True, False):
        use(on_native)
        rng = np.random.default_rng(1)
        opt = ALL[case]()
        x = LAYOUTS[layout](rng, np.float32)
        steps = []
        for _ in range(4):
            g = LAYOUTS[layout](rng, np.float32)
            gpuopt.update(opt, x, g)
            steps.append(gpuopt.apply(opt, x, g))
        results.append((x, steps))
    (x, steps), (y, expected) = results
    _same_bits(np.ascontiguousarray(x), np.ascontiguousarray(y), f"{case} {layout}")
    for a, b in zip(steps, expected):
        _same_bits(a, b, f"{case} {layout} apply")


def test_gradients_of_other_dtypes_and_mixed_groups(use):
    results = []
    for on_native in (True, False):
        use(on_native)
        rng = np.random.default_rng(2)
        opt = CHAINS["ClipValue+WeightDecay+ADAM"]()
        params = [rng.standard_normal(n).astype(dt) for n, dt in
                  [(300, np.float32), (70001, np.float64), (5, np.float16), (40, np.float32)]]
        for _ in range(5):
            grads = [rng.standard_normal(p.shape).astype(gd) for p, gd in
                     zip(params, (np.float16, np.float32, np.float32, np.float32))]
            gpuopt.update(opt, params, grads)
        results.append(params)
    for a, b in zip(*results):
        _same_bits(a, b, "mixed dtypes")


@pytest.mark.parametrize("case", ["ClipNorm+ADAM", "AMSGrad"])
def test_results_do_not_depend_on_the_thread_count(case, device, use):
    """Arrays large enough for helper threads (one array alone, and a collection): every
    thread count gives the executor's bits."""
    runs = []
    for threads in (1, 2, 3, None):
        use(threads is not None)
        device.cpu_threads = threads or 2
        rng = np.random.default_rng(3)
        opt = ALL[case]()
        params = [rng.standard_normal(n).astype(np.float32) for n in (17 * CHUNK + 77, 100, 12 * CHUNK)]
        for _ in range(3):
            gpuopt.update(opt, params, [rng.standard_normal(p.shape).astype(np.float32) for p in params])
            gpuopt.update(opt, params[0], rng.standard_normal(params[0].shape).astype(np.float32))
        runs.append(params)
    device.cpu_threads = 2
    for run in runs[:-1]:
        for a, b in zip(run, runs[-1]):
            _same_bits(a, b, "threads")


@pytest.mark.parametrize("size, dst_offset, src_offset", [
    (0, 0, 0), (1, 3, 0), (15, 1, 2), (17, 0, 5), (64 * 4 + 9, 7, 0),
    ((1 << 20) + 33, 0, 0), ((3 << 20) + 5, 9, 4),  # pieces of 1 MiB, helper threads, a tail
])
def test_the_reference_copy_copies_every_byte(size, dst_offset, src_offset, device):
    """The benchmark's copy (streaming stores from a 16-byte boundary of the destination,
    four runs of each piece at once, plain bytes at both ends) at any alignment and size."""
    device.cpu_threads = 2
    src = np.random.default_rng(size).integers(0, 256, size + src_offset, dtype=np.uint8)[src_offset:]
    buffer = np.zeros(size + dst_offset + 16, dtype=np.uint8)
    dst = buffer[dst_offset:dst_offset + size]
    (copy,) = device.copies(dst, src).values()
    copy()
    assert np.array_equal(dst, src)
    assert not buffer[:dst_offset].any() and not buffer[dst_offset + size:].any()  # nothing outside


@pytest.mark.parametrize("case, calls", [
    ("ADAM", ["gpuopt_multi_tensor"]),
    ("ClipNorm+ClipNorm+Descent", ["gpuopt_multi_reduce", "gpuopt_multi_reduce", "gpuopt_multi_tensor"]),
])
def test_a_whole_model_is_one_call_per_dtype_group(case, calls, native, use):
    use(True)
    opt = ALL[case]()
    params = [np.ones(n, np.float32) for n in range(1, 151)] + [np.ones(7, np.float64)]
    grads = [np.full(p.shape, 0.5, p.dtype) for p in params]
    gpuopt.update(opt, params, grads)
    with native.count_launches() as counter:
        gpuopt.update(opt, params, grads)
    assert sorted(counter.names) == sorted(calls * 2)  # float32 and float64 groups


def test_updates_from_several_threads_match_sequential_ones(use):
    use(True)

    def train(seed: int) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        opt = CHAINS["ClipNorm+ADAM"]()
        params = [rng.standard_normal(n).astype(np.float32) for n in (CHUNK + 10, 300)]
        for _ in range(10):
            gpuopt.update(opt, params, [rng.standard_normal(p.shape).astype(np.float32) for p in params])
        return params

    expected = [train(seed) for seed in range(4)]
    results: dict[int, list[np.ndarray]] = {}
    threads = [threading.Thread(target=lambda s=seed: results.__setitem__(s, train(s))) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for seed in range(4):
        for a, b in zip(results[seed], expected[seed]):
            _same_bits(a, b, f"thread {seed}")


def test_changing_hyperparameters_never_builds_a_module(device, use):
    use(True)
    opt = gpuopt.Optimiser(gpuopt.ClipNorm(1.0), RULES["SignMomentum"]())
    x, g = np.ones(100), np.full(100, 0.3)
    gpuopt.update(opt, x, g)
    built = device.builds
    for eta in (0.5, 0.25):
        opt[1].eta = eta
        opt[0].thresh = eta
        gpuopt.update(opt, x, g)
    assert device.builds == built


# -- building and choosing the backend, in fresh processes -------------------------------------

BUILD_ONE = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from gpuopt.backends import cxx_build
    from gpuopt.backends.native_backend import NativeDevice
    from gpuopt.plan import plan
    import gpuopt

    device = NativeDevice(cxx_build.find_compiler())
    source = device.module_source(plan(gpuopt.Optimiser(gpuopt.AMSGrad(), gpuopt.ClipValue(0.5))),
                                  np.dtype("float64"), np.dtype("float32"), True)
    while time.time() < float(sys.argv[1]):  # both processes start the build together
        time.sleep(0.001)
    device.library(source)
    print(device.cache)
    """
)


def test_two_processes_building_one_module_at_once(device, tmp_path):
    import time

    env = {**os.environ, "GPUOPT_CACHE_DIR": str(tmp_path)}
    start = f"{time.time() + 2.0}"
    runs = [subprocess.Popen([sys.executable, "-c", BUILD_ONE, start], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=120) for run in runs]
    for run, (_, err) in zip(runs, outputs):
        assert run.returncode == 0, err
    folders = list((tmp_path / "native").iterdir())
    assert len(folders) == 1 and (folders[0] / "module.so").is_file()  # one build, nothing half-done


FALLBACK = textwrap.dedent(
    """
    import numpy as np
    import gpuopt
    from gpuopt.backends import cpu_backend, describe, numpy_backend

    x, g = np.ones(10), np.full(10, 0.5)
    opt = gpuopt.ADAM(0.1)
    gpuopt.update(opt, x, g)
    gpuopt.update(opt, [x], [g])
    assert cpu_backend() is numpy_backend.BACKEND
    print(describe("numpy"), x[0])
    """
)


@pytest.mark.parametrize("setting", ["no compiler", "GPUOPT_CPU=numpy"])
def test_numpy_executor_where_no_compiler_works_or_when_asked(setting, tmp_path):
    env = {**os.environ, "GPUOPT_CACHE_DIR": str(tmp_path)}
    env.pop("GPUOPT_CPU", None)
    if setting == "no compiler":
        env.update(CXX=str(tmp_path / "missing-c++"), PATH=str(tmp_path))  # no c++, g++ or clang++ either
    else:
        env["GPUOPT_CPU"] = "numpy"
    result = subprocess.run([sys.executable, "-c", FALLBACK], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("numpy (NumPy executor)")
    notices = [line for line in result.stderr.splitlines() if line.startswith("gpuopt:")]
    if setting == "no compiler":
        assert len(notices) == 1 and "no C++ compiler found" in notices[0] and "missing-c++" in notices[0]
    else:
        assert notices == []
    assert not (tmp_path / "native").exists() or setting == "no compiler"


def test_native_is_the_default_the_demo_uses_it_and_the_cache_is_per_user(tmp_path):
    env = {**os.environ, "GPUOPT_CACHE_DIR": str(tmp_path)}
    env.pop("GPUOPT_CPU", None)
    demo = [sys.executable, "-m", "gpuopt", "demo", "--steps", "5", "--backend", "numpy"]
    result = subprocess.run(demo, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "backend numpy (native code, " in result.stdout and result.stderr == ""
    assert any((tmp_path / "native").iterdir())
    env.pop("GPUOPT_CACHE_DIR")
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    code = "from gpuopt.backends.native_backend import cache_dir; print(cache_dir())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60).stdout
    assert out.strip() == str(tmp_path / "xdg" / "gpuopt")
    assert cache_dir() == type(cache_dir())(os.environ["GPUOPT_CACHE_DIR"])


def test_arrays_passed_by_data_pointer_where_the_object_layout_is_unknown(device, monkeypatch):
    from gpuopt.backends import native_backend

    monkeypatch.setattr(native_backend, "_data_offset", lambda: -1)  # as on another Python
    by_pointer = KernelBackend(NativeDevice(device.compiler, device.cache))
    results = []
    for backend in (by_pointer, EXECUTOR):
        monkeypatch.setattr(gpuopt.backends, "cpu_backend", lambda backend=backend: backend)
        rng = np.random.default_rng(4)
        opt = CHAINS["ClipNorm+ADAM"]()
        params = [rng.standard_normal(n).astype(np.float32) for n in (1000, 3)]
        for _ in range(3):
            grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
            gpuopt.update(opt, params, grads)
            gpuopt.update(opt, params[1], grads[1])
        results.append(params)
    for a, b in zip(*results):
        _same_bits(a, b, "by pointer")


FORK = textwrap.dedent(
    """
    import os
    import numpy as np
    import gpuopt

    x, g = np.ones(1 << 19, np.float32), np.full(1 << 19, 0.01, np.float32)
    opt = gpuopt.Optimiser(gpuopt.ClipNorm(1.0), gpuopt.ADAM())
    gpuopt.update(opt, [x, x[:10].copy()], [g, g[:10]])  # (helper threads have run)
    read, write = os.pipe()
    if os.fork() == 0:
        gpuopt.update(opt, [x, np.ones(5, np.float32)], [g, g[:5]])
        gpuopt.update(opt, x, g)
        os.write(write, x.tobytes()[:64])
        os._exit(0)
    os.wait()
    gpuopt.update(opt, [x, np.ones(5, np.float32)], [g, g[:5]])
    gpuopt.update(opt, x, g)
    assert os.read(read, 64) == x.tobytes()[:64]
    print("ok")
    """
)


def test_a_forked_child_updates_with_threads(device):
    env = {**os.environ, "GPUOPT_CPU": "native"}
    result = subprocess.run([sys.executable, "-c", FORK], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_new_unaligned_gradients_of_a_repeated_update_are_copied(use):
    results = []
    for on_native in (True, False):
        use(on_native)
        rng = np.random.default_rng(5)
        opt = RULES["ADAM"]()
        params = [rng.standard_normal(n).astype(np.float32) for n in (1000, 77)]
        kept = []  # (old gradients alive: the prepared update takes new ones in their place)
        for step in range(5):
            grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
            if step >= 2:  # a repeated update on the same parameters, gradients one byte off
                grads = [_unaligned(g) for g in grads]
            kept.append(grads)
            gpuopt.update(opt, params, grads)
            if on_native:  # prepared while aligned; never pointed at memory the kernels cannot read
                assert ("_prepared" in vars(opt)) == (step < 2)
        results.append(params)
    for a, b in zip(*results):
        _same_bits(a, b, "unaligned gradients")


def test_thread_count_from_the_environment(monkeypatch):
    from gpuopt.backends.native_backend import cpu_threads

    monkeypatch.setenv("GPUOPT_CPU_THREADS", "3")
    assert cpu_threads() == 3
    monkeypatch.delenv("GPUOPT_CPU_THREADS")
    assert 1 <= cpu_threads() <= len(os.sched_getaffinity(0))


def test_a_compiler_without_openmp_simd_or_march_native_still_builds(device, tmp_path, monkeypatch):
    picky = tmp_path / "picky-c++"  # refuses what an older or stricter compiler would
    picky.write_text('#!/bin/sh\nfor a in "$@"; do case "$a" in -fopenmp-simd|-march=native) exit 1;; esac; done\n'
                     f'exec "{device.compiler}" "$@"\n')
    picky.chmod(0o755)
    backend = KernelBackend(NativeDevice(str(picky), tmp_path / "cache"))
    results = []
    for chosen in (backend, EXECUTOR):
        monkeypatch.setattr(gpuopt.backends, "cpu_backend", lambda chosen=chosen: chosen)
        rng = np.random.default_rng(6)
        opt, x = RULES["ADAM"](), rng.standard_normal(5000)
        for _ in range(3):
            gpuopt.update(opt, x, rng.standard_normal(5000))
        results.append(x)
    assert backend.device._flags == ()
    _same_bits(*results, "plain flags")


def test_bfloat16_torch_tensors_match_the_executor(use):
    torch = pytest.importorskip("torch")
    results = []
    for on_native in (True, False):
        use(on_native)
        gen = torch.Generator().manual_seed(7)
        opt = CHAINS["ClipNorm+ADAM"]()
        params = [torch.randn(n, generator=gen).to(torch.bfloat16) for n in (CHUNK + 999, 5)]
        for _ in range(4):
            grads = [torch.randn(p.shape, generator=gen).to(torch.bfloat16) for p in params]
            gpuopt.update(opt, params, grads)
            gpuopt.update(opt, params[1], grads[1])
        results.append([p.view(torch.int16).numpy().copy() for p in params])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_a_parameter_made_read_only_after_a_prepared_update_is_refused(use):
    use(True)
    opt = RULES["ADAM"]()
    params = [np.ones(10, np.float32), np.ones(20, np.float32)]
    grads = [np.full(10, 0.5, np.float32), np.full(20, 0.5, np.float32)]
    gpuopt.update(opt, params, grads)
    gpuopt.update(opt, params, grads)  # prepared on these arrays
    params[1].flags.writeable = False
    before = [p.copy() for p in params]
    with pytest.raises(ValueError, match="read-only"):
        gpuopt.update(opt, params, grads)
    for a, b in zip(params, before):
        _same_bits(a, b, "refused")


def test_mixed_precision_master_copy_matches_the_executor(use):
    results = []
    for on_native in (True, False):
        use(on_native)
        rng = np.random.default_rng(8)
        opt = gpuopt.MixedPrecision(CHAINS["ClipNorm+ADAM"]())
        params = [rng.standard_normal(n).astype(np.float16) for n in (CHUNK + 3, 7)]
        for _ in range(4):
            gpuopt.update(opt, params, [rng.standard_normal(p.shape).astype(np.float16) for p in params])
        results.append(params)
    for a, b in zip(*results):
        _same_bits(a, b, "master copy")


# -- one array updated again and again: the prepared path ----------------------------------------


def _paths(run, *args):
    """How many calls ``run(*args)`` sent down each path, and what it raised (None, or the message)."""
    error = None
    with counted_paths() as taken:
        try:
            run(*args)
        except (TypeError, ValueError) as exc:
            error = str(exc)
    return taken, error


def _single_steps(opt, x, rng, steps=7):
    """``steps`` updates of ``x`` alone: new gradients, then the same one twice in a row."""
    g = None
    for step in range(steps):
        if g is None or step % 3:
            g = (2 * rng.standard_normal(x.shape)).astype(x.dtype)
        gpuopt.update(opt, x, g)


SINGLE_CASES = {**ALL, "MixedPrecision(ADAM)": lambda: gpuopt.MixedPrecision(RULES["ADAM"]())}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(SINGLE_CASES))
def test_a_repeated_single_array_update_is_prepared_and_equals_the_full_path(case, dtype, use, monkeypatch):
    """Prepared from the second call on; bit for bit the executor's, and the full path's."""
    import gpuopt.api

    runs = []
    for on_native, prepared in ((True, True), (True, False), (False, False)):
        use(on_native)
        if not prepared:
            monkeypatch.setattr(gpuopt.api, "try_prepared", lambda *args: False)
        rng = np.random.default_rng(6)
        opt = SINGLE_CASES[case]()
        x = rng.standard_normal(CHUNK + 1001).astype(dtype)  # two chunks
        paths, error = _paths(_single_steps, opt, x, rng)
        assert error is None
        if prepared:
            assert paths == {"full": 2, "prepared": 5}
        states = [leaf.state_for(x) for leaf in opt.leaves()]
        runs.append((x, [s.slots for s in states if s.slots is not None], [s.t for s in states]))
    for x, slots, counts in runs[:2]:
        _same_bits(x, runs[2][0], f"{case} {dtype}")
        for a, b in zip(slots, runs[2][1]):
            _same_bits(a, b, f"{case} {dtype} state")
        assert counts == runs[2][2] == [7] * len(counts)


@pytest.mark.parametrize("param, grad", [("float16", "float32"), ("float64", "float16"), ("float32", "float64")])
def test_a_repeated_update_with_a_gradient_of_another_dtype_is_prepared(param, grad, use):
    results = []
    for on_native in (True, False):
        use(on_native)
        rng = np.random.default_rng(9)
        opt = CHAINS["ClipValue+WeightDecay+ADAM"]()
        x = rng.standard_normal(1001).astype(param)
        paths, error = _paths(_steps_with_gradients_of, opt, x, grad, rng)
        assert error is None
        if on_native:
            assert paths == {"full": 2, "prepared": 3}
        results.append(x)
    _same_bits(results[0], results[1], f"{param} with {grad} gradients")


def _steps_with_gradients_of(opt, x, dtype, rng):
    for _ in range(5):
        gpuopt.update(opt, x, rng.standard_normal(x.shape).astype(dtype))


def _layout_steps(opt, x, layout, rng):
    for _ in range(5):
        gpuopt.update(opt, x, LAYOUTS[layout](rng, np.float32))


@pytest.mark.parametrize("layout, prepared", [
    ("0-d", True), ("empty", True), ("transposed", False), ("strided", False), ("unaligned", False),
])
@pytest.mark.parametrize("case", ["ADAM", "ClipNorm+ADAM"])
def test_only_arrays_the_module_reads_directly_are_prepared(case, layout, prepared, use):
    results = []
    for on_native in (True, False):
        use(on_native)
        rng = np.random.default_rng(7)
        opt = ALL[case]()
        x = LAYOUTS[layout](rng, np.float32)
        paths, error = _paths(_layout_steps, opt, x, layout, rng)
        assert error is None
        if on_native:
            assert paths == ({"full": 2, "prepared": 3} if prepared else {"full": 5, "prepared": 0})
        results.append(x)
    _same_bits(np.ascontiguousarray(results[0]), np.ascontiguousarray(results[1]), f"{case} {layout}")


def _share_memory_reversed(opt, x, g):
    return x, x[::-1]


def _reshape(opt, x, g):
    x.shape = (8, 8)
    return x, g.reshape(8, 8)


def _retype(opt, x, g):
    x.dtype = np.int32
    return x, g


def _read_only(opt, x, g):
    x.flags.writeable = False
    return x, g


def _hyperparameter(opt, x, g):
    opt.eta = 0.5
    return x, g


def _reset(opt, x, g):
    opt.reset()
    return x, g


def _apply_between(opt, x, g):
    gpuopt.apply(opt, x, g)
    return x, g


def _checkpoint(opt, x, g):
    import io

    buffer = io.BytesIO()
    gpuopt.save_state(opt, x, buffer)
    buffer.seek(0)
    gpuopt.load_state(opt, x, buffer)
    return x, g


def _another_array(opt, x, g):
    gpuopt.update(opt, np.ones(5, np.float32), np.ones(5, np.float32))
    return x, g


#: a change made after one array's update is prepared -> what the next call does: takes the
#: prepared path, the full path, or raises (the full path's error: nothing written). (NumPy
#: refuses to resize an array in place while weak references to it exist: the state's.)
CHANGES = {
    "the same arrays": (lambda opt, x, g: (x, g), "prepared"),
    "a new gradient like the old": (lambda opt, x, g: (x, g.copy()), "prepared"),
    "a new hyperparameter value": (_hyperparameter, "prepared"),
    "a gradient of another dtype": (lambda opt, x, g: (x, g.astype(np.float64)), "full"),
    "an unaligned gradient": (lambda opt, x, g: (x, _unaligned(g)), "full"),
    "the parameter as its own gradient": (lambda opt, x, g: (x, x), "full"),
    "a view of the parameter as its gradient": (lambda opt, x, g: (x, x[:]), "full"),
    "the parameter reshaped in place": (_reshape, "full"),
    "reset": (_reset, "full"),
    "apply in between": (_apply_between, "full"),
    "a checkpoint loaded": (_checkpoint, "full"),
    "another array updated in between": (_another_array, "full"),
    "no gradient": (lambda opt, x, g: (x, None), "nothing"),
    "a gradient of another shape": (lambda opt, x, g: (x, g[:10]), "shape"),
    "gradients in a list": (lambda opt, x, g: (x, [g]), "single array but grads is a list"),
    "its gradient reversed (shared memory)": (_share_memory_reversed, "shares memory"),
    "the parameter made read-only": (_read_only, "read-only"),
    "the parameter's dtype changed in place": (_retype, "dtype int32"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_after_a_prepared_update_takes_the_full_path_or_raises_as_it(change, use):
    """What each change does to the next call: the prepared path, the full one, or the full
    path's error with nothing written; the same results (and messages) as the executor."""
    make_change, expected = CHANGES[change]
    runs = []
    for on_native in (True, False):
        use(on_native)
        opt = RULES["ADAM"]()
        x, g = np.linspace(-1, 1, 64, dtype=np.float32), np.full(64, 0.25, np.float32)
        for _ in range(3):
            gpuopt.update(opt, x, g)
        if on_native:
            assert type(vars(opt)["_prepared"]).__name__ == "PreparedSingle"
        x_now, g_now = make_change(opt, x, g)
        state = opt.state_for(x)
        before = (x.copy(), None if state is None else (state.slots.copy(), state.t))
        paths, error = _paths(gpuopt.update, opt, x_now, g_now)
        state = opt.state_for(x)
        after = (x.copy(), None if state is None else (state.slots.copy(), state.t))
        if expected in ("prepared", "full", "nothing"):
            assert error is None, error
        else:
            assert error is not None and expected in error and "\n" not in error
            _same_bits(after[0], before[0], f"{change}: refused, parameter")
            _same_bits(after[1][0], before[1][0], f"{change}: refused, state")
            assert after[1][1] == before[1][1]
        if on_native:
            taken = {"prepared": {"prepared": 1, "full": 0}, "full": {"prepared": 0, "full": 1}}
            assert paths == taken.get(expected, {"prepared": 0, "full": 0}), change
        runs.append((after, error))
    (native, native_error), (executor, executor_error) = runs
    assert native_error == executor_error
    _same_bits(native[0], executor[0], change)
    _same_bits(native[1][0], executor[1][0], f"{change} state")
    assert native[1][1] == executor[1][1]


def test_updating_arrays_one_call_each_never_prepares(use):
    """A loop over several arrays, one call each, through one optimiser: each call is the
    full path (nothing prepared per call only to be thrown away at the next)."""
    use(True)
    opt = RULES["Momentum"]()
    params = [np.ones(n, np.float32) for n in (10, 20, 30)]
    paths, _ = _paths(lambda: [gpuopt.update(opt, p, np.full(p.shape, 0.5, np.float32))
                                for _ in range(3) for p in params])
    assert paths == {"full": 9, "prepared": 0} and "_prepared" in vars(opt)
    assert type(vars(opt)["_prepared"]).__name__ == "_SingleSeen"


def _steps(opt, x, g, n):
    for _ in range(n):
        gpuopt.update(opt, x, g)


def test_one_array_from_several_threads_steps_once_per_call(use):
    """Threads updating one array through one optimiser: every call is one step, as if made
    one after another (a constant gradient: the order does not matter)."""
    results = []
    for threaded in (True, False):
        use(True)
        opt = CHAINS["ClipValue+WeightDecay+ADAM"]()
        x, g = np.linspace(-1, 1, 3000, dtype=np.float32), np.full(3000, 0.25, np.float32)

        if threaded:
            threads = [threading.Thread(target=_steps, args=(opt, x, g, 40)) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        else:
            _steps(opt, x, g, 160)
        results.append((x, [leaf.state_for(x).t for leaf in opt.leaves()]))
    _same_bits(results[0][0], results[1][0], "threads")
    assert results[0][1] == results[1][1] == [160] * 3
