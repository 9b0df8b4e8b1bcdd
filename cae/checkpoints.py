"""Orbax checkpoints of a run: ``{"state": pytree, "history": json}`` keyed by epoch number.

orbax commits each checkpoint atomically (temp dir + rename), so a process killed mid-save
leaves the previous checkpoint as the latest one. A checkpoint that cannot be restored is set
aside into ``checkpoints_damaged/`` (by ``cae.train``) or skipped (by ``cae.visualize``), and the
one before it is used. In a multi-process job every process makes a :class:`Checkpointer`; the
``agree`` it is given shares each process's outcome of a step with all (see
``cae.cluster.all_outcomes``), so that they all take the same branch.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import itertools
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from cae.errors import StorageError, first_line, storage_error_message

__all__ = ["Checkpointer", "Agree", "alone", "committed_epochs", "quiet_background_failures",
           "CHECKPOINT_DIR", "DAMAGED_DIR"]

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints_damaged"  # outside CHECKPOINT_DIR: orbax never looks at it again

# agree(outcome, step, timeout_s) -> every process's outcome of ``step``, indexed by process id
# (``cae.cluster.all_outcomes``); a process alone agrees with itself.
Agree = Callable[..., list[str]]


def alone(outcome: str, step: str = "", timeout_s: float = 0.0) -> list[str]:
    """The ``agree`` of a process that is the whole job: its own outcome."""
    return [outcome]


def committed_epochs(run_dir: str | os.PathLike) -> list[int]:
    """The epochs of ``run_dir``'s committed checkpoints, oldest first. Reads the folder only
    (no orbax manager, which in a multi-process job would wait for the other processes)."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return []
    return sorted(ocp.path.step.checkpoint_steps(directory))


@contextlib.contextmanager
def quiet_background_failures():
    """While orbax saves or restores: its threads log each failure (with a traceback) before
    the call raises it in this thread, where it becomes our one line. Keep the one line."""
    absl_logger = logging.getLogger("absl")
    level, hook = absl_logger.level, sys.unraisablehook
    absl_logger.setLevel(logging.CRITICAL)
    sys.unraisablehook = lambda unraisable: None  # TensorStore's callbacks report through it
    try:
        yield
    except BaseException:
        gc.collect()  # abandoned reads and writes report when collected: quietly, now
        raise
    finally:
        absl_logger.setLevel(level)
        sys.unraisablehook = hook


class Checkpointer:
    """Orbax checkpoints of ``{"state": pytree, "history": json}`` keyed by epoch number."""

    def __init__(self, run_dir: str | os.PathLike, max_to_keep: int = 3, agree: Agree = alone,
                 primary: bool = True):
        """In a multi-process job every process makes one; ``agree`` shares each process's
        outcome of a step with all (module docstring); only the ``primary`` moves folders."""
        self.directory = Path(run_dir).absolute() / CHECKPOINT_DIR
        self.max_to_keep = max_to_keep
        self._agree, self._primary = agree, primary
        self._manager = None

    @property
    def manager(self):
        if self._manager is None:
            # cleanup_tmp_directories: a save cut short (kill -9, disk full) leaves a temp dir.
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep, create=True,
                                                     cleanup_tmp_directories=True),
                item_names=("state", "history"),
            )
        return self._manager

    def epochs(self) -> list[int]:
        """The committed checkpoints' epochs, oldest first (:func:`committed_epochs`)."""
        return committed_epochs(self.directory.parent)

    def latest_epoch(self) -> int | None:
        epochs = self.epochs()
        return epochs[-1] if epochs else None

    def set_aside(self, epoch: int) -> Path:
        """Move checkpoint ``epoch`` out of orbax's sight into ``checkpoints_damaged/`` (kept,
        not deleted: it is the user's data); returns where it went."""
        damaged = self.directory.parent / DAMAGED_DIR
        damaged.mkdir(exist_ok=True)
        stamp = time.strftime('%Y%m%d-%H%M%S')
        target = damaged / f"{epoch}-{stamp}"
        for n in itertools.count(1):  # the same epoch set aside twice within a second
            if not target.exists():
                break
            target = damaged / f"{epoch}-{stamp}-{n}"
        os.replace(self.directory / str(epoch), target)
        return target

    def save(self, epoch: int, state: Any, history: list[dict]) -> None:
        """Save and wait until committed: after this returns, a SIGKILL cannot lose it."""
        try:
            self._check_room(epoch, state)
            too_full = ""
        except StorageError as e:
            too_full = str(e)
        # All save, or none does.
        failures = [f for f in self._agree(too_full, "checkpointing") if f]
        if failures:
            raise StorageError(failures[0])
        with quiet_background_failures():
            try:
                self.manager.save(epoch, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    history=ocp.args.JsonSave({"metrics": history}),
                ))
                self.manager.wait_until_finished()
            except Exception as e:
                reason = storage_error_message(e)
                if reason is None:
                    raise
                time.sleep(1.0)  # let the other writer threads fail quietly, too
                raise StorageError(f"saving the checkpoint of epoch {epoch} in "
                                   f"{self.directory} failed: {reason}") from None

    def _check_room(self, epoch: int, state: Any) -> None:
        """Refuse to start a save that cannot fit (twice the arrays' bytes, or the last
        checkpoint's size, plus 1 MiB of metadata): orbax's many writer threads would each
        report the full disk at length before the error reaches us."""
        arrays = sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(state))
        latest = self.latest_epoch()
        last = (sum(p.stat().st_size for p in (self.directory / str(latest)).rglob("*")
                    if p.is_file()) if latest is not None else 0)
        need = max(2 * arrays, last) + 2**20
        where = self.directory if self.directory.is_dir() else self.directory.parent
        free = shutil.disk_usage(where).free
        if free < need:
            raise StorageError(
                f"saving the checkpoint of epoch {epoch} in {self.directory} failed: "
                f"{os.strerror(errno.ENOSPC)} ({free / 2**20:.1f} MiB free, about "
                f"{need / 2**20:.1f} MiB needed); free some space and run the same command "
                "again to resume")

    def restore(self, epoch: int, abstract_state: Any) -> tuple[Any, list[dict]]:
        """``abstract_state``: a pytree of arrays or ShapeDtypeStructs giving the structure."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        restored = self.manager.restore(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            history=ocp.args.JsonRestore(),
        ))
        return restored["state"], list(restored["history"]["metrics"])

    def restore_newest_intact(self, abstract_state: Any, *, set_aside: bool,
                              report: Callable[[int, str, Path | None], None]
                              ) -> tuple[int, Any, list[dict]] | None:
        """Restore the newest checkpoint that can be restored -> (epoch, state, history), or
        None when none can.

        A newer one that cannot (truncated or missing files) is ``report(epoch, reason,
        moved_to)``-ed and the one before it is tried. ``set_aside``: move it out of orbax's
        sight first (:meth:`set_aside`, by the primary; ``moved_to`` says where), as a run that
        resumes does; else leave it where it is (``moved_to`` None), as drawing does. In a
        multi-process job every process calls this, and they go through the same steps.
        """
        skipped: set[int] = set()
        while epochs := [e for e in self.epochs() if e not in skipped]:
            epoch = epochs[-1]
            with quiet_background_failures():
                try:
                    state, history = self.restore(epoch, abstract_state)
                    failure = ""
                except Exception as e:  # whatever orbax / TensorStore raise for damaged files
                    failure = first_line(e)
                    gc.collect()  # as quiet_background_failures does for what it lets out
            failures = [f for f in self._agree(failure, "restoring a checkpoint") if f]
            if not failures:
                return epoch, state, history
            self.close()  # the manager caches the steps it saw
            if not set_aside:
                skipped.add(epoch)
                report(epoch, failures[0], None)
                continue
            if self._primary:
                report(epoch, failures[0], self.set_aside(epoch))
            # The others look again only after the primary moved it.
            self._agree("moved", "setting a damaged checkpoint aside")
        return None

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None


