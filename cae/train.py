"""Train a convolutional autoencoder: ``python -m cae.train --config configs/mnist_tied.yaml``.

``train_and_evaluate(cfg, workdir)`` is the testable entry point; ``main`` only parses the command
line and turns user mistakes into one-line errors. The steps are pure functions, ``jit``ted once
at module level, with the train state donated.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before anything imports TensorFlow

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cae import baselines, cluster, cpu_speed, models, plots, probe, rundir
from cae import config as config_lib
from cae import data as data_lib
from cae.config import Config, ConfigError

__all__ = ["TrainState", "create_train_state", "loss_fn", "train_step", "eval_step",
           "evaluate", "train_and_evaluate", "main", "TrainingDiverged"]

LOG_EVERY = 50  # steps between loss syncs (progress bar, NaN check, TensorBoard)


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


class TrainState(train_state.TrainState):
    loss: str = struct.field(pytree_node=False, default="bce")  # "bce" | "mse"
    compute_dtype: str = struct.field(pytree_node=False, default="float32")  # | "bfloat16"


# ----------------------------------------------------------------------------------------------
# Devices: one mesh axis over every device; batches split along it, everything else replicated
# ----------------------------------------------------------------------------------------------

BATCH_AXIS = "batch"


def make_mesh() -> Mesh:
    """A 1-D mesh over all devices (of all processes): data parallelism along ``batch``."""
    return Mesh(np.asarray(jax.devices()), (BATCH_AXIS,))


# Where these say there are several processes, ``main`` joins them before JAX does anything.
CLUSTER_ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                    "TPU_WORKER_HOSTNAMES")


def maybe_initialize_distributed() -> bool:
    """Call ``jax.distributed.initialize()`` when launched as one of several processes.

    Slurm (``srun``), Open MPI (``mpirun``) and Cloud TPU pods are detected by JAX itself; any
    other launcher sets ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0),
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. Returns whether it initialised.
    """
    env = os.environ
    if not launched_as_several_processes():
        return False
    # jax.distributed installs its own SIGTERM handler (preemption notices) that keeps the
    # process running; put back the one we had (cluster.terminate_promptly's, or the default).
    sigterm = signal.getsignal(signal.SIGTERM)
    if env.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"],
                                   _env_int("JAX_NUM_PROCESSES"), _env_int("JAX_PROCESS_ID"))
    else:
        jax.distributed.initialize()
    if sigterm is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sigterm)
    return True


def _env_int(name: str, default: int | None = None) -> int | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"${name}={text!r}: must be an integer") from None


def launched_as_several_processes() -> bool:
    """Does the environment say this is one process of several (see CLUSTER_ENV_VARS)?"""
    env = os.environ
    return bool(env.get("JAX_COORDINATOR_ADDRESS")
                or _env_int("SLURM_NTASKS", 1) > 1
                or _env_int("OMPI_COMM_WORLD_SIZE", 1) > 1
                or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def sharding(mesh: Mesh, spec: P | None = None) -> jax.sharding.Sharding:
    """``NamedSharding(mesh, spec)`` (default: replicated); with one device, that device's plain
    sharding (the same placement, and the jit needs no SPMD partitioning)."""
    if mesh.size == 1:
        return jax.sharding.SingleDeviceSharding(mesh.devices.flat[0])
    return NamedSharding(mesh, P() if spec is None else spec)


def put(array: np.ndarray, mesh: Mesh, spec: P | None = None) -> jax.Array:
    """Host array -> global device array laid out as ``spec`` (default: replicated).

    Built from per-device slices, so it also works when the mesh spans several processes."""
    return jax.make_array_from_callback(array.shape, sharding(mesh, spec),
                                        lambda index: array[index])


# ----------------------------------------------------------------------------------------------
# Model, optimizer, steps
# ----------------------------------------------------------------------------------------------


def build_model(cfg: Config, image_shape=None) -> models.ConvAutoencoder:
    """``image_shape`` (H, W, C) is needed only for ``decode`` (``method="decode"``)."""
    m = cfg.model
    n = len(m.features)
    return models.ConvAutoencoder(
        features=tuple(m.features),
        kernel_size=tuple(config_lib.per_layer(m.kernel_size, n, "model.kernel_size")),
        strides=tuple(config_lib.per_layer(m.strides, n, "model.strides")),
        padding=tuple(config_lib.per_layer(m.padding, n, "model.padding")),
        tied=m.tied, activation=m.activation, code_activation=m.code_activation,
        impl=m.conv_transpose_impl,
        image_shape=None if image_shape is None else tuple(int(v) for v in image_shape),
        code_size=m.code_size,
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
                             tx=build_optimizer(cfg, total_steps), loss=cfg.train.loss,
                             compute_dtype=cfg.train.dtype)


def loss_fn(params, apply_fn, images: jax.Array, loss: str,
            compute_dtype: str = "float32") -> jax.Array:
    """images: [B, H, W, C] uint8. Mean per-pixel BCE on logits, or MSE on sigmoid outputs.

    ``compute_dtype="bfloat16"``: the model runs in bfloat16 on bfloat16 copies of the float32
    parameters (gradients flow back to the float32 ones); the loss is taken in float32.
    """
    x = data_lib.normalize(images)
    if compute_dtype != "float32":
        params = jax.tree.map(lambda p: p.astype(compute_dtype), params)
        logits = apply_fn({"params": params}, x.astype(compute_dtype)).astype(jnp.float32)
    else:
        logits = apply_fn({"params": params}, x)
    if loss == "bce":
        per_pixel = optax.sigmoid_binary_cross_entropy(logits, x)
    else:
        per_pixel = (jax.nn.sigmoid(logits) - x) ** 2
    # Mean per image, then over the batch: two short sums instead of one of B*H*W*C terms, so
    # the float32 rounding stays ~1e-7 whatever order the backend sums in (one long sequential
    # sum, as XLA:CPU's own reduction does, drifts by ~4e-5 relative at 128x784 terms).
    return per_pixel.mean(axis=(1, 2, 3)).mean()


def _step(state: TrainState, images: jax.Array) -> tuple[TrainState, jax.Array]:
    loss, grads = jax.value_and_grad(loss_fn)(state.params, state.apply_fn, images, state.loss,
                                              state.compute_dtype)
    return state.apply_gradients(grads=grads), loss


@functools.partial(jax.jit, donate_argnums=0)
def train_step(state: TrainState, images: jax.Array) -> tuple[TrainState, jax.Array]:
    """One optimizer step on images [B, H, W, C] uint8; returns (new state, loss).

    The per-step path (one Python call per batch); training itself uses ``train_steps``.
    """
    return _step(state, images)


@functools.partial(jax.jit, donate_argnums=0, static_argnames="length")
def train_steps(state: TrainState, images: jax.Array, batches: jax.Array, start: jax.Array,
                length: int) -> tuple[TrainState, jax.Array]:
    """``length`` optimizer steps in one compiled program, on data that stays on the device.

    images: [N, H, W, C] uint8, the whole training split (replicated on every device);
    batches: [S, B] int32 example indices of this epoch's batches (sharded along B);
    runs batches[start : start + length] through ``lax.scan``; returns (state, losses [length]).
    The batch is gathered on the device: no host-to-device copy per step.
    """
    rows = jax.lax.dynamic_slice_in_dim(batches, start, length)
    return jax.lax.scan(_step, state, images[rows])


@functools.partial(jax.jit, static_argnames=("num_examples", "batch_size"))
def epoch_batches(key: jax.Array, num_examples: int, batch_size: int) -> jax.Array:
    """A fresh shuffle of ``num_examples`` into [num_examples // batch_size, batch_size] indices.

    The last ``num_examples % batch_size`` examples of each shuffle are left out of that epoch
    (every batch has the same size: one compiled step); a new shuffle every epoch means no
    example is left out for good.
    """
    steps = num_examples // batch_size
    perm = jax.random.permutation(key, num_examples)
    return perm[:steps * batch_size].reshape(steps, batch_size).astype(jnp.int32)


@jax.jit
def eval_step(state: TrainState, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """images: [B, H, W, C] uint8 -> (per-example mean squared error [B], reconstructions)."""
    x = data_lib.normalize(images)
    recon = jax.nn.sigmoid(state.apply_fn({"params": state.params}, x))
    return jnp.mean((recon - x) ** 2, axis=(1, 2, 3)), recon


@jax.jit
def _sum_squared_errors(state: TrainState, batches: jax.Array, valid: jax.Array) -> jax.Array:
    """batches: [S, B, H, W, C] uint8; valid: [S, B] bool. Sum of per-example MSE over valid."""
    def body(total, xs):
        images, ok = xs
        errors = eval_step(state, images)[0]
        return total + jnp.sum(jnp.where(ok, errors, 0.0)), None

    return jax.lax.scan(body, jnp.zeros((), jnp.float32), (batches, valid))[0]


class EvalSet:
    """A split held on the device(s) as [S, B, H, W, C] batches, padded to whole batches (the
    padding is masked out), for ``evaluate`` in one compiled call. B is sharded over devices."""

    def __init__(self, images: np.ndarray, batch_size: int, mesh: Mesh):
        b = -(-batch_size // mesh.size) * mesh.size  # a multiple of the device count
        s = -(-len(images) // b)
        pad = s * b - len(images)
        padded = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
        valid = np.arange(s * b) < len(images)
        self.num_examples = len(images)
        self.batches = put(padded.reshape(s, b, *images.shape[1:]), mesh, P(None, BATCH_AXIS))
        self.valid = put(valid.reshape(s, b), mesh, P(None, BATCH_AXIS))


def evaluate(state: TrainState, test: EvalSet, program=None) -> float:
    """Mean per-pixel squared error over *all* of the split (pixels in [0, 1]); no test example
    is skipped. One compiled call: ``program`` (from ``compile_evaluation``) or the plain jit."""
    run = _sum_squared_errors if program is None else program
    return float(run(state, test.batches, test.valid)) / test.num_examples


def compile_evaluation(state: TrainState, test: EvalSet):
    """``evaluate``'s program for this state and split, compiled as the training step is
    (``cpu_speed.compile_fast``: on CPU ~2x faster than XLA's default compile of the same
    program)."""
    return cpu_speed.compile_fast(_sum_squared_errors.lower(state, test.batches, test.valid))


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB for pixels in [0, 1]."""
    return float("inf") if mse <= 0 else float(10.0 * math.log10(1.0 / mse))


# ----------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------


def code_shape(cfg: Config, image_shape) -> tuple[int, int, int]:
    """The code's shape (h, w, C) for images of ``image_shape`` (H, W, C); its size h * w * C is
    the number of values per image the encoder keeps. Raises ValueError if a layer does not fit."""
    m = build_model(cfg)
    return models.code_shape(image_shape, m.features, m.kernel_size, m.strides, m.padding,
                             m.code_size)


def _check_geometry(cfg: Config, image_shape, num_train: int, num_devices: int = 1) -> None:
    try:
        code_shape(cfg, image_shape)
    except ValueError as e:
        raise ConfigError(f"model (images {image_shape[0]}x{image_shape[1]}): {e}") from None
    if cfg.train.batch_size > num_train:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size}: larger than the "
                          f"{num_train} training examples")
    total_steps = num_train // cfg.train.batch_size * cfg.train.epochs
    if total_steps > config_lib.INT_MAX:  # the step counter is an int32
        raise ConfigError(f"train.epochs={cfg.train.epochs}: {total_steps} steps in all, more "
                          f"than the step counter holds ({config_lib.INT_MAX})")
    if cfg.train.batch_size % num_devices:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size}: must be a multiple of the "
                          f"number of devices ({num_devices}); each device takes an equal share")


def _progress(cfg: Config, total: int, desc: str):
    from tqdm.auto import tqdm

    disable = None if cfg.output.progress == "auto" else not cfg.output.progress  # None: tty only
    return tqdm(total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True)


def load_data(cfg: Config) -> data_lib.Dataset:
    """The splits ``cfg.data`` names, in memory. Raises DataError."""
    return data_lib.load_dataset(cfg.data.name, cfg.data.data_dir, cfg.data.manual_dir,
                                 cfg.data.max_train_examples)


def train_and_evaluate(cfg: Config, workdir: str | os.PathLike | None = None,
                       dataset: data_lib.Dataset | None = None) -> dict:
    """Run (or resume) the experiment in ``workdir`` (default ``cfg.output.dir``).

    ``dataset``: ``load_data(cfg)`` done already (a sweep of runs on the same data loads it
    once); None loads it here. Returns the summary dict, also written last to
    ``workdir/summary.json``.
    Raises ConfigError / DataError / RunDirError for user mistakes, TrainingDiverged on NaN.
    """
    t_start = time.perf_counter()
    if workdir is not None:
        cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, dir=str(workdir)))
    run_dir = Path(cfg.output.dir)
    ds = load_data(cfg) if dataset is None else dataset
    mesh = make_mesh()
    _check_geometry(cfg, ds.image_shape, len(ds.train), mesh.size)
    batch_size = cfg.train.batch_size
    steps_per_epoch = len(ds.train) // batch_size  # see epoch_batches: shuffled, none lost
    state = create_train_state(cfg, ds.image_shape, steps_per_epoch * cfg.train.epochs)

    resume, lock = cluster.open_run_dir(run_dir, config_lib.to_dict(cfg), cfg.output.overwrite)
    # Every process: orbax coordinates the writes, and they agree on each step's outcome.
    ckpt = rundir.Checkpointer(run_dir, agree=lambda outcome: cluster.all_outcomes(
        outcome, "checkpointing"), primary=cluster.is_primary())
    history: list[dict] = []
    first_epoch = 1
    if resume:
        # Restored straight into the mesh's layout: with several processes, arrays restored
        # onto each process's own device could not be moved onto the mesh afterwards.
        last, restored, history = ckpt.restore_latest(
            state_tree(jax.device_put(state, sharding(mesh))),
            report=lambda line: print(line, file=sys.stderr, flush=True))
        state = state.replace(**restored)
        first_epoch = last + 1
        print(f"resuming {run_dir} from the checkpoint of epoch {last}/{cfg.train.epochs}")
    # Only process 0 writes the run dir's own files; the others write theirs to a scratch dir.
    out_dir = run_dir if cluster.is_primary() else Path(tempfile.mkdtemp(prefix="cae-scratch-"))
    rundir.write_atomic(out_dir / rundir.METRICS_FILE, rundir.dump_jsonl(history))

    # The data and the parameters live on the device(s) for the whole run: the training split
    # and parameters replicated, each batch split over the devices; XLA inserts the gradient
    # all-reduce. One Python call runs LOG_EVERY steps.
    state = jax.device_put(state, sharding(mesh))
    train_images = put(ds.train, mesh)
    test_set = EvalSet(ds.test, cfg.train.eval_batch_size, mesh)
    batch_sharding = sharding(mesh, P(None, BATCH_AXIS))
    shuffle_key = jax.random.key(cfg.train.seed)

    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(out_dir / "tensorboard"),
                           purge_step=int(state.step) if resume else None)
    eval_program = compile_evaluation(state, test_set)
    initial_mse = (history[0]["initial_test_mse"] if history
                   else evaluate(state, test_set, eval_program))
    steady_images, steady_time = 0, 0.0
    wall_before = history[-1]["wall_time_s"] if history else 0.0
    # Compile the training programs up front (one per chunk length: LOG_EVERY and the epoch's
    # remainder), so that no epoch compiles and the throughput figures are all steady state.
    t0 = time.perf_counter()
    batches_spec = jax.ShapeDtypeStruct((steps_per_epoch, batch_size), jnp.int32,
                                        sharding=batch_sharding)
    programs = {length: cpu_speed.compile_fast(train_steps.lower(state, train_images, batches_spec,
                                                           np.int32(0), length))
                for length in {min(LOG_EVERY, steps_per_epoch), steps_per_epoch % LOG_EVERY} - {0}}
    print(f"compiled the training step ({cfg.train.batch_size} images, {mesh.size} "
          f"device{'s' if mesh.size > 1 else ''}) in {time.perf_counter() - t0:.1f} s", flush=True)
    try:
        for epoch in range(first_epoch, cfg.train.epochs + 1):
            batches = jax.device_put(epoch_batches(jax.random.fold_in(shuffle_key, epoch),
                                                   len(ds.train), batch_size), batch_sharding)
            losses, bar = [], _progress(cfg, steps_per_epoch, f"epoch {epoch}")
            t0 = time.perf_counter()
            for start in range(0, steps_per_epoch, LOG_EVERY):
                length = min(LOG_EVERY, steps_per_epoch - start)
                state, chunk = programs[length](state, train_images, batches, np.int32(start))
                chunk = np.asarray(chunk)  # waits for the chunk; the NaN check needs it anyway
                losses.append(chunk)
                if not np.all(np.isfinite(chunk)):
                    bad = int(np.argmin(np.isfinite(chunk)))
                    raise TrainingDiverged(
                        f"train loss became {chunk[bad]} at epoch {epoch}, step {start + bad + 1}; "
                        f"stopped. {_last_good(epoch, run_dir)}; try a lower train.learning_rate")
                writer.add_scalar("train/loss", float(chunk[-1]), int(state.step))
                bar.set_postfix(loss=f"{chunk[-1]:.4f}")
                bar.update(length)
            epoch_time = time.perf_counter() - t0
            timed_images = steps_per_epoch * batch_size
            bar.close()
            steady_images, steady_time = steady_images + timed_images, steady_time + epoch_time
            test_mse = evaluate(state, test_set, eval_program)
            record = {
                "epoch": epoch, "step": int(state.step),
                "train_loss": float(np.mean(np.concatenate(losses))),
                "test_mse": test_mse, "test_psnr": psnr(test_mse),
                "epoch_time_s": epoch_time,
                "images_per_sec": timed_images / epoch_time if epoch_time > 0 else 0.0,
                "wall_time_s": wall_before + time.perf_counter() - t_start,
                "initial_test_mse": initial_mse,
            }
            history.append(record)
            ckpt.save(epoch, state_tree(state), history)  # committed before we report it
            rundir.write_atomic(out_dir / rundir.METRICS_FILE, rundir.dump_jsonl(history))
            for key in ("train_loss", "test_mse", "test_psnr", "images_per_sec"):
                writer.add_scalar(f"epoch/{key}", record[key], int(state.step))
            print(f"epoch {epoch}/{cfg.train.epochs}: train_loss {record['train_loss']:.4f}  "
                  f"test_mse {test_mse:.5f}  test_psnr {record['test_psnr']:.2f} dB  "
                  f"{record['images_per_sec']:.0f} img/s  {epoch_time:.1f} s", flush=True)
        summary = _finish(cfg, state, ds, history, out_dir, writer, steady_images, steady_time,
                          wall_before + time.perf_counter() - t_start)
    finally:
        _close_events(writer)
        ckpt.close()
        if lock is not None:
            lock.release()
        if out_dir != run_dir:
            shutil.rmtree(out_dir, ignore_errors=True)
    return summary


def _close_events(writer) -> None:
    """Close the TensorBoard writer. If the storage refuses its last events (disk full), drop
    them: the run's own error says what happened, and tensorboardX would otherwise retry at
    exit and print a traceback."""
    try:
        writer.close()
    except OSError:
        events = getattr(getattr(writer, "file_writer", None), "event_writer", None)
        if events is not None:  # tensorboardX's own "closed" flag: no retry at exit
            events._closed = True


def _last_good(epoch: int, run_dir: Path) -> str:
    """Where a diverged run can be taken up again (epoch 1 has no checkpoint before it)."""
    if epoch <= 1:
        return f"No checkpoint was written (it diverged in epoch 1); {run_dir} can be reused"
    return f"Last good checkpoint: epoch {epoch - 1} in {run_dir}"


def state_tree(state: TrainState) -> dict:
    """The part of the train state that is saved: arrays only, no functions."""
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step}


def _finish(cfg, state, ds, history, run_dir, writer, steady_images, steady_time, wall) -> dict:
    n = min(cfg.output.num_images, len(ds.test))
    originals = ds.test[:n]
    recon = np.asarray(eval_step(state, originals)[1])
    final = history[-1]
    code_size, pca = pca_baseline(cfg, ds, probe=cfg.train.linear_probe)
    against, baseline = pca_labels(code_size, pca)
    plots.save_reconstructions(
        run_dir / "reconstructions.png", data_lib.normalize(originals), recon,
        title=f"{ds.name}, {'tied' if cfg.model.tied else 'untied'}, code of {code_size} "
              f"numbers: test MSE {final['test_mse']:.4f}{against} after {cfg.train.epochs} "
              "epochs")
    writer.add_images("test/reconstructions", np.concatenate(
        [data_lib.normalize(originals), recon]), int(state.step), dataformats="NHWC")
    plots.save_figure(run_dir / "curves.png", plots.curves_figure(
        history, loss_name=f"train loss ({cfg.train.loss.upper()})",
        title=f"{ds.name}, {'tied' if cfg.model.tied else 'untied'}", baseline=baseline))
    probe_acc = None
    if cfg.train.linear_probe:  # frozen codes of the train split -> classifier -> test split
        print(f"linear probe: logistic regression on the codes of {len(ds.train)} train images "
              "(train.linear_probe=false skips it)", flush=True)
        probe_acc = probe.probe_dataset(build_model(cfg, ds.image_shape).apply, state.params, ds,
                                        cfg.train.eval_batch_size, seed=cfg.train.seed)
        if probe_acc is not None:
            writer.add_scalar("test/linear_probe_acc", probe_acc, int(state.step))
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
        "num_devices": jax.device_count(),  # batches are split over all of them
        "backend": jax.default_backend(),
        "wall_time_s": wall,
        "dataset": ds.name,
        "image_shape": list(ds.image_shape),
        "linear_probe_acc": probe_acc,  # None: switched off, or a dataset without labels
        "code_size": code_size,  # numbers per image in the code
    }
    if pca is not None:  # the linear baseline with as many numbers: PCA-code_size
        summary["pca_test_mse"] = pca.test_mse
        summary["mse_ratio_to_pca"] = (pca.test_mse / final["test_mse"] if final["test_mse"] > 0
                                       else float("inf"))
        if cfg.train.linear_probe:
            summary["pca_probe_acc"] = pca.probe_acc
    rundir.write_atomic(run_dir / rundir.SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


def pca_baseline(cfg: Config, ds: data_lib.Dataset, probe: bool = False):
    """-> (code_size, PCA with code_size components on the same splits, or None when the code is
    not smaller than an image: then nothing is compressed and there is no baseline). Cached per
    machine (``cae.baselines``); ``probe``: with the linear probe of the PCA codes."""
    code_size = int(np.prod(code_shape(cfg, ds.image_shape)))
    if code_size >= int(np.prod(ds.image_shape)):
        return code_size, None
    t0 = time.perf_counter()
    result = baselines.pca_baseline(ds, code_size, probe=probe)
    if time.perf_counter() - t0 > 1.0:  # computed, not read from the cache
        print(f"PCA baseline with {code_size} components in {time.perf_counter() - t0:.1f} s "
              f"(cached in {baselines.cache_dir()})", flush=True)
    return code_size, result


def pca_labels(code_size: int, pca) -> tuple[str, tuple[str, float] | None]:
    """``pca_baseline``'s result for the pictures: (a suffix for a title naming PCA's test MSE,
    ``plots.curves_figure``'s ``baseline``); ("", None) without a baseline."""
    if pca is None:
        return "", None
    return (f" (PCA with {code_size} components: {pca.test_mse:.4f})",
            (f"PCA, {code_size} components", pca.test_mse))


def summary_line(summary: dict) -> str:
    """The figures of a summary.json in one line, each quality figure beside its baseline."""
    parts = [f"test_mse {summary['test_mse']:.5f} (untrained {summary['initial_test_mse']:.5f}"]
    if summary.get("pca_test_mse") is not None:
        parts[0] += (f", PCA-{summary['code_size']} {summary['pca_test_mse']:.5f}: "
                     f"{summary['mse_ratio_to_pca']:.2f}x lower than PCA)")
    else:
        parts[0] += f"; code of {summary['code_size']} numbers: no PCA baseline)"
    parts.append(f"test_psnr {summary['test_psnr']:.2f} dB")
    if summary.get("linear_probe_acc") is not None:
        pca_probe = summary.get("pca_probe_acc")
        parts.append(f"linear_probe_acc {summary['linear_probe_acc']:.4f}"
                     + ("" if pca_probe is None else f" (PCA codes {pca_probe:.4f})"))
    parts.append(f"code {summary['code_size']} numbers, {summary['num_params']} params, "
                 f"{summary['train_images_per_sec']:.0f} img/s")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


EXIT_DIVERGED, EXIT_USER, EXIT_STORAGE = 1, 2, 3


def run_command(body, interrupted: str) -> tuple[int, Any]:
    """Run a command-line entry point's ``body()``; returns (exit code, its result).

    Exit codes (README, *Reliability*): mistakes in the config, the data or the run dir 2; the
    storage failing (disk full, read-only, not a directory) 3; a diverged run 1; Ctrl-C 130 and
    SIGTERM 143 (with the ``interrupted`` hint). Each with one line on stderr, never a
    traceback. Other exceptions are bugs and propagate.
    """
    try:
        with cluster.terminate_promptly(interrupted):
            return 0, body()
    except (ConfigError, data_lib.DataError, rundir.RunDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER, None
    except rundir.StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_STORAGE, None
    except OSError as e:
        print(f"error: {rundir.storage_error_message(e)}", file=sys.stderr)
        return EXIT_STORAGE, None
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED, None
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130, None
    except cluster.Terminated:
        cluster.say_once(interrupted)
        return 143, None


def main(argv: list[str] | None = None) -> int:
    parser = config_lib.CommandLineParser(prog="python -m cae.train",
                                          description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML experiment config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.epochs=3 (repeatable)")
    args = parser.parse_args(argv)

    def run():
        maybe_initialize_distributed()
        cfg = config_lib.load_config(args.config, args.set)
        return cfg, train_and_evaluate(cfg)

    code, result = run_command(
        run, "interrupted: run the same command again to resume from the last checkpoint")
    if code:
        return code
    cfg, summary = result
    print(f"done: {summary_line(summary)}; results in {cfg.output.dir}")
    return 0


def exit_with(code: int) -> None:
    """Exit with ``code``. After a storage failure or an interruption, without the exit
    handlers and the interpreter's teardown: they would retry the writes that just failed
    (TensorBoard's, orbax's) and print their tracebacks after our one line, or, interrupted
    amid JAX's and orbax's threads, crash (SIGSEGV seen after SIGTERM) or wait for the other
    processes of a job. Everything committed is on disk already (orbax waits for each save,
    the other files are renamed into place)."""
    if code not in (EXIT_STORAGE, 130, 143):
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_with(main())
