"""The training application end to end on the real MNIST (TFDS, prepared offline).

Quick tests: the data, and every user mistake exits non-zero with one line and leaves no run dir.
Slow tests (``-m slow``): real training runs, the quality bar, kill -9 and resume, the CLI.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import MANUAL_DIR, REPO, SYNTHETIC_TRAIN, manual_dir_available

from cae import checkpoints, config, data, experiment, report, rundir, train

SMOKE = REPO / "configs" / "smoke.yaml"


def _cfg(mnist_dirs, tmp_path, *overrides, path=SMOKE):
    sets = [f"data.data_dir={mnist_dirs['data_dir']}", f"output.dir={tmp_path / 'run'}",
            "output.progress=off"]
    if mnist_dirs["manual_dir"]:
        sets.append(f"data.manual_dir={mnist_dirs['manual_dir']}")
    return config.load_config(path, [*sets, *overrides])


def _main(capsys, mnist_dirs, tmp_path, *overrides, path=SMOKE):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    sets = [f"data.data_dir={mnist_dirs['data_dir']}", f"output.dir={tmp_path / 'run'}",
            "output.progress=off"]
    argv = ["--config", str(path)]
    for s in [*sets, *overrides]:
        argv += ["--set", s]
    code = train.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def _idx_images(path: Path) -> np.ndarray:
    """Independent reader of the original MNIST idx archive: 16-byte header, then uint8."""
    raw = gzip.decompress(path.read_bytes())
    n, h, w = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
    return np.frombuffer(raw, np.uint8, offset=16).reshape(n, h, w, 1)


def _multiset(images: np.ndarray) -> list[bytes]:
    return sorted(hashlib.sha1(im.tobytes()).digest() for im in images)


def test_mnist_arrays_are_the_original_archives(mnist):
    assert mnist.train.shape == (60000, 28, 28, 1) and mnist.train.dtype == np.uint8
    assert mnist.test.shape == (10000, 28, 28, 1) and mnist.test.dtype == np.uint8
    if not manual_dir_available():
        pytest.skip("original archives not available to compare with")
    # TFDS reorders examples; compare the multisets of images with the raw idx files.
    assert _multiset(mnist.test) == _multiset(_idx_images(MANUAL_DIR / "t10k-images-idx3-ubyte.gz"))
    assert _multiset(mnist.train) == _multiset(
        _idx_images(MANUAL_DIR / "train-images-idx3-ubyte.gz"))


def test_normalize_scales_to_unit_interval(mnist):
    x = data.normalize(mnist.test[:100])
    assert x.dtype == np.float32 and x.min() == 0.0 and x.max() == 1.0


def test_max_train_examples_takes_a_prefix(mnist_dirs, mnist):
    small = data.load_dataset("mnist", max_train_examples=100, **mnist_dirs)
    np.testing.assert_array_equal(small.train, mnist.train[:100])
    assert small.test.shape == mnist.test.shape  # the test split is never cut


def test_corrupt_manual_dir_is_rejected_by_tfds_checksums(tmp_path):
    """Archives with MNIST's names but not its bytes (a truncated download, another dataset's
    files): TFDS's registered checksums refuse them, in one line."""
    manual = tmp_path / "manual"
    manual.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (manual / name).write_bytes(gzip.compress(name.encode() * 100))
    with pytest.raises(data.DataError, match=r"data\.manual_dir=.*wrong checksum") as info:
        data.load_dataset("mnist", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_tfds_prepares_mnist_offline_from_the_manual_dir(tmp_path):
    """The real path a newcomer takes: an empty data dir, the four archives, TFDS prepares."""
    if not manual_dir_available():
        pytest.skip(f"MNIST archives not found in {MANUAL_DIR}")
    ds = data.load_dataset("mnist", data_dir=str(tmp_path / "tfds"), manual_dir=str(MANUAL_DIR))
    assert ds.train.shape == (60000, 28, 28, 1) and ds.test.shape == (10000, 28, 28, 1)
    assert (tmp_path / "tfds" / "mnist").is_dir()


# ----------------------------------------------------------------------------------------------
# User mistakes: one line, non-zero exit, no run dir
# ----------------------------------------------------------------------------------------------

BAD_RUNS = [
    (["data.name=not_a_dataset"], r"data\.name='not_a_dataset': not a TFDS dataset"),
    (["data.name=glue/cola"], r"data\.name='glue/cola': not an image dataset"),
    (["data.name=fashion_mnist", "data.manual_dir=/nonexistent/folder"],
     r"data\.manual_dir='/nonexistent/folder': no such folder; it must hold .*ubyte\.gz"),
    (["model.kernel_size=[3, 3, 11]", "model.features=[4, 4, 4]", "model.strides=2"],
     r"model \(images 28x28\): encoder layer 2: kernel size 11 along H is larger"),
    (["train.batch_size=5000"], r"train\.batch_size=5000: larger than the 4096 training"),
    (["train.epochs=0"], r"train\.epochs=0: must be >= 1"),
    (["model.strides=0"], r"model\.strides=0: must be >= 1"),
    (["train.learning_rate=inf"], r"train\.learning_rate=inf: must be a finite number"),
    (["model.unknown=3"], r"--set model\.unknown: unknown key"),
    (["train.epochs"], r"--set 'train\.epochs': expected section\.key=value"),
    (["train.warmup_steps=3000000000"], r"train\.warmup_steps=3000000000: must be <= 2147483647"),
    (["data.max_train_examples=70000"],  # on the quick tier's synthetic "mnist"
     rf"data\.max_train_examples=70000: 'mnist' has only {SYNTHETIC_TRAIN} training examples"),
]


@pytest.mark.parametrize("overrides,message", BAD_RUNS, ids=lambda v: str(v)[:40])
def test_user_mistakes_exit_2_with_one_line_and_no_run_dir(capsys, synthetic_mnist_dirs, tmp_path,
                                                           overrides, message):
    code, out, err = _main(capsys, synthetic_mnist_dirs, tmp_path, *overrides)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in err + out
    assert not (tmp_path / "run").exists()


def test_missing_config_file_and_bad_flags(capsys, tmp_path):
    assert train.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "missing.yaml: file not found" in err
    with pytest.raises(SystemExit) as info:
        train.main(["--config", "x.yaml", "--bogus"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "unrecognized arguments: --bogus" in err


def test_foreign_output_dir_is_not_touched(capsys, synthetic_mnist_dirs, tmp_path):
    foreign = tmp_path / "run"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    code, _, err = _main(capsys, synthetic_mnist_dirs, tmp_path)
    assert code == 2 and "is not a cae run directory" in err
    assert (foreign / "thesis.tex").read_text() == "precious"
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]


# ----------------------------------------------------------------------------------------------
# Real training runs
# ----------------------------------------------------------------------------------------------

REQUIRED_SUMMARY = {"test_mse", "test_psnr", "num_params", "tied", "epochs",
                    "train_images_per_sec", "num_devices", "wall_time_s"}
REQUIRED_METRICS = {"epoch", "train_loss", "test_mse", "test_psnr", "wall_time_s",
                    "images_per_sec"}


@pytest.mark.slow
def test_smoke_run_produces_a_complete_run_dir(capsys, mnist_dirs, mnist, tmp_path):
    cfg = _cfg(mnist_dirs, tmp_path, "train.epochs=2")
    summary = train.train_and_evaluate(cfg)
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text()) == summary
    assert REQUIRED_SUMMARY <= set(summary)
    assert summary["tied"] is True and summary["epochs"] == 2 and summary["num_devices"] == 1
    assert summary["test_mse"] < summary["initial_test_mse"] / 4  # it learned
    assert summary["test_psnr"] == pytest.approx(10 * np.log10(1 / summary["test_mse"]))
    assert summary["train_images_per_sec"] > 0
    # smoke.yaml's code, 7x7x16, has as many numbers as the image: nothing to compare with PCA.
    assert summary["code_size"] == 784 and "pca_test_mse" not in summary
    # test_mse is the mean over the *whole* test split: recompute it independently here.
    state = experiment.create_train_state(cfg, (28, 28, 1), 1)
    restored, _ = checkpoints.Checkpointer(run).restore(2, experiment.state_tree(state))
    state = state.replace(**restored)
    x = data.normalize(mnist.test)
    recon = np.concatenate([np.asarray(train.eval_step(state, mnist.test[i:i + 2500])[1])
                            for i in range(0, 10000, 2500)])
    assert summary["test_mse"] == pytest.approx(float(np.mean((recon - x) ** 2)), rel=1e-5)

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(REQUIRED_METRICS <= set(r) for r in records)
    assert config.from_dict(yaml.safe_load((run / "config.yaml").read_text())) == cfg
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [
        "1", "2"]
    import matplotlib.image

    png = matplotlib.image.imread(run / "reconstructions.png")
    assert png.ndim == 3 and png.shape[1] > png.shape[0] > 100

    # A finished run is not overwritten silently ...
    code, _, err = _main(capsys, mnist_dirs, tmp_path, "train.epochs=2")
    assert code == 2 and "holds a finished run" in err and "output.overwrite=true" in err
    assert json.loads((run / "summary.json").read_text()) == summary
    # ... but is replaced on request, and the same seed gives the same result bit for bit.
    code, out, _ = _main(capsys, mnist_dirs, tmp_path, "train.epochs=2", "output.overwrite=true")
    assert code == 0 and "done:" in out
    again = json.loads((run / "summary.json").read_text())
    assert again["test_mse"] == summary["test_mse"]
    assert again["train_loss"] == summary["train_loss"]


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_error_and_no_summary(capsys, mnist_dirs, tmp_path):
    code, _, err = _main(capsys, mnist_dirs, tmp_path, "train.learning_rate=1e30",
                         "train.optimizer=sgd")
    assert code == 1
    assert err.strip().count("\n") == 0 and "train loss became nan" in err.lower()
    assert "train.learning_rate" in err
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.slow
def test_quality_bar_on_full_mnist(mnist_dirs, tmp_path):
    """Issue 15's bars for the default config, as the README runs it: a code of at most 64
    numbers whose test MSE is at most 1/4 of PCA's with as many components (fitted on the same
    train split), and a linear probe of its codes at least as good as PCA's codes'."""
    cfg = _cfg(mnist_dirs, tmp_path, path=REPO / "configs" / "mnist_tied.yaml")
    summary = train.train_and_evaluate(cfg)
    assert summary["code_size"] <= 64, summary
    assert summary["test_mse"] <= summary["pca_test_mse"] / 4, summary
    assert summary["mse_ratio_to_pca"] >= 4
    assert summary["test_mse"] < summary["initial_test_mse"] / 20
    assert summary["linear_probe_acc"] >= summary["pca_probe_acc"], summary


@pytest.mark.slow
def test_untied_default_trains(mnist_dirs, tmp_path):
    """mnist_untied.yaml (the default's twin), one epoch: it learns and is read against the
    same PCA baseline (the probe, checked for the tied default, is not run here)."""
    cfg = _cfg(mnist_dirs, tmp_path, "train.epochs=1", "train.linear_probe=false",
               path=REPO / "configs" / "mnist_untied.yaml")
    summary = train.train_and_evaluate(cfg)
    assert summary["test_mse"] < summary["initial_test_mse"] / 20
    assert summary["pca_test_mse"] > summary["test_mse"] and summary["linear_probe_acc"] is None
    assert "pca_probe_acc" not in summary


# ----------------------------------------------------------------------------------------------
# Kill -9 and resume; the CLI in a child process
# ----------------------------------------------------------------------------------------------

RESUME_SETS = ["train.epochs=3", "data.max_train_examples=8192", "model.features=[8, 16]"]


def _cli(env, run_dir, *sets, **popen):
    argv = [sys.executable, "-m", "cae.train", "--config", str(SMOKE),
            "--set", f"output.dir={run_dir}", *[a for s in sets for a in ("--set", s)]]
    return subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


@pytest.mark.slow
def test_kill_9_then_resume_matches_an_uninterrupted_run(mnist_dirs, subprocess_env, tmp_path):
    # Reference: the same config run straight through, in this process.
    reference = train.train_and_evaluate(_cfg(mnist_dirs, tmp_path, *RESUME_SETS))
    killed = tmp_path / "killed"
    proc = _cli(subprocess_env, killed, *RESUME_SETS)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not (killed / "summary.json").exists()
    done = metrics.read_text().count("\n")
    assert 1 <= done < 3

    # Resuming with another config is refused, and changes nothing.
    other = _cli(subprocess_env, killed, *RESUME_SETS, "train.learning_rate=0.01")
    _, err = other.communicate(timeout=240)
    assert other.returncode == 2
    assert "holds an unfinished run with another config (train.learning_rate" in err
    assert err.strip().count("\n") == 0

    resumed = _cli(subprocess_env, killed, *RESUME_SETS)
    out, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err
    assert "resuming" in out and "Traceback" not in err
    summary = json.loads((killed / "summary.json").read_text())
    for key in ("test_mse", "train_loss", "num_params", "steps"):
        assert summary[key] == reference[key], key  # bitwise: same floats
    records = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    ref_records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text()
                   .splitlines()]
    assert [r["test_mse"] for r in records] == [r["test_mse"] for r in ref_records]


@pytest.mark.slow
def test_cli_end_to_end_in_a_child_process(subprocess_env, tmp_path):
    proc = _cli(subprocess_env, tmp_path / "cli", "output.progress=off")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "epoch 1/1" in out and "done: test_mse" in out
    assert "Traceback" not in err
    assert not [line for line in err.splitlines() if line.strip()], err  # no log noise
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert summary["test_mse"] < summary["initial_test_mse"] / 4


def test_resume_check_fills_keys_added_since_the_run_was_saved():
    """A run saved before a config key existed resumes under the key's default value, and
    any real difference is still caught."""
    new = config.to_dict(config.load_config(SMOKE))
    old = {s: dict(keys) for s, keys in new.items()}
    del old["train"]["dtype"]
    assert rundir.config_difference(old, new) is None
    changed = {s: dict(keys) for s, keys in new.items()}
    changed["train"]["dtype"] = "bfloat16"
    assert rundir.config_difference(old, changed) == \
        "train.dtype: saved 'float32', now 'bfloat16'"
    new["output"]["progress"] = not new["output"]["progress"]  # free to differ
    assert rundir.config_difference(old, new) is None


@pytest.mark.parametrize("test_mse,pca,says", [(0.0036, 0.01521, "4.22x lower than PCA"),
                                               (0.0018, 0.00107, "1.68x higher than PCA: worse")])
def test_summary_line_reads_the_mse_against_pca_either_way(test_mse, pca, says):
    summary = {"test_mse": test_mse, "initial_test_mse": 0.2, "code_size": 32,
               "pca_test_mse": pca, "mse_ratio_to_pca": pca / test_mse, "test_psnr": 24.0,
               "num_params": 10, "train_images_per_sec": 1.0}
    line = report.summary_line(summary)
    assert says in line, line
