"""Train a convolutional autoencoder: ``python -m cae.train --config configs/mnist_tied.yaml``.

``train_and_evaluate(cfg, workdir)`` is the testable entry point; ``main`` only parses the command
line and turns user mistakes into one-line errors. The steps are pure functions, ``jit``ted once
at module level, with the train state donated.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before anything imports TensorFlow

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state

from cae import config as config_lib
from cae import data as data_lib
from cae import models, plots, rundir
from cae.config import Config, ConfigError

__all__ = ["TrainState", "create_train_state", "loss_fn", "train_step", "eval_step",
           "evaluate", "train_and_evaluate", "main", "TrainingDiverged"]

LOG_EVERY = 50  # steps between loss syncs (progress bar, NaN check, TensorBoard)


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


class TrainState(train_state.TrainState):
    loss: str = struct.field(pytree_node=False, default="bce")  # "bce" | "mse"


# ----------------------------------------------------------------------------------------------
# Model, optimizer, steps
# ----------------------------------------------------------------------------------------------


def build_model(cfg: Config) -> models.ConvAutoencoder:
    m = cfg.model
    n = len(m.features)
    return models.ConvAutoencoder(
        features=tuple(m.features),
        kernel_size=tuple(config_lib.per_layer(m.kernel_size, n, "model.kernel_size")),
        strides=tuple(config_lib.per_layer(m.strides, n, "model.strides")),
        padding=tuple(config_lib.per_layer(m.padding, n, "model.padding")),
        tied=m.tied, activation=m.activation, impl=m.conv_transpose_impl,
    )


def build_optimizer(cfg: Config, total_steps: int) -> optax.GradientTransformation:
    t = cfg.train
    if t.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(
            0.0, t.learning_rate, t.warmup_steps, max(total_steps, t.warmup_steps + 1))
    elif t.warmup_steps:
        lr = optax.linear_schedule(0.0, t.learning_rate, t.warmup_steps)
    else:
        lr = t.learning_rate
    if t.optimizer == "adamw":
        return optax.adamw(lr, weight_decay=t.weight_decay)
    if t.optimizer == "sgd":
        return optax.sgd(lr, momentum=0.9, nesterov=True)
    return optax.adam(lr)


def create_train_state(cfg: Config, image_shape, total_steps: int) -> TrainState:
    """Initialise parameters for images of ``image_shape`` = (H, W, C) from ``train.seed``."""
    model = build_model(cfg)
    # JAX's default ("partitionable") threefry takes ~1.5 s *per parameter shape* to compile on
    # CPU; this one-off init does not need it, and the classic lowering compiles 5x faster.
    # Same seed -> same parameters, every run.
    with jax.threefry_partitionable(False):
        variables = jax.jit(model.init)(jax.random.key(cfg.train.seed),
                                        jnp.zeros((1, *image_shape)))
    params = variables["params"]
    return TrainState.create(apply_fn=model.apply, params=params,
                             tx=build_optimizer(cfg, total_steps), loss=cfg.train.loss)


def loss_fn(params, apply_fn, images: jax.Array, loss: str) -> jax.Array:
    """images: [B, H, W, C] uint8. Mean per-pixel BCE on logits, or MSE on sigmoid outputs."""
    x = data_lib.normalize(images)
    logits = apply_fn({"params": params}, x)
    if loss == "bce":
        return optax.sigmoid_binary_cross_entropy(logits, x).mean()
    return jnp.mean((jax.nn.sigmoid(logits) - x) ** 2)


@functools.partial(jax.jit, donate_argnums=0)
def train_step(state: TrainState, images: jax.Array) -> tuple[TrainState, jax.Array]:
    """One optimizer step on images [B, H, W, C] uint8; returns (new state, loss)."""
    loss, grads = jax.value_and_grad(loss_fn)(state.params, state.apply_fn, images, state.loss)
    return state.apply_gradients(grads=grads), loss


@jax.jit
def eval_step(state: TrainState, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """images: [B, H, W, C] uint8 -> (per-example mean squared error [B], reconstructions)."""
    x = data_lib.normalize(images)
    recon = jax.nn.sigmoid(state.apply_fn({"params": state.params}, x))
    return jnp.mean((recon - x) ** 2, axis=(1, 2, 3)), recon


def evaluate(state: TrainState, images: np.ndarray, batch_size: int) -> float:
    """Mean per-pixel squared error over *all* of ``images`` (pixels in [0, 1]).

    The last batch is zero-padded to ``batch_size`` (one compiled shape) and the padding is
    dropped from the result: no test example is skipped.
    """
    errors = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        n = len(batch)
        if n < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]),
                                                    batch.dtype)])
        errors.append(np.asarray(eval_step(state, batch)[0])[:n])
    return float(np.concatenate(errors).astype(np.float64).mean())


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB for pixels in [0, 1]."""
    return float("inf") if mse <= 0 else float(10.0 * math.log10(1.0 / mse))


# ----------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------


def _check_geometry(cfg: Config, image_shape, num_train: int) -> None:
    m = build_model(cfg)
    try:
        models.layer_sizes(image_shape[:2], m.kernel_size, m.strides, m.padding)
    except ValueError as e:
        raise ConfigError(f"model (images {image_shape[0]}x{image_shape[1]}): {e}") from None
    if cfg.train.batch_size > num_train:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size}: larger than the "
                          f"{num_train} training examples")


def _progress(cfg: Config, total: int, desc: str):
    from tqdm.auto import tqdm

    disable = None if cfg.output.progress == "auto" else not cfg.output.progress  # None: tty only
    return tqdm(total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True)


def train_and_evaluate(cfg: Config, workdir: str | os.PathLike | None = None) -> dict:
    """Run (or resume) the experiment in ``workdir`` (default ``cfg.output.dir``).

    Returns the summary dict, also written last to ``workdir/summary.json``.
    Raises ConfigError / DataError / RunDirError for user mistakes, TrainingDiverged on NaN.
    """
    t_start = time.perf_counter()
    if workdir is not None:
        cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, dir=str(workdir)))
    run_dir = Path(cfg.output.dir)
    ds = data_lib.load_dataset(cfg.data.name, cfg.data.data_dir, cfg.data.manual_dir,
                               cfg.data.max_train_examples)
    _check_geometry(cfg, ds.image_shape, len(ds.train))
    steps_per_epoch = len(ds.train) // cfg.train.batch_size  # last partial batch: next epoch
    state = create_train_state(cfg, ds.image_shape, steps_per_epoch * cfg.train.epochs)

    resume = rundir.prepare_run_dir(run_dir, config_lib.to_dict(cfg), cfg.output.overwrite)
    ckpt = rundir.Checkpointer(run_dir)
    history: list[dict] = []
    first_epoch = 1
    if resume:
        last = ckpt.latest_epoch()
        restored, history = ckpt.restore(last, state_tree(state))
        state = state.replace(**restored)
        first_epoch = last + 1
        print(f"resuming {run_dir} from the checkpoint of epoch {last}/{cfg.train.epochs}")
    rundir.write_atomic(run_dir / rundir.METRICS_FILE, rundir.dump_jsonl(history))

    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tensorboard"),
                           purge_step=int(state.step) if resume else None)
    initial_mse = history[0]["initial_test_mse"] if history else evaluate(
        state, ds.test, cfg.train.eval_batch_size)
    steady_images, steady_time = 0, 0.0
    wall_before = history[-1]["wall_time_s"] if history else 0.0
    compiled = False
    try:
        for epoch in range(first_epoch, cfg.train.epochs + 1):
            perm = np.random.default_rng([cfg.train.seed, epoch]).permutation(len(ds.train))
            losses, bar = [], _progress(cfg, steps_per_epoch, f"epoch {epoch}")
            t0, timed_images = time.perf_counter(), 0
            for i in range(steps_per_epoch):
                batch = ds.train[perm[i * cfg.train.batch_size:(i + 1) * cfg.train.batch_size]]
                state, loss = train_step(state, batch)
                losses.append(loss)
                if not compiled:  # exclude compilation from the throughput figures
                    jax.block_until_ready(loss)
                    compiled, t0 = True, time.perf_counter()
                else:
                    timed_images += len(batch)
                if (i + 1) % LOG_EVERY == 0 or i + 1 == steps_per_epoch:
                    recent = np.asarray(jax.device_get(losses[-LOG_EVERY:]))
                    if not np.all(np.isfinite(recent)):
                        raise TrainingDiverged(
                            f"train loss became {recent[~np.isfinite(recent)][0]} at epoch "
                            f"{epoch}, step {i + 1}; stopped. Last good checkpoint: epoch "
                            f"{epoch - 1} in {run_dir}; try a lower train.learning_rate"
                        )
                    writer.add_scalar("train/loss", float(recent[-1]), int(state.step))
                    bar.set_postfix(loss=f"{recent[-1]:.4f}")
                bar.update(1)
            epoch_time = time.perf_counter() - t0
            bar.close()
            steady_images, steady_time = steady_images + timed_images, steady_time + epoch_time
            test_mse = evaluate(state, ds.test, cfg.train.eval_batch_size)
            record = {
                "epoch": epoch, "step": int(state.step),
                "train_loss": float(np.mean(jax.device_get(losses))),
                "test_mse": test_mse, "test_psnr": psnr(test_mse),
                "epoch_time_s": epoch_time,
                "images_per_sec": timed_images / epoch_time if epoch_time > 0 else 0.0,
                "wall_time_s": wall_before + time.perf_counter() - t_start,
                "initial_test_mse": initial_mse,
            }
            history.append(record)
            ckpt.save(epoch, state_tree(state), history)  # committed before we report it
            rundir.write_atomic(run_dir / rundir.METRICS_FILE, rundir.dump_jsonl(history))
            for key in ("train_loss", "test_mse", "test_psnr", "images_per_sec"):
                writer.add_scalar(f"epoch/{key}", record[key], int(state.step))
            print(f"epoch {epoch}/{cfg.train.epochs}: train_loss {record['train_loss']:.4f}  "
                  f"test_mse {test_mse:.5f}  test_psnr {record['test_psnr']:.2f} dB  "
                  f"{record['images_per_sec']:.0f} img/s  {epoch_time:.1f} s", flush=True)
        summary = _finish(cfg, state, ds, history, run_dir, writer, steady_images, steady_time,
                          wall_before + time.perf_counter() - t_start)
    finally:
        writer.close()
        ckpt.close()
    return summary


def state_tree(state: TrainState) -> dict:
    """The part of the train state that is saved: arrays only, no functions."""
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step}


def _finish(cfg, state, ds, history, run_dir, writer, steady_images, steady_time, wall) -> dict:
    n = min(cfg.output.num_images, len(ds.test))
    originals = ds.test[:n]
    recon = np.asarray(eval_step(state, originals)[1])
    final = history[-1]
    plots.save_reconstructions(
        run_dir / "reconstructions.png", data_lib.normalize(originals), recon,
        title=f"{ds.name}, {'tied' if cfg.model.tied else 'untied'}: test MSE "
              f"{final['test_mse']:.4f} after {cfg.train.epochs} epochs")
    writer.add_images("test/reconstructions", np.concatenate(
        [data_lib.normalize(originals), recon]), int(state.step), dataformats="NHWC")
    if steady_time <= 0:  # every epoch came from a checkpoint: report what they measured
        ips = [r["images_per_sec"] for r in history if r["images_per_sec"] > 0]
        images_per_sec = float(np.mean(ips)) if ips else 0.0
    else:
        images_per_sec = steady_images / steady_time
    summary = {
        "test_mse": final["test_mse"],
        "test_psnr": final["test_psnr"],
        "initial_test_mse": final["initial_test_mse"],
        "train_loss": final["train_loss"],
        "num_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "tied": cfg.model.tied,
        "epochs": cfg.train.epochs,
        "steps": int(state.step),
        "train_images_per_sec": images_per_sec,
        "num_devices": 1,  # single-device training (data-parallel is a separate feature)
        "backend": jax.default_backend(),
        "wall_time_s": wall,
        "dataset": ds.name,
        "image_shape": list(ds.image_shape),
    }
    rundir.write_atomic(run_dir / rundir.SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + traceback-looking text
        self.exit(2, f"error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m cae.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML experiment config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.epochs=3 (repeatable)")
    args = parser.parse_args(argv)
    try:
        cfg = config_lib.load_config(args.config, args.set)
        summary = train_and_evaluate(cfg)
    except (ConfigError, data_lib.DataError, rundir.RunDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume from the last checkpoint",
              file=sys.stderr)
        return 130
    print(f"done: test_mse {summary['test_mse']:.5f}, test_psnr {summary['test_psnr']:.2f} dB, "
          f"{summary['num_params']} params, {summary['train_images_per_sec']:.0f} img/s; "
          f"results in {cfg.output.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
