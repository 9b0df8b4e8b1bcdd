"""The benchmark scripts run end to end at tiny sizes (their figures are not checked here: speed
is measured by running them, see BENCHMARKS.md). bench_ops.py checks every method's gradients
against autodiff and exits non-zero if one differs."""

from __future__ import annotations

import re
import subprocess

import pytest
from conftest import PYTHON, REPO


def _run(args, env=None):
    proc = subprocess.run([PYTHON, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bench_ops_runs_and_checks_every_impl():
    out = _run(["scripts/bench_ops.py", "--batch", "8", "--reps", "1", "--no-torch",
                "--impls", "auto,lax,subpixel,phase,autodiff"])
    rows = {line.split()[0]: line for line in out.splitlines()
            if re.match(r"^(dec1|dec2|dec3|large|decoder)\s", line)}
    assert set(rows) == {"dec1", "dec2", "dec3", "large", "decoder"}
    assert all(line.count(" ms (") == 5 for line in rows.values())  # one cell per method


@pytest.mark.slow
def test_bench_training_runs(subprocess_env):
    out = _run(["scripts/bench.py", "--steps", "3", "--rounds", "1", "--no-torch",
                "--set", "train.batch_size=32", "--set", "data.max_train_examples=1024"],
               env=subprocess_env)
    rates = dict(re.findall(r"^(jax [a-z ,-]+?)\s+(\d+)\s", out, re.M))
    assert "jax per-step" in rates and "jax scan" in rates
    assert all(int(v) > 0 for v in rates.values())
    assert "whole epoch as one program: 32 steps" in out
