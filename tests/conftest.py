"""Shared fixtures: the real MNIST, prepared by TFDS offline from the shared manual dir.

The manual dir is ``$CAE_MANUAL_DIR`` or ``<repo>/../shared/datasets/mnist`` (the four original
archives). The prepared TFDS data dir is ``$TFDS_DATA_DIR`` or ``~/.cache/cae/tfds`` and is reused
between sessions, so preparation (~30 s) happens once per machine.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parents[1]
MANUAL_DIR = Path(os.environ.get("CAE_MANUAL_DIR") or REPO.parent / "shared" / "datasets" / "mnist")
DATA_DIR = Path(os.environ.get("TFDS_DATA_DIR") or Path.home() / ".cache" / "cae" / "tfds")
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def manual_dir_available() -> bool:
    return all((MANUAL_DIR / f).is_file() for f in MNIST_FILES)


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
    env = dict(os.environ)
    env["TFDS_DATA_DIR"] = mnist_dirs["data_dir"]
    if mnist_dirs["manual_dir"]:
        env["CAE_MANUAL_DIR"] = mnist_dirs["manual_dir"]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


PYTHON = sys.executable
