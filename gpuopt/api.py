"""``update`` and ``apply``: the public entry points, for one array or a collection."""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backends import get_backend
from .backends.numpy_backend import compute_dtype
from .dispatch import Resolved, check_pair, check_writable, cupy_module, gpu_available
from .guard import guarded
from .memory import Disjoint, check_overlaps
from .plan import Program, plan
from .rule import ParamState, Rule


@dataclass
class Job:
    """One parameter's step, ready for a backend: flat arrays plus host scalars."""

    key: object  # the user's parameter object: state is keyed on its identity
    x: Any  # the parameter as a backend array (a view of the user's object)
    g: Any
    slots: list[Any]  # one flat row per state slot of the chain, in program order
    scalars: list[float]
    out: Any = None  # apply(): where the step goes


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
    return checked


def _job(opt: Rule, program: Program, key: object, x: Resolved, g: Resolved,
         scalar_cache: dict | None = None) -> Job:
    """State (created on first use) and host scalars for one parameter's next step.

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
            slots = None
            if leaf.state:
                slots = backend.full_state(leaf.initial_state(), x.array.size, compute_dtype(x.array.dtype))
            state = ParamState(0, slots)
            leaf.set_state_for(key, state)
        states.append(state)
    step_counts = tuple(state.t + 1 for state in states)
    scalars = cache.get(step_counts)
    if scalars is None:
        scalars = cache[step_counts] = _step_scalars(program, leaves, step_counts)
    slots = [states[ref.rule].slots[ref.position] for ref in program.slots]
    return Job(key, x.array, g.array, slots, scalars)


def _step_scalars(program: Program, leaves: tuple[Rule, ...], step_counts: tuple[int, ...]) -> list[float]:
    """Run each rule's host schedule for its next step, then collect the kernel's scalars."""
    values = []
    for leaf, t in zip(leaves, step_counts):
        leaf.advance(t)
        values.append(leaf.scalars(t))
    return program.host_scalars([values[ref.rule][ref.name] for ref in program.scalars])


def _advance(opt: Rule, jobs: list[Job]) -> None:
    for leaf in opt.leaves():
        leaf.state_version += 1  # a prepared update of any optimiser sharing it is stale now
        for job in jobs:
            leaf.state_for(job.key).t += 1


class _Prepared:
    """The last collection update of an optimiser, kept so that repeating it on the same
    parameter arrays skips the per-array checks, state lookups and table building: only the
    host scalars are computed and the kernels launched. The gradients may be the same arrays
    (PyTorch's persistent ``.grad``) or new ones like them (a fresh CuPy backward pass): then
    each is checked against the one it replaces and only the tables' gradient column changes.

    It holds weak references to the arrays (state stays weakly held: the record is dropped
    when any parameter or gradient dies), the device tables, and the states whose step counts advance.
    Any other change of state (another update or apply, reset, a checkpoint load) bumps the
    rules' state_version, which makes the record stale.
    """

    def __init__(self, opt: Rule, program: Program, params: list, grads: list, jobs: list[Job],
                 launch: Any):
        self.program = program
        self.leaves = opt.leaves()
        self.versions = tuple(leaf.state_version for leaf in self.leaves)
        owner = weakref.ref(opt)

        def forget(_: object) -> None:
            o = owner()
            if o is not None and o.__dict__.get("_prepared") is self:
                del o.__dict__["_prepared"]

        # The record dies with any of its arrays, so while it lives their ids cannot have
        # been reused: comparing ids is then an identity test (and costs a few microseconds).
        self._forget = forget
        self._params_alive = [weakref.ref(p, forget) for p in params]
        self.param_ids = tuple(map(id, params))
        # What a new gradient array must be like to take an old one's place in the tables.
        self.grad_kinds = [(type(g), g.dtype, g.shape, getattr(g, "device", None)) for g in grads]
        self.params_memory = Disjoint(params)  # new gradients must not meet the parameters
        self.grad_bytes = np.array([g.nbytes for g in grads], dtype=np.int64)
        self._use_gradients(grads)
        self.states = [leaf.state_for(job.key) for job in jobs for leaf in self.leaves]
        self.launch = launch

    def _use_gradients(self, grads: list) -> None:
        # Dropping the old references also drops their callbacks: an old gradient's death
        # no longer concerns this record.
        self._grads_alive = [weakref.ref(g, self._forget) for g in grads]
        self.grad_ids = tuple(map(id, grads))

    def take_gradients(self, grads: list) -> bool:
        """Swap in new gradient arrays if each is like the one it replaces (array type, dtype,
        shape, device, contiguous); False, changing nothing, if any is not."""
        if len(grads) != len(self.grad_kinds):
            return False
        for g, (kind, dtype, shape, device) in zip(grads, self.grad_kinds):
            if (type(g) is not kind or g.dtype != dtype or g.shape != shape
                    or not g.flags.c_contiguous or getattr(g, "device", None) != device):
                return False
        if self.params_memory.meets(grads, self.grad_bytes):
            return False  # (the full path names the arrays that share memory)
        self.launch.set_gradients(grads)
        self._use_gradients(grads)
        return True

    def matches(self, opt: Rule, params: list) -> bool:
        return (
            tuple(map(id, params)) == self.param_ids  # (None has its own id: never a match)
            and opt.leaves() == self.leaves
            and plan(opt) is self.program
            and tuple(leaf.state_version for leaf in self.leaves) == self.versions
        )

    def step(self) -> None:
        # Every array is at the same step counts (checked when prepared): the first's will do.
        step_counts = tuple(state.t + 1 for state in self.states[: len(self.leaves)])
        self.launch(_step_scalars(self.program, self.leaves, step_counts))
        for state in self.states:
            state.t += 1


def _fast_path(opt: Rule, params: Any, grads: Any) -> bool:
    """Repeat the prepared update if this call is the same as the last one; True if done."""
    prepared = opt.__dict__.get("_prepared") if isinstance(opt, Rule) else None
    if prepared is None or not isinstance(params, (list, tuple, dict)) or type(grads) is not type(params):
        return False
    if isinstance(params, dict):
        if list(params) != list(grads):
            return False
        params, grads = list(params.values()), list(grads.values())
    if not prepared.matches(opt, params):
        return False
    if tuple(map(id, grads)) != prepared.grad_ids and not prepared.take_gradients(grads):
        return False  # (None, or an array of another kind: the full path checks and handles it)
    prepared.step()
    return True


def _prepare(opt: Rule, program: Program, params: Any, grads: Any, checked: list, jobs: list[Job]) -> None:
    """Keep what it takes to repeat this call (device collections of plain arrays only)."""
    opt.__dict__.pop("_prepared", None)
    if not isinstance(params, (list, tuple, dict)) or not jobs:
        return
    p = list(params.values()) if isinstance(params, dict) else list(params)
    g = list(grads.values()) if isinstance(grads, dict) else list(grads)
    if any(x is None for x in g) or len(checked) != len(p):
        return
    backend = get_backend(checked[0][1].backend)
    if not hasattr(backend, "prepare") or any(
        x.backend != checked[0][1].backend or x.array is not key or gr.array is not gobj
        for (key, x, gr), gobj in zip(checked, g)
    ):
        return  # NumPy has nothing to prepare; views of torch tensors are re-read every call
    if len({tuple(leaf.state_for(job.key).t for leaf in opt.leaves()) for job in jobs}) != 1:
        return  # step counts differ between arrays
    try:
        launch = backend.prepare(program, jobs)
    except MemoryError:  # the update itself is done: only its repetition stays unprepared
        return
    if launch is not None:
        opt.__dict__["_prepared"] = _Prepared(opt, program, p, g, jobs, launch)


def update(opt: Rule, params: Any, grads: Any) -> None:
    """Update ``params`` in place by one step of ``opt``; its state advances.

    ``params`` is one array, or a list, tuple or dict of arrays with ``grads`` of the same
    structure (a ``None`` gradient skips that parameter). Gradients are not modified.
    Every check runs before any write, so a failing call changes nothing. Calls through one
    optimiser from several threads run one at a time.
    """
    with guarded(opt):
        _update(opt, params, grads)


def _update(opt: Rule, params: Any, grads: Any) -> None:
    if _fast_path(opt, params, grads):
        return
    checked = _checked(opt, _entries(params, grads), writes_x=True)
    if not checked:
        return
    program = plan(opt)
    scalar_cache: dict = {}
    jobs = [_job(opt, program, key, x, g, scalar_cache) for key, x, g in checked]
    by_backend: dict[str, list[Job]] = {}
    for job, (_, x, _) in zip(jobs, checked):
        by_backend.setdefault(x.backend, []).append(job)
    for name, group in by_backend.items():
        get_backend(name).run(program, group, apply=False)
    _advance(opt, jobs)
    _prepare(opt, program, params, grads, checked, jobs)


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
    job.out = backend.empty_like(xr.array)
    backend.run(program, [job], apply=True)
    _advance(opt, [job])
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
