"""The end of a training run: pictures, linear probe, the PCA baseline, then ``summary.json``
(written last and atomically: it marks the run finished), and the one-line summary.

Every quality figure stands beside its baselines: the untrained model (``initial_test_mse``) and
PCA with as many components as the code has numbers (``pca_test_mse``, ``mse_ratio_to_pca``).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from cae import data as data_lib
from cae import experiment, plots
from cae.config import Config
from cae.files import write_atomic
from cae.rundir import SUMMARY_FILE

__all__ = ["write_report", "summary_line"]


def write_report(cfg: Config, state: experiment.TrainState, ds: data_lib.Dataset,
                 history: list[dict], *, wall_time_s: float, images_per_sec: float,
                 out_dir: Path, writer) -> dict:
    """Pictures (also to TensorBoard's ``writer``), linear probe and PCA baseline, then
    ``out_dir/summary.json`` -> the summary. ``history``: metrics.jsonl's records;
    ``wall_time_s``: the training's, without this report."""
    code_size, pca = experiment.linear_baseline(cfg, ds, with_probe=cfg.train.linear_probe)
    step = int(state.step)
    shown = experiment.test_reconstructions(cfg, ds, state.params)
    figures = experiment.run_figures(cfg, ds, state.params, history, epoch=cfg.train.epochs,
                                     code_size=code_size, pca=pca, shown=shown)
    checkerboard, figures["checkerboard.png"] = experiment.checkerboard(
        cfg, ds, state.params, code_size, pca)
    for name, figure in figures.items():
        plots.save_figure(out_dir / name, figure)
    writer.add_images("test/reconstructions", np.concatenate(shown), step, dataformats="NHWC")
    probe_acc = None
    if cfg.train.linear_probe:
        probe_acc = experiment.probe_accuracy(cfg, state.params, ds)
        if probe_acc is not None:
            writer.add_scalar("test/linear_probe_acc", probe_acc, step)
    final = history[-1]
    summary = {
        "test_mse": final["test_mse"],
        "test_psnr": final["test_psnr"],
        "initial_test_mse": final["initial_test_mse"],
        "train_loss": final["train_loss"],
        "num_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "tied": cfg.model.tied,
        "epochs": cfg.train.epochs,
        "steps": step,
        "train_images_per_sec": images_per_sec,
        "num_devices": jax.device_count(),  # batches are split over all of them
        "backend": jax.default_backend(),
        "wall_time_s": wall_time_s,
        "dataset": ds.name,
        "image_shape": list(ds.image_shape),
        "linear_probe_acc": probe_acc,  # None: switched off, or a dataset without labels
        "code_size": code_size,  # numbers per image in the code
        # decoder, checkerboard_stride, checkerboard_score, pca_checkerboard_score (None
        # without PCA), checkerboard_chance (white noise's score): docs/results.md
        **checkerboard,
    }
    if pca is not None:  # the linear baseline with as many numbers: PCA-code_size
        summary["pca_test_mse"] = pca.test_mse
        summary["mse_ratio_to_pca"] = (pca.test_mse / final["test_mse"] if final["test_mse"] > 0
                                       else float("inf"))
        if cfg.train.linear_probe:
            summary["pca_probe_acc"] = pca.probe_acc
    write_atomic(out_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


def summary_line(summary: dict) -> str:
    """The figures of a summary.json in one line, each quality figure beside its baseline."""
    parts = [f"test_mse {summary['test_mse']:.5f} (untrained {summary['initial_test_mse']:.5f}"]
    if summary.get("pca_test_mse") is not None:
        ratio = summary["mse_ratio_to_pca"]
        verdict = (f"{ratio:.2f}x lower than PCA" if ratio >= 1 else
                   f"{1 / ratio:.2f}x higher than PCA: worse than the linear baseline")
        parts[0] += f", PCA-{summary['code_size']} {summary['pca_test_mse']:.5f}: {verdict})"
    else:
        parts[0] += f"; code of {summary['code_size']} numbers: no PCA baseline)"
    parts.append(f"test_psnr {summary['test_psnr']:.2f} dB")
    if summary.get("checkerboard_score") is not None:
        pca_cb = summary.get("pca_checkerboard_score")
        parts.append(f"checkerboard {summary['checkerboard_score']:.3f}"
                     + ("" if pca_cb is None else f" (PCA {pca_cb:.3f})"))
    if summary.get("linear_probe_acc") is not None:
        pca_probe = summary.get("pca_probe_acc")
        parts.append(f"linear_probe_acc {summary['linear_probe_acc']:.4f}"
                     + ("" if pca_probe is None else f" (PCA codes {pca_probe:.4f})"))
    parts.append(f"code {summary['code_size']} numbers, {summary['num_params']} params, "
                 f"{summary['train_images_per_sec']:.0f} img/s")
    return ", ".join(parts)
