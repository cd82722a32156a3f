"""The README's Python examples run as written (on NumPy), in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gpuopt.dispatch import gpu_available
from gpuopt.rules import BUILT_IN

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_fluxs_examples():
    text = "\n".join(_blocks())
    for needle in ("Descent(0.1)", "ADAM()", "ExpDecay(0.001, 0.1, 1000, 1e-4)", "ClipValue", "class MyMomentum(Rule)"):
        assert needle in text


def _uses_torch(block: str) -> bool:
    return "torch" in block


def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the checkpoint example writes a file
    namespace: dict = {}
    for block in _blocks():
        if _uses_torch(block):
            continue  # the PyTorch section: test_readme_pytorch_examples_run
        if "count_launches" in block and not gpu_available():
            block = block.split("with gpuopt.count_launches()")[0]  # launch counting needs CuPy
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["W"].shape == (2, 5)
    assert (tmp_path / "opt.npz").exists()


def test_readme_pytorch_examples_run(tmp_path, monkeypatch):
    pytest.importorskip("torch", reason="the PyTorch section needs torch (CI installs the CPU wheel)")
    monkeypatch.chdir(tmp_path)  # the training loop saves a checkpoint
    namespace: dict = {}
    blocks = [block for block in _blocks() if _uses_torch(block)]
    assert len(blocks) == 2
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize("name", [*BUILT_IN, "Optimiser"])
def test_readme_lists_every_rule(name):
    assert f"| `{name}(" in README.read_text()
