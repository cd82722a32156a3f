"""Updates from several threads give exactly the sequential results, and
tracing and every cache are safe to use from several threads at once."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest

import gpuopt
import gpuopt.plan
from gpuopt.backends.kernel_backend import KernelBackend
from gpuopt.backends.protocol import Job

THREADS = 4
STEPS = 8
SIZE = 2 * 65536 + 7  # several NumPy blocks and a ragged tail: the scratch buffers are used fully

RULES: list[tuple[str, Callable[[], gpuopt.Rule]]] = [
    ("Descent", lambda: gpuopt.Descent(0.5)),
    ("ADAM", lambda: gpuopt.ADAM(0.01)),
    ("ClipNorm-WeightDecay-Momentum", lambda: gpuopt.Optimiser(
        gpuopt.ClipNorm(10.0), gpuopt.WeightDecay(1e-3), gpuopt.Momentum(0.01))),
    ("ExpDecay-NADAM", lambda: gpuopt.Optimiser(gpuopt.ExpDecay(0.5, 0.5, 3, 1e-3), gpuopt.NADAM())),
]


def run_threads(work: Callable[[int], None], count: int = THREADS) -> None:
    """Run ``work(i)`` in ``count`` threads started together; re-raise the first error."""
    start = threading.Barrier(count)
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            start.wait()
            work(i)
        except BaseException as exc:  # noqa: BLE001 - reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def inputs(i: int, dtype: type = np.float32) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(i)
    x = rng.standard_normal(SIZE).astype(dtype)
    return x, [rng.standard_normal(SIZE).astype(dtype) for _ in range(STEPS)]


@pytest.mark.parametrize("name, make", RULES, ids=[r[0] for r in RULES])
def test_separate_optimisers_in_threads_match_sequential(name, make):
    expected = []
    for i in range(THREADS):
        x, grads = inputs(i)
        opt = make()
        for g in grads:
            gpuopt.update(opt, x, g)
        expected.append(x)
    got = [inputs(i)[0] for i in range(THREADS)]

    def work(i: int) -> None:
        opt = make()
        for g in inputs(i)[1]:
            gpuopt.update(opt, got[i], g)

    run_threads(work)
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("name, make", RULES[:3], ids=[r[0] for r in RULES[:3]])
def test_one_optimiser_shared_by_threads_matches_sequential(name, make):
    """Each thread updates its own parameters through one optimiser (schedules excluded:
    ExpDecay's eta depends on which parameter reaches a step first)."""
    sequential = make()
    expected = []
    for i in range(THREADS):
        x, grads = inputs(i, np.float64)
        for g in grads:
            gpuopt.update(sequential, [x], [g])
        expected.append(x)
    shared = make()
    got = [inputs(i, np.float64)[0] for i in range(THREADS)]

    def work(i: int) -> None:
        for g in inputs(i, np.float64)[1]:
            gpuopt.update(shared, [got[i]], [g])

    run_threads(work)
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(g, e)


def test_one_parameter_from_several_threads_is_serialised():
    """Updates of one array through one optimiser from several threads: each is a whole step,
    so the result is that of THREADS * STEPS steps (Descent commutes, so the order is moot)."""
    x = np.zeros(SIZE)
    opt = gpuopt.Momentum(0.1, 0.5)

    def work(i: int) -> None:
        for _ in range(STEPS):
            gpuopt.update(opt, x, np.ones(SIZE))

    run_threads(work)
    expected = np.zeros(SIZE)
    reference = gpuopt.Momentum(0.1, 0.5)
    for _ in range(THREADS * STEPS):
        gpuopt.update(reference, expected, np.ones(SIZE))
    np.testing.assert_array_equal(x, expected)
    assert opt.state_for(x).t == THREADS * STEPS


def scaled_rule(k: int) -> type[gpuopt.Rule]:
    """A new rule structure (a new class) whose step multiplies by k + its constant."""

    class Scaled(gpuopt.Rule):
        eta = gpuopt.Hyper(1.0)
        state = {"v": 0.0}

        def step(self, d, x, s, h):
            s.v = s.v + d * float(k)
            return h.eta * (d * float(k) + s.v) / float(k + 1)

    Scaled.__name__ = f"Scaled{k}"
    return Scaled


def test_first_tracing_in_many_threads_at_once():
    """Threads tracing new structures at the same moment each get the right program, and
    what is cached afterwards is right too."""
    rounds = 6
    classes = [[scaled_rule(r * THREADS + i) for i in range(THREADS)] for r in range(rounds)]
    results: dict[tuple[int, int], np.ndarray] = {}

    def work(i: int) -> None:
        for r in range(rounds):
            # every thread traces every class of the round, in a different order
            for j in [(i + k) % THREADS for k in range(THREADS)]:
                x = np.ones(5)
                opt = gpuopt.Optimiser(classes[r][j](), gpuopt.ClipValue(100.0))
                gpuopt.update(opt, x, np.full(5, 2.0))
                gpuopt.update(opt, x, np.full(5, 2.0))
                if j == i:
                    results[(r, j)] = x

    run_threads(work)
    for (r, j), got in results.items():
        k = r * THREADS + j
        expected = 1.0 - (2 * k + 2 * k) / (k + 1) - (2 * k + 4 * k) / (k + 1)
        np.testing.assert_allclose(got, expected, rtol=1e-12)
        program = gpuopt.plan.plan(gpuopt.Optimiser(classes[r][j](), gpuopt.ClipValue(100.0)))
        x = np.ones(5)
        gpuopt.update(gpuopt.Optimiser(classes[r][j](), gpuopt.ClipValue(100.0)), x, np.full(5, 2.0))
        np.testing.assert_allclose(x, 1.0 - 4 * k / (k + 1), rtol=1e-12)
        assert program.description.startswith(f"Scaled{k} >")


class CheckingDevice:
    """A kernel device that runs nothing but checks, at each multi-tensor launch, that the
    table it is given points at the parameters of the thread's own call."""

    xp = np
    threads = 8
    max_blocks = 4

    def __init__(self) -> None:
        self.expected = threading.local()
        self.mismatches: list[tuple] = []
        self.launches = 0

    def kernel(self, source, name):
        def launch(blocks, threads, args):
            if name == "gpuopt_multi_tensor":
                self.launches += 1
                table = args[2]  # (tensor count, chunk count, table, ...)
                if [int(p) for p in table[:, 0]] != self.expected.x:
                    self.mismatches.append((self.expected.x, table[:, 0].tolist()))
        return launch

    @staticmethod
    def pointer(array):
        return array.ctypes.data


def table_job(n: int, scalars: int) -> Job:
    return Job(None, np.zeros(n, np.float32), np.zeros(n, np.float32),
               [np.zeros(n, np.float32), np.zeros(n, np.float32)], [0.0] * scalars)


def test_kernel_backend_tables_from_threads():
    """Threads launching through one kernel backend at once: each launch gets a table of its
    own call's arrays (the cached tables are shared and replaced, never mixed)."""
    device = CheckingDevice()
    backend = KernelBackend(device)
    program = gpuopt.plan.plan(gpuopt.ADAM())
    calls = 40

    def work(i: int) -> None:
        for step in range(calls):
            jobs = [table_job(100 + i, program.scalar_count), table_job(300 + step, program.scalar_count)]
            device.expected.x = [job.x.ctypes.data for job in jobs]
            backend.run(program, jobs, apply=False)

    run_threads(work)
    assert device.mismatches == []
    assert device.launches == THREADS * calls
