"""Shared fixtures, and the two test tiers.

Tiers:

- quick: ``python -m pytest -m "not slow" -n 2`` needs no dataset and runs no benchmark script
  (target: under 2 minutes on 2 cores). Its data are generated digit-like images
  (``tests/synthetic_data.py``), in memory (``synthetic_mnist``) or prepared by TFDS as "mnist" in
  a temporary data dir (``synthetic_mnist_dirs``, ``synthetic_subprocess_env``).
- full: ``python -m pytest -n 2`` (what CI runs) adds the ``slow`` tests: end-to-end training on
  the real MNIST, the quality bars, the benchmark scripts, the notebooks.

The split is enforced, not a convention: every test that requests a real-MNIST fixture
(``REAL_MNIST_FIXTURES``, directly or through other fixtures) or the benchmark runner is marked
``slow`` at collection.

The real MNIST: the manual dir is ``$CAE_MANUAL_DIR`` or ``<repo>/../shared/datasets/mnist`` (the
four original archives). The prepared TFDS data dir is ``$TFDS_DATA_DIR`` or
``~/.cache/cae/tfds`` and is reused between sessions, so preparation (~30 s) happens once per
machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from synthetic_data import prepare_synthetic_mnist

REPO = Path(__file__).resolve().parents[1]
MANUAL_DIR = Path(os.environ.get("CAE_MANUAL_DIR") or REPO.parent / "shared" / "datasets" / "mnist")
DATA_DIR = Path(os.environ.get("TFDS_DATA_DIR") or Path.home() / ".cache" / "cae" / "tfds")
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
PYTHON = sys.executable
pytest_plugins = ["pytester"]  # test_quick_loop.py runs pytest on a made-up test file

# Fixtures that prepare or read the real MNIST, and the one that runs benchmark scripts: a test
# requesting any of them belongs to the full tier only.
REAL_MNIST_FIXTURES = frozenset({"mnist_dirs", "mnist", "subprocess_env"})
SLOW_FIXTURES = REAL_MNIST_FIXTURES | {"run_benchmark"}

# The synthetic "mnist": as many training examples as configs/smoke.yaml takes, so the smoke
# config runs on it unchanged.
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 4096, 1024


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES.intersection(item.fixturenames):
            item.add_marker(pytest.mark.slow)


def manual_dir_available() -> bool:
    return all((MANUAL_DIR / f).is_file() for f in MNIST_FILES)


def _child_env(data_dir: str, manual_dir: str | None) -> dict:
    """Environment for ``python -m cae.train`` (or a script) in a child process, reading the
    TFDS data in ``data_dir`` and importing this checkout's ``cae``."""
    env = dict(os.environ, TFDS_DATA_DIR=data_dir)
    if manual_dir:
        env["CAE_MANUAL_DIR"] = manual_dir
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


# ----------------------------------------------------------------------------------------------
# The real MNIST (full tier)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mnist_dirs() -> dict:
    """``{"data_dir", "manual_dir"}`` for MNIST, prepared (once) with TFDS from the manual dir."""
    from cae import data

    prepared = (DATA_DIR / "mnist").is_dir()
    if not manual_dir_available() and not prepared:
        pytest.skip(f"MNIST archives not found in {MANUAL_DIR} (set CAE_MANUAL_DIR)")
    manual = str(MANUAL_DIR) if manual_dir_available() else None
    data.load_dataset("mnist", data_dir=str(DATA_DIR), manual_dir=manual, max_train_examples=1)
    return {"data_dir": str(DATA_DIR), "manual_dir": manual}


@pytest.fixture(scope="session")
def mnist(mnist_dirs):
    """The real MNIST train and test splits as uint8 arrays."""
    from cae import data

    return data.load_dataset("mnist", **mnist_dirs)


@pytest.fixture
def subprocess_env(mnist_dirs) -> dict:
    """Environment for running ``python -m cae.train`` in a child process on the same data."""
    return _child_env(mnist_dirs["data_dir"], mnist_dirs["manual_dir"])


@pytest.fixture
def run_benchmark():
    """``run_benchmark(args, env=None) -> stdout``: ``python scripts/...`` from the repo root,
    which must exit 0. Benchmarks compile many programs: full tier only."""
    def run(args: list[str], env: dict | None = None) -> str:
        proc = subprocess.run([PYTHON, *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    return run


# ----------------------------------------------------------------------------------------------
# Synthetic digits (quick tier)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def synthetic_mnist_dirs(tmp_path_factory) -> dict:
    """Like ``mnist_dirs``: ``{"data_dir", "manual_dir"}``, where TFDS's "mnist" is
    ``SYNTHETIC_TRAIN`` + ``SYNTHETIC_TEST`` generated digits (prepared in ~2 s) and the manual
    dir is empty, so nothing can fall back on the real archives."""
    root = tmp_path_factory.mktemp("synthetic_mnist")
    prepare_synthetic_mnist(root / "tfds", SYNTHETIC_TRAIN, SYNTHETIC_TEST)
    (root / "no_archives").mkdir()
    return {"data_dir": str(root / "tfds"), "manual_dir": str(root / "no_archives")}


@pytest.fixture(scope="session")
def synthetic_mnist(synthetic_mnist_dirs):
    """The synthetic "mnist" as a ``cae.data.Dataset`` (train [4096, 28, 28, 1] uint8, test
    [1024, 28, 28, 1] uint8, labels [N] int32), loaded by ``cae.data.load_dataset``."""
    from cae import data

    return data.load_dataset("mnist", **synthetic_mnist_dirs)


@pytest.fixture
def synthetic_subprocess_env(synthetic_mnist_dirs) -> dict:
    """Like ``subprocess_env``, on the synthetic "mnist"."""
    return _child_env(synthetic_mnist_dirs["data_dir"], synthetic_mnist_dirs["manual_dir"])
