"""Preparing one TFDS dataset never reads another's files (tensorflow/datasets#2267).

Two tiny TFDS builders, defined here, whose manual-dir archives have the same file name
(``images.gz``) but different contents, as MNIST's and Fashion-MNIST's do. No network.
"""

from __future__ import annotations

import gzip
import hashlib
import io

import numpy as np
import pytest

from cae import data

tfds = data.import_tfds()

ARCHIVE = "images.gz"
SHAPE = (6, 4, 4, 1)  # 4 train + 2 test images of 4x4


def _archive(value: int) -> bytes:
    """A gzip-ed .npy of images all equal to ``value``, byte-identical on every run."""
    buf = io.BytesIO()
    np.save(buf, np.full(SHAPE, value, np.uint8))
    return gzip.compress(buf.getvalue(), mtime=0)


def _url_info(archive: bytes):
    return tfds.download.checksums.UrlInfo(size=len(archive),
                                           checksum=hashlib.sha256(archive).hexdigest(),
                                           filename=ARCHIVE)


class _TwinBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Reads ``images.gz`` from the manual dir, checksum-verified against ``url_infos``."""

    VERSION = tfds.core.Version("1.0.0")
    URL = ""

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"image": tfds.features.Image(shape=SHAPE[1:]),
             "label": tfds.features.ClassLabel(num_classes=2)}))

    def _split_generators(self, dl_manager):
        images = np.load(dl_manager.download_and_extract(self.URL))
        return {"train": self._generate_examples(images[:4]),
                "test": self._generate_examples(images[4:])}

    def _generate_examples(self, images):
        for i, image in enumerate(images):
            yield i, {"image": image, "label": i % 2}


class CaeTwinA(_TwinBuilder):
    URL = f"https://a.invalid/{ARCHIVE}"
    url_infos = {URL: _url_info(_archive(10))}


class CaeTwinB(_TwinBuilder):
    URL = f"https://b.invalid/{ARCHIVE}"
    url_infos = {URL: _url_info(_archive(200))}


@pytest.fixture
def manual_dirs(tmp_path):
    dirs = {}
    for name, value in (("a", 10), ("b", 200)):
        dirs[name] = tmp_path / f"manual_{name}"
        dirs[name].mkdir()
        (dirs[name] / ARCHIVE).write_bytes(_archive(value))
    return dirs


def test_plain_tfds_prepares_one_dataset_from_the_others_archive(tmp_path, manual_dirs):
    """The bug cae works around, reproduced with TFDS alone: B's own archive passes its
    checksum, then TFDS reuses A's extraction of the same file name."""
    data_dir = str(tmp_path / "tfds")
    for builder_cls, manual in ((CaeTwinA, manual_dirs["a"]), (CaeTwinB, manual_dirs["b"])):
        builder_cls(data_dir=data_dir).download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    b = tfds.as_numpy(CaeTwinB(data_dir=data_dir).as_dataset(split="train", batch_size=-1))
    assert np.all(b["image"] == 10)  # A's pixels under B's name
    # ... and `python -m cae.data check` finds it.
    assert data.same_data(data_dir) == [["cae_twin_a/1.0.0", "cae_twin_b/1.0.0"]]
    assert data.main(["check", data_dir]) == 1


def test_cae_prepares_each_dataset_from_its_own_archives(tmp_path, manual_dirs, capsys):
    data_dir = str(tmp_path / "tfds")
    a = data.load_dataset("cae_twin_a", data_dir=data_dir, manual_dir=str(manual_dirs["a"]))
    b = data.load_dataset("cae_twin_b", data_dir=data_dir, manual_dir=str(manual_dirs["b"]))
    assert np.all(a.train == 10) and np.all(a.test == 10)
    assert np.all(b.train == 200) and np.all(b.test == 200)
    assert a.train.shape == b.train.shape == (4, 4, 4, 1)
    assert data.same_data(data_dir) == []
    assert data.main(["check", data_dir]) == 0
    assert "no two hold the same images" in capsys.readouterr().out


def test_max_train_examples_beyond_the_split_is_one_clear_error(tmp_path, manual_dirs):
    with pytest.raises(data.DataError, match=r"data\.max_train_examples=5: 'cae_twin_a' has "
                                             r"only 4 training examples"):
        data.load_dataset("cae_twin_a", data_dir=str(tmp_path / "tfds"),
                          manual_dir=str(manual_dirs["a"]), max_train_examples=5)
