"""``python -m gpuopt demo``: train a small MLP with a gpuopt optimiser, on NumPy or CuPy.

The model is a two-layer perceptron (tanh or relu hidden layer, softmax cross-entropy) with
hand-written backprop. Everything is written against an array module ``xp`` (``numpy`` or
``cupy``), so the same code runs on either backend, and the data set is generated here from a
seed (Gaussian blobs, or interleaved spirals for a harder problem): the demo needs nothing
besides gpuopt and NumPy.

With ``--framework torch`` the same MLP is a ``torch.nn`` model trained by autograd through
:class:`gpuopt.torch.Optimizer` (:mod:`gpuopt.demo_torch`), on the CPU or a GPU.

The optimiser comes from the command line as an expression (``ADAM``, ``ADAM(1e-3)``,
``ClipNorm(1)+ADAM(1e-3)``, ``Optimiser(ExpDecay(0.01), Momentum())``), read by
:func:`gpuopt.arguments.parse_optimiser`, which never calls ``eval``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .api import update
from .arguments import at_least_two, choose_backend, non_negative_int, parse_optimiser, positive_int
from .backends import describe
from .dispatch import cupy_module
from .rule import Rule

__all__ = [
    "make_dataset", "init_params", "loss_and_grads", "train",
    "DemoResult", "DemoError", "add_parser", "run",
]

DEFAULT_OPTIMISER = "ADAM(0.01)"

# -- data and model ------------------------------------------------------------------------

DATASETS = ("blobs", "spirals")
FRAMEWORKS = ("arrays", "torch")


def make_dataset(n: int, *, kind: str = "blobs", classes: int = 4, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` labelled 2-D points (float32 features, int64 labels), generated from ``seed``.

    ``blobs``: one Gaussian per class on a circle, well separated (a linear-ish problem).
    ``spirals``: interleaved spiral arms, which need the hidden layer.
    """
    if kind not in DATASETS:
        raise ValueError(f"unknown data set {kind!r}; expected one of {DATASETS}")
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=n)
    if kind == "blobs":
        angle = 2 * np.pi * np.arange(classes) / classes
        centres = 3.0 * np.stack([np.cos(angle), np.sin(angle)], axis=1)
        x = centres[y] + rng.normal(size=(n, 2))
    else:
        r = rng.uniform(0.05, 1.0, size=n)
        theta = 4.0 * r + 2 * np.pi * y / classes + rng.normal(scale=0.15, size=n)
        x = 2.0 * r[:, None] * np.stack([np.sin(theta), np.cos(theta)], axis=1)
    return x.astype(np.float32), y.astype(np.int64)


def init_params(n_in: int, hidden: int, n_out: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Glorot-style initial weights (float32), as NumPy arrays."""
    rng = np.random.default_rng(seed + 1)

    def weights(fan_in: int, fan_out: int) -> np.ndarray:
        scale = math.sqrt(2.0 / (fan_in + fan_out))
        return (rng.normal(size=(fan_in, fan_out)) * scale).astype(np.float32)

    return {
        "W1": weights(n_in, hidden), "b1": np.zeros(hidden, np.float32),
        "W2": weights(hidden, n_out), "b2": np.zeros(n_out, np.float32),
    }


def loss_and_grads(xp: Any, params: dict[str, Any], x: Any, y: Any, activation: str = "tanh",
                   grads: bool = True) -> tuple[Any, Any, dict[str, Any] | None]:
    """Mean cross-entropy, accuracy (both 0-d ``xp`` arrays) and the gradients of the loss.

    Written against the array module ``xp`` only, so it runs on NumPy and CuPy alike.
    """
    w1, b1, w2, b2 = params["W1"], params["b1"], params["W2"], params["b2"]
    z = x @ w1 + b1
    h = xp.tanh(z) if activation == "tanh" else xp.maximum(z, 0)
    logits = h @ w2 + b2
    shifted = logits - logits.max(axis=1, keepdims=True)  # stable softmax
    e = xp.exp(shifted)
    total = e.sum(axis=1, keepdims=True)
    rows = xp.arange(x.shape[0])
    loss = (xp.log(total[:, 0]) - shifted[rows, y]).mean()
    accuracy = (logits.argmax(axis=1) == y).mean()
    if not grads:
        return loss, accuracy, None
    # d loss / d logits = (softmax - onehot) / batch
    dlogits = e / total
    dlogits[rows, y] -= 1
    dlogits /= x.shape[0]
    dh = dlogits @ w2.T
    dz = dh * (1 - h * h) if activation == "tanh" else dh * (z > 0)
    return loss, accuracy, {
        "W1": x.T @ dz, "b1": dz.sum(axis=0),
        "W2": h.T @ dlogits, "b2": dlogits.sum(axis=0),
    }


# -- training --------------------------------------------------------------------------------


def _say(line: str) -> None:
    print(line, flush=True)


class DemoError(Exception):
    """A demo setting that cannot run here (e.g. CuPy asked for without a GPU)."""


def pick_backend(name: str) -> str:
    """``auto`` is CuPy only where a GPU is usable; ``cupy`` without one is a DemoError."""
    try:
        return choose_backend(name)
    except ValueError as exc:
        raise DemoError(str(exc)) from None


@dataclass
class DemoResult:
    """What a demo run reached; ``history`` holds (step, loss, accuracy) on the training set."""

    backend: str
    steps: int
    seconds: float
    initial_loss: float
    final_loss: float
    train_accuracy: float
    test_accuracy: float
    chance: float
    history: list[tuple[int, float, float]] = field(default_factory=list)


def train(
    opt: Rule,
    *,
    steps: int = 500,
    backend: str = "auto",
    seed: int = 0,
    batch_size: int = 64,
    hidden: int = 32,
    dataset: str = "blobs",
    classes: int = 4,
    activation: str = "tanh",
    samples: int = 2048,
    log_every: int | None = None,
    log: Callable[[str], None] | None = None,
    framework: str = "arrays",
) -> DemoResult:
    """Train the MLP with ``opt`` for ``steps`` minibatch steps.

    ``framework``: ``arrays`` (NumPy or CuPy arrays, hand-written backprop, ``gpuopt.update``)
    or ``torch`` (a ``torch.nn`` model, autograd, ``gpuopt.torch.Optimizer``).

    Progress lines go to ``log`` (default: stdout, flushed per line so a CI log shows them as
    they come); pass ``log=lambda line: None`` to train silently.
    """
    if steps < 0 or batch_size < 1 or hidden < 1 or classes < 2 or samples < 2:
        raise DemoError("steps must be >= 0, batch size and hidden >= 1, classes and samples >= 2")
    if activation not in ("tanh", "relu"):
        raise DemoError(f"unknown activation {activation!r}; expected tanh or relu")
    if framework not in FRAMEWORKS:
        raise DemoError(f"unknown framework {framework!r}; expected one of {FRAMEWORKS}")
    backend = pick_backend(backend)
    if framework == "torch":
        try:
            import torch  # noqa: F401
        except ImportError:
            raise DemoError("--framework torch needs PyTorch (pip install torch)") from None
    xp = np if backend == "numpy" or framework == "torch" else cupy_module()
    say = log or _say

    # Data and weights come from NumPy's generator, so both backends start from the same values.
    x_np, y_np = make_dataset(samples + samples // 4, kind=dataset, classes=classes, seed=seed)
    x_train, y_train = xp.asarray(x_np[:samples]), xp.asarray(y_np[:samples])
    x_test, y_test = xp.asarray(x_np[samples:]), xp.asarray(y_np[samples:])
    params = {k: xp.asarray(v) for k, v in init_params(2, hidden, classes, seed).items()}
    batch_size = min(batch_size, samples)
    rng = np.random.default_rng(seed + 2)

    def sync() -> None:  # CuPy runs asynchronously: wait before reading a clock
        if backend == "cupy":
            xp.cuda.get_current_stream().synchronize()

    def evaluate(test: bool = False) -> tuple[float, float]:
        x, y = (x_test, y_test) if test else (x_train, y_train)
        loss, acc, _ = loss_and_grads(xp, params, x, y, activation, grads=False)
        return float(loss), float(acc)

    def train_step(idx: Any) -> None:
        _, _, grads = loss_and_grads(xp, params, x_train[idx], y_train[idx], activation)
        update(opt, params, grads)

    if framework == "torch":
        from . import demo_torch

        data = (x_np[:samples], y_np[:samples], x_np[samples:], y_np[samples:])
        backend, model, train_step = demo_torch.build(opt, params, data, activation, backend)
        evaluate, sync = model.evaluate, model.sync

    every = log_every if log_every and log_every > 0 else max(1, steps // 10)
    width = len(str(steps))
    say(
        f"gpuopt demo: MLP 2-{hidden}-{classes} ({activation}) on {dataset} "
        f"({samples} train / {len(y_np) - samples} test), backend {describe(backend)}, batch "
        f"{batch_size}, "
        f"{steps} steps, seed {seed}"
    )
    say(f"optimiser: {opt!r}")
    loss0, acc0 = evaluate()
    history = [(0, loss0, acc0)]
    say(f"step {0:>{width}}/{steps}  loss {loss0:.4f}  acc {acc0:7.2%}")

    order = xp.asarray(rng.permutation(samples))
    cursor = 0
    started = interval_start = time.perf_counter()
    trained = 0.0  # seconds spent training, evaluation excluded
    done_at_interval = 0
    for step in range(1, steps + 1):
        if cursor + batch_size > samples:  # a new epoch: reshuffle, drop the ragged tail
            order, cursor = xp.asarray(rng.permutation(samples)), 0
        idx = order[cursor:cursor + batch_size]
        cursor += batch_size
        train_step(idx)
        if step % every == 0 or step == steps:
            sync()
            now = time.perf_counter()
            trained += now - interval_start
            rate = (step - done_at_interval) / max(now - interval_start, 1e-9)
            loss, acc = evaluate()
            history.append((step, loss, acc))
            say(f"step {step:>{width}}/{steps}  loss {loss:.4f}  acc {acc:7.2%}  {rate:8.0f} steps/s")
            if not math.isfinite(loss):
                say("loss is not finite: the optimiser diverged; try a smaller learning rate")
                break
            done_at_interval, interval_start = step, time.perf_counter()
    sync()
    elapsed = time.perf_counter() - started

    final_loss, train_acc = history[-1][1], history[-1][2]
    _, test_acc = evaluate(test=True)
    result = DemoResult(backend, history[-1][0], elapsed, loss0, final_loss, train_acc,
                        float(test_acc), 1.0 / classes, history)
    say(
        f"final: loss {final_loss:.4f} (from {loss0:.4f}), train accuracy {train_acc:.2%}, "
        f"test accuracy {result.test_accuracy:.2%} (chance {result.chance:.0%}); "
        f"{result.steps} steps in {elapsed:.2f} s ({result.steps / max(trained, 1e-9):.0f} steps/s training)"
    )
    return result


# -- command line (a subcommand of ``python -m gpuopt``) --------------------------------------


def _optimiser_arg(text: str) -> Rule:
    try:
        return parse_optimiser(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``demo`` on ``python -m gpuopt``'s subcommands."""
    p = subparsers.add_parser(
        "demo",
        help="train a small MLP on a synthetic data set with a gpuopt optimiser",
        description=(
            "Train a two-layer MLP (hand-written backprop, NumPy or CuPy) on a synthetic "
            "classification data set with a gpuopt optimiser, printing progress."
        ),
        epilog=(
            "Optimiser expressions: a rule name for its defaults (ADAM), a call (ADAM(1e-3, "
            "(0.9, 0.99))), keyword arguments (ADAM(eta=1e-3)), + to chain rules "
            "(ClipNorm(1)+ADAM(1e-3)) or Optimiser(...) (Optimiser(ExpDecay(0.01), Momentum()))."
        ),
    )
    p.add_argument("--optimiser", "--optimizer", type=_optimiser_arg, default=DEFAULT_OPTIMISER,
                   metavar="EXPR", help=f"optimiser expression (default: {DEFAULT_OPTIMISER})")
    p.add_argument("--steps", type=positive_int, default=500, help="training steps (default: 500)")
    p.add_argument("--backend", choices=("auto", "numpy", "cupy"), default="auto",
                   help="array backend; auto picks cupy only where a GPU is usable (default: auto)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed for data, weights and batches (default: 0)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="minibatch size (default: 64)")
    p.add_argument("--hidden", type=positive_int, default=32, help="hidden units (default: 32)")
    p.add_argument("--dataset", choices=DATASETS, default="blobs", help="synthetic data set (default: blobs)")
    p.add_argument("--classes", type=at_least_two, default=4, help="number of classes (default: 4)")
    p.add_argument("--activation", choices=("tanh", "relu"), default="tanh",
                   help="hidden activation (default: tanh)")
    p.add_argument("--framework", choices=FRAMEWORKS, default="arrays",
                   help="arrays: NumPy/CuPy with hand-written backprop; torch: a torch.nn model through "
                        "gpuopt.torch.Optimizer (default: arrays)")
    p.add_argument("--log-every", type=positive_int, default=None, metavar="N",
                   help="print progress every N steps (default: steps/10)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the demo from parsed arguments; 0 on success, 1 if training diverged, 2 on a bad setting."""
    try:
        result = train(
            args.optimiser, steps=args.steps, backend=args.backend, seed=args.seed,
            batch_size=args.batch_size, hidden=args.hidden, dataset=args.dataset,
            classes=args.classes, activation=args.activation, log_every=args.log_every,
            framework=args.framework,
        )
    except DemoError as exc:
        print(f"gpuopt demo: error: {exc}", file=sys.stderr)
        return 2
    return 0 if math.isfinite(result.final_loss) else 1
