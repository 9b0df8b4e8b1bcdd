"""TFDS image datasets as in-memory uint8 arrays.

TFDS is the only source. Small image datasets (MNIST is 47 MB as uint8) are loaded once per split
as NumPy arrays and batched from memory; nothing is streamed from disk per step. Images stay
uint8 on the host and are scaled to [0, 1] float32 inside the jitted steps (4x less to copy).

Offline use: ``manual_dir`` (default ``$CAE_MANUAL_DIR``) is a folder holding the dataset's
original download archives (for MNIST the four ``*-ubyte.gz`` files). TFDS is handed that folder
as its manual dir and prepares the dataset from it with its own checksum verification.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import socket
import urllib.parse
from pathlib import Path

import numpy as np

from cae import cli
from cae.errors import EXIT_USER, first_line

__all__ = ["Dataset", "DataError", "load_dataset", "import_tfds", "normalize",
           "prepared_datasets", "same_data", "main"]

MANUAL_DIR_ENV = "CAE_MANUAL_DIR"


class DataError(RuntimeError):
    """The requested data cannot be had; the message is one line saying what to provide."""

    exit_code = EXIT_USER


@dataclasses.dataclass(frozen=True)
class Dataset:
    """train: [N, H, W, C] uint8; test: [M, H, W, C] uint8 (TFDS's ``test`` split, all of it).

    train_labels: [N] int32, test_labels: [M] int32 -- TFDS's ``label`` feature, aligned with the
    images (same examples, same order); None for a dataset without one.
    """

    name: str
    train: np.ndarray
    test: np.ndarray
    train_labels: np.ndarray | None = None
    test_labels: np.ndarray | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.shape[1:])


def normalize(images):
    """uint8 [..., H, W, C] -> float32 in [0, 1]. Works on NumPy and JAX arrays."""
    return images.astype("float32") / 255.0


def import_tfds():
    """Import TensorFlow Datasets quietly, with TensorFlow kept off any GPU.

    TensorFlow is only TFDS's I/O backend here; if it claimed GPU memory it would take it from
    JAX, so GPUs are hidden from it before anything else touches TensorFlow.
    """
    # TF 2.21 announces its oneDNN kernels on stderr whatever the log level (which cae/__init__
    # sets); TF only reads files here, so its oneDNN math is irrelevant: off, stderr stays clean.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import tensorflow as tf
    import tensorflow_datasets as tfds

    with contextlib.suppress(RuntimeError, ValueError):  # already initialised: nothing to do
        tf.config.set_visible_devices([], "GPU")
    with contextlib.suppress(Exception):
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    tf.get_logger().setLevel("ERROR")
    tfds.disable_progress_bar()
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # download retries are not news
    return tfds


@contextlib.contextmanager
def _prepare_lock(data_dir: Path):
    """Serialise preparation between processes (e.g. parallel test workers) sharing a data dir."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / ".cae-prepare.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _needed_files(builder) -> list[str]:
    try:
        return sorted({info.filename or url.rsplit("/", 1)[-1]
                       for url, info in builder.url_infos.items()})
    except Exception:  # builders without registered checksums
        return []


def _builder(tfds, name: str, data_dir: str | None):
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(
            f"data.name={name!r}: not a TFDS dataset; image datasets that work include "
            "'mnist', 'fashion_mnist', 'kmnist', 'emnist/letters', 'cifar10'"
        ) from None
    except Exception as e:  # e.g. an unknown config in "emnist/xyz"
        raise DataError(f"data.name={name!r}: {first_line(e)}") from None


def _image_key(builder, name: str) -> str:
    features = builder.info.features
    keys = [k for k, f in features.items() if type(f).__name__ == "Image"]
    if "image" in keys:
        return "image"
    if len(keys) == 1:
        return keys[0]
    raise DataError(
        f"data.name={name!r}: not an image dataset with one image feature "
        f"(features: {sorted(features.keys())})"
    )


def _label_key(builder) -> str | None:
    """The class-label feature used for the linear probe and the code plots, if there is one."""
    features = builder.info.features
    if "label" in features and type(features["label"]).__name__ == "ClassLabel":
        return "label"
    return None


def _reachable(builder, timeout: float = 5.0) -> bool:
    """Can we open a TCP connection to the first download host? TFDS would otherwise retry for
    minutes on a machine without network before failing."""
    urls = list(getattr(builder, "url_infos", None) or {})
    if not urls:
        return True  # nothing registered to probe: let TFDS try
    url = urllib.parse.urlsplit(urls[0])
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _extract_dir(builder) -> Path:
    """Where TFDS unpacks ``builder``'s archives: a folder of this dataset and version only.

    TFDS's default, ``downloads/extracted/GZIP.<archive name>``, is shared by every dataset
    and reused by name, so with MNIST prepared, "fashion_mnist" would be built from MNIST's
    ``train-images-idx3-ubyte.gz`` (tensorflow/datasets#2267) after checking Fashion-MNIST's
    own archives' checksums.
    """
    version_dir = Path(builder.data_dir).relative_to(Path(builder.data_dir_root))
    return Path(builder.data_dir_root) / "downloads" / "extracted-by-dataset" / version_dir


def _prepare(tfds, builder, name: str, manual_dir: str | None) -> None:
    files = _needed_files(builder)
    listed = ", ".join(files) or "its original download archives"
    if manual_dir is not None:
        if not Path(manual_dir).is_dir():
            raise DataError(f"data.manual_dir={manual_dir!r}: no such folder; it must hold "
                            f"{name}'s original archives: {listed}")
        missing = [f for f in files if not (Path(manual_dir) / f).is_file()]
        if missing and not _reachable(builder):
            raise DataError(f"data.manual_dir={manual_dir!r} lacks {', '.join(missing)}: the "
                            f"original archives TFDS needs to prepare {name!r} offline")
    elif not _reachable(builder):
        raise DataError(
            f"data.name={name!r} is not prepared in {builder.data_dir_root} and "
            f"there is no network: set data.manual_dir (or ${MANUAL_DIR_ENV}) to a folder "
            f"holding {listed}"
        )
    root = Path(builder.data_dir_root)
    config = tfds.download.DownloadConfig(
        manual_dir=manual_dir or root / "downloads" / "manual",  # TFDS's default manual dir
        extract_dir=_extract_dir(builder))
    with _prepare_lock(root):
        if builder.is_prepared():  # another process prepared it while we waited
            return
        try:
            builder.download_and_prepare(download_config=config)
        except Exception as e:
            said = first_line(e, limit=400)
            if manual_dir:
                raise DataError(
                    f"data.manual_dir={manual_dir!r}: TFDS could not prepare {name!r} from it "
                    f"({said}); it needs intact copies of {listed}"
                ) from None
            raise DataError(
                f"data.name={name!r}: cannot prepare it in {builder.data_dir!s} ({said}); set "
                f"data.manual_dir or ${MANUAL_DIR_ENV} to a folder holding {listed}"
            ) from None


def load_dataset(name: str = "mnist", data_dir: str | None = None,
                 manual_dir: str | None = None, max_train_examples: int | None = None) -> Dataset:
    """Prepare (once, offline if ``manual_dir`` is given) and load ``name``'s train and test
    splits into memory as uint8 ``[N, H, W, C]`` arrays. Raises :class:`DataError`."""
    if manual_dir is None:
        manual_dir = os.environ.get(MANUAL_DIR_ENV) or None
    if manual_dir is not None:
        manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
    if data_dir is not None:
        data_dir = os.path.abspath(os.path.expanduser(data_dir))
    tfds = import_tfds()
    builder = _builder(tfds, name, data_dir)
    key = _image_key(builder, name)
    if not builder.is_prepared():
        _prepare(tfds, builder, name, manual_dir)
        # A builder made before another process finished preparing keeps the empty dataset
        # info it read then (no splits); a new one reads what is on disk now.
        builder = _builder(tfds, name, data_dir)
    splits = builder.info.splits
    if "train" not in splits or "test" not in splits:
        raise DataError(f"data.name={name!r}: needs 'train' and 'test' splits, has "
                        f"{sorted(splits.keys())}")
    available = splits["train"].num_examples
    if max_train_examples is not None and max_train_examples > available:
        raise DataError(f"data.max_train_examples={max_train_examples}: {name!r} has only "
                        f"{available} training examples; use at most {available}, or null for all")
    train_split = "train" if max_train_examples is None else f"train[:{max_train_examples}]"
    label_key = _label_key(builder)
    arrays, labels = {}, {}
    for split_name, split in (("train", train_split), ("test", "test")):
        ds = builder.as_dataset(split=split, batch_size=-1)
        examples = tfds.as_numpy(ds)
        images = np.asarray(examples[key])
        # Read from the same batch as the images, so the slice and order are the same.
        labels[split_name] = (None if label_key is None
                              else np.asarray(examples[label_key]).astype(np.int32))
        if images.ndim == 3:  # [N, H, W] grayscale without a channel axis
            images = images[..., None]
        if images.ndim != 4 or images.dtype != np.uint8:
            raise DataError(f"data.name={name!r}: expected uint8 images [N, H, W, C], got "
                            f"{images.dtype} {images.shape}")
        arrays[split_name] = images
    return Dataset(name=name, train=arrays["train"], test=arrays["test"],
                   train_labels=labels["train"], test_labels=labels["test"])


# ----------------------------------------------------------------------------------------------
# Checking a data dir prepared before cae kept each dataset's extracted archives apart
# ----------------------------------------------------------------------------------------------


def prepared_datasets(data_dir: str | os.PathLike) -> dict[str, Path]:
    """``{"name[/config]/version": its folder}`` for every dataset prepared in ``data_dir``."""
    root = Path(data_dir)
    found = {}
    for info in sorted(root.glob("**/dataset_info.json")):
        relative = info.parent.relative_to(root)
        if relative.parts and relative.parts[0] != "downloads":
            found[str(relative)] = info.parent
    return found


def _fingerprint(tfds, folder: Path) -> str:
    """A digest of the multiset of a prepared dataset's images (its test split, else its first
    split): equal digests, equal images, in whatever order they were written."""
    builder = tfds.builder_from_directory(str(folder))
    splits = sorted(builder.info.splits.keys())
    split = "test" if "test" in splits else splits[0]
    key = _image_key(builder, str(folder))
    digests = sorted(hashlib.sha1(np.ascontiguousarray(example[key]).tobytes()).digest()
                     for example in tfds.as_numpy(builder.as_dataset(split=split)))
    return hashlib.sha256(b"".join(digests)).hexdigest()


def same_data(data_dir: str | os.PathLike) -> list[list[str]]:
    """Groups of datasets prepared in ``data_dir`` that hold the same images: all but one of
    each group were built from another dataset's archives (tensorflow/datasets#2267)."""
    tfds = import_tfds()
    by_digest = collections.defaultdict(list)
    for name, folder in prepared_datasets(data_dir).items():
        try:
            by_digest[_fingerprint(tfds, folder)].append(name)
        except DataError:
            continue  # not an image dataset: not cae's to check
    return [names for names in by_digest.values() if len(names) > 1]


def main(argv: list[str] | None = None) -> int:
    """``python -m cae.data check [DATA_DIR]``: report datasets prepared from each other's files.
    Exit 1 when some are found (a finding, not an error)."""
    parser = cli.CommandLineParser(prog="python -m cae.data",
                                   description="check a TFDS data dir for datasets that hold "
                                               "the same images under different names")
    parser.add_argument("command", choices=["check"])
    parser.add_argument("data_dir", nargs="?", default=None,
                        help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    args = parser.parse_args(argv)

    def check() -> int:
        data_dir = Path(args.data_dir or os.environ.get("TFDS_DATA_DIR")
                        or Path.home() / "tensorflow_datasets").expanduser()
        if not data_dir.is_dir():
            raise DataError(f"{data_dir}: no such folder")
        groups = same_data(data_dir)
        for names in groups:
            print(f"{' and '.join(names)} in {data_dir} hold the same images: all but one were "
                  "prepared from another dataset's archives; delete the wrong one's folder (and "
                  f"{data_dir / 'downloads' / 'extracted'}), then prepare it again")
        if not groups:
            print(f"{len(prepared_datasets(data_dir))} prepared datasets in {data_dir}: no two "
                  "hold the same images")
        return 1 if groups else 0

    code, found = cli.run_command(check, "interrupted")
    return code or found


if __name__ == "__main__":
    cli.exit_with(main())
