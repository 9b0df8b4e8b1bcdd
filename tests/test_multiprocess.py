"""Two real processes on 127.0.0.1, joined by JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID (gloo collectives on CPU), as docs/reliability.md, *Several hosts*, launches them.

(a) the same numbers as one process with 2 devices, also after resuming past a damaged
checkpoint; (b) only process 0 writes the run dir's own files; (c) run dirs that are not shared
are refused by every process, up front, in one line; (d) SIGTERM during a wait ends a process
promptly; (e) a process lost (kill -9 of the worker, then of the coordinator) ends the other with
one line and exit 75, and the rerun resumes to the bits of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow

SMOKE = REPO / "configs" / "smoke.yaml"
SETS = ["data.max_train_examples=1024", "train.epochs=2", "train.linear_probe=false",
        "output.progress=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(run_dir, *overrides) -> list[str]:
    argv = [sys.executable, "-m", "cae.train", "--config", str(SMOKE)]
    for s in [f"output.dir={run_dir}", *SETS, *overrides]:
        argv += ["--set", s]
    return argv


def _launch(env, run_dirs, *overrides, port=None, umasks=(0o022, 0o077), processes=2):
    """Start processes 0..n-1 of one job (process i writes to run_dirs[i]) -> Popen list."""
    port = port or _free_port()
    procs = []
    for i in range(processes):
        penv = dict(env, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                    JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
        penv.pop("XLA_FLAGS", None)
        procs.append(subprocess.Popen(
            _argv(run_dirs[i], *overrides), env=penv, cwd=REPO, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, umask=umasks[i]))
    return procs


def _family(pid: int) -> list[int]:
    """``pid`` and its children (cae.guard's child runs the training)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return [pid, *map(int, children)]


def _finish(procs, timeout=300):
    return [p.communicate(timeout=timeout) for p in procs]


def _kill(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate()


def _run_job(env, run_dirs, *overrides):
    """Launch the two processes, wait for both, check both exited 0 -> [(stdout, stderr)]."""
    procs = _launch(env, run_dirs, *overrides)
    try:
        outputs = _finish(procs)
    finally:
        _kill(procs)
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return outputs


def _records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_like_one_process_with_two_devices_and_only_process_0_writes(
        subprocess_env, tmp_path):
    shared = tmp_path / "two_processes"
    # Process 1 runs with umask 077: any file it wrote would be private (mode 0600).
    outputs = _run_job(subprocess_env, [shared, shared])
    for out, _ in outputs:
        assert "2 devices" in out and "done: test_mse" in out
    one = tmp_path / "one_process"
    ref = subprocess.run(_argv(one), cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=dict(subprocess_env,
                                  XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    assert ref.returncode == 0, ref.stderr[-3000:]

    # (a) the same numbers, bit for bit.
    s2 = json.loads((shared / "summary.json").read_text())
    s1 = json.loads((one / "summary.json").read_text())
    assert s2["num_devices"] == s1["num_devices"] == 2
    for key in ("test_mse", "train_loss", "initial_test_mse", "steps", "num_params"):
        assert s2[key] == s1[key], key
    assert [r["test_mse"] for r in _records(shared)] == [r["test_mse"] for r in _records(one)]
    # (b) one writer of everything but orbax's checkpoints: one TensorBoard events file, and no
    # file of process 1 (private) anywhere else.
    assert len(list((shared / "tensorboard").glob("events.out.tfevents.*"))) == 1
    ours = [p for p in shared.rglob("*") if p.is_file()
            and "checkpoints" not in p.relative_to(shared).parts[:1]]
    assert {p.name for p in ours} >= {"config.yaml", "metrics.jsonl", "summary.json",
                                      "reconstructions.png", "curves.png"}
    private = [str(p) for p in ours if not p.stat().st_mode & 0o044]
    assert private == []

    # The job resumes an unfinished run, past a damaged newest checkpoint, to the same bits.
    (shared / "summary.json").unlink()
    metadata = shared / "checkpoints" / "2" / "state" / "_METADATA"
    metadata.write_bytes(metadata.read_bytes()[:100])
    outputs = _run_job(subprocess_env, [shared, shared])
    for out, err in outputs:
        assert "from the checkpoint of epoch 1/2" in out and "Traceback" not in err
    assert outputs[0][1].count("warning: the checkpoint of epoch 2 cannot be restored") == 1
    resumed = json.loads((shared / "summary.json").read_text())
    for key in ("test_mse", "train_loss", "steps"):
        assert resumed[key] == s1[key], key


def test_run_dirs_not_shared_by_the_processes_are_refused_up_front(subprocess_env, tmp_path):
    dirs = [tmp_path / "host0" / "run", tmp_path / "host1" / "run"]
    t0 = time.monotonic()
    procs = _launch(subprocess_env, dirs)
    try:
        outputs = _finish(procs, timeout=120)
    finally:
        _kill(procs)
    assert time.monotonic() - t0 < 120  # not orbax's 600 s barrier
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 2, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: output.dir=") and \
            "must be on storage all processes share" in last, last
        assert "Traceback" not in err and "epoch 1" not in out
    assert not dirs[0].exists() and not dirs[1].exists()  # nothing left behind


def test_sigterm_ends_a_process_waiting_for_the_other_promptly(subprocess_env, tmp_path):
    shared = tmp_path / "run"
    procs = _launch(subprocess_env, [shared, shared], "train.epochs=1000")
    try:
        # Process 1 compiled and is training; freeze it: process 0 then waits for it inside a
        # collective (C++), where no Python signal handler runs.
        for line in procs[1].stdout:
            if line.startswith("compiled the training step"):
                break
        else:
            pytest.fail(procs[1].communicate()[1][-3000:])
        for pid in _family(procs[1].pid):  # the guard and its child, which trains
            os.kill(pid, signal.SIGSTOP)
        time.sleep(3)
        t0 = time.monotonic()
        procs[0].send_signal(signal.SIGTERM)
        _, err = procs[0].communicate(timeout=60)
        assert time.monotonic() - t0 < 15
        assert procs[0].returncode == 143, err[-3000:]
        assert err.strip().splitlines()[-1].startswith("interrupted: run the same command")
    finally:
        _kill(procs)

    # Waiting for a process that never comes (in jax.distributed's own connection wait).
    alone = _launch(subprocess_env, [tmp_path / "alone"] * 2, processes=1)
    try:
        time.sleep(4)
        assert alone[0].poll() is None
        t0 = time.monotonic()
        alone[0].send_signal(signal.SIGTERM)
        alone[0].communicate(timeout=60)
        assert time.monotonic() - t0 < 15
        assert alone[0].returncode in (143, -signal.SIGTERM)
    finally:
        _kill(alone)


def test_a_lost_process_ends_the_other_with_one_line_and_the_rerun_resumes(subprocess_env,
                                                                        tmp_path):
    env = dict(subprocess_env, CAE_HEARTBEAT_TIMEOUT_S="10")
    epochs = "train.epochs=4"
    reference = tmp_path / "uninterrupted"
    _run_job(env, [reference, reference], epochs)
    expected = json.loads((reference / "summary.json").read_text())
    for lost, name in ((1, "process 1"), (0, "process 0")):  # the worker, then the coordinator
        run = tmp_path / f"lost_{lost}"
        procs = _launch(env, [run, run], epochs)
        survivor = procs[1 - lost]
        try:
            for line in procs[0].stdout:  # printed once the checkpoint of epoch 1 is committed
                if line.startswith("epoch 1/4:"):
                    break
            else:
                pytest.fail(procs[0].communicate()[1][-3000:])
            procs[lost].kill()  # kill -9: the guard and, with it, its child
            t0 = time.monotonic()
            _, err = survivor.communicate(timeout=180)
            waited = time.monotonic() - t0
        finally:
            _kill(procs)
        assert survivor.returncode == 75, err[-3000:]
        assert waited < 10 + 30, waited  # at once in a collective, else the heartbeat timeout
        lines = err.strip().splitlines()
        assert len(lines) == 1, err[-3000:]
        assert lines[0].startswith(f"error: {name}") and "was lost" in lines[0]
        assert "run the same command again on every process to resume" in lines[0]
        assert not re.search(r"Traceback|Check failure|^F\d{4} |terminate called", err, re.M)
        assert (run / "checkpoints" / "1").is_dir() and not (run / "summary.json").exists()

        outputs = _run_job(env, [run, run], epochs)  # the same command again, on both
        for out, _ in outputs:
            assert "resuming" in out
        resumed = json.loads((run / "summary.json").read_text())
        for key in ("test_mse", "train_loss", "initial_test_mse", "steps"):
            assert resumed[key] == expected[key], (lost, key)
