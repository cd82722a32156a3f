"""``python -m gpuopt demo``: training, the optimiser expression parser, and the CLI."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gpuopt
from gpuopt import demo
from gpuopt.__main__ import main
from gpuopt.arguments import parse_optimiser
from gpuopt.demo import loss_and_grads

ROOT = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r"^step +(\d+)/(\d+) +loss ([\d.]+) +acc +([\d.]+)%", re.M)
FINAL_LINE = re.compile(r"^final: loss ([\d.]+) .*test accuracy ([\d.]+)%", re.M)


def _run_demo(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[list[tuple[int, float, float]],
                                                                       float, float]:
    assert main(["demo", "--backend", "numpy", *args]) == 0
    out = capsys.readouterr().out
    steps = [(int(s), float(loss), float(acc) / 100) for s, _, loss, acc in STEP_LINE.findall(out)]
    final = FINAL_LINE.search(out)
    assert final, out
    return steps, float(final.group(1)), float(final.group(2)) / 100


@pytest.mark.parametrize(
    "expression",
    [
        "ADAM(0.01)",
        "ClipNorm(1)+ADAM(1e-2)",
        "Optimiser(ExpDecay(0.1, 0.5, 20), Momentum(0.5))",
        "ADAMW(0.01, decay=1e-4)",
        "Nesterov(0.1)",
    ],
)
def test_demo_learns(capsys: pytest.CaptureFixture[str], expression: str) -> None:
    steps, final_loss, test_acc = _run_demo(capsys, "--optimiser", expression, "--steps", "60",
                                            "--log-every", "20")
    assert [s for s, _, _ in steps] == [0, 20, 40, 60]
    assert final_loss < 0.5 * steps[0][1]
    assert steps[-1][2] > 0.6 and test_acc > 0.6  # chance is 25%


def test_demo_defaults_reach_high_accuracy(capsys: pytest.CaptureFixture[str]) -> None:
    steps, final_loss, test_acc = _run_demo(capsys)
    assert steps[-1][0] == 500
    assert test_acc > 0.9 and steps[-1][2] > 0.9


def test_demo_spirals_relu(capsys: pytest.CaptureFixture[str]) -> None:
    steps, final_loss, _ = _run_demo(capsys, "--dataset", "spirals", "--activation", "relu",
                                     "--classes", "3", "--steps", "100", "--hidden", "16")
    assert final_loss < steps[0][1]


def test_train_is_deterministic() -> None:
    a = demo.train(gpuopt.ADAM(0.01), steps=30, backend="numpy", log=lambda line: None)
    b = demo.train(gpuopt.ADAM(0.01), steps=30, backend="numpy", log=lambda line: None)
    assert a.history == b.history and a.final_loss < a.initial_loss


def test_backprop_matches_finite_differences() -> None:
    rng = np.random.default_rng(3)
    x, y = demo.make_dataset(16, classes=3, seed=3)
    x = x.astype(np.float64)
    for activation in ("tanh", "relu"):
        params = {k: v.astype(np.float64) + 0.1 * rng.normal(size=v.shape)
                  for k, v in demo.init_params(2, 5, 3, seed=3).items()}
        _, _, grads = loss_and_grads(np, params, x, y, activation)
        for name, p in params.items():
            for i in range(min(p.size, 6)):
                flat = p.reshape(-1)
                old = flat[i]
                flat[i] = old + 1e-6
                up = float(loss_and_grads(np, params, x, y, activation, grads=False)[0])
                flat[i] = old - 1e-6
                down = float(loss_and_grads(np, params, x, y, activation, grads=False)[0])
                flat[i] = old
                assert grads[name].reshape(-1)[i] == pytest.approx((up - down) / 2e-6, abs=1e-6)


# -- the optimiser expression parser ------------------------------------------------------------


def test_parse_optimiser_builds_rules() -> None:
    adam = parse_optimiser("ADAM")
    assert type(adam) is gpuopt.ADAM and adam.eta == 0.001
    assert type(parse_optimiser(" adam ")) is gpuopt.ADAM  # case-insensitive when unambiguous
    assert type(parse_optimiser("SGD(0.3)")) is gpuopt.Descent
    custom = parse_optimiser("ADAM(eta=1e-3, beta=(0.8, 0.9), eps=1e-6)")
    assert (custom.eta, custom.beta, custom.eps) == (1e-3, (0.8, 0.9), 1e-6)
    chain = parse_optimiser("ClipNorm(1) + WeightDecay(+1e-4) + ADAM(1e-3)")
    assert type(chain) is gpuopt.Optimiser
    assert [type(r) for r in chain] == [gpuopt.ClipNorm, gpuopt.WeightDecay, gpuopt.ADAM]
    nested = parse_optimiser("Optimiser(ExpDecay(0.01), Momentum())")
    assert [type(r) for r in nested] == [gpuopt.ExpDecay, gpuopt.Momentum]
    assert nested[0].eta == 0.01
    adamw = parse_optimiser("ClipValue(1) + ADAMW(decay=0.1)")
    assert [type(r) for r in adamw] == [gpuopt.ClipValue, gpuopt.ADAMW]  # ADAMW is not flattened


@pytest.mark.parametrize(
    "text, message",
    [
        ("__import__('os')", "unknown rule name '__import__'"),
        ("__import__('os').system('true')", "attribute access is not allowed"),
        ("os.system('true')", "attribute access is not allowed"),
        ("ADAM.__class__", "attribute access is not allowed"),
        ("ADAM().__class__.__bases__", "attribute access is not allowed"),
        ("ADAM(eta=__import__('os').getpid())", "attribute access is not allowed"),
        ("ADAM()()", "cannot be called"),
        ("ADAM('0.1')", "not allowed"),
        ("ADAM(eta=True)", "not allowed"),
        ("ADAM(1j)", "not allowed"),
        ("lambda: ADAM()", "not allowed"),
        ("[r for r in ()]", "not allowed"),
        ("ADAM(*[0.1])", "*arguments are not allowed"),
        ("ADAM(**{'eta': 0.1})", "**arguments are not allowed"),
        ("ADAM(eta=0.1 * 2)", "not allowed"),
        ("ADAM if 1 else Descent", "not allowed"),
        ("ADAM + 1", "+ chains rules"),
        ("-ADAM", "sign applies to numbers"),
        ("0.1", "not an optimiser"),
        ("(0.9, 0.99)", "not an optimiser"),
        ("Foo()", "unknown rule name 'Foo'"),
        ("ADAN(0.1)", "did you mean ADAM"),
        ("Rule()", "unknown rule name 'Rule'"),
        ("Hyper(1)", "unknown rule name 'Hyper'"),
        ("ADAM(-0.1)", "eta must be >= 0"),
        ("ADAM(0.1, 0.2, 0.3)", "positional arguments"),
        ("ClipNorm", "missing a required argument: 'thresh'"),
        ("ADAM(lr=0.1)", "unexpected keyword argument 'lr'"),
        ("ADAM(", "cannot parse"),
        ("", "empty"),
        ("(" * 250 + "ADAM" + ")" * 250, "nested too deeply|cannot parse"),
        ("Optimiser(" * 90 + ")" * 90, None),  # deep but legal
        ("ADAM" + "+ADAM" * 400, "longer than"),
    ],
)
def test_parse_optimiser_rejects(text: str, message: str | None) -> None:
    if message is None:
        assert isinstance(parse_optimiser(text), gpuopt.Optimiser)
        return
    with pytest.raises(ValueError, match=message if "|" in message else re.escape(message)):
        parse_optimiser(text)


def test_cli_rejects_unsafe_optimiser(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--optimiser", "__import__('os').system('echo pwned')", "--steps", "5"]) == 2
    captured = capsys.readouterr()
    assert "pwned" not in captured.out
    assert "argument --optimiser" in captured.err and "attribute access is not allowed" in captured.err
    assert main(["demo", "--optimiser", "Adamm", "--steps", "5"]) == 2
    assert "unknown rule name 'Adamm'" in capsys.readouterr().err


# -- backends and the command line ------------------------------------------------------------


def test_cupy_backend_without_gpu_fails_cleanly(capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpuopt.arguments, "gpu_available", lambda: False)  # where the backend is chosen
    assert main(["demo", "--backend", "cupy", "--steps", "5"]) == 2
    captured = capsys.readouterr()
    assert "error: --backend cupy needs a GPU" in captured.err
    assert "Traceback" not in captured.err and "step" not in captured.out
    assert demo.pick_backend("auto") == "numpy"


def test_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2  # a subcommand is required
    assert main(["--version"]) == 0
    assert gpuopt.__version__ in capsys.readouterr().out
    assert main(["demo", "--help"]) == 0
    assert "--optimiser" in capsys.readouterr().out
    assert main(["demo", "--steps", "0"]) == 2
    assert main(["demo", "--backend", "tpu"]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not gpuopt.dispatch.gpu_available(), reason="needs a usable CUDA GPU")
def test_demo_on_cupy_matches_numpy() -> None:
    on_gpu = demo.train(gpuopt.ADAM(0.01), steps=50, backend="cupy", log=lambda line: None)
    on_cpu = demo.train(gpuopt.ADAM(0.01), steps=50, backend="numpy", log=lambda line: None)
    assert on_gpu.backend == "cupy"
    assert on_gpu.final_loss == pytest.approx(on_cpu.final_loss, rel=1e-2)


def test_demo_with_torch_trains_the_same_mlp(capsys: pytest.CaptureFixture[str]) -> None:
    """--framework torch: the same weights and batches, autograd and gpuopt.torch.Optimizer,
    so the run follows the NumPy demo's to float32 rounding."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add contention on a busy machine
    try:
        steps, final_loss, test_acc = _run_demo(capsys, "--framework", "torch", "--steps", "60",
                                                "--log-every", "20")
    finally:
        torch.set_num_threads(threads)
    arrays = demo.train(gpuopt.ADAM(0.01), steps=60, backend="numpy", log_every=20, log=lambda line: None)
    assert [s for s, _, _ in steps] == [0, 20, 40, 60]
    for (_, loss, acc), (_, their_loss, their_acc) in zip(steps, arrays.history):
        assert loss == pytest.approx(their_loss, rel=1e-3) and acc == pytest.approx(their_acc, abs=0.01)
    assert test_acc == pytest.approx(arrays.test_accuracy, abs=0.01)


def test_demo_with_torch_says_when_torch_is_missing() -> None:
    code = ("import sys; sys.modules['torch'] = None\nfrom gpuopt.__main__ import main\n"
            "sys.exit(main(['demo', '--framework', 'torch', '--steps', '5']))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "--framework torch needs PyTorch (pip install torch)" in proc.stderr


def test_python_dash_m_demo() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "gpuopt", "demo", "--steps", "50"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert STEP_LINE.search(proc.stdout) and FINAL_LINE.search(proc.stdout), proc.stdout


# -- command-line errors: one line naming the argument, exit status 2, no traceback ------------

CLI_ERRORS = [
    (["demo", "--seed", "-1"], r"argument --seed: expected an integer >= 0, got '-1'"),
    (["demo", "--classes", "1"], r"argument --classes: expected an integer >= 2, got '1'"),
    (["demo", "--optimiser", "ADAM(eta=1e-3, eta=2)"], r"--optimiser.*keyword argument 'eta' repeated"),
    (["demo", "--optimiser", "ADAM(beta=-(0.9, 0.99))"], r"--optimiser.*a sign applies to numbers, not to tuples"),
    (["demo", "--optimiser", "Descent(1" + "0" * 400 + ")"], r"--optimiser.*eta must be at most"),
    (["demo", "--optimiser", "ADAM(1e400)"], r"--optimiser.*eta must be a finite real number"),
    (["bench", "--json", "/missing-dir-gpuopt/b.json"], r"--json: directory '/missing-dir-gpuopt' does not exist"),
    (["bench", "--plot", "/missing-dir-gpuopt/b.png"], r"--plot: directory '/missing-dir-gpuopt' does not exist"),
]


@pytest.mark.parametrize("argv, expected", CLI_ERRORS, ids=[" ".join(c[0])[:40] for c in CLI_ERRORS])
def test_command_line_errors_are_one_line(argv, expected, capsys, monkeypatch):
    from gpuopt import bench

    monkeypatch.setattr(bench, "benchmark", lambda *a, **k: pytest.fail("measured before checking its options"))
    monkeypatch.setattr(demo, "train", lambda *a, **k: pytest.fail("trained with a bad option"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no message"
    assert "Traceback" not in "\n".join(err)
    assert re.search(expected, err[-1]), err[-1]
    assert len(err[-1]) < 300


def test_plot_file_name_printed_is_the_file_written(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    tiny = ["bench", "--backend", "numpy", "--sizes", "8", "--rules", "Descent", "--repeats", "1", "--warmup", "0",
            "--no-model", "--no-baselines", "--no-torch", "--quiet"]
    assert main([*tiny, "--plot", str(tmp_path / "x")]) == 0
    assert f"wrote {tmp_path / 'x.png'}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]
    folder = tmp_path / "plots"
    assert main([*tiny, "--plot", f"{folder}/", "--json", f"{folder}/"]) == 0
    written = sorted(p.name for p in folder.iterdir())
    assert len(written) == 2 and all(not name.startswith(".") for name in written)
    assert {name.rsplit(".", 1)[1] for name in written} == {"png", "json"}
