"""Generated digit-like images, and a TFDS "mnist" prepared from them: the quick tier's data.

Each image is a seven-segment digit (the label), drawn with a random stroke width, brightness
and position, softened and lightly noised: a few numbers per image explain most of it, as with
real digits, so a small autoencoder's reconstruction error falls within a couple of epochs and
a linear probe of its codes can read the label.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Segments of a seven-segment display (a: top, then clockwise; g: middle), per digit.
SEGMENTS = {0: "abcdef", 1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc", 5: "afgcd", 6: "afgedc",
            7: "abc", 8: "abcdefg", 9: "abcdfg"}
SIZE = 28


def _draw(digit: int, rng: np.random.Generator) -> np.ndarray:
    """One [28, 28] float image in [0, 1] of ``digit``."""
    width, height, stroke = rng.integers(9, 14), rng.integers(15, 21), rng.integers(2, 4)
    left = rng.integers(3, SIZE - 3 - width)
    top = rng.integers(3, SIZE - 3 - height)
    right, bottom, middle = left + width, top + height, top + height // 2
    rows = {"a": top, "g": middle, "d": bottom}
    columns = {"f": (left, top, middle), "b": (right, top, middle),
               "e": (left, middle, bottom), "c": (right, middle, bottom)}
    image = np.zeros((SIZE, SIZE))
    for segment in SEGMENTS[digit]:
        if segment in rows:
            y = rows[segment]
            image[y:y + stroke, left:right + stroke] = 1.0
        else:
            x, y0, y1 = columns[segment]
            image[y0:y1 + stroke, x:x + stroke] = 1.0
    # Soften the edges as pen strokes are ([1, 2, 1] / 4 along both axes), then vary the ink.
    for axis in (0, 1):
        image = (np.roll(image, 1, axis) + 2 * image + np.roll(image, -1, axis)) / 4
    image *= rng.uniform(0.7, 1.0)
    return np.clip(image + rng.normal(0.0, 0.03, image.shape), 0.0, 1.0)


def synthetic_digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """-> (images [n, 28, 28, 1] uint8, labels [n] int32), the same for the same (n, seed)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.int32)
    images = np.stack([_draw(int(d), rng) for d in labels])
    return np.round(images * 255).astype(np.uint8)[..., None], labels


def prepare_synthetic_mnist(data_dir: Path, num_train: int, num_test: int) -> None:
    """Write a TFDS dataset named "mnist" (MNIST's features, version and file layout) holding
    synthetic digits to ``data_dir``: ``tfds.builder("mnist", data_dir=data_dir)`` and every
    process given it as ``TFDS_DATA_DIR`` then read these, through TFDS's ordinary code path,
    without the real archives or a network."""
    from tensorflow_datasets.image_classification import mnist

    from cae.data import import_tfds

    import_tfds()  # quietly: no progress bars, no TensorFlow log lines
    splits = {"train": synthetic_digits(num_train, seed=0),
              "test": synthetic_digits(num_test, seed=1)}

    class SyntheticMnist(mnist.MNIST, skip_registration=True):
        name = "mnist"  # MNIST's folder and metadata, so the registered builder reads it

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(*arrays) for split, arrays in splits.items()}

        def _generate_examples(self, images, labels):
            for index, (image, label) in enumerate(zip(images, labels)):
                yield index, {"image": image, "label": int(label)}

    SyntheticMnist(data_dir=str(data_dir)).download_and_prepare()
