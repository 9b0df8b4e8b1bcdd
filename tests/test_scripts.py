"""The benchmark scripts run end to end at tiny sizes (their figures are not checked here: speed
is measured by running them, see BENCHMARKS.md). bench_ops.py checks every method's gradients
against autodiff and exits non-zero if one differs.

Running a benchmark (the ``run_benchmark`` fixture) compiles many programs, so those tests are in
the full tier only; rejecting bad arguments compiles nothing and stays quick."""

from __future__ import annotations

import re
import subprocess

from conftest import PYTHON, REPO


def test_bench_ops_runs_and_checks_every_impl(run_benchmark):
    out = run_benchmark(["scripts/bench_ops.py", "--batch", "8", "--reps", "1", "--no-torch",
                         "--impls", "auto,lax,subpixel,phase,autodiff"])
    names = {"wide2", "dec1", "dec2", "dec3", "large", "fc32", "deep3", "decoder", "decoder_wide",
             "decoder_bn"}
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] and
            line.split()[0] in names and line.split()[1] != "sum"}
    assert set(rows) == names
    assert all(line.count(" ms (") == 5 for line in rows.values())  # one cell per method
    sums = [line for line in out.splitlines() if re.match(r"^decoder(_bn|_wide)? sum\s", line)]
    assert len(sums) == 3 and all(line.count(" ms (") == 5 for line in sums)


def test_bench_ops_problems_subset_and_paired_ratios(run_benchmark):
    torch_present = subprocess.run([PYTHON, "-c", "import torch"],
                                   capture_output=True).returncode == 0
    impls = "auto,autodiff,torch" if torch_present else "auto,autodiff"
    out = run_benchmark(["scripts/bench_ops.py", "--batch", "8", "--reps", "3", "--impls",
                         impls, "--problems", "dec3,large"])
    rows = [line.split()[0] for line in out.splitlines()
            if line.split()[:1] and line.split()[0] in {"wide2", "dec1", "dec2", "dec3", "large",
                                                        "decoder", "decoder_bn"}]
    if torch_present:  # the main table, then the paired table: each problem twice
        assert rows == ["dec3", "large", "dec3", "large"], out
        table = out.split("paired by round", 1)[1]
        paired = re.findall(r"([0-9.]+)x \[([0-9.]+)-([0-9.]+)\]", table)
        assert len(paired) == 4  # two problems x (autodiff, auto)
        assert all(float(lo) <= float(med) <= float(hi) for med, lo, hi in paired)
    else:
        assert rows == ["dec3", "large"], out
    assert "decoder sum" not in out  # a step is summed only when all its layers were timed


def test_bench_ops_plain_jit_mode_checks_against_torch(run_benchmark):
    """--plain-jit (issue 21): plain jax.jit vs torch at the named problems, gradients checked
    against torch's (the script exits non-zero on a mismatch), one row per problem."""
    out = run_benchmark(["scripts/bench_ops.py", "--plain-jit", "--reps", "1", "--impls",
                         "auto,gemm", "--problems", "dec_14to28,1d_512,3d_8"])
    rows = {line.split()[0] for line in out.splitlines() if line.split()[:1]
            and line.split()[0] in {"dec_14to28", "1d_512", "3d_8"}}
    assert rows == {"dec_14to28", "1d_512", "3d_8"}, out
    assert "torch" in out


def test_bench_ops_rejects_unknown_problem():
    proc = subprocess.run([PYTHON, "scripts/bench_ops.py", "--problems", "large,nope"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert ("unknown ['nope']; allowed: wide2, dec1, dec2, dec3, large, fc32, deep3, "
            "decoder_wide, decoder_bn, decoder") in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_training_runs(run_benchmark, synthetic_subprocess_env):
    out = run_benchmark(["scripts/bench.py", "--steps", "3", "--rounds", "1", "--no-torch",
                         "--set", "train.batch_size=32", "--set", "data.max_train_examples=1024"],
                        env=synthetic_subprocess_env)
    rates = dict(re.findall(r"^(jax [a-z ,-]+?)\s+(\d+)\s", out, re.M))
    assert "jax per-step" in rates and "jax scan" in rates
    assert all(int(v) > 0 for v in rates.values())
    assert "whole epoch as one program: 32 steps" in out


def test_bench_fc_code_times_both_programs(run_benchmark):
    out = run_benchmark(["scripts/bench_fc_code.py", "--steps", "2", "--rounds", "2",
                         "--set", "train.batch_size=8", "--set", "model.features=[8,16]",
                         "--set", "model.code_size=4"])
    rates = dict(re.findall(r"^(gemm|conv)\s+([0-9.]+) ms/step", out, re.M))
    assert set(rates) == {"gemm", "conv"} and all(float(v) > 0 for v in rates.values())
    assert re.search(r"conv / gemm, paired by round: [0-9.]+x \[[0-9.]+-[0-9.]+\] over 2", out)


def test_probe_baseline_of_an_untrained_model(run_benchmark, subprocess_env):
    """On the real MNIST: its figure is the README's."""
    out = run_benchmark(["scripts/probe_baseline.py", "--config", "configs/smoke.yaml",
                         "--set", "data.max_train_examples=2000"], env=subprocess_env)
    acc = float(re.search(r"linear probe on 2000 train / 10000 test codes: ([0-9.]+)$", out,
                          re.M).group(1))
    assert 0.5 < acc < 1.0  # random ReLU features separate MNIST far above chance (0.1)
