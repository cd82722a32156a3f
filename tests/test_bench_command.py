"""The benchmark command (gpuopt/bench/) on NumPy, kept fast: tiny sizes, a tiny model, no
PyTorch. Also: bytes per element against the hand count, the unfused baselines against gpuopt's
NumPy path (the baselines are the same math), and the GPU targets' logic on a synthetic report."""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gpuopt
from gpuopt import bench
from gpuopt.__main__ import build_parser
from gpuopt.arguments import parse_rules, parse_sizes
from gpuopt.bench.devices import COPY_BYTES
from gpuopt.bench.report import format_report, plot_report, write_json
from gpuopt.bench.targets import evaluate_targets
from gpuopt.bench.workload import CHAIN, RULES, bytes_per_element, gpt2_shapes
from gpuopt.dispatch import gpu_available
from gpuopt.plain import Unfused

from .cases import ALL, SignMomentum

TINY = ["--backend", "numpy", "--sizes", "10,12", "--rules", "ADAM,Descent,Clip+WD+ADAM",
        "--repeats", "2", "--warmup", "1", "--model-layers", "1", "--model-width", "8",
        "--no-torch", "--quiet"]


def _args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["bench", *argv])


@pytest.fixture(autouse=True)
def small_copy_buffer(monkeypatch):
    monkeypatch.setitem(COPY_BYTES, "numpy", 8 << 20)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny NumPy run through run(): its exit status, stdout, and the JSON it wrote."""
    mp = pytest.MonkeyPatch()
    mp.setitem(COPY_BYTES, "numpy", 8 << 20)
    out = io.StringIO()
    mp.setattr(sys, "stdout", out)
    path = tmp_path_factory.mktemp("bench") / "result.json"
    try:
        status = bench.run(_args([*TINY, "--json", str(path)]))
    finally:
        mp.undo()
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    return status, out.getvalue(), report


# -- bytes per element ---------------------------------------------------------------------

#: bytes a step moves per element for float32 parameters, counted by hand (x and g read, x
#: written, each state slot read and written)
COUNTED_BYTES_FLOAT32 = {
    "Descent": 12, "Momentum": 20, "Nesterov": 20, "RMSProp": 20, "ADAGrad": 20,
    "ADAM": 28, "RADAM": 28, "AdaMax": 28, "NADAM": 28, "ADADelta": 28, "AMSGrad": 36,
}


@pytest.mark.parametrize("name", list(COUNTED_BYTES_FLOAT32))
def test_bytes_per_element_matches_the_hand_count(name):
    assert bytes_per_element(RULES[name](), "float32") == COUNTED_BYTES_FLOAT32[name]


def test_bytes_per_element_general():
    assert bytes_per_element(gpuopt.ADAMW(), np.float32) == 28
    assert bytes_per_element(RULES[CHAIN](), np.float32) == 28
    # float16 parameters keep float32 state: 3 * 2 + 2 slots * 2 * 4
    assert bytes_per_element(gpuopt.ADAM(), np.float16) == 22
    assert bytes_per_element(gpuopt.ADAM(), np.float64) == 56
    assert bytes_per_element(gpuopt.AMSGrad(), np.float16) == 6 + 24
    # a custom rule counts its own slots; a ClipNorm pass also reads g once more
    assert bytes_per_element(SignMomentum(), np.float32) == 20
    assert bytes_per_element(gpuopt.Optimiser(gpuopt.ClipNorm(1.0), gpuopt.ADAM()), np.float32) == 32
    # the reduction recomputes the rules before it: it reads their state too
    chain = gpuopt.Optimiser(gpuopt.Momentum(), gpuopt.ClipNorm(1.0))
    assert bytes_per_element(chain, np.float32) == 20 + 4 + 4


# -- the unfused baselines are the same math ------------------------------------------------

AGREE = [name for name in ALL if "SignMomentum" not in name]
TOL = {"float64": 1e-12, "float32": 2e-5, "float16": 2e-3}


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("case", AGREE)
def test_unfused_matches_gpuopt(case, dtype):
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(3001).astype(dtype)
    x_fused, x_plain = x0.copy(), x0.copy()
    opt, plain = ALL[case](), Unfused(ALL[case](), np)
    for _ in range(8):  # RADAM in cases rectifies from step 6; ExpDecay decays every 3-4 steps
        g = (2 * rng.standard_normal(x0.shape)).astype(dtype)
        g_copy = g.copy()
        gpuopt.update(opt, x_fused, g)
        with np.errstate(all="ignore"):
            plain.step(x_plain, g)
        np.testing.assert_array_equal(g, g_copy)  # the baseline does not touch the gradient
    assert x_plain.dtype == x0.dtype
    scale = np.abs(x0.astype(np.float64)).max()
    np.testing.assert_allclose(x_plain.astype(np.float64), x_fused.astype(np.float64),
                               rtol=TOL[dtype], atol=TOL[dtype] * scale, err_msg=case)
    assert not np.array_equal(x_plain, x0)


def test_unfused_many_tensors_keeps_state_per_tensor():
    rng = np.random.default_rng(1)
    params = [rng.standard_normal(n).astype(np.float32) for n in (5, 70, 300)]
    copies = [p.copy() for p in params]
    opt, plain = gpuopt.ADAM(0.01), Unfused(gpuopt.ADAM(0.01), np)
    for _ in range(4):
        grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
        gpuopt.update(opt, params, grads)
        plain.step_many(copies, grads)
    for a, b in zip(params, copies):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_unfused_by_rule_name_equals_unfused_of_the_rule():
    rng = np.random.default_rng(2)
    x_named, x_rule = rng.standard_normal(50), rng.standard_normal(50)
    x_rule[...] = x_named
    named, of_rule = Unfused.by_name("NADAM", np, 0.01, eps=1e-4), Unfused(gpuopt.NADAM(0.01, eps=1e-4), np)
    for _ in range(5):
        g = rng.standard_normal(50)
        named.step(x_named, g)
        of_rule.step(x_rule, g)
    np.testing.assert_array_equal(x_named, x_rule)
    with pytest.raises(TypeError, match="thresh"):
        Unfused.by_name("ClipNorm", np)


def test_unfused_rejects_rules_without_a_formula():
    with pytest.raises(NotImplementedError, match="SignMomentum"):
        Unfused(gpuopt.Optimiser(gpuopt.ClipValue(1.0), SignMomentum()), np)


# -- options ------------------------------------------------------------------------------


def test_parse_sizes():
    assert parse_sizes("16-18") == [16, 17, 18]
    assert parse_sizes("12,10") == [10, 12]
    assert parse_sizes("10, 16-17,10") == [10, 16, 17]
    for bad in ("", "a", "18-16", "40", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_sizes(bad)


def test_parse_rules():
    everything = parse_rules("all")
    assert [name for name, _ in everything] == list(RULES) and CHAIN in RULES
    names = [name for name, _ in parse_rules("adam, clip+wd+adam,Descent,ADAM")]
    assert names == ["ADAM", CHAIN, "Descent"]
    (name, factory), = parse_rules("ClipNorm(1)+ADAM(1e-3, (0.9, 0.99))")
    rule = factory()
    assert name == "ClipNorm(1)+ADAM(1e-3, (0.9, 0.99))"
    assert isinstance(rule, gpuopt.Optimiser) and rule[1].beta == (0.9, 0.99)
    assert factory() is not rule  # a fresh rule (fresh state) each time
    with pytest.raises(argparse.ArgumentTypeError, match="unknown rule"):
        parse_rules("ADAMM")


def test_gpt2_shapes():
    shapes = gpt2_shapes()
    assert len(shapes) == 148
    assert sum(math.prod(s) for _, s in shapes) == 124_439_808
    assert dict(shapes)["wte"] == (50257, 768)
    assert dict(shapes)["h.11.mlp.c_proj.weight"] == (3072, 768)


# -- the command -------------------------------------------------------------------------


def test_bench_runs_on_numpy_and_writes_json(tiny_run):
    status, out, report = tiny_run
    assert status == 0
    assert {"device", "date", "versions", "config", "copy_bandwidth", "results", "skipped", "model",
            "targets"} <= set(report)
    assert report["device"]["backend"] == "numpy" and report["device"]["name"]
    assert {"gpuopt", "numpy", "cupy", "torch"} <= set(report["versions"])
    assert report["versions"]["gpuopt"] == gpuopt.__version__
    assert report["copy_bandwidth"]["gbps"] > 0
    got = {(r["rule"], r["log2"]) for r in report["results"]}
    assert got == {(rule, k) for rule in ("ADAM", "Descent", CHAIN) for k in (10, 12)}
    for r in report["results"]:
        assert r["elements"] == 2 ** r["log2"]
        assert r["bytes_per_element"] == {"ADAM": 28, "Descent": 12, CHAIN: 28}[r["rule"]]
        assert r["time_s"] > 0 and r["gbps"] > 0 and r["pct_copy"] > 0
        assert math.isclose(r["gbps"], r["bytes"] / r["time_s"] / 1e9)
        unfused = r["baselines"]["unfused"]
        assert unfused["time_s"] > 0
        assert math.isclose(unfused["time_ratio"], r["time_s"] / unfused["time_s"])
        assert "torch" not in r["baselines"]  # --no-torch
    model = report["model"]
    assert model["tensors"] == 16
    assert model["parameters"] == sum(math.prod(s) for s in model["shapes"].values())
    assert {"multi_tensor", "per_tensor_loop", "flat", "unfused"} <= set(model["variants"])
    statuses = {t["id"]: t["status"] for t in report["targets"]}
    assert statuses["numpy_adam_vs_plain"] == "not measured"  # 2^24 was not run
    assert all(statuses[t] == "not measured" for t in statuses if t.startswith("gpu_"))
    for heading in ("time/step", "GB/s", "% copy", "x unfused", "targets:", "[not measured]"):
        assert heading in out


def test_model_compares_gpuopt_torch_optimizer_with_torch_fused_adam(capsys):
    """Benchmark item: gpuopt.torch.Optimizer's step against torch.optim.Adam(fused=True) on the
    same (tiny) model's tensors, side by side in one run, in the JSON and the text."""
    pytest.importorskip("torch")
    argv = [a for a in TINY if a != "--no-torch"]
    argv[argv.index("--rules") + 1] = "Descent"
    argv[argv.index("--sizes") + 1] = "10"
    report = bench.benchmark(bench.config_from_args(_args([*argv, "--no-baselines"])))
    variants = report["model"]["variants"]
    for name in ("torch_fused", "gpuopt_torch"):
        assert variants[name]["time_s"] > 0, variants[name]
    ratio = variants["gpuopt_torch"]["time_ratio_to_torch_fused"]
    assert ratio == variants["gpuopt_torch"]["time_s"] / variants["torch_fused"]["time_s"]
    assert "gpuopt.torch.Optimizer" in format_report(report)


def test_json_to_a_directory_is_named_by_device_and_date(tiny_run, tmp_path):
    path = write_json(tiny_run[2], str(tmp_path) + "/")
    assert path.startswith(str(tmp_path)) and path.endswith(f"-numpy-float32-{tiny_run[2]['date'][:10]}.json")
    with open(path, encoding="utf-8") as f:
        assert json.load(f)["results"] == tiny_run[2]["results"]


def test_plot_writes_png(tiny_run, tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_report(tiny_run[2], str(tmp_path / "bench.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_fails_before_running(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setattr(bench, "benchmark", lambda *a, **k: pytest.fail("ran without matplotlib"))
    assert bench.run(_args([*TINY, "--plot", str(tmp_path / "x.png")])) == 2
    assert "matplotlib" in capsys.readouterr().err


@pytest.mark.skipif(gpu_available(), reason="checks the message shown where no GPU is usable")
def test_backend_cupy_without_gpu(capsys):
    assert bench.run(_args(["--backend", "cupy", "--no-model"])) == 2
    assert "needs a GPU" in capsys.readouterr().err


def test_numpy_target_is_evaluated_at_2_24(monkeypatch):
    """Only the wiring (ADAM at 2^24 vs its unfused baseline) is tested: times are faked."""
    report = _synthetic_report("numpy")
    report["results"] = [_result("ADAM", 24, 0.03, unfused=0.1)]
    target = {t["id"]: t for t in evaluate_targets(report)}["numpy_adam_vs_plain"]
    assert target["status"] == "met" and math.isclose(target["value"], 0.3)
    report["results"] = [_result("ADAM", 24, 0.05, unfused=0.1)]
    assert {t["id"]: t for t in evaluate_targets(report)}["numpy_adam_vs_plain"]["status"] == "not met"


def test_gpu_targets_on_a_synthetic_report():
    report = _synthetic_report("cupy")
    copy = report["copy_bandwidth"]["gbps"]
    ideal = 28 * 2**28 / (copy * 1e9)
    report["results"] = [
        _result("ADAM", 28, ideal * 1.05, unfused=ideal * 4, torch_fused=ideal * 1.2, copy=copy),
        _result(CHAIN, 28, ideal * 1.2, copy=copy),
    ]
    report["model"] = {"tensors": 148, "parameters": 124_439_808, "layers": 12, "width": 768,
                       "dtype": "float32", "variants": {
        "multi_tensor": {"time_s": 1.0e-3, "gbps": 3.5e3, "host_time_us": 40.0},
        "flat": {"time_s": 0.95e-3, "gbps": 3.7e3, "time_ratio": 1.0 / 0.95},
        "torch_fused": {"time_s": 0.9e-3, "gbps": 3.9e3, "time_ratio": 1.0 / 0.9},
    }}
    got = {t["id"]: (t["status"], t["value"]) for t in evaluate_targets(report)}
    assert got["gpu_adam_copy_bandwidth"][0] == "met"
    assert math.isclose(got["gpu_adam_copy_bandwidth"][1], 1.05)
    assert got["gpu_adam_vs_torch_fused"][0] == "met"
    assert got["gpu_model_vs_torch_fused"][0] == "not met"
    assert got["gpu_model_vs_flat"][0] == "met"
    assert got["gpu_host_time"] == ("met", pytest.approx(40.0))
    assert got["gpu_chain_vs_adam"][0] == "not met"
    assert got["numpy_adam_vs_plain"][0] == "not measured"
    report["config"]["dtype"] = "float16"
    assert all(t["status"] == "not measured" for t in evaluate_targets(report))
    text = format_report({**report, "targets": evaluate_targets(report)})
    assert "[not measured]" in text and "x torch fused" in text


def _synthetic_report(backend: str) -> dict:
    return {
        "kind": "rules", "device": {"backend": backend, "name": "test device"},
        "config": {"dtype": "float32", "timer": "test", "repeats": 1}, "native_build": None,
        "copy_bandwidth": {"gbps": 3000.0, "method": "test", "gbps_by_method": {"test": 3000.0}},
        "results": [], "skipped": [], "model": None, "notes": [],
    }


def _result(rule, log2, time_s, copy=3000.0, **baselines):
    n = 2**log2
    bpe = 28
    return {
        "rule": rule, "log2": log2, "elements": n, "bytes_per_element": bpe, "bytes": bpe * n,
        "time_s": time_s, "gbps": bpe * n / time_s / 1e9, "pct_copy": 100 * bpe * n / time_s / 1e9 / copy,
        "baselines": {k: {"time_s": v, "time_ratio": time_s / v} for k, v in baselines.items()},
    }


# -- timing ------------------------------------------------------------------------------------


def test_steps_timed_together_take_one_repeat_each_a_round_in_changing_orders():
    """A machine whose speed drifts during a run must not favour whichever ran first."""
    from gpuopt.bench.devices import Machine

    calls = []
    steps = {name: (lambda name=name: calls.append(name), None) for name in ("a", "b", "c")}
    timed = Machine("numpy").time_steps(steps, repeats=6, warmup=0, target_s=0.0)
    rounds = [tuple(calls[k:k + 3]) for k in range(3, len(calls), 3)]  # (after one calibration step each)
    assert len(rounds) == 6 and all(sorted(r) == ["a", "b", "c"] for r in rounds)  # each once a round
    assert len({r[0] for r in rounds}) > 1 and len({r[-1] for r in rounds}) > 1  # no fixed first or last
    assert set(timed) == {"a", "b", "c"} and all(t["repeats"] == 6 for t in timed.values())


def test_every_repeat_follows_a_pause_on_the_cpu(monkeypatch):
    """Each candidate starts alike: no other's spinning threads, the caches as a pause leaves them."""
    from gpuopt.bench import devices

    events = []
    monkeypatch.setattr(devices.time, "sleep", lambda s: events.append(("pause", s)))
    steps = {name: (lambda name=name: events.append(name), None) for name in ("gpuopt", "torch_fused")}
    devices.Machine("numpy").time_steps(steps, 2, 0, 0.0)
    pause = ("pause", devices.SETTLE_S)
    assert events[2::2] == [pause] * 4 and sorted(events[3::2]) == ["gpuopt"] * 2 + ["torch_fused"] * 2


class _FailsFirstStep:
    def __init__(self, *args):
        pass

    def step_many(self, *args):
        raise RuntimeError("no such baseline\nsecond line")


def _fails_to_set_up(*args):
    raise RuntimeError("no such baseline\nsecond line")


@pytest.mark.parametrize("broken", [_fails_to_set_up, _FailsFirstStep], ids=["set up", "first step"])
def test_a_failing_baseline_is_noted_and_the_run_goes_on(monkeypatch, broken):
    from gpuopt.bench import runner

    monkeypatch.setattr(runner, "Unfused", broken)
    report = bench.benchmark(bench.config_from_args(_args([*TINY, "--no-model"])))
    assert all(r["baselines"]["unfused"] == {"error": "RuntimeError: no such baseline"} for r in report["results"])
    assert all("time_s" in r for r in report["results"])
    assert "unfused at 2^10 ADAM failed: RuntimeError: no such baseline" in report["notes"]


# -- the GPU run's script, rehearsed ----------------------------------------------------------

@pytest.mark.skipif(gpu_available(), reason="on a GPU the script is the run itself, not a rehearsal")
def test_gpu_run_script_on_the_cpu_reports_every_step_and_fails_with_any(tmp_path):
    """``benchmarks/gpu_run.sh --quick``, the one call a lent GPU gets, run here with tiny
    benchmark settings: every step runs and leaves its files; the step that needs a GPU (host
    time with real launches) fails and another is stopped at a time limit of 1 s, and both
    show in the summary and the exit status while every other step still runs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python3 = bin_dir / "python3"  # (the script calls python3, as on the GPU machine: this one, in its environment)
    python3.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python3.chmod(0o755)
    out = tmp_path / "results"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "GPU_RUN_LIMITS": "300 300 300 1 300"}
    run = subprocess.run(["bash", str(root / "benchmarks" / "gpu_run.sh"), "--quick", str(out), "--sizes", "10",
                          "--repeats", "1", "--no-model", "--no-torch"],
                         env=env, capture_output=True, text=True, timeout=600)
    found = re.search(r"== summary: (unknown-gpu-\d{4}-\d\d-\d\d-quick), \d+ s ==", run.stdout)
    assert found, run.stdout[-3000:] + run.stderr[-3000:]
    stamp, summary = found.group(1), run.stdout[found.start():]
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    for line in ("tests: exit 0", "bench: exit 0", "host time, real launches: exit 2",
                 "host time, nothing launched: stopped after its limit of 1 s", "sanitizer tests: exit 0"):
        assert f"\n{line}\n" in summary
    assert len([line for line in summary.splitlines() if " deselected in " in line]) == 2  # both pytest runs' ends
    tests, sanitizer = (out / f"{stamp}-pytest.txt").read_text().split("test session starts")[1:]
    assert "test_kernels_under_compute_sanitizer" not in tests  # (the GPU tests skip here)
    assert "compute_sanitizer[memcheck" in sanitizer and "compute_sanitizer[racecheck" in sanitizer
    assert "needs CuPy and a usable CUDA GPU" in (out / f"{stamp}-host.txt").read_text()
    assert f"{stamp}-host.json: not written" in summary and f"{stamp}-host-noop.json: not written" in summary
    # At most the eight files a lent device returns: here all but the two host-time reports.
    assert sorted(path.name for path in out.iterdir()) == sorted(
        f"{stamp}-{name}" for name in ("machine.txt", "pytest.txt", "bench.txt", "bench.json", "bench.png", "host.txt"))
    assert "CUDA headers for NVRTC:" in (out / f"{stamp}-machine.txt").read_text()
    targets = json.loads((out / f"{stamp}-bench.json").read_text())["targets"]
    assert targets and all(t["description"] in summary for t in targets)  # every target, a line each
