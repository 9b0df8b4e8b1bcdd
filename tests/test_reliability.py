"""Faults that lose nothing (README, *Reliability*): the run-dir lock, the checkpoint fallback,
storage errors as one line, resumes that only a real change of the computation blocks.

The multi-process tests are in ``test_multiprocess.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from cae import ablate, config, rundir, train

SMOKE = REPO / "configs" / "smoke.yaml"
TINY = ["data.max_train_examples=512", "train.linear_probe=false", "output.progress=false"]


def _main(capsys, mnist_dirs, run_dir, *overrides):
    """``python -m cae.train`` in this process -> (exit code, stdout, stderr)."""
    argv = ["--config", str(SMOKE)]
    for s in [f"data.data_dir={mnist_dirs['data_dir']}", f"output.dir={run_dir}", *TINY,
              *overrides]:
        argv += ["--set", s]
    code = train.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# ----------------------------------------------------------------------------------------------
# The lock
# ----------------------------------------------------------------------------------------------


def test_a_run_dir_in_use_is_refused_and_a_dead_owner_never_blocks(capsys, mnist_dirs,
                                                                   tmp_path):
    run = tmp_path / "run"
    # Another process (say, a job thought dead) holds the run dir.
    owner = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from cae import rundir; "
         "lock = rundir.lock_run_dir(sys.argv[1]); print('locked', flush=True); time.sleep(600)",
         str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert owner.stdout.readline().strip() == "locked"
        code, _, err = _main(capsys, mnist_dirs, run)
        assert code == 2
        line = _one_error_line(err)
        assert f"is in use by pid {owner.pid} on host {os.uname().nodename}" in line
        assert sorted(p.name for p in run.iterdir()) == [rundir.LOCK_FILE]  # untouched
    finally:
        owner.send_signal(signal.SIGKILL)  # dies without releasing anything
        owner.wait()
    code, out, err = _main(capsys, mnist_dirs, run)
    assert code == 0, err
    assert (run / "summary.json").exists()


def test_the_lock_is_released_when_the_run_ends_and_a_foreign_dir_gets_no_lock_file(tmp_path):
    lock = rundir.lock_run_dir(tmp_path / "run")
    with pytest.raises(rundir.RunDirError, match=f"in use by pid {os.getpid()}"):
        rundir.lock_run_dir(tmp_path / "run")
    lock.release()
    rundir.lock_run_dir(tmp_path / "run").release()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(rundir.RunDirError, match="is not a cae run directory"):
        rundir.lock_run_dir(foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


# ----------------------------------------------------------------------------------------------
# Checkpoint fallback and resume
# ----------------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.slow
def test_damaged_checkpoints_are_set_aside_and_the_run_resumes_from_an_intact_one(
        capsys, mnist_dirs, tmp_path):
    run = tmp_path / "run"
    code, _, err = _main(capsys, mnist_dirs, run, "train.epochs=3")
    assert code == 0, err
    reference = json.loads((run / "summary.json").read_text())
    # An unfinished run whose two newest checkpoints are damaged: epoch 3 an array file,
    # epoch 2 a metadata file.
    (run / "summary.json").unlink()
    arrays = max((p for p in (run / "checkpoints" / "3" / "state").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
    _truncate(arrays)
    _truncate(run / "checkpoints" / "2" / "state" / "_METADATA")

    # cae.visualize draws the newest intact one, and moves nothing.
    from cae import visualize

    assert visualize.main([str(run), "--out", str(tmp_path / "pictures")]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: the checkpoint of epoch") == 2 and "Traceback" not in err
    assert (tmp_path / "pictures" / "curves.png").exists()
    assert (run / "checkpoints" / "3").is_dir() and not (run / "checkpoints_damaged").exists()

    # Another config is refused, with a hint that deletes nothing.
    code, _, err = _main(capsys, mnist_dirs, run, "train.epochs=3", "train.learning_rate=0.01")
    line = _one_error_line(err)
    assert code == 2 and "another config (train.learning_rate" in line
    assert "rerun with the saved config" in line and "would delete its checkpoints" in line

    # Where the data lie and what only shapes the output do not block the resume.
    data_link = tmp_path / "same_data"
    data_link.symlink_to(mnist_dirs["data_dir"])
    code, out, err = _main(capsys, mnist_dirs, run, "train.epochs=3",
                           f"data.data_dir={data_link}", "output.num_images=3")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "Traceback" not in err
    assert "checkpoint of epoch 3 cannot be restored" in warnings[0]
    assert "checkpoint of epoch 2 cannot be restored" in warnings[1]
    assert "resuming" in out and "from the checkpoint of epoch 1/3" in out
    summary = json.loads((run / "summary.json").read_text())
    for key in ("test_mse", "train_loss", "steps"):
        assert summary[key] == reference[key], key  # retrained epochs 2-3, the same bits
    damaged = sorted(p.name.split("-")[0] for p in (run / "checkpoints_damaged").iterdir())
    assert damaged == ["2", "3"]  # set aside, not deleted
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [
        "1", "2", "3"]

    # No intact checkpoint at all: one line naming the folder and what to do.
    (run / "summary.json").unlink()
    for epoch in ("1", "2", "3"):
        _truncate(run / "checkpoints" / epoch / "state" / "_METADATA")
    code, _, err = _main(capsys, mnist_dirs, run, "train.epochs=3")
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: no checkpoint in ") and str(run / "checkpoints") in last
    assert "run the same command again to start the run afresh" in last
    assert "Traceback" not in err
    assert len(list((run / "checkpoints_damaged").iterdir())) == 5


def test_locations_and_output_only_keys_do_not_block_a_resume():
    saved = config.to_dict(config.load_config(SMOKE))
    now = {s: dict(keys) for s, keys in saved.items()}
    now["data"].update(data_dir="/elsewhere/tfds", manual_dir="/elsewhere/mnist")
    now["output"].update(num_images=3, dir="/elsewhere/run", progress=True)
    assert rundir.config_difference(saved, now) is None
    now["data"]["name"] = "fashion_mnist"
    assert rundir.config_difference(saved, now) == \
        "data.name: saved 'mnist', now 'fashion_mnist'"


@pytest.mark.slow
def test_divergence_in_epoch_1_cites_no_checkpoint(capsys, mnist_dirs, tmp_path):
    code, _, err = _main(capsys, mnist_dirs, tmp_path / "run", "train.learning_rate=1e30",
                         "train.optimizer=sgd")
    line = _one_error_line(err)
    assert code == 1 and "No checkpoint was written (it diverged in epoch 1)" in line
    assert "Last good checkpoint" not in line


# ----------------------------------------------------------------------------------------------
# Storage: one line, exit 3, and nothing left as if complete
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _tmpfs(path: Path, *options: str):
    """A small file system of our own (needs root and mount); skips where there is none."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs",
                              str(path)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_output_dir_under_a_file_is_one_line_and_exit_3(capsys, synthetic_mnist_dirs, tmp_path):
    (tmp_path / "file").write_text("x")
    code, _, err = _main(capsys, synthetic_mnist_dirs, tmp_path / "file" / "run")
    line = _one_error_line(err)
    assert code == 3 and "Not a directory" in line and str(tmp_path / "file") in line


@pytest.mark.slow
def test_read_only_output_dir_is_one_line_and_exit_3(capsys, mnist_dirs, tmp_path):
    from cae import visualize

    code, _, err = _main(capsys, mnist_dirs, tmp_path / "done")
    assert code == 0, err
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
        context = contextlib.nullcontext(tmp_path / "ro")
    else:  # root writes through permissions: a read-only mount instead
        context = _tmpfs(tmp_path / "ro", "ro", "size=64k")
    with context as ro:
        code, _, err = _main(capsys, mnist_dirs, ro / "run")
        line = _one_error_line(err)
        assert code == 3 and str(ro / "run") in line
        assert "Read-only file system" in line or "Permission denied" in line
        code = visualize.main([str(tmp_path / "done"), "--out", str(ro / "pictures")])
        line = _one_error_line(capsys.readouterr().err)
        assert code == 3 and str(ro / "pictures") in line


def _cli(env, run_dir, *overrides, precheck: bool = True) -> subprocess.CompletedProcess:
    """``python -m cae.train`` in a child process: its whole stderr, exit handlers included.
    ``precheck=False``: without the free-space check before a save, so that orbax itself runs
    into the full disk."""
    argv = [sys.executable, "-m", "cae.train", "--config", str(SMOKE)]
    if not precheck:
        argv[1:3] = ["-c", "import sys; from cae import checkpoints, cli, train; "
                           "checkpoints.Checkpointer._check_room = lambda *a: None; "
                           "cli.exit_with(train.main(sys.argv[1:]))"]
    for s in [f"output.dir={run_dir}", *TINY, *overrides]:
        argv += ["--set", s]
    return subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("precheck", [True, False], ids=["before_the_save", "during_the_save"])
def test_disk_full_while_checkpointing_is_one_line_and_the_rerun_finishes(subprocess_env,
                                                                          tmp_path, precheck):
    with _tmpfs(tmp_path / "small", "size=8m") as disk:
        filler = disk / "filler"
        # Leave room for config.yaml, metrics.jsonl and TensorBoard's first events, not for a
        # checkpoint (~60 kB in 4 kB pages).
        filler.write_bytes(b"\0" * (8192 - 24) * 1024)
        full = _cli(subprocess_env, disk / "run", precheck=precheck)
        assert full.returncode == 3, full.stderr
        line = _one_error_line(full.stderr)
        assert "No space left on device" in line and "checkpoint of epoch 1" in line
        assert not (disk / "run" / "summary.json").exists()
        if precheck:
            return  # nothing was written; the rerun below matters after a save cut short
        filler.unlink()  # space again: the same command finishes the run
        again = _cli(subprocess_env, disk / "run")
        assert again.returncode == 0, again.stderr
        assert (disk / "run" / "summary.json").exists()
        assert not list((disk / "run" / "checkpoints").glob("*.orbax-checkpoint-tmp*"))


# ----------------------------------------------------------------------------------------------
# SIGTERM; cae.ablate under several processes
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_stops_a_run_with_one_line_and_exit_143(mnist_dirs, subprocess_env, tmp_path):
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "cae.train", "--config", str(SMOKE)]
    for s in [f"output.dir={run}", *TINY, "train.epochs=200"]:
        argv += ["--set", s]
    proc = subprocess.Popen(argv, env=subprocess_env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.05)
    time.sleep(1.0)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert time.time() - t0 < 10
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("interrupted: run the same command again")
    assert "Traceback" not in err


_SLOW_UNWIND = """
import sys, time
from cae import cli
def body():
    try:
        print("ready", flush=True)
        time.sleep(60)
    finally:
        time.sleep(float(sys.argv[1]))  # e.g. a checkpoint being finished while unwinding
cli.exit_with(cli.run_command(body, "interrupted: again")[0])
"""


@pytest.mark.parametrize("unwind_s", [0.0, 8.0], ids=["prompt", "slower_than_the_grace"])
def test_sigterm_says_its_line_exactly_once_however_long_the_unwinding(synthetic_subprocess_env,
                                                                      unwind_s):
    """The CI failure of 2026-12-06: the handler ran, then unwinding took longer than the
    watchdog's 5 s grace, and the watchdog ended the process without the line."""
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_UNWIND, str(unwind_s)],
                            env=synthetic_subprocess_env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert err.splitlines() == ["interrupted: again"], err
    assert time.time() - t0 < 7.5


_SIGTERM_IN_GC = """
import gc, os, signal, sys, time
from cae import cli

WHERE = sys.argv[1]

armed = [True]


def callback(phase, info):  # as JAX's own gc callback: Python code that runs during a collection
    if phase == "start" and armed[0]:
        armed[0] = False
        os.kill(os.getpid(), signal.SIGTERM)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.5:  # the handler runs here, inside the callback
            pass


class Finalized:
    def __del__(self):  # as TensorFlow's atomic functions' __del__
        callback("start", None)


if WHERE == "gc":
    gc.callbacks.append(callback)


def body():
    if WHERE == "gc":
        gc.collect()
    else:
        Finalized()  # dropped at once: __del__ runs here
    time.sleep(3)  # the Terminated, asked for again, arrives here
    print("not interrupted", flush=True)


code, _ = cli.run_command(body, "interrupted: again")
print("code", code, flush=True)
"""


@pytest.mark.parametrize("where", ["gc", "del"])
def test_sigterm_during_a_gc_callback_is_not_lost_or_printed_as_ignored(
        synthetic_subprocess_env, where):
    """The CI-load failures of 2026-12-07: SIGTERM's Terminated raised inside JAX's gc callback,
    or a TensorFlow __del__, was printed as "Exception ignored in ..." with a traceback, and
    dropped."""
    proc = subprocess.run([sys.executable, "-c", _SIGTERM_IN_GC, where],
                          env=synthetic_subprocess_env, cwd=REPO, capture_output=True, text=True,
                          timeout=30)
    assert proc.stdout.splitlines() == ["code 143"], proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == ["interrupted: again"], proc.stderr


def test_ablate_under_several_processes_is_refused_with_one_line(capsys, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    code = ablate.main(["--config", str(REPO / "configs" / "ablation_tied_vs_untied.yaml")])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "cae.ablate runs as one process" in line
