"""gpuopt.torch.Optimizer as a drop-in torch.optim optimiser: the same training runs as torch's
own optimisers, LR schedulers, param groups, state_dict round trips, GradScaler, bfloat16 and
MixedPrecision. On the CPU always (with the torch CPU wheel); the same on a GPU where there is one."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

import gpuopt
from gpuopt.dispatch import gpu_available

torch = pytest.importorskip("torch")
import gpuopt.torch  # noqa: E402  (needs torch: after the skip)

ON_GPU = pytest.mark.skipif(not (torch.cuda.is_available() and gpu_available()),
                            reason="needs a CUDA GPU visible to torch and CuPy")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, ON_GPU])]
STEPS = 200


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny tensors: torch's worker threads only add contention on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _mlp(device: str, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    return model.to(device=device, dtype=dtype)


def _batch(step: int, device: str, dtype=torch.float32):
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(32, 6, generator=generator)
    y = torch.sin(x[:, :3]) + 0.1 * torch.randn(32, 3, generator=generator)
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


def _loss(model, step: int):
    dtype = next(model.parameters()).dtype
    x, y = _batch(step, next(model.parameters()).device.type, dtype)
    return torch.nn.functional.mse_loss(model(x).float(), y.float())


def _train(model, opt, steps: int, first: int = 0, scheduler=None, scaler=None):
    for step in range(first, first + steps):
        opt.zero_grad()
        loss = _loss(model, step)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        if scheduler is not None:
            scheduler.step()
    return model


def _assert_same_parameters(ours, theirs, rtol=1e-4, atol=1e-6):
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a.detach().float().cpu(), b.detach().float().cpu(), rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"{name}: {m}")


# -- the same values as torch's own optimisers (the README's rule table) -----------------

MATCHING = {
    "ADAM": (lambda: gpuopt.ADAM(1e-3), lambda p: torch.optim.Adam(p, lr=1e-3, eps=1e-8)),
    "Momentum": (lambda: gpuopt.Momentum(0.01, 0.9), lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9)),
    "Nesterov": (lambda: gpuopt.Nesterov(0.01, 0.9),
                 lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True)),
    "RMSProp": (lambda: gpuopt.RMSProp(1e-3, 0.9), lambda p: torch.optim.RMSprop(p, lr=1e-3, alpha=0.9, eps=1e-8)),
    "ADAGrad": (lambda: gpuopt.ADAGrad(0.05),
                lambda p: torch.optim.Adagrad(p, lr=0.05, initial_accumulator_value=1e-8, eps=1e-8)),
    "ADADelta": (lambda: gpuopt.ADADelta(0.9), lambda p: torch.optim.Adadelta(p, lr=1.0, rho=0.9, eps=1e-8)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(MATCHING))
def test_training_matches_torch_optimiser(name, device):
    rule, reference = MATCHING[name]
    ours, theirs = _mlp(device), _mlp(device)
    opt = gpuopt.torch.Optimizer(ours.parameters(), rule())
    assert isinstance(opt, torch.optim.Optimizer)
    _train(ours, opt, STEPS)
    _train(theirs, reference(theirs.parameters()), STEPS)
    _assert_same_parameters(ours, theirs)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in ours.parameters())


SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=50, gamma=0.5),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=STEPS),
    # cycles betas[0] as well as the learning rate: both drive ADAM's hyperparameters
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=STEPS),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_lr_schedulers_drive_the_rule(name, device):
    ours, theirs = _mlp(device), _mlp(device)
    rule = gpuopt.ADAM(1e-3)
    opt = gpuopt.torch.Optimizer(ours.parameters(), rule)
    reference = torch.optim.Adam(theirs.parameters(), lr=1e-3, eps=1e-8)
    ours_scheduler, their_scheduler = SCHEDULERS[name](opt), SCHEDULERS[name](reference)
    for step in range(STEPS):
        _train(ours, opt, 1, first=step, scheduler=ours_scheduler)
        _train(theirs, reference, 1, first=step, scheduler=their_scheduler)
        assert rule.eta == opt.param_groups[0]["lr"] == pytest.approx(reference.param_groups[0]["lr"])
        assert rule.beta == tuple(reference.param_groups[0]["betas"])
    _assert_same_parameters(ours, theirs)


def test_lr_reads_and_writes_the_rule_learning_rate():
    model = _mlp("cpu")
    chain = gpuopt.Optimiser(gpuopt.ClipNorm(1.0), gpuopt.ExpDecay(0.1, 0.5, 2, 1e-4), gpuopt.Descent(1.0))
    opt = gpuopt.torch.Optimizer(model.parameters(), chain)
    group = opt.param_groups[0]
    assert group["lr"] == 0.1  # the first member with an eta: ExpDecay's
    _train(model, opt, 2)
    assert group["lr"] == chain[1].eta == 0.05  # ExpDecay decayed it; the group shows it
    group["lr"] = 0.02
    assert chain[1].eta == 0.02 and chain[2].eta == 1.0
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\]: eta must be >= 0"):
        group["lr"] = -1.0
    assert chain[1].eta == 0.02 and group["lr"] == 0.02
    momentum = gpuopt.torch.Optimizer(_mlp("cpu").parameters(), gpuopt.Nesterov(0.01, 0.9))
    momentum.param_groups[0]["momentum"] = 0.5
    assert momentum.param_groups[0]["rule"].rho == 0.5


@pytest.mark.parametrize("device", DEVICES)
def test_param_groups_with_their_own_rules_and_learning_rates(device):
    ours, theirs = _mlp(device), _mlp(device)
    first, second = ours[0], ours[2]
    opt = gpuopt.torch.Optimizer([
        {"params": first.parameters(), "lr": 3e-3},  # the default rule with its own lr
        {"params": [second.weight], "rule": gpuopt.Momentum(0.02, 0.8)},
        {"params": [second.bias]},  # the default rule again: a copy, keeping lr 1e-3
    ], gpuopt.ADAM(1e-3))
    assert [g["lr"] for g in opt.param_groups] == [3e-3, 0.02, 1e-3]
    assert opt.param_groups[0]["rule"] is not opt.param_groups[2]["rule"]
    adam = torch.optim.Adam([{"params": theirs[0].parameters(), "lr": 3e-3}, {"params": [theirs[2].bias]}],
                            lr=1e-3, eps=1e-8)
    sgd = torch.optim.SGD([theirs[2].weight], lr=0.02, momentum=0.8)
    for step in range(STEPS):
        _train(ours, opt, 1, first=step)
        adam.zero_grad()
        sgd.zero_grad()
        _loss(theirs, step).backward()
        adam.step()
        sgd.step()
    _assert_same_parameters(ours, theirs)


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_parameter_is_untouched(device):
    model = _mlp(device)
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    rule = gpuopt.ADAM(1e-2)
    opt = gpuopt.torch.Optimizer(model.parameters(), rule)
    before = model[2].weight.detach().clone()
    _train(model, opt, 20)
    assert torch.equal(model[0].weight, frozen)
    assert rule.state_for(model[0].weight) is None  # not stepped: no state either
    assert rule.state_for(model[2].weight).t == 20 and not torch.equal(model[2].weight, before)


def test_zero_grad_and_closure_as_torch():
    model = _mlp("cpu")
    opt = gpuopt.torch.Optimizer(model.parameters(), gpuopt.Descent(0.1))
    _loss(model, 0).backward()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    _loss(model, 0).backward()
    opt.zero_grad(set_to_none=False)
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())

    def closure():
        opt.zero_grad()
        loss = _loss(model, 1)
        loss.backward()
        return loss

    first = opt.step(closure)
    assert first.item() > opt.step(closure).item()  # a descent step lowers this batch's loss


def test_a_bad_parameter_in_any_group_fails_the_step_before_any_update():
    model = _mlp("cpu")
    phase = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    opt = gpuopt.torch.Optimizer([{"params": model.parameters()},
                                  {"params": [phase], "rule": gpuopt.Descent(0.1)}], gpuopt.ADAM())
    _loss(model, 0).backward()
    phase.grad = torch.ones(3, dtype=torch.complex64)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match=r"param group 1 params\[0\] has dtype torch.complex64"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert opt.param_groups[0]["rule"].state_for(model[0].weight) is None


def _sparse_gradient(p):
    p.grad = torch.zeros(3).to_sparse()


def _resized_after_its_gradient(p):
    p.grad = torch.ones(3)
    p.data = torch.zeros(4)


def _complex_parameter(p):
    p.data = torch.zeros(3, dtype=torch.complex64)
    p.grad = torch.ones(3, dtype=torch.complex64)


BAD_PAIRS = {  # how a parameter goes bad -> the error that names it
    "sparse gradient": (_sparse_gradient, TypeError, "has a sparse gradient"),
    "resized after its gradient": (_resized_after_its_gradient, ValueError, r"has shape \(4,\) on cpu but"),
    "complex": (_complex_parameter, TypeError, "has dtype torch.complex64"),
}


@pytest.mark.parametrize("groups", [1, 2])  # (one group: one update call, which checks; more: checked first)
@pytest.mark.parametrize("case", list(BAD_PAIRS))
def test_each_bad_pair_is_named_and_nothing_steps(case, groups):
    spoil, error, message = BAD_PAIRS[case]
    model = _mlp("cpu")
    good, bad = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    if groups == 1:
        opt = gpuopt.torch.Optimizer([good, bad], gpuopt.Descent(0.1))
    else:
        opt = gpuopt.torch.Optimizer([{"params": model.parameters()},
                                      {"params": [good, bad], "rule": gpuopt.Descent(0.1)}], gpuopt.ADAM())
    _loss(model, 0).backward()
    good.grad = torch.ones(3)
    for _ in range(2):
        opt.step()  # well twice (a repeated step may take another path): the checks must hold later too
    spoil(bad)
    before = [p.detach().clone() for p in [*model.parameters(), good]]
    with pytest.raises(error, match=rf"param group {groups - 1} params\[1\] {message}"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip([*model.parameters(), good], before))


# -- state_dict ---------------------------------------------------------------------------------

ROUND_TRIPS = {
    "ADAM": (torch.float32, lambda: gpuopt.ADAM(1e-2)),
    "ClipNorm+ExpDecay+Momentum": (torch.float32, lambda: gpuopt.Optimiser(
        gpuopt.ClipNorm(0.5), gpuopt.ExpDecay(0.05, 0.5, 7, 1e-4), gpuopt.Momentum(1.0, 0.9))),
    "bfloat16 MixedPrecision(ClipNorm+ADAM)": (torch.bfloat16, lambda: gpuopt.MixedPrecision(
        gpuopt.Optimiser(gpuopt.ClipNorm(1.0), gpuopt.ADAM(1e-3)))),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_state_dict_round_trip_continues_bit_identically(case, device):
    dtype, rule = ROUND_TRIPS[case]
    straight = _mlp(device, dtype)
    _train(straight, gpuopt.torch.Optimizer(straight.parameters(), rule()), 40)

    first = _mlp(device, dtype)
    opt = gpuopt.torch.Optimizer(first.parameters(), rule())
    _train(first, opt, 20)
    saved = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, saved)
    saved.seek(0)
    loaded = torch.load(saved, weights_only=True)  # no pickled objects in it
    resumed = _mlp(device, dtype, seed=99)
    resumed.load_state_dict(loaded["model"])
    opt = gpuopt.torch.Optimizer(resumed.parameters(), rule())
    opt.load_state_dict(loaded["opt"])
    _train(resumed, opt, 20, first=20)
    for a, b in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(a, b)


def test_load_state_dict_checks_before_changing_anything():
    model = _mlp("cpu")
    opt = gpuopt.torch.Optimizer(model.parameters(), gpuopt.ADAM(1e-2))
    _train(model, opt, 3)
    other = gpuopt.torch.Optimizer(_mlp("cpu").parameters(), gpuopt.Momentum())
    with pytest.raises(gpuopt.CheckpointError, match="Momentum"):
        other.load_state_dict(opt.state_dict())
    state = opt.state_dict()
    opt.param_groups[0]["lr"] = 0.5
    state["param_groups"][0]["lr"] = -1.0
    with pytest.raises(ValueError, match="'lr'"):
        opt.load_state_dict(state)
    assert opt.param_groups[0]["lr"] == 0.5
    with pytest.raises(ValueError, match="param groups"):
        opt.load_state_dict({"param_groups": [], "gpuopt_checkpoints": []})


# -- GradScaler ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scaler_steps_and_skips_as_torch(device):
    ours, theirs = _mlp(device), _mlp(device)
    opt = gpuopt.torch.Optimizer(ours.parameters(), gpuopt.ADAM(1e-3))
    reference = torch.optim.Adam(theirs.parameters(), lr=1e-3, eps=1e-8)
    scalers = [torch.amp.GradScaler(device, init_scale=2.0**12, growth_interval=10) for _ in range(2)]
    for step in range(60):
        for model, optimizer, scaler in ((ours, opt, scalers[0]), (theirs, reference, scalers[1])):
            optimizer.zero_grad()
            loss = _loss(model, step)
            if step in (7, 31):
                loss = loss * float("inf")  # non-finite gradients: the scaler skips the step
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    assert scalers[0].get_scale() == scalers[1].get_scale()
    assert opt.param_groups[0]["rule"].state_for(ours[0].weight).t == 58  # two steps skipped
    _assert_same_parameters(ours, theirs)


# -- bfloat16 and MixedPrecision ----------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_training_tracks_float32_training(device):
    wide, narrow = _mlp(device), _mlp(device, torch.bfloat16)
    rule = gpuopt.ADAM(3e-3)
    _train(wide, gpuopt.torch.Optimizer(wide.parameters(), gpuopt.ADAM(3e-3)), STEPS)
    _train(narrow, gpuopt.torch.Optimizer(narrow.parameters(), rule), STEPS)
    assert all(p.dtype == torch.bfloat16 for p in narrow.parameters())
    assert all(rule.state_for(p).slots.dtype.name == "float32" for p in narrow.parameters())
    start = _mlp(device)
    for a, b, s in zip(narrow.parameters(), wide.parameters(), start.parameters()):
        moved = (b - s).abs().mean().item()
        assert moved > 0.03  # the run did move the parameters, and bfloat16 followed
        assert (a.float() - b).abs().mean().item() < 0.25 * moved
    wide_loss, narrow_loss = _loss(wide, STEPS).item(), _loss(narrow, STEPS).item()
    assert wide_loss < 0.2 * _loss(start, STEPS).item() and narrow_loss < 1.25 * wide_loss


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_learning_rate_moves_bfloat16_only_with_mixed_precision(device):
    """At lr 1e-5 an ADAM step is far below half a bfloat16 ulp of these weights: plain bfloat16
    parameters round every step away; MixedPrecision accumulates them in float32 as float32
    training does, and writes its rounding."""
    start = _mlp(device, torch.bfloat16)
    plain, mixed = _mlp(device, torch.bfloat16), _mlp(device, torch.bfloat16)
    wide = _mlp(device, torch.bfloat16).float()  # the same starting values, in float32
    _train(plain, gpuopt.torch.Optimizer(plain.parameters(), gpuopt.ADAM(1e-5)), STEPS)
    master = gpuopt.MixedPrecision(gpuopt.ADAM(1e-5))
    _train(mixed, gpuopt.torch.Optimizer(mixed.parameters(), master), STEPS)
    _train(wide, gpuopt.torch.Optimizer(wide.parameters(), gpuopt.ADAM(1e-5)), STEPS)
    def moved(model):  # the fraction of all elements that changed
        changed = sum(int((p != s).sum()) for p, s in zip(model.parameters(), start.parameters()))
        return changed / sum(p.numel() for p in start.parameters())

    assert moved(plain) < 0.02  # barely moves: only the tiniest weights, with the finest ulps
    assert moved(mixed) > 0.3
    for m, w, s in zip(mixed.parameters(), wide.parameters(), start.parameters()):
        copy = torch.as_tensor(master.state_for(m).slots[0]).reshape(m.shape).to(w.device)
        assert m.dtype == torch.bfloat16 and torch.equal(m, copy.to(torch.bfloat16))  # its rounding
        # the master copy moved as float32 training did (gradients differ by bfloat16's forward pass)
        drift, distance = (copy - w).abs().mean().item(), (w - s.float()).abs().mean().item()
        assert distance > 1e-3 and drift < 0.2 * distance


# -- import ---------------------------------------------------------------------------------------


def test_import_gpuopt_never_imports_torch():
    code = ("import sys, numpy, gpuopt; gpuopt.update(gpuopt.ADAM(), numpy.ones(3), numpy.ones(3)); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gpuopt_torch_says_when_torch_is_missing():
    code = "import sys; sys.modules['torch'] = None\nimport gpuopt.torch"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert "gpuopt.torch needs PyTorch (pip install torch)" in result.stderr
