"""Draw every picture of a run: ``python -m cae.visualize RUN_DIR [--out DIR]``.

Loads ``RUN_DIR/config.yaml``, the latest checkpoint and the data, and writes six PNGs into
``RUN_DIR`` (or ``--out``): ``reconstructions.png``, ``curves.png``, ``filters.png``,
``codes_pca.png`` and ``unit_decodes.png`` (see docs/run-dir.md, *Pictures*). Works on
finished and unfinished runs (the latest checkpoint is drawn). User mistakes (no such folder,
not a run dir, no checkpoint, data not to be had) print one ``error:`` line and exit with 2,
and nothing is written.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cae import checkpoints, cli, experiment, plots, probe, rundir
from cae import config as config_lib
from cae.errors import EXIT_USER, ConfigError

__all__ = ["PICTURES", "one_hot_codes", "decode_codes", "load_run",
           "write_pictures", "visualize", "main", "VisualizeError"]

PICTURES = ("reconstructions.png", "curves.png", "filters.png", "codes_pca.png",
            "unit_decodes.png", "checkerboard.png")
CODE_POINTS = 5000  # test codes in codes_pca.png (PCA fitted on the whole test split)


class VisualizeError(RuntimeError):
    """RUN_DIR or --out cannot be used; the message is one line."""

    exit_code = EXIT_USER


def one_hot_codes(code_shape: tuple[int, int, int], amplitude: float) -> np.ndarray:
    """code_shape (h, w, F) -> codes [F, h, w, F]: code j is ``amplitude`` in channel j at the
    centre position (h // 2, w // 2) and 0 everywhere else."""
    h, w, f = code_shape
    codes = np.zeros((f, h, w, f), np.float32)
    codes[np.arange(f), h // 2, w // 2, np.arange(f)] = amplitude
    return codes


def decode_codes(model, params, codes: np.ndarray) -> np.ndarray:
    """codes: [N, h, w, F] -> sigmoid(decoder(codes)) [N, H, W, C] in [0, 1]. ``model`` needs
    ``image_shape`` (see ``experiment.build_model``)."""
    logits = model.apply({"params": params}, jnp.asarray(codes), method="decode")
    return np.asarray(jax.nn.sigmoid(logits))


def load_run(run_dir: Path):
    """-> (config, dataset, params of the latest checkpoint, its metrics history, its epoch).
    Raises VisualizeError / ConfigError / DataError for user mistakes."""
    if not run_dir.exists():
        raise VisualizeError(f"RUN_DIR {str(run_dir)!r}: no such directory")
    if not run_dir.is_dir():
        raise VisualizeError(f"RUN_DIR {str(run_dir)!r}: not a directory")
    config_file = run_dir / rundir.CONFIG_FILE
    if not config_file.is_file():
        raise VisualizeError(f"RUN_DIR {str(run_dir)!r}: not a cae run directory (no "
                             f"{rundir.CONFIG_FILE}); give the output.dir of a training run")
    try:
        cfg = config_lib.from_dict(rundir.read_saved_config(run_dir, strict=True))
    except ConfigError as e:
        message = str(e)
        raise VisualizeError(message if message.startswith(str(config_file))
                             else f"{config_file}: {message}") from None
    ckpt = checkpoints.Checkpointer(run_dir)
    try:
        if ckpt.latest_epoch() is None:
            raise VisualizeError(f"RUN_DIR {str(run_dir)!r}: no checkpoint yet (the run "
                                 "stopped before its first epoch ended); nothing to draw")
        ds = experiment.load_data(cfg)
        # The abstract train state gives orbax the structure of what was saved. A damaged newer
        # checkpoint is reported and skipped, not moved: drawing changes nothing (the next
        # cae.train run sets it aside).
        state = experiment.create_train_state(cfg, ds.image_shape, 1)
        newest = ckpt.restore_newest_intact(experiment.state_tree(state), set_aside=False,
                                            report=_report_skipped)
    finally:
        ckpt.close()
    if newest is None:
        raise VisualizeError(f"no checkpoint in {ckpt.directory} can be restored; run cae.train "
                             "with the same config to set the damaged ones aside and resume")
    epoch, restored, history = newest
    return cfg, ds, restored["params"], history, epoch


def _report_skipped(epoch: int, reason: str, moved_to: Path | None) -> None:
    print(f"warning: the checkpoint of epoch {epoch} cannot be restored ({reason}); drawing an "
          "older one", file=sys.stderr)


def write_pictures(cfg, ds, params, history: list[dict], out_dir: Path, epoch: int) -> list[Path]:
    """Compute everything first, then write the six PNGs (atomically) into ``out_dir``."""
    model = experiment.build_model(cfg, ds.image_shape)
    where = f"{ds.name}, {'tied' if cfg.model.tied else 'untied'}, epoch {epoch}"
    code_size, pca = experiment.linear_baseline(cfg, ds)
    figures = experiment.run_figures(cfg, ds, params, history, epoch=epoch, code_size=code_size,
                                     pca=pca)
    _, figures["checkerboard.png"] = experiment.checkerboard(cfg, ds, params, code_size, pca)
    kernel = np.asarray(params["encoder_0"]["kernel"])  # [k, k, C, F]
    figures["filters.png"] = plots.filters_figure(
        kernel, title=f"{where}: the first encoder layer's {kernel.shape[-1]} filters "
                      f"({kernel.shape[0]}x{kernel.shape[1]})")

    code_shape = experiment.model_code_shape(cfg, ds.image_shape)
    h, w, f = code_shape
    codes = probe.encode_images(model.apply, params, ds.test, cfg.train.eval_batch_size)
    figures["codes_pca.png"] = plots.codes_figure(
        codes, ds.test_labels, max_points=CODE_POINTS,
        title=f"{where}: test codes ({h}x{w}x{f} = {codes.shape[1]} numbers) by PCA\n"
              f"{min(CODE_POINTS, len(codes))} of {len(codes)} shown, coloured by label")

    # One code unit alone, at a typical magnitude of the trained codes (a unit-sized one-hot
    # would decode to little more than the decoder's biases).
    amplitude = float(np.percentile(np.abs(codes), 99)) if codes.size else 1.0
    decoded = decode_codes(model, params, one_hot_codes(code_shape, amplitude))
    figures["unit_decodes.png"] = plots.unit_decodes_figure(
        decoded, labels=[f"channel {j}" for j in range(f)],
        title=f"{where}: what one code unit decodes to\nsigmoid(decoder(code)), code = "
              f"{amplitude:.1f} (99th percentile of |test code|) in channel j at position "
              f"({h // 2}, {w // 2}) of the {h}x{w} code, 0 elsewhere")

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in PICTURES:
        plots.save_figure(out_dir / name, figures[name])
        written.append(out_dir / name)
    return written


def visualize(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None
              ) -> list[Path]:
    """Draw the pictures of ``run_dir`` into ``out_dir`` (default ``run_dir``); returns paths."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir
    if out.exists() and not out.is_dir():
        raise VisualizeError(f"--out {str(out)!r}: exists and is not a directory")
    cfg, ds, params, history, epoch = load_run(run_dir)
    return write_pictures(cfg, ds, params, history, out, epoch)


def main(argv: list[str] | None = None) -> int:
    parser = cli.CommandLineParser(prog="python -m cae.visualize",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run's output.dir")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="write the PNGs here instead of RUN_DIR")
    args = parser.parse_args(argv)
    code, written = cli.run_command(lambda: visualize(args.run_dir, args.out),
                                    "interrupted: run the same command again to draw them")
    if code:
        return code
    print(f"wrote {', '.join(p.name for p in written)} to {written[0].parent}")
    return 0


if __name__ == "__main__":
    cli.exit_with(main())
