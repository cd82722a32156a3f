"""PyTorch CPU tensors and nn.Parameters go through the NumPy backend without a copy (DLPack),
updated in place, with state keyed on the tensor itself. Skipped where torch is missing."""

from __future__ import annotations

import numpy as np
import pytest

import gpuopt

torch = pytest.importorskip("torch")


def _model_and_grads(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    return model


def _backward(model, step: int) -> None:
    model.zero_grad()
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, 6, dtype=torch.float64, generator=generator)
    model(x).pow(2).sum().backward()


def test_parameters_updated_in_place_and_match_torch_adam():
    ours, theirs = _model_and_grads(0), _model_and_grads(0)
    opt = gpuopt.ADAM(0.01)
    reference = torch.optim.Adam(theirs.parameters(), lr=0.01, eps=1e-8)
    pointers = [p.data_ptr() for p in ours.parameters()]
    for step in range(10):
        _backward(ours, step)
        _backward(theirs, step)
        params = list(ours.parameters())
        gpuopt.update(opt, params, [p.grad for p in params])
        reference.step()
    assert [p.data_ptr() for p in ours.parameters()] == pointers  # no copy, no new storage
    for a, b in zip(ours.parameters(), theirs.parameters()):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-10, atol=1e-13)
    assert all(opt.state_for(p).t == 10 for p in ours.parameters())
    assert all(p.requires_grad for p in ours.parameters())  # still trainable


def test_none_gradient_skips_a_parameter():
    model = _model_and_grads(1)
    _backward(model, 0)
    params = list(model.parameters())
    frozen = params[0].detach().clone()
    gpuopt.update(gpuopt.Descent(0.1), params, [None] + [p.grad for p in params[1:]])
    assert torch.equal(params[0].detach(), frozen)
