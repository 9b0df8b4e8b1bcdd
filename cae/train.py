"""Train a convolutional autoencoder: ``python -m cae.train --config configs/mnist_tied.yaml``.

``train_and_evaluate(cfg, workdir)`` is the testable entry point; ``main`` only parses the command
line (:mod:`cae.cli` turns user mistakes into one-line errors). This file holds the steps and the
loop, as the Flax examples do: the steps are pure functions, ``jit``ted once at module level,
with the train state donated. What a config becomes (model, state, data) is
:mod:`cae.experiment`'s; the devices and processes they run on :mod:`cae.cluster`'s; the run dir
:mod:`cae.rundir`'s and :mod:`cae.checkpoints`'; the end-of-run report :mod:`cae.report`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from cae import checkpoints, cli, cluster, cpu_speed, guard, report, rundir
from cae import config as config_lib
from cae import data as data_lib
from cae.config import Config
from cae.errors import EXIT_DIVERGED
from cae.experiment import (
    TrainState,
    check_geometry,
    create_train_state,
    load_data,
    psnr,
    reconstruct,
    state_tree,
)
from cae.files import dump_jsonl, write_atomic

__all__ = ["loss_fn", "train_step", "train_epoch_steps", "epoch_batches", "eval_step",
           "evaluate", "EvalSet", "train_and_evaluate", "main", "TrainingDiverged"]

LOG_EVERY = 50  # steps between loss syncs (progress bar, NaN check, TensorBoard)
BATCHES = P(None, cluster.BATCH_AXIS)  # [S, B, ...]: S batches of B, B split over the devices


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""

    exit_code = EXIT_DIVERGED


# ----------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------


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
    """One optimizer step on one batch, images [B, H, W, C] uint8; returns (new state, loss).

    One Python call per batch (tests, benchmarks); training uses ``train_epoch_steps``.
    """
    return _step(state, images)


@functools.partial(jax.jit, donate_argnums=0, static_argnames="length")
def train_epoch_steps(state: TrainState, images: jax.Array, batches: jax.Array,
                      start: jax.Array, length: int) -> tuple[TrainState, jax.Array]:
    """``length`` steps of an epoch in one compiled program, on data that stays on the device.

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
    recon = reconstruct(state.apply_fn, state.params, images)
    return jnp.mean((recon - data_lib.normalize(images)) ** 2, axis=(1, 2, 3)), recon


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
        self.batches = cluster.put(padded.reshape(s, b, *images.shape[1:]), mesh, BATCHES)
        self.valid = cluster.put(valid.reshape(s, b), mesh, BATCHES)


def evaluate(state: TrainState, test: EvalSet, program=None) -> float:
    """Mean per-pixel squared error over *all* of the split (pixels in [0, 1]); no test example
    is skipped. One compiled call: ``program`` (from ``compile_evaluation``) or the plain jit."""
    run = _sum_squared_errors if program is None else program
    return float(run(state, test.batches, test.valid)) / test.num_examples


def compile_evaluation(state: TrainState, test: EvalSet):
    """``evaluate``'s program for this state and split, compiled as the training step is
    (``cpu_speed.compile_fast``: on CPU ~2x faster than XLA's default compile of the same
    program)."""
    return cpu_speed.lower_and_compile_fast(_sum_squared_errors, state, test.batches,
                                            test.valid)


# ----------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------


def train_and_evaluate(cfg: Config, workdir: str | os.PathLike | None = None,
                       dataset: data_lib.Dataset | None = None) -> dict:
    """Run (or resume) the experiment in ``workdir`` (default ``cfg.output.dir``).

    ``dataset``: ``load_data(cfg)`` done already (a sweep of runs on the same data loads it
    once); None loads it here. Returns the summary dict, also written last to
    ``workdir/summary.json``.
    Raises ConfigError / DataError / RunDirError for user mistakes, TrainingDiverged on NaN.
    """
    started = time.perf_counter()
    if workdir is not None:
        cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, dir=str(workdir)))
    ds = load_data(cfg) if dataset is None else dataset
    mesh = cluster.make_mesh()
    check_geometry(cfg, ds.image_shape, len(ds.train), mesh.size)
    steps_per_epoch = len(ds.train) // cfg.train.batch_size  # see epoch_batches: none lost
    state = create_train_state(cfg, ds.image_shape, steps_per_epoch * cfg.train.epochs)
    with RunFiles(cfg) as files:
        state, history, first_epoch = files.restore(state, mesh)
        # The data and the parameters live on the device(s) for the whole run: the training
        # split and parameters replicated, each batch split over the devices; XLA inserts the
        # gradient all-reduce.
        state = jax.device_put(state, cluster.sharding(mesh))
        test_set = EvalSet(ds.test, cfg.train.eval_batch_size, mesh)
        files.open_tensorboard(purge_step=int(state.step) if first_epoch > 1 else None)
        eval_program = compile_evaluation(state, test_set)
        record = RunRecord(history, started, cfg.train.batch_size, initial_test_mse=(
            history[0]["initial_test_mse"] if history else evaluate(state, test_set, eval_program)))
        trainer = EpochTrainer(cfg, state, ds.train, mesh)  # compiles up front
        for epoch in range(first_epoch, cfg.train.epochs + 1):
            state, losses, seconds = trainer.run(state, epoch, files)
            record.add_epoch(epoch, state, losses, seconds,
                             test_mse=evaluate(state, test_set, eval_program))
            files.save_epoch(state, record.history)
        wall_time_s = record.wall_time_s()  # the training's, without the report
        return report.write_report(cfg, state, ds, record.history, wall_time_s=wall_time_s,
                                   images_per_sec=record.images_per_sec(),
                                   out_dir=files.out_dir, writer=files.writer)


@dataclasses.dataclass
class RunRecord:
    """What the run measured: ``history``, one metrics.jsonl record per epoch (those of a resumed
    run's checkpoint first), and the throughput of the epochs this process trained."""

    history: list[dict]
    started: float  # time.perf_counter() when this process's part of the run began
    batch_size: int
    initial_test_mse: float  # of the untrained model
    trained_images: int = 0
    trained_seconds: float = 0.0
    wall_before: float = dataclasses.field(init=False)  # of the epochs restored from a checkpoint

    def __post_init__(self):
        self.wall_before = self.history[-1]["wall_time_s"] if self.history else 0.0

    def wall_time_s(self) -> float:
        """Since the run began, the time of the processes it was resumed from included."""
        return self.wall_before + time.perf_counter() - self.started

    def add_epoch(self, epoch: int, state: TrainState, losses: np.ndarray, seconds: float, *,
                  test_mse: float) -> None:
        """losses: the epoch's train loss per step [S]; seconds: its training time."""
        images = len(losses) * self.batch_size
        self.trained_images += images
        self.trained_seconds += seconds
        self.history.append({
            "epoch": epoch, "step": int(state.step),
            "train_loss": float(np.mean(losses)),
            "test_mse": test_mse, "test_psnr": psnr(test_mse),
            "epoch_time_s": seconds,
            "images_per_sec": images / seconds if seconds > 0 else 0.0,
            "wall_time_s": self.wall_time_s(),
            "initial_test_mse": self.initial_test_mse,
        })

    def images_per_sec(self) -> float:
        """Steady-state training throughput; when every epoch came from a checkpoint, what
        those epochs measured."""
        if self.trained_seconds > 0:
            return self.trained_images / self.trained_seconds
        ips = [r["images_per_sec"] for r in self.history if r["images_per_sec"] > 0]
        return float(np.mean(ips)) if ips else 0.0


class RunFiles:
    """The run dir as this process writes it: the lock, the checkpoints, metrics.jsonl and
    TensorBoard, closed (lock released) on leaving the ``with`` block.

    Every process checkpoints (orbax coordinates the writes, and they agree on each step's
    outcome); only process 0 writes the run dir's own files, the others a scratch dir's.
    """

    def __init__(self, cfg: Config):
        self.cfg, self.run_dir = cfg, Path(cfg.output.dir)
        self.resume, self.lock = rundir.open_run_dir(
            self.run_dir, config_lib.to_dict(cfg), cfg.output.overwrite,
            agree=cluster.all_outcomes, primary=cluster.is_primary(), several=cluster.several())
        self.ckpt = checkpoints.Checkpointer(self.run_dir, agree=cluster.all_outcomes,
                                             primary=cluster.is_primary())
        self.out_dir = (self.run_dir if cluster.is_primary()
                        else Path(tempfile.mkdtemp(prefix="cae-scratch-")))
        self.writer = None

    def __enter__(self) -> RunFiles:
        return self

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            _close_events(self.writer)
        self.ckpt.close()
        if self.lock is not None:
            self.lock.release()
        if self.out_dir != self.run_dir:
            shutil.rmtree(self.out_dir, ignore_errors=True)

    def restore(self, state: TrainState, mesh: Mesh) -> tuple[TrainState, list[dict], int]:
        """-> (state, metrics history, first epoch to train): the latest checkpoint's when the
        run resumes, else (``state``, [], 1). Starts metrics.jsonl with the history."""
        history, first_epoch = [], 1
        if self.resume:
            # Restored straight into the mesh's layout: with several processes, arrays restored
            # onto each process's own device could not be moved onto the mesh afterwards.
            newest = self.ckpt.restore_newest_intact(
                state_tree(jax.device_put(state, cluster.sharding(mesh))), set_aside=True,
                report=_report_set_aside)
            if newest is None:
                raise rundir.RunDirError(
                    f"no checkpoint in {self.ckpt.directory} can be restored (the damaged ones "
                    f"are in {self.run_dir / checkpoints.DAMAGED_DIR}); run the same command "
                    "again to start the run afresh, or restore the checkpoints from a backup")
            last, restored, history = newest
            state, first_epoch = state.replace(**restored), last + 1
            print(f"resuming {self.run_dir} from the checkpoint of epoch "
                  f"{last}/{self.cfg.train.epochs}")
        write_atomic(self.out_dir / rundir.METRICS_FILE, dump_jsonl(history))
        return state, history, first_epoch

    def open_tensorboard(self, purge_step: int | None) -> None:
        """``purge_step``: a resumed run's step; TensorBoard drops the events written after it."""
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=purge_step)

    def save_epoch(self, state: TrainState, history: list[dict]) -> None:
        """Checkpoint the epoch that ends ``history``, then report it: metrics.jsonl,
        TensorBoard, one line on stdout."""
        record = history[-1]
        self.ckpt.save(record["epoch"], state_tree(state), history)  # committed before reported
        write_atomic(self.out_dir / rundir.METRICS_FILE, dump_jsonl(history))
        for key in ("train_loss", "test_mse", "test_psnr", "images_per_sec"):
            self.writer.add_scalar(f"epoch/{key}", record[key], record["step"])
        print(f"epoch {record['epoch']}/{self.cfg.train.epochs}: train_loss "
              f"{record['train_loss']:.4f}  test_mse {record['test_mse']:.5f}  test_psnr "
              f"{record['test_psnr']:.2f} dB  {record['images_per_sec']:.0f} img/s  "
              f"{record['epoch_time_s']:.1f} s", flush=True)


class EpochTrainer:
    """The training split on the device(s) and the programs that train on it, compiled up front
    (one per chunk length: LOG_EVERY and the epoch's remainder), so that no epoch compiles and
    every epoch's throughput is steady state. One Python call runs LOG_EVERY steps."""

    def __init__(self, cfg: Config, state: TrainState, train_images: np.ndarray, mesh: Mesh):
        self.cfg, self.num_examples = cfg, len(train_images)
        self.steps = len(train_images) // cfg.train.batch_size  # see epoch_batches: none lost
        self.images = cluster.put(train_images, mesh)
        self.batch_sharding = cluster.sharding(mesh, BATCHES)
        self.shuffle_key = jax.random.key(cfg.train.seed)
        t0 = time.perf_counter()
        batches = jax.ShapeDtypeStruct((self.steps, cfg.train.batch_size), jnp.int32,
                                       sharding=self.batch_sharding)
        self.programs = {
            length: cpu_speed.lower_and_compile_fast(
                train_epoch_steps, state, self.images, batches, np.int32(0), length)
            for length in {min(LOG_EVERY, self.steps), self.steps % LOG_EVERY} - {0}}
        print(f"compiled the training step ({cfg.train.batch_size} images, {mesh.size} "
              f"device{'s' if mesh.size > 1 else ''}) in {time.perf_counter() - t0:.1f} s",
              flush=True)

    def run(self, state: TrainState, epoch: int, files: RunFiles
            ) -> tuple[TrainState, np.ndarray, float]:
        """One epoch on a fresh shuffle -> (state, loss per step [S], seconds). Raises
        TrainingDiverged when a loss is not finite."""
        batches = jax.device_put(
            epoch_batches(jax.random.fold_in(self.shuffle_key, epoch), self.num_examples,
                          self.cfg.train.batch_size), self.batch_sharding)
        losses, bar = [], _progress(self.cfg, self.steps, f"epoch {epoch}")
        t0 = time.perf_counter()
        for start in range(0, self.steps, LOG_EVERY):
            length = min(LOG_EVERY, self.steps - start)
            state, chunk = self.programs[length](state, self.images, batches, np.int32(start))
            chunk = np.asarray(chunk)  # waits for the chunk; the NaN check needs it anyway
            losses.append(chunk)
            if not np.all(np.isfinite(chunk)):
                bad = int(np.argmin(np.isfinite(chunk)))
                raise TrainingDiverged(
                    f"train loss became {chunk[bad]} at epoch {epoch}, step {start + bad + 1}; "
                    f"stopped. {_last_good(epoch, files.run_dir)}; try a lower "
                    "train.learning_rate")
            files.writer.add_scalar("train/loss", float(chunk[-1]), int(state.step))
            bar.set_postfix(loss=f"{chunk[-1]:.4f}")
            bar.update(length)
        seconds = time.perf_counter() - t0
        bar.close()
        return state, np.concatenate(losses), seconds


def _report_set_aside(epoch: int, reason: str, moved_to: Path | None) -> None:
    print(f"warning: the checkpoint of epoch {epoch} cannot be restored ({reason}); moved it "
          f"to {moved_to} and trying the one before", file=sys.stderr, flush=True)


def _progress(cfg: Config, total: int, desc: str):
    from tqdm.auto import tqdm

    # "auto": a bar only on a terminal (the user's: a guarded child's stderr is the guard's pipe).
    disable = (not guard.stderr_is_tty() if cfg.output.progress == "auto"
               else not cfg.output.progress)
    return tqdm(total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True)


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


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = cli.CommandLineParser(prog="python -m cae.train",
                                   description=__doc__.splitlines()[0])
    cli.add_config_flags(parser, config_help="YAML experiment config",
                         set_help="override a config key, e.g. --set train.epochs=3 (repeatable)")
    args = parser.parse_args(argv)
    interrupted = "interrupted: run the same command again to resume from the last checkpoint"
    if not guard.guarded():  # one process of several: run as the guard's child (cae.guard)
        code, several = cli.run_command(cluster.launched_as_several_processes, interrupted)
        if code or several:
            return code or guard.run_guarded("cae.train", sys.argv[1:] if argv is None else argv)

    def run():
        cluster.maybe_initialize_distributed()
        cfg = config_lib.load_config(args.config, args.set)
        try:
            return cfg, train_and_evaluate(cfg)
        except Exception as e:  # a collective whose peer is gone: one line, not a traceback
            lost = cluster.several() and guard.lost_process_error(
                e, jax.process_index(), jax.process_count())
            if lost:
                raise lost from None
            raise

    code, result = cli.run_command(run, interrupted)
    if code:
        return code
    cfg, summary = result
    print(f"done: {report.summary_line(summary)}; results in {cfg.output.dir}")
    return 0


if __name__ == "__main__":
    cli.exit_with(main())
