"""The registry of built-in rules is the one list: exports, the command line, the benchmark,
the plain formulas and the test catalogue all agree with it."""

from __future__ import annotations

import inspect

import pytest

import gpuopt
from gpuopt.arguments import rule_names
from gpuopt.bench.workload import CHAIN, RULES
from gpuopt.plain import FORMULAS, REQUIRED
from gpuopt.rules import BUILT_IN, OPTIMISERS, WRAPPERS

from .cases import ALL, ORACLE_CASES, names_in

FORMULA_RULES = [name for name, cls in BUILT_IN.items() if cls not in WRAPPERS]


@pytest.mark.parametrize("name", list(BUILT_IN))
def test_every_built_in_rule_is_exported_and_named_on_the_command_line(name):
    assert name in gpuopt.__all__ and getattr(gpuopt, name) is BUILT_IN[name]
    assert rule_names()[name] is BUILT_IN[name]


def test_the_benchmark_times_every_optimiser():
    assert [name for name in RULES if name != CHAIN] == [cls.__name__ for cls in OPTIMISERS]


def test_every_formula_is_a_built_in_rule():
    assert set(FORMULAS) == set(FORMULA_RULES)


@pytest.mark.parametrize("name", FORMULA_RULES)
def test_plain_formula_has_the_rules_signature(name):
    """The plain formulas keep their own defaults: both readings of a rule must agree."""
    params = inspect.signature(BUILT_IN[name]).parameters
    formula = FORMULAS[name]
    assert list(params) == list(formula.defaults)
    for key, p in params.items():
        assert (p.default is inspect.Parameter.empty) == (formula.defaults[key] is REQUIRED), key
        if p.default is not inspect.Parameter.empty:
            assert p.default == formula.defaults[key], key
        assert (p.kind is inspect.Parameter.KEYWORD_ONLY) == (key in formula.keyword_only), key


@pytest.mark.parametrize("name", FORMULA_RULES)
def test_every_rule_is_checked_against_its_formula_and_run_on_kernels(name):
    assert any(names_in(spec) == [name] for spec in ORACLE_CASES.values())
    assert name in ALL


def test_rules_command_lists_every_registered_rule(capsys):
    import re

    from gpuopt.__main__ import main

    assert main(["rules"]) == 0
    rows = [re.split(r"\s{2,}", line, maxsplit=2) for line in capsys.readouterr().out.splitlines()]
    assert [row[0].split("(")[0] for row in rows] == [*BUILT_IN, "Optimiser"]
    listed = {row[0]: row[1:] for row in rows}
    assert listed["ADAM(eta=0.001, beta=(0.9, 0.999); eps=1e-08)"] == [
        "optimiser", "ADAM with learning rate ``eta`` and moment decays ``beta = (b1, b2)``."]
    assert listed["ClipValue(thresh)"] == ["transform", "Clip the update element-wise to ``[-thresh, thresh]``."]
    assert listed["MixedPrecision(rule)"][0] == "wrapper" and listed["Optimiser(rules...)"][0] == "chain"
