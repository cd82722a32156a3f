"""gpuopt for PyTorch: :class:`Optimizer`, a drop-in ``torch.optim.Optimizer``.

::

    opt = gpuopt.torch.Optimizer(model.parameters(), gpuopt.ADAM(1e-3))
    for x, y in batches:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

Each step is ``gpuopt.update`` on the parameters that have a gradient: CUDA tensors go through
the fused multi-tensor kernels (one launch per dtype group and device), CPU tensors through
the NumPy executor, both in place. float16 and bfloat16 parameters keep float32 state; wrap
the rule in :class:`gpuopt.MixedPrecision` to keep a float32 master copy as well.

This module imports torch; ``import gpuopt`` does not import this module.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from itertools import repeat
from operator import attrgetter, is_
from typing import Any

import numpy as np

try:
    import torch
except ImportError as error:  # say what is missing, not just "No module named torch"
    raise ImportError(
        "gpuopt.torch needs PyTorch (pip install torch); the rest of gpuopt works without it"
    ) from error

from . import checkpoint
from .api import update
from .chain import Optimiser
from .rule import Rule
from .rules.descent import Momentum, Nesterov
from .rules.mixed import MixedPrecision

__all__ = ["Optimizer"]

# Param-group keys that torch's own optimisers and LR schedulers use, and the hyperparameter
# each stands for (on the rule's learning-rate member). Other hyperparameters of that member
# appear under their gpuopt names (eps, rho, ...).
_TORCH_NAMES = {"eta": "lr", "beta": "betas"}
_MOMENTUM_RULES = (Momentum, Nesterov)  # their rho is torch's momentum (RMSProp's is alpha)


def _lr_member(rule: Rule) -> Rule | None:
    """The member whose ``eta`` is the learning rate: the first leaf that has one."""
    return next((leaf for leaf in rule.leaves() if "eta" in leaf.hyperparameters()), None)


def _bindings(rule: Rule) -> dict[str, tuple[Rule, str]]:
    """Param-group key -> (leaf, hyperparameter) for the rule's learning-rate member."""
    member = _lr_member(rule)
    if member is None:
        return {}
    bindings = {}
    for name in member.hyperparameters():
        key = _TORCH_NAMES.get(name, name)
        if name == "rho" and isinstance(member, _MOMENTUM_RULES):
            key = "momentum"
        bindings[key] = (member, name)
    return bindings


def _from_group(value: Any) -> Any:
    """A group value as a hyperparameter: tensors (torch allows a tensor lr) become floats."""
    if isinstance(value, torch.Tensor):
        return float(value)
    if isinstance(value, (list, tuple)):
        return tuple(_from_group(v) for v in value)
    return value


def _check(leaf: Rule, name: str, value: Any, what: str) -> None:
    descriptor = next(h for h in type(leaf)._hypers if h.name == name)
    if descriptor.check is not None:
        try:
            descriptor.check(name, value)
        except ValueError as error:
            raise ValueError(f"{what}: {error}") from None


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_pair(p: torch.Tensor, grad: torch.Tensor, what: str) -> None:
    """What gpuopt.update would reject, checked on torch's attributes (cheap) so that a step
    over several groups or devices raises before any of them is updated."""
    if grad.is_sparse:
        raise TypeError(f"{what} has a sparse gradient; gpuopt takes dense gradients only")
    if p.dtype not in _DTYPES or grad.dtype not in _DTYPES:
        raise TypeError(f"{what} has dtype {p.dtype} and gradient dtype {grad.dtype}; expected "
                        "float16, bfloat16, float32 or float64")
    if p.shape != grad.shape or p.device != grad.device:
        raise ValueError(f"{what} has shape {tuple(p.shape)} on {p.device} but its gradient "
                         f"{tuple(grad.shape)} on {grad.device}; expected the same")


_DTYPE_SET = frozenset(_DTYPES)
_dtype, _shape, _device, _sparse = (attrgetter(name) for name in ("dtype", "shape", "device", "is_sparse"))


def _checked_calls(index: int, group_params: list[torch.Tensor]) -> list[tuple[torch.device, list, list]]:
    """(device, parameters, gradients) of each update call a group's step makes: its
    parameters that have a gradient, by device, checked as :func:`_check_pair` checks them
    (on whole lists at once, which is several times faster; pair by pair only to name the
    first bad one)."""
    params = list(group_params)
    grads = [p.grad for p in params]
    if any(map(is_, grads, repeat(None))):
        params = [p for p, g in zip(params, grads) if g is not None]
        grads = [g for g in grads if g is not None]
    devices = list(map(_device, params))
    if (any(map(_sparse, grads)) or not _DTYPE_SET.issuperset(map(_dtype, params + grads))
            or list(map(_shape, params)) != list(map(_shape, grads)) or devices != list(map(_device, grads))):
        for position, p in enumerate(group_params):
            if p.grad is not None:
                _check_pair(p, p.grad, f"param group {index} params[{position}]")
    if not params:
        return []
    if devices.count(devices[0]) == len(devices):
        return [(devices[0], params, grads)]
    by_device: dict[torch.device, tuple[list, list]] = {}
    for device, p, g in zip(devices, params, grads):
        pair = by_device.setdefault(device, ([], []))
        pair[0].append(p)
        pair[1].append(g)
    return [(device, ps, gs) for device, (ps, gs) in by_device.items()]


def _update_on(device: torch.device, rule: Rule, params: list, grads: list) -> None:
    if device.type == "cuda":
        with torch.cuda.device(device):  # the kernels go to the parameters' GPU
            update(rule, params, grads)
    else:
        update(rule, params, grads)


class _ParamGroup(dict):
    """A param group whose learning rate (and the other bound keys) *is* the rule's
    hyperparameter: reading gives the rule's current value (ExpDecay's decayed eta
    included), writing sets it, validated, so torch's LR schedulers drive gpuopt."""

    def __init__(self, data: dict, bindings: dict[str, tuple[Rule, str]], index: int):
        super().__init__(data)
        self.bindings = bindings
        self.index = index  # its position in param_groups, for error messages

    def __getitem__(self, key: str) -> Any:
        binding = self.bindings.get(key)
        if binding is None:
            return super().__getitem__(key)
        value = getattr(*binding)
        super().__setitem__(key, value)  # so that items() and copies see it too
        return value

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def __setitem__(self, key: str, value: Any) -> None:
        binding = self.bindings.get(key)
        if binding is not None:
            leaf, name = binding
            try:
                setattr(leaf, name, _from_group(value))
            except ValueError as error:
                raise ValueError(f"param_groups[{self.index}][{key!r}]: {error}") from None
        super().__setitem__(key, value)

    def snapshot(self) -> dict:
        """A plain dict of the group, bound keys read from the rule."""
        return {key: self[key] for key in self}


def _fresh(rule: Rule) -> Rule:
    """A new rule like ``rule`` (same structure and hyperparameters), with no state."""
    if isinstance(rule, Optimiser):
        return Optimiser(*(_fresh(member) for member in rule))
    if isinstance(rule, MixedPrecision):
        return MixedPrecision(_fresh(rule.rule))
    copy = type(rule)(**rule.hyperparameters())
    for key in rule.schedule_state:
        setattr(copy, key, getattr(rule, key))
    return copy


class Optimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that steps with a gpuopt rule (or chain).

    ``params``: tensors, or param-group dicts as torch takes them. A group may carry its own
    ``rule``; groups without one use ``rule`` (the first such group uses that very object,
    later ones a fresh copy, so that each group has its own hyperparameters). A group's
    ``lr`` is its rule's ``eta`` (in a chain, the first member that has one), read and
    written: torch's LR schedulers work unchanged. That member's other hyperparameters are
    group keys too: ``betas`` (ADAM's ``beta``), ``momentum`` (Momentum's and Nesterov's
    ``rho``), ``eps``, ... Values given in a group are set on its rule.

    State lives in the rules (``param_groups[i]["rule"]``), keyed by parameter: ``state_dict``
    holds each group's gpuopt checkpoint as a byte tensor, so it goes through ``torch.save``
    and ``torch.load`` (``weights_only=True`` too) and restores a run bit for bit.
    """

    def __init__(self, params: Iterable[Any], rule: Rule):
        if not isinstance(rule, Rule):
            raise TypeError(f"rule must be a gpuopt rule or Optimiser, got {type(rule).__name__}")
        # the default rule serves the first group without one; later ones get copies made
        # from its hyperparameters as given here, not as a group's own values changed them
        self._rule, self._template, self._rule_used = rule, _fresh(rule), False
        defaults = {key: getattr(leaf, name) for key, (leaf, name) in _bindings(rule).items()}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        rule = group.get("rule")
        takes_default = rule is None
        if takes_default:
            rule = _fresh(self._template) if self._rule_used else self._rule
        elif not isinstance(rule, Rule):
            raise TypeError(
                f"param group {len(self.param_groups)}: rule must be a gpuopt rule, got {type(rule).__name__}"
            )
        group["rule"] = rule
        bindings = _bindings(rule)
        given = {key: _from_group(group[key]) for key in bindings if key in group}
        for key, value in given.items():  # checked before anything changes
            leaf, name = bindings[key]
            _check(leaf, name, value, f"param group {len(self.param_groups)} {key!r}")
        for key, (leaf, name) in bindings.items():
            group.setdefault(key, getattr(leaf, name))
        wrapped = _ParamGroup(group, {}, len(self.param_groups))
        super().add_param_group(wrapped)  # torch's checks: tensors, leaves, no repeats
        for key, value in given.items():
            leaf, name = bindings[key]
            setattr(leaf, name, value)
        wrapped.bindings = bindings
        self._rule_used = self._rule_used or takes_default

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One step of every group's rule on its parameters that have a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if len(self.param_groups) == 1:  # one update call, which checks everything before any write
            params = self.param_groups[0]["params"]
            grads = [p.grad for p in params]
            if any(map(is_, grads, repeat(None))):
                params, grads = [p for p, g in zip(params, grads) if g is not None], [g for g in grads if g is not None]
            if params:
                try:
                    _update_on(params[0].device, self.param_groups[0]["rule"], params, grads)
                except (TypeError, ValueError):
                    _checked_calls(0, self.param_groups[0]["params"])  # names a bad pair as below
                    raise
            return loss
        calls = []  # every group's update calls, all checked before the first one runs
        for index, group in enumerate(self.param_groups):
            calls += [(group["rule"], *call) for call in _checked_calls(index, group["params"])]
        for rule, device, params, grads in calls:
            _update_on(device, rule, params, grads)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """Groups (hyperparameters, parameter indices) and each group's gpuopt checkpoint."""
        groups, blobs, first = [], [], 0
        for group in self.param_groups:
            packed = {k: v for k, v in group.snapshot().items() if k not in ("params", "rule")}
            packed["rule"] = repr(group["rule"])  # for people reading it; the checkpoint checks
            packed["params"] = list(range(first, first + len(group["params"])))
            first += len(group["params"])
            buffer = io.BytesIO()
            checkpoint.save_state(group["rule"], list(group["params"]), buffer)
            blobs.append(torch.from_numpy(np.frombuffer(buffer.getvalue(), dtype=np.uint8).copy()))
            groups.append(packed)
        return {"state": {}, "param_groups": groups, "gpuopt_checkpoints": blobs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; checks every group before changing any."""
        try:
            groups, blobs = state_dict["param_groups"], state_dict["gpuopt_checkpoints"]
        except (KeyError, TypeError):
            raise ValueError("state_dict is not a gpuopt.torch.Optimizer state dict "
                             "(it has no 'param_groups' and 'gpuopt_checkpoints')") from None
        if len(groups) != len(self.param_groups) or len(blobs) != len(groups):
            raise ValueError(f"state_dict has {len(groups)} param groups but this optimizer has "
                             f"{len(self.param_groups)}")
        plans = []
        for index, (group, saved, blob) in enumerate(zip(self.param_groups, groups, blobs)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"param group {index} has {len(group['params'])} parameters but the "
                                 f"state_dict's has {len(saved['params'])}")
            plans.append(checkpoint.plan_load(group["rule"], list(group["params"]),
                                             io.BytesIO(blob.cpu().numpy().tobytes()), True,
                                             f"of param group {index}"))
            for key, value in saved.items():
                if key in group.bindings:
                    leaf, name = group.bindings[key]
                    _check(leaf, name, _from_group(value), f"param group {index} {key!r}")
        for group, saved, plan in zip(self.param_groups, groups, plans):
            checkpoint._commit(plan)
            for key, value in saved.items():
                if key not in ("params", "rule"):
                    group[key] = value
