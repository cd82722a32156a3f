"""The prepared repeat of a collection update: a training loop's step at a host cost that
does not grow with per-array Python work.

After a collection ``update`` on a GPU backend, the optimiser keeps a :class:`PreparedUpdate`.
A later call with the same parameter objects (compared by identity, at C speed) skips the
per-array checks, state lookups and table building: only the host scalars are computed and the
kernels launched. Gradients may be the same arrays (PyTorch's persistent ``.grad``) or new ones
(a CuPy backward pass, or PyTorch after ``zero_grad(set_to_none=True)``): new ones must be like
the ones they replace (type, dtype, shape, layout, device), and their addresses replace the
tables' gradient column. Every array of the update shares one step count per rule
(:class:`~gpuopt.rule.StepCount`), so a step advances one counter per rule, not one per array.

The record holds weak references only (state stays weakly held). It dies with any of its
parameters, so while it lives their ids cannot have been reused; gradient ids prove identity
only while the gradients they were read from are alive. Any other
change of state (another update or apply, reset, a checkpoint load) bumps the rules'
``state_version``, which makes it stale.

One array updated alone, again and again, is prepared as a collection of one
(:class:`PreparedSingle`) where the backend prepares single arrays (the native CPU; a GPU keeps
its element-wise launch on the full path), from its second call in a row.
"""

from __future__ import annotations

import sys
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from itertools import repeat
from operator import attrgetter
from typing import Any

import numpy as np

from . import rule as rule_module
from . import tensor_records
from .backends import get_backend
from .backends.protocol import Job, PreparedLaunch
from .identities import Identities
from .memory import Disjoint
from .plan import Program
from .rule import Rule, StepCount

#: how many update calls took each path ("prepared" or "full"); tests and benchmarks read it
PATHS: Counter[str] = Counter()


def step_scalars(program: Program, leaves: Sequence[Rule], step_counts: Sequence[int]) -> list[float]:
    """Run each rule's schedule for its next step, then collect the kernel's scalars: each
    is a value of its rule's :meth:`~gpuopt.rule.Rule.extra_scalars` or else a hyperparameter
    (what :meth:`~gpuopt.rule.Rule.scalars` gives, without building every rule's whole dict)."""
    extras = []
    for leaf, t in zip(leaves, step_counts):
        leaf.schedule(t)
        extras.append(leaf.extra_scalars(t))
    return program.kernel_scalars([extras[rule][name] if name in extras[rule] else float(getattr(leaves[rule], name))
                                   for rule, name in program.scalar_sources])


#: fast address readers for array types other than CuPy's and PyTorch's (the host-time
#: benchmark's stand-in for device memory registers one)
POINTER_READERS: dict[type, Callable[[Any], int]] = {}


_state_version = attrgetter("state_version")


def _writeable(array: Any) -> bool:
    return array.flags.writeable


def _aligned(array: Any) -> bool:
    return getattr(getattr(array, "flags", None), "aligned", True)


class _ArrayKind:
    """How to read, at C speed over a list, the address of one type of array and what must
    stay the same for a new array to take an old one's place in the tables."""

    def __init__(self, kind: type, device_pointer: Callable[[Any], int]):
        module = _family(kind)
        self.torch = module == "torch"
        #: PyTorch tensors' layouts and addresses in one call to C++, where it could be built
        self.records = tensor_records.reader() if self.torch else None
        if self.torch:
            tensor = sys.modules["torch"].Tensor
            self.pointer = tensor.data_ptr
            self.layout: tuple[Callable[[Any], Any], ...] = (
                attrgetter("dtype"), attrgetter("shape"), tensor.get_device, tensor.is_contiguous)
        elif module == "cupy":
            self.pointer = attrgetter("data.ptr")
            self.layout = (attrgetter("dtype"), attrgetter("shape"), attrgetter("strides"),
                           attrgetter("data.device_id"))
        elif kind in POINTER_READERS:  # a registered stand-in for device memory
            self.pointer = POINTER_READERS[kind]
            self.layout = (attrgetter("dtype"), attrgetter("shape"), attrgetter("strides"))
        else:  # the backend's own arrays (a NumPy array may also be unaligned: kernels cannot read it)
            self.pointer = device_pointer
            self.layout = (attrgetter("dtype"), attrgetter("shape"), attrgetter("strides"), _aligned)
        # (one attribute per pass over the arrays: cheaper than a tuple per array)

    def pointers(self, arrays: Sequence[Any]) -> list[int]:
        return list(map(self.pointer, arrays))

    def _described(self, arrays: Sequence[Any]) -> np.ndarray | None:
        """The C++ reader's records of ``arrays``; None without the reader, or where it cannot
        describe one of them (then these arrays are read in Python from now on)."""
        if self.records is not None:
            records = self.records.records(arrays)
            if (records[:, 1] >= 0).all():
                return records
            self.records = None
        return None

    def layouts(self, arrays: Sequence[Any]) -> Any:
        """What :meth:`take` compares: the records without their addresses, or one list per
        attribute."""
        records = self._described(arrays)
        if records is not None:
            return np.ascontiguousarray(records[:, 1:])
        return [list(map(read, arrays)) for read in self.layout]

    def take(self, arrays: Sequence[Any], expected: Any) -> Sequence[int] | None:
        """The addresses of ``arrays`` if their layouts are ``expected`` (from :meth:`layouts`),
        else None (after the first difference, nothing more is read)."""
        if self.records is not None:
            return self.records.take(arrays, expected)
        if not all(list(map(read, arrays)) == want for read, want in zip(self.layout, expected)):
            return None
        return self.pointers(arrays)

    def places(self, arrays: Sequence[Any]) -> Any:
        """Where the elements of ``arrays`` are, to notice a torch parameter's storage replaced
        (``p.data = ...``): with the C++ reader whole records, so that a new storage at the same
        address (a slice, another dtype's view) shows too; else addresses."""
        records = self._described(arrays)
        return records if records is not None else self.pointers(arrays)

    def same_places(self, arrays: Sequence[Any], places: Any) -> bool:
        if isinstance(places, np.ndarray):
            return self.records is not None and np.array_equal(self.records.records(arrays), places)
        return self.pointers(arrays) == places


class PreparedUpdate:
    """One optimiser's last collection update, ready to repeat (see the module docstring)."""

    def __init__(self, opt: Rule, program: Program, params: list, grads: list, jobs: Sequence[Job],
                 launch: PreparedLaunch, param_kind: _ArrayKind, grad_kind: _ArrayKind):
        self.program = program
        self.leaves = opt.leaves()
        self.versions = list(map(_state_version, self.leaves))
        self.state_edits = rule_module.state_edits
        self.launch = launch
        self.param_kind, self.grad_kind = param_kind, grad_kind
        owner = weakref.ref(opt)

        def forget(_: object) -> None:
            o = owner()
            if o is not None and o.__dict__.get("_prepared") is self:
                del o.__dict__["_prepared"]

        self._forget = forget
        self._params_alive = [weakref.ref(p, forget) for p in params]
        self.param_ids = Identities(params)
        # A torch parameter keeps its identity when its storage is replaced (p.data = ...).
        self.param_places = param_kind.places(params) if param_kind.torch else None
        # Host memory that native code writes through raw pointers, ignoring the flag (not a
        # registered stand-in for device memory):
        self.writeable_flags = isinstance(params[0], np.ndarray) and type(params[0]) not in POINTER_READERS
        self.grad_types = list(map(type, grads))
        self.grad_layouts = grad_kind.layouts(grads)
        self.param_memory = Disjoint([job.x for job in jobs], [job.g for job in jobs])  # new gradients: apart
        self.grad_ids = Identities(grads)
        self._use_gradients(grads)
        # One step count per rule for every array of the update: they step together.
        self.counters = []
        for leaf in self.leaves:
            shared = StepCount(leaf.state_for(jobs[0].key).t)
            for job in jobs:
                leaf.state_for(job.key).count = shared
            self.counters.append(shared)

    def _use_gradients(self, grads: Sequence[Any]) -> None:
        """Trust these gradients' ids from now on: while they live, the same ids are the
        same arrays. Their death must not end the record (most loops make new gradients every
        step), only stop the ids from proving identity."""
        self.grads_alive = True
        self._grad_refs = list(map(weakref.ref, grads, repeat(self._gradient_died)))
        self.grad_ids.remember(grads)
        self.first_grad_id = id(grads[0])

    def _gradient_died(self, _: object) -> None:
        self.grads_alive = False

    def _take_gradients(self, grads: Sequence[Any]) -> bool:
        """Swap in new gradient arrays if each is like the one it replaces; False, changing
        nothing, if any is not (None, another dtype, shape, layout or device)."""
        if list(map(type, grads)) != self.grad_types:
            return False
        pointers = self.grad_kind.take(grads, self.grad_layouts)
        if pointers is None or self.param_memory.meets(pointers):
            return False  # (the full path names the arrays that share memory, and refuses them)
        self.launch.set_gradient_pointers(pointers)
        self._grad_refs = []
        self.grads_alive = False
        if id(grads[0]) != self.first_grad_id:  # (a cheap hint: new arrays, as most loops make every step)
            self.first_grad_id = id(grads[0])
            self.grad_ids.forget()
        elif self.grad_ids.match(grads):
            # Checked twice under the same ids: likely persistent (PyTorch's .grad), so watch
            # them (weak references cost as much as checking them once).
            self._use_gradients(grads)
        else:
            self.grad_ids.remember(grads)
        return True

    def try_step(self, leaves: tuple[Rule, ...], params: list, grads: Sequence[Any]) -> bool:
        """Run the step if this call repeats the prepared one (``leaves``: the optimiser's
        rules now); False, changing nothing, if not."""
        if (not self.param_ids.match(params)  # (None has its own id: never a match)
                or leaves != self.leaves  # (the same rules: the same program, traced from their classes)
                or list(map(_state_version, leaves)) != self.versions
                or rule_module.state_edits != self.state_edits  # (a step count set by hand)
                or (self.param_places is not None and not self.param_kind.same_places(params, self.param_places))
                or (self.writeable_flags and not all(map(_writeable, params)))):
            return False  # (a NumPy parameter made read-only since: the full path refuses it)
        if not (self.grads_alive and self.grad_ids.match(grads)) and not self._take_gradients(grads):
            return False
        self.launch.check_launchable()  # (before the schedules run: a refused call changes nothing)
        counters = self.counters
        self.launch(step_scalars(self.program, leaves, [c.value + 1 for c in counters]))
        for counter in counters:
            counter.value += 1
        return True


def _family(kind: type) -> str:
    """Array types read alike: PyTorch's tensor classes, CuPy's, or one backend type each."""
    module = kind.__module__.split(".")[0]
    return module if module in ("torch", "cupy") else f"{kind.__module__}.{kind.__qualname__}"


class PreparedSingle(PreparedUpdate):
    """One array's update prepared for repeating (a backend that prepares single arrays: the
    native CPU), as a collection of one. A NumPy array may also change in place and stay the
    same object (a new ``shape``, ``strides`` or ``dtype``; NumPy refuses to ``resize`` an
    array with weak references, as its state has): the layouts of the parameter and its
    gradient are checked first, and any change goes the full way."""

    def __init__(self, opt: Rule, program: Program, x: Any, g: Any, jobs: Sequence[Job],
                 launch: PreparedLaunch, param_kind: _ArrayKind, grad_kind: _ArrayKind):
        super().__init__(opt, program, [x], [g], jobs, launch, param_kind, grad_kind)
        self.param_id, self.grad_type = id(x), type(g)
        self.layouts = (x.dtype, x.shape, x.strides, g.dtype, g.shape, g.strides)

    def try_single(self, leaves: tuple[Rule, ...], x: Any, g: Any) -> bool:
        """Run the step if ``update(opt, x, g)`` repeats the prepared one (``leaves``: the
        optimiser's rules now); False, changing nothing, if not."""
        if (id(x) != self.param_id or type(g) is not self.grad_type
                or (x.dtype, x.shape, x.strides, g.dtype, g.shape, g.strides) != self.layouts):
            return False
        return self.try_step(leaves, (x,), (g,))


class _SingleSeen(weakref.ref):
    """The last array updated alone, by the full path (a weak reference to it): prepared if
    the next call repeats it (a loop over many arrays, one call each, would otherwise prepare
    at every call)."""

    __slots__ = ()


def try_prepared(opt: Rule, leaves: tuple[Rule, ...], params: Any, grads: Any) -> bool:
    """Repeat the optimiser's prepared update if this call is the same; True if done.
    ``leaves`` are ``opt.leaves()``, as the caller found them."""
    prepared = opt.__dict__.get("_prepared") if isinstance(opt, Rule) else None
    if prepared is None:
        return False
    if type(prepared) is PreparedSingle:  # (first: one array's update is the cheap one)
        if not prepared.try_single(leaves, params, grads):
            return False
        PATHS["prepared"] += 1
        return True
    if not isinstance(prepared, PreparedUpdate):
        return False  # (a _SingleSeen)
    if isinstance(params, dict):
        if not isinstance(grads, dict) or list(params) != list(grads):
            return False
        params, grads = list(params.values()), list(grads.values())
    elif not (isinstance(params, (list, tuple)) and isinstance(grads, (list, tuple))):
        return False
    if not prepared.try_step(leaves, params, grads):
        return False
    PATHS["prepared"] += 1
    return True


def prepare(opt: Rule, program: Program, params: Any, grads: Any, checked: list, jobs: Sequence[Job]) -> None:
    """Keep what it takes to repeat this call: collections on a backend that prepares, whose
    arrays all step together, of one array type each for parameters and gradients; one NumPy
    array on a backend that prepares single arrays, from its second call in a row."""
    seen = opt.__dict__.pop("_prepared", None)
    if not jobs:
        return
    single = not isinstance(params, (list, tuple, dict))
    if single:
        if not (isinstance(params, np.ndarray) and isinstance(grads, np.ndarray)):
            return
        if not (type(seen) is _SingleSeen and seen() is params):
            opt.__dict__["_prepared"] = _SingleSeen(params)
            return
    p = [params] if single else list(params.values()) if isinstance(params, dict) else list(params)
    g = [grads] if single else list(grads.values()) if isinstance(grads, dict) else list(grads)
    if any(x is None for x in g) or len(checked) != len(p):
        return
    backends = {x.backend for _, x, _ in checked}
    param_types, grad_types = set(map(type, p)), set(map(type, g))
    if len(backends) != 1 or len(set(map(_family, param_types))) != 1 or len(set(map(_family, grad_types))) != 1:
        return  # (torch.nn.Parameter and torch.Tensor are one family: one way to read them)
    # Each object is the backend array itself, or a torch tensor whose pointers are read directly.
    for (key, x, gr), g_obj in zip(checked, g):
        if (x.array is not key and x.framework != "torch") or (gr.array is not g_obj and gr.framework != "torch"):
            return
    if len({tuple(leaf.state_for(job.key).t for leaf in opt.leaves()) for job in jobs}) != 1:
        return  # step counts differ between arrays
    backend = get_backend(backends.pop())
    try:
        launch = backend.prepare(program, jobs, one_array=True) if single else backend.prepare(program, jobs)
    except MemoryError:  # the update itself is done: only its repetition stays unprepared
        return
    if launch is None:
        return
    param_kind = _ArrayKind(param_types.pop(), launch.pointer)
    grad_kind = _ArrayKind(grad_types.pop(), launch.pointer)
    if single:
        opt.__dict__["_prepared"] = PreparedSingle(opt, program, params, grads, jobs, launch, param_kind, grad_kind)
    else:
        opt.__dict__["_prepared"] = PreparedUpdate(opt, program, p, g, jobs, launch, param_kind, grad_kind)
