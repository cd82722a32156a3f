"""The demo's MLP in PyTorch (autograd instead of hand-written backprop), trained through
:class:`gpuopt.torch.Optimizer`: ``python -m gpuopt demo --framework torch``.

The model starts from the same weights as the NumPy demo (:func:`gpuopt.demo.init_params`)
and sees the same batches, so the two runs can be compared line by line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .rule import Rule


class TorchMLP:
    """Step and evaluation functions of the demo MLP on one torch device."""

    def __init__(self, opt: Rule, params: dict[str, np.ndarray], data: tuple[np.ndarray, ...],
                 activation: str, device: str):
        import torch

        from .torch import Optimizer

        self.torch = torch
        hidden, classes = params["W2"].shape
        self.model = torch.nn.Sequential(
            torch.nn.Linear(params["W1"].shape[0], hidden),
            torch.nn.Tanh() if activation == "tanh" else torch.nn.ReLU(),
            torch.nn.Linear(hidden, classes),
        ).to(device)
        with torch.no_grad():  # nn.Linear keeps its weight as (out, in): the transpose
            self.model[0].weight.copy_(torch.from_numpy(params["W1"].T.copy()))
            self.model[0].bias.copy_(torch.from_numpy(params["b1"]))
            self.model[2].weight.copy_(torch.from_numpy(params["W2"].T.copy()))
            self.model[2].bias.copy_(torch.from_numpy(params["b2"]))
        self.optimizer = Optimizer(self.model.parameters(), opt)
        self.x_train, self.y_train, self.x_test, self.y_test = (torch.from_numpy(a).to(device) for a in data)
        self.device = device

    def step(self, batch: np.ndarray) -> None:
        """One training step on the rows ``batch`` of the training set."""
        index = self.torch.from_numpy(batch).to(self.device)
        self.optimizer.zero_grad()
        logits = self.model(self.x_train[index])
        self.torch.nn.functional.cross_entropy(logits, self.y_train[index]).backward()
        self.optimizer.step()

    def evaluate(self, test: bool = False) -> tuple[float, float]:
        """Mean cross-entropy and accuracy on the training (or test) set."""
        x, y = (self.x_test, self.y_test) if test else (self.x_train, self.y_train)
        with self.torch.no_grad():
            logits = self.model(x)
            loss = self.torch.nn.functional.cross_entropy(logits, y)
            accuracy = (logits.argmax(dim=1) == y).float().mean()
        return float(loss), float(accuracy)

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()


def torch_device(backend: str) -> str:
    """``auto``: CUDA where torch and CuPy both see a GPU; ``numpy`` means the CPU here."""
    import torch

    from .dispatch import gpu_available

    if backend == "auto":
        return "cuda" if torch.cuda.is_available() and gpu_available() else "cpu"
    return "cuda" if backend == "cupy" else "cpu"


def build(opt: Rule, params: dict[str, np.ndarray], data: tuple[np.ndarray, ...], activation: str,
          backend: str) -> tuple[str, TorchMLP, Callable[[Any], None]]:
    """(backend label, model, step function) for the demo loop."""
    device = torch_device(backend)
    model = TorchMLP(opt, params, data, activation, device)
    return f"torch ({device})", model, model.step
