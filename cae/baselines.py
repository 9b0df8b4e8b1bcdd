"""The linear baseline every autoencoder figure is read against: PCA with as many components as
the code has numbers.

PCA is the optimal *linear* compressor in squared error: keeping the top ``k`` principal
components of the train split gives the smallest mean squared reconstruction error any rank-k
affine map can reach on that split. An autoencoder whose code has ``k`` numbers is worth its
non-linearity only if it beats that on the test split.

The basis is fitted in float64 from the train split's covariance, accumulated chunk by chunk
(``X^T X`` over [D, D], D = H*W*C; 784 for MNIST), then ``numpy.linalg.eigh``: a few seconds,
memory O(D^2) besides the images. Test reconstructions ``mean + (x - mean) V_k V_k^T`` are
clipped to [0, 1], as the autoencoder's sigmoid output is. Results are cached per dataset
content (a hash of the arrays), so they are paid once per machine (``CAE_CACHE_DIR``, default
``~/.cache/cae``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

from cae import probe as probe_lib
from cae import spectra
from cae.files import write_atomic

__all__ = ["PCA", "fit_pca", "reconstruction_mse", "reconstruction_error_spectrum", "codes",
           "PCABaseline", "pca_baseline", "pca_error_spectrum", "dataset_fingerprint",
           "cache_dir"]

_ROWS_PER_CHUNK = 8192


@dataclasses.dataclass(frozen=True)
class PCA:
    """mean: [D] float64; components: [D, D] float64, column j the j-th principal direction
    (variance descending); variances: [D] float64, the train split's variance along each."""

    mean: np.ndarray
    components: np.ndarray
    variances: np.ndarray


def _flat(images: np.ndarray, start: int, stop: int) -> np.ndarray:
    """images[start:stop]: [n, H, W, C] uint8 -> [n, D] float64 pixels in [0, 1]."""
    chunk = images[start:stop]
    return chunk.reshape(len(chunk), -1).astype(np.float64) / 255.0


def fit_pca(images: np.ndarray) -> PCA:
    """images: [N, H, W, C] uint8 (the train split) -> every principal component, in float64.

    Two passes over the data: the mean, then the centred scatter matrix, chunk by chunk (no
    float64 copy of the whole split); then the symmetric eigendecomposition."""
    n = len(images)
    if n < 2:
        raise ValueError(f"PCA needs at least 2 images, got {n}")
    d = int(np.prod(images.shape[1:]))
    total = np.zeros(d)
    for start in range(0, n, _ROWS_PER_CHUNK):
        total += _flat(images, start, start + _ROWS_PER_CHUNK).sum(axis=0)
    mean = total / n
    scatter = np.zeros((d, d))
    for start in range(0, n, _ROWS_PER_CHUNK):
        centred = _flat(images, start, start + _ROWS_PER_CHUNK) - mean
        scatter += centred.T @ centred
    variances, vectors = np.linalg.eigh(scatter / (n - 1))
    order = np.argsort(variances)[::-1]
    return PCA(mean, vectors[:, order], np.maximum(variances[order], 0.0))


def codes(pca: PCA, images: np.ndarray, k: int) -> np.ndarray:
    """images: [N, H, W, C] uint8 -> their k PCA coefficients [N, k] (float64)."""
    basis = pca.components[:, :k]
    return np.concatenate([(_flat(images, s, s + _ROWS_PER_CHUNK) - pca.mean) @ basis
                           for s in range(0, len(images), _ROWS_PER_CHUNK)] or
                          [np.zeros((0, k))])


def reconstruction_mse(pca: PCA, images: np.ndarray, k: int) -> float:
    """Mean per-pixel squared error of reconstructing ``images`` [N, H, W, C] uint8 from their
    top-k PCA coefficients, the reconstruction clipped to [0, 1] (pixels in [0, 1])."""
    basis = pca.components[:, :k]
    total = 0.0
    for start in range(0, len(images), _ROWS_PER_CHUNK):
        x = _flat(images, start, start + _ROWS_PER_CHUNK)
        recon = np.clip(pca.mean + ((x - pca.mean) @ basis) @ basis.T, 0.0, 1.0)
        total += float(np.sum((recon - x) ** 2))
    return total / (len(images) * pca.components.shape[0])


def reconstruction_error_spectrum(pca: PCA, images: np.ndarray, k: int) -> np.ndarray:
    """The mean power spectrum [H, W] of the error of reconstructing ``images`` [N, H, W, C]
    uint8 from their top-k PCA coefficients (clipped to [0, 1], as in
    :func:`reconstruction_mse`); it sums to that MSE (``cae.spectra.power_spectrum``)."""
    basis = pca.components[:, :k]
    shape = images.shape[1:]
    total = np.zeros(shape[:2])
    for start in range(0, len(images), _ROWS_PER_CHUNK):
        x = _flat(images, start, start + _ROWS_PER_CHUNK)
        recon = np.clip(pca.mean + ((x - pca.mean) @ basis) @ basis.T, 0.0, 1.0)
        total += spectra.power_spectrum((recon - x).reshape(len(x), *shape)) * len(x)
    return total / len(images)


# ----------------------------------------------------------------------------------------------
# Cached per dataset: the basis once, each k's figures once
# ----------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$CAE_CACHE_DIR``, else ``$XDG_CACHE_HOME/cae``, else ``~/.cache/cae``."""
    if os.environ.get("CAE_CACHE_DIR"):
        return Path(os.environ["CAE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cae"


def dataset_fingerprint(*arrays: np.ndarray | None) -> str:
    """A hash of the arrays' shapes, dtypes and bytes: the cache key is the data itself, so a
    different split (``data.max_train_examples``) or different files never share an entry."""
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none")
            continue
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()[:20]


@dataclasses.dataclass(frozen=True)
class PCABaseline:
    """PCA with ``k`` components fitted on the train split: its test MSE and, when the dataset
    has labels and it was asked for, the linear-probe accuracy of its k-number codes."""

    k: int
    test_mse: float
    probe_acc: float | None = None


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)


def _load_or_fit(train: np.ndarray, folder: Path) -> PCA:
    path = folder / "pca.npz"
    try:
        with np.load(path) as f:
            return PCA(f["mean"], f["components"], f["variances"])
    except (OSError, ValueError, KeyError):  # none yet, or unreadable: fit (again)
        pass
    pca = fit_pca(train)
    buf = io.BytesIO()
    np.savez(buf, mean=pca.mean, components=pca.components, variances=pca.variances)
    try:
        _write_atomic(path, buf.getvalue())
    except OSError:  # a read-only or full cache costs time, never the run
        pass
    return pca


def _folder(ds, folder: str | os.PathLike | None) -> Path:
    if folder is None:
        key = dataset_fingerprint(ds.train, ds.test, ds.train_labels, ds.test_labels)
        folder = cache_dir() / "baselines" / f"{ds.name.replace('/', '_')}-{key}"
    return Path(folder)


def pca_error_spectrum(ds, k: int, *, folder: str | os.PathLike | None = None) -> np.ndarray:
    """PCA-k's test reconstruction error's mean power spectrum [H, W] on ``ds`` (the basis from
    the cache :func:`pca_baseline` shares, fitted if missing): what the checkerboard score of a
    model is read against."""
    return reconstruction_error_spectrum(_load_or_fit(ds.train, _folder(ds, folder)), ds.test,
                                         int(k))


def pca_baseline(ds, k: int, *, probe: bool = False, folder: str | os.PathLike | None = None,
                 probe_steps: int | None = None) -> PCABaseline:
    """PCA-k on ``ds`` (a :class:`cae.data.Dataset`): fitted on ``ds.train``, scored on
    ``ds.test``; with ``probe=True`` (and labels) also the linear probe of the k PCA
    coefficients, the same probe as ``cae.train``'s (``cae.probe.linear_probe``).

    Cached in ``folder`` (default ``cache_dir()/baselines/<fingerprint of ds>``): the basis
    (``pca.npz``) and one JSON per k and probe setting.
    """
    k = int(k)
    d = int(np.prod(ds.image_shape))
    if not 1 <= k <= d:
        raise ValueError(f"PCA with k={k} components: need 1 <= k <= {d} (pixels per image)")
    probe = probe and ds.train_labels is not None and ds.test_labels is not None
    steps = probe_lib.DEFAULT_STEPS if probe_steps is None else int(probe_steps)
    folder = _folder(ds, folder)
    result_path = folder / f"k{k}{f'-probe{steps}' if probe else ''}.json"
    try:
        cached = json.loads(result_path.read_text())
        return PCABaseline(k, float(cached["test_mse"]), cached.get("probe_acc"))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    pca = _load_or_fit(ds.train, folder)
    result = PCABaseline(k, reconstruction_mse(pca, ds.test, k))
    if probe:
        acc = probe_lib.linear_probe(codes(pca, ds.train, k).astype(np.float32), ds.train_labels,
                                     codes(pca, ds.test, k).astype(np.float32), ds.test_labels,
                                     steps=steps, copy=False)
        result = dataclasses.replace(result, probe_acc=acc)
    try:
        _write_atomic(result_path, (json.dumps(dataclasses.asdict(result)) + "\n").encode())
    except OSError:
        pass
    return result
