"""The training loop end to end on generated digits, in the quick tier (no dataset needed).

The data are ``tests/synthetic_data.py``'s seven-segment digits, prepared by TFDS as "mnist" in a
temporary data dir (see conftest.py). The same checks on the real MNIST, with its quality bars,
are in test_train.py's slow tests.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import textwrap

import numpy as np
import pytest
import yaml
from conftest import REPO, SYNTHETIC_TEST, SYNTHETIC_TRAIN
from synthetic_data import synthetic_digits

from cae import config, data, train

SMOKE = REPO / "configs" / "smoke.yaml"


def _digests(images: np.ndarray) -> list[bytes]:
    return [hashlib.sha1(image.tobytes()).digest() for image in images]


def test_tfds_gives_back_the_generated_digits_each_with_its_label(synthetic_mnist,
                                                                  synthetic_mnist_dirs):
    """cae.data reads the synthetic "mnist" as it reads the real one: every generated image
    once, its own label beside it, the train split cut to a prefix on request."""
    for split, seed, n in (("train", 0, SYNTHETIC_TRAIN), ("test", 1, SYNTHETIC_TEST)):
        images, labels = synthetic_digits(n, seed)
        label_of = dict(zip(_digests(images), labels))
        got = getattr(synthetic_mnist, split)
        assert got.shape == (n, 28, 28, 1) and got.dtype == np.uint8
        assert sorted(_digests(got)) == sorted(label_of)  # TFDS reorders the examples
        got_labels = getattr(synthetic_mnist, f"{split}_labels")
        assert [label_of[d] for d in _digests(got)] == got_labels.tolist()
    head = data.load_dataset("mnist", max_train_examples=100, **synthetic_mnist_dirs)
    np.testing.assert_array_equal(head.train, synthetic_mnist.train[:100])
    np.testing.assert_array_equal(head.train_labels, synthetic_mnist.train_labels[:100])
    np.testing.assert_array_equal(head.test, synthetic_mnist.test)


def test_two_epochs_write_a_complete_run_dir_and_learn(synthetic_mnist, tmp_path,
                                                        monkeypatch):
    monkeypatch.setenv("CAE_CACHE_DIR", str(tmp_path / "cache"))  # the PCA baseline's
    run = tmp_path / "run"
    cfg = config.load_config(SMOKE, ["train.epochs=2", "model.code_size=16",
                                     "output.progress=off", f"output.dir={run}"])
    summary = train.train_and_evaluate(cfg, dataset=synthetic_mnist)

    assert json.loads((run / "summary.json").read_text()) == summary
    assert summary["epochs"] == 2 and summary["steps"] == 2 * SYNTHETIC_TRAIN // 64
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[1]["train_loss"] < records[0]["train_loss"]
    assert records[1]["test_mse"] < records[0]["test_mse"] < summary["initial_test_mse"]
    assert summary["test_mse"] < summary["initial_test_mse"] / 4  # it learned
    # A 16-number code against PCA with 16 components, and a probe far above chance (0.1).
    assert summary["code_size"] == 16 and summary["pca_test_mse"] > 0
    assert summary["linear_probe_acc"] > 0.5
    assert config.from_dict(yaml.safe_load((run / "config.yaml").read_text())) == cfg
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [
        "1", "2"]
    assert {"reconstructions.png", "curves.png"} <= {p.name for p in run.glob("*.png")}
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_an_interrupted_run_resumes_from_its_checkpoint_to_the_same_bits(
        capsys, synthetic_mnist_dirs, tmp_path):
    """``python -m cae.train`` (in this process, data from the TFDS data dir): a run cut off
    after epoch 1 ends, when rerun, exactly as the uninterrupted run did."""
    run = tmp_path / "run"
    argv = ["--config", str(SMOKE)]
    for item in ("train.epochs=3", "data.max_train_examples=1024", "train.linear_probe=false",
                 "output.progress=off", f"output.dir={run}",
                 f"data.data_dir={synthetic_mnist_dirs['data_dir']}",
                 f"data.manual_dir={synthetic_mnist_dirs['manual_dir']}"):
        argv += ["--set", item]
    assert train.main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    reference = json.loads((run / "summary.json").read_text())
    reference_mses = [json.loads(line)["test_mse"]
                      for line in (run / "metrics.jsonl").read_text().splitlines()]

    # What a kill during epoch 2 leaves: epoch 1's checkpoint, no summary.
    (run / "summary.json").unlink()
    for epoch in ("2", "3"):
        shutil.rmtree(run / "checkpoints" / epoch)
    assert train.main(argv) == 0
    out, err = capsys.readouterr()
    assert "from the checkpoint of epoch 1/3" in out and "Traceback" not in err
    summary = json.loads((run / "summary.json").read_text())
    for key in ("test_mse", "train_loss", "steps", "num_params"):
        assert summary[key] == reference[key], key  # epochs 2-3 retrained: the same floats
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert [r["test_mse"] for r in records] == reference_mses

    # A finished run is not trained again.
    assert train.main(argv) == 2
    assert "holds a finished run" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The tiers themselves
# ----------------------------------------------------------------------------------------------


def test_a_test_reaching_the_real_mnist_is_slow_whatever_its_markers(pytester):
    """conftest.py marks ``slow`` every test requesting a real-MNIST fixture, directly or through
    another fixture, or the benchmark runner; the quick tier runs the rest without them."""
    for name in ("conftest.py", "synthetic_data.py"):
        pytester.makepyfile(**{name[:-3]: (REPO / "tests" / name).read_text()})
    pytester.makepyfile(test_tiers=textwrap.dedent("""
        import pytest

        @pytest.fixture
        def first_image(mnist):
            return mnist.train[0]

        def test_direct(mnist_dirs):
            raise AssertionError("ran in the quick tier")

        def test_indirect(first_image):
            raise AssertionError("ran in the quick tier")

        def test_child_process(subprocess_env):
            raise AssertionError("ran in the quick tier")

        def test_benchmark(run_benchmark):
            raise AssertionError("ran in the quick tier")

        def test_plain():
            pass
    """))
    quick = pytester.runpytest("-m", "not slow", "-p", "no:randomly", "-p", "no:xdist")
    quick.assert_outcomes(passed=1, deselected=4)
    slow = pytester.runpytest("-m", "slow", "--collect-only", "-q", "-p", "no:randomly",
                              "-p", "no:xdist")
    assert sorted(line.split("::")[1] for line in slow.outlines if "::" in line) == [
        "test_benchmark", "test_child_process", "test_direct", "test_indirect"]


@pytest.mark.parametrize("seed", [0, 1])
def test_synthetic_digits_are_reproducible_and_digit_like(seed):
    images, labels = synthetic_digits(200, seed)
    again, again_labels = synthetic_digits(200, seed)
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(labels, again_labels)
    assert set(labels.tolist()) == set(range(10))
    # Dark background, bright strokes: most pixels near 0, a tenth or more well lit.
    x = images.astype(np.float32) / 255
    assert np.median(x) < 0.1 and 0.08 < np.mean(x > 0.5) < 0.4
    # A "1" has two lit segments, an "8" seven: ink grows with the number of segments.
    ink = {d: x[labels == d].mean() for d in (1, 8)}
    assert ink[8] > 2 * ink[1]
