"""``update`` and ``apply``: the public entry points, for one array or a collection.

Each call checks everything first (:func:`_checked`), creates missing state, hands the
backends one :class:`~gpuopt.backends.protocol.Job` per parameter, then advances the step
counts. A collection update repeated on the same parameters takes the prepared path of
:mod:`gpuopt.prepared` instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .backends import get_backend
from .backends.numpy_backend import compute_dtype
from .backends.protocol import Job
from .dispatch import Resolved, check_pair, check_writable, cupy_module, gpu_available
from .dtypes import BFLOAT16, to_compute
from .guard import guarded
from .memory import check_overlaps
from .plan import Program, plan
from .prepared import PATHS, prepare, step_scalars, try_prepared
from .rule import ParamState, Rule, StepCount


def _entries(params: Any, grads: Any) -> list[tuple[str, object, object]]:
    """(name, parameter, gradient) triples; TypeError when the structures differ."""
    if isinstance(params, dict):
        if not isinstance(grads, dict):
            raise TypeError(f"params is a dict, so grads must be a dict too, got {type(grads).__name__}")
        missing = [k for k in params if k not in grads]
        extra = [k for k in grads if k not in params]
        if missing or extra:
            raise TypeError(
                f"grads must have the same keys as params: missing {missing}, unexpected {extra}"
            )
        return [(f"params[{k!r}]", params[k], grads[k]) for k in params]
    if isinstance(params, (list, tuple)):
        if not isinstance(grads, (list, tuple)):
            raise TypeError(
                f"params is a {type(params).__name__}, so grads must be a list or tuple, got {type(grads).__name__}"
            )
        if len(grads) != len(params):
            raise TypeError(f"params has {len(params)} entries but grads has {len(grads)}")
        return [(f"params[{i}]", p, g) for i, (p, g) in enumerate(zip(params, grads))]
    if isinstance(grads, (list, tuple, dict)):
        raise TypeError(f"params is a single array but grads is a {type(grads).__name__}")
    return [("parameter", params, grads)]


def _checked(opt: Rule, entries: Iterable[tuple[str, object, object]], writes_x: bool
             ) -> list[tuple[object, Resolved, Resolved]]:
    """Every check, before anything is written."""
    checked = []
    placed = []  # (name, backend, x, g): memory shared between them is checked at the end
    seen: dict[int, str] = {}
    for name, x_obj, g_obj in entries:
        if g_obj is None:
            continue  # a parameter without a gradient is skipped
        x, g = check_pair(x_obj, g_obj, name)
        if writes_x:
            check_writable(x, name)
        if id(x_obj) in seen:
            raise ValueError(f"{name} is the same array as {seen[id(x_obj)]}; each parameter may appear once")
        seen[id(x_obj)] = name
        for leaf in opt.leaves():
            state = leaf.state_for(x_obj)
            if state is not None and state.slots is not None and state.slots.shape[1] != x.array.size:
                raise ValueError(
                    f"{name} has {x.array.size} elements but {type(leaf).__name__} holds state "
                    f"for {state.slots.shape[1]}; call opt.reset() after resizing parameters"
                )
        checked.append((x_obj, x, g))
        placed.append((name, x.backend, x.array, g.array))
    if writes_x:
        check_overlaps(placed)
    groups: dict[tuple[str, str], list[Any]] = {}
    for _, x, _ in checked:
        groups.setdefault((x.backend, x.framework), []).append(x.array)
    for (backend, framework), arrays in groups.items():
        get_backend(backend).check_launchable(arrays, framework)
    return checked


def _job(opt: Rule, program: Program, key: object, x: Resolved, g: Resolved,
         scalar_cache: dict | None = None) -> Job:
    """State (created on first use, next to the parameter) and host scalars for one
    parameter's next step.

    ``scalar_cache`` shares the host scalars of one call between parameters at the same step
    count, so a 150-tensor model computes them once, not 150 times.
    """
    backend = get_backend(x.backend)
    leaves = opt.leaves()
    cache = {} if scalar_cache is None else scalar_cache
    states = []
    for leaf in leaves:
        state = leaf.state_for(key)
        if state is None:
            state = ParamState(0, fresh_slots(backend, leaf, x))
            leaf.set_state_for(key, state)
        states.append(state)
    step_counts = tuple(state.t + 1 for state in states)
    scalars = cache.get(step_counts)
    if scalars is None:
        scalars = cache[step_counts] = step_scalars(program, leaves, step_counts)
    slots = [states[ref.rule].slots[ref.position] for ref in program.slots]
    return Job(key, x.array, g.array, slots, scalars, framework=x.framework, x_type=x.element, g_type=g.element)


def fresh_slots(backend: Any, leaf: Rule, x: Resolved) -> Any:
    """A new state array for ``leaf`` and parameter ``x`` (next to it), as its first step finds it."""
    if not leaf.state:
        return None
    with backend.queue_of(x.array, x.framework):
        slots = backend.full_state(leaf.initial_state(), x.array.size, compute_dtype(x.element), like=x.array)
        for row in leaf.parameter_slots():  # a master copy starts as the parameter
            slots[row][...] = to_compute(x.array.reshape(-1), x.element)
    return slots


def _count_step(opt: Rule, jobs: list[Job]) -> None:
    for leaf in opt.leaves():
        leaf.state_version += 1  # a prepared update of any optimiser sharing it is stale now
        for job in jobs:
            state = leaf.state_for(job.key)
            state.count = StepCount(state.count.value + 1)  # (a private count: see ParamState.t)


def update(opt: Rule, params: Any, grads: Any) -> None:
    """Update ``params`` in place by one step of ``opt``; its state advances.

    ``params`` is one array, or a list, tuple or dict of arrays with ``grads`` of the same
    structure (a ``None`` gradient skips that parameter). Gradients are not modified.
    Every check runs before any write, so a failing call changes nothing. Calls through one
    optimiser from several threads run one at a time.
    """
    with guarded(opt) as leaves:
        _update(opt, leaves, params, grads)


def _update(opt: Rule, leaves: tuple[Rule, ...], params: Any, grads: Any) -> None:
    if try_prepared(opt, leaves, params, grads):
        return
    checked = _checked(opt, _entries(params, grads), writes_x=True)
    if not checked:
        return
    PATHS["full"] += 1
    program = plan(opt)
    scalar_cache: dict = {}
    jobs = [_job(opt, program, key, x, g, scalar_cache) for key, x, g in checked]
    by_backend: dict[str, list[Job]] = {}
    for job, (_, x, _) in zip(jobs, checked):
        by_backend.setdefault(x.backend, []).append(job)
    for name, group in by_backend.items():
        get_backend(name).run(program, group, apply=False)
    _count_step(opt, jobs)
    prepare(opt, program, params, grads, checked, jobs)


def apply(opt: Rule, x: Any, dx: Any) -> Any:
    """The step ``opt`` would subtract from ``x``, as a new array; ``x`` and ``dx`` stay
    untouched and the optimiser's state advances."""
    if isinstance(x, (list, tuple, dict)):
        raise TypeError("apply takes one array; use update for collections")
    with guarded(opt):
        return _apply(opt, x, dx)


def _apply(opt: Rule, x: Any, dx: Any) -> Any:
    (key, xr, gr), = _checked(opt, _entries(x, dx), writes_x=False) or [(None, None, None)]
    if key is None:
        raise TypeError("apply needs a gradient, got None")
    program = plan(opt)
    job = _job(opt, program, key, xr, gr)
    backend = get_backend(xr.backend)
    with backend.queue_of(xr.array, xr.framework):
        job.out = backend.empty_like(xr.array)
    backend.run(program, [job], apply=True)
    _count_step(opt, [job])
    if xr.element == BFLOAT16:  # bfloat16 patterns: handed back as float32 values
        return to_compute(job.out, BFLOAT16)
    return job.out


def count_launches() -> Any:
    """Context manager counting gpuopt's CUDA kernel launches inside it::

        with gpuopt.count_launches() as counter:
            gpuopt.update(opt, x, dx)
        counter.launches, counter.names   # e.g. 1, ['gpuopt_elementwise']

    Only kernels gpuopt itself launches are counted (not CuPy's own, such as the fill that
    initialises new state). Needs CuPy and a GPU: RuntimeError otherwise.
    """
    if cupy_module() is None:
        raise RuntimeError("count_launches counts CUDA kernel launches and needs CuPy: pip install 'gpuopt[cuda12]'")
    if not gpu_available():
        raise RuntimeError("count_launches counts CUDA kernel launches, but CuPy cannot see a usable GPU")
    return get_backend("cupy").count_launches()
