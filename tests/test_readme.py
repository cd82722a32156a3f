"""The README's Python examples run as written (on NumPy), in order, in one namespace."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from gpuopt.dispatch import gpu_available
from gpuopt.rule_list import kinds

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


#: the README's table of rules: (name, parameters as written there)
TABLE = re.findall(r"^\| `(\w+)\((.*?)\)` \|", README.read_text(), flags=re.M)


def test_readme_has_a_table_of_rules_and_points_to_the_full_list():
    assert len(TABLE) >= 12 and "python -m gpuopt rules" in README.read_text()


@pytest.mark.parametrize("name, params", TABLE, ids=[name for name, _ in TABLE])
def test_readme_table_shows_registered_rules_with_their_defaults(name, params):
    """The table need not list every rule (``python -m gpuopt rules`` does), but what it shows
    is true: a registered rule, its parameters in order, keyword-only ones after ``;``, and
    their defaults."""
    assert name in kinds(), f"the README's table shows {name}, which is not a registered rule"
    _kind, cls = kinds()[name]
    written = ast.parse(f"def f({params.replace('; ', ', *, ').replace('rules...', '*rules')}): pass").body[0].args
    plain = written.posonlyargs + written.args
    defaults = [inspect.Parameter.empty] * (len(plain) - len(written.defaults)) + written.defaults
    readme = [(a.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD, d) for a, d in zip(plain, defaults)]
    if written.vararg:
        readme.append((written.vararg.arg, inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.empty))
    readme += [(a.arg, inspect.Parameter.KEYWORD_ONLY, d or inspect.Parameter.empty)
               for a, d in zip(written.kwonlyargs, written.kw_defaults)]
    actual = [(p.name, p.kind, p.default) for p in inspect.signature(cls).parameters.values()]
    assert [(n, k, d if d is inspect.Parameter.empty else ast.literal_eval(d)) for n, k, d in readme] == actual
