"""The checkerboard score: how much of a reconstruction error's power sits at the frequencies
where a stride-s upsampling aliases (docs/results.md, *Checkerboard artifacts*).

A stride-s layer computes each output pixel from one of s x s phases (``i mod s``); when the
phases weigh their inputs differently (a k=3, s=2 transposed conv reaches output pixels with 1, 2
or 4 kernel taps) the output carries a pattern of period s, i.e. power at the frequencies
``j / s`` cycles per pixel, j = 1 .. s-1, along either axis. For s = 2 on an even size N these
are the DFT bins with a coordinate at N/2 (pi): the rows and columns through the Nyquist
frequency. The score is

    checkerboard = P(alias bins) / P(every bin but DC),   P = the mean power spectrum

so a pure checkerboard scores 1, an error with no period-s structure near 0, and white noise
the share of the bins that alias (:func:`chance_score`, 55 / 783 = 0.070 for 28x28, s = 2). The
DC bin (a uniform offset) is left out: it is no pattern. Read a model's score against PCA's at
the same code size (PCA has no upsampling layer, so its score is what the data alone put there).

NumPy only: no ``cae`` import, usable from every floor.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["alias_mask", "power_spectrum", "checkerboard_score", "alias_power", "chance_score"]


def _alias_bins(n: int, stride: int) -> set[int]:
    """The DFT bins of an n-point axis nearest to j / stride cycles per pixel, j = 1..stride-1
    (exact when stride divides n: bin j * n / stride)."""
    return {int(np.floor(j * n / stride + 0.5)) % n for j in range(1, stride)}


def alias_mask(hw: Sequence[int], stride: int) -> np.ndarray:
    """[H, W] bool, in ``np.fft.fft2``'s bin order: True where the row or the column frequency
    is one a stride-``stride`` upsampling aliases to (never the DC bin). stride 1: all False."""
    h, w = (int(v) for v in hw)
    rows = np.zeros(h, bool)
    cols = np.zeros(w, bool)
    rows[list(_alias_bins(h, stride) - {0})] = True
    cols[list(_alias_bins(w, stride) - {0})] = True
    return rows[:, None] | cols[None, :]


def power_spectrum(errors: np.ndarray) -> np.ndarray:
    """errors: [N, H, W, C] (or [N, H, W]) -> the mean power spectrum [H, W] (float64, in
    ``np.fft.fft2``'s bin order), averaged over images and channels and scaled so that it
    sums to the mean squared value per pixel (Parseval): ``power_spectrum(e).sum() ==
    mean(e ** 2)``."""
    e = np.asarray(errors, np.float64)
    if e.ndim == 3:
        e = e[..., None]
    h, w = e.shape[1:3]
    f = np.fft.fft2(e, axes=(1, 2))
    return (np.abs(f) ** 2).mean(axis=(0, 3)) / float(h * w) ** 2


def checkerboard_score(spectrum: np.ndarray, stride: int) -> float:
    """spectrum: [H, W] (:func:`power_spectrum`'s) -> the share of its non-DC power at the
    bins :func:`alias_mask` marks, in [0, 1]; 0 when nothing but DC has power (a constant has
    no checkerboard)."""
    p = np.asarray(spectrum, np.float64)
    non_dc = float(p.sum() - p[0, 0])
    if non_dc <= 0.0:
        return 0.0
    return float(p[alias_mask(p.shape, stride)].sum() / non_dc)


def alias_power(spectrum: np.ndarray, stride: int) -> float:
    """The part of the mean squared error (``spectrum``: :func:`power_spectrum`'s) that sits at
    the alias bins: the score's numerator, in MSE units, for reading a share against an error
    that is smaller or larger overall."""
    p = np.asarray(spectrum, np.float64)
    return float(p[alias_mask(p.shape, stride)].sum())


def chance_score(hw: Sequence[int], stride: int) -> float:
    """The score of white noise: the share of the non-DC bins that alias."""
    h, w = (int(v) for v in hw)
    return float(alias_mask((h, w), stride).sum() / (h * w - 1))
