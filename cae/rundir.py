"""A run directory's life cycle: fresh / resume / finished, atomic files, orbax checkpoints.

A run dir is *complete* iff it holds ``summary.json``, which is written last and atomically.
An unfinished run (``config.yaml`` plus at least one committed checkpoint) is resumed by running
the same command again; orbax commits each checkpoint atomically (temp dir + rename), so a
process killed mid-save leaves the previous checkpoint as the latest one. A checkpoint that
cannot be restored is set aside into ``checkpoints_damaged/`` and the one before it is used.
A run holds ``.cae.lock`` (``flock``) for its life, so two runs never share a run dir.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import itertools
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from cae import cli

__all__ = ["RunDirError", "StorageError", "write_atomic", "config_difference", "inspect_run_dir",
           "plan_run_dir", "prepare_run_dir", "Checkpointer", "RunLock", "lock_run_dir",
           "storage_error_message", "CONFIG_FILE", "SUMMARY_FILE", "METRICS_FILE", "LOCK_FILE"]

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints_damaged"  # outside CHECKPOINT_DIR: orbax never looks at it again
LOCK_FILE = ".cae.lock"  # flock-ed for the run's life; says who holds it
SHARED_CHECK_FILE = ".cae-shared-check"  # multi-process: proves every process sees the run dir
_BOOKKEEPING = {LOCK_FILE, SHARED_CHECK_FILE}  # not content: a dir with only these is empty
_UMASK = os.umask(0)
os.umask(_UMASK)


class RunDirError(RuntimeError):
    """output.dir cannot be used as asked; the message is one line saying why and what to do."""

    exit_code = cli.EXIT_USER


class StorageError(RuntimeError):
    """Reading or writing the run's files failed (disk full, read-only, ...); one line."""

    exit_code = cli.EXIT_STORAGE


# Errors of the storage, not of our code: the message names the path and the system's reason.
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT,
                   errno.EFBIG, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOENT,
                   errno.EIO, errno.ENAMETOOLONG)


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception's first line of text (or its type's name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


def storage_error_message(e: BaseException) -> str | None:
    """One line for an error of the file system (ours, orbax's or TensorStore's), else None."""
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror or e}"
    text = str(e)
    for code in _STORAGE_ERRNOS:
        reason = os.strerror(code)
        if reason in text:  # TensorStore / orbax wrap the OSError's text in their own
            return f"{reason} ({first_line(e)})"
    return None


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it 0600; give it a normal file's mode
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename is None:  # a failed write() names no file; the error should
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            diff = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if diff:
                return diff
        return None
    return None if a == b else f"{prefix[:-1]}: saved {a!r}, now {b!r}"


# Keys that may differ between the interrupted process and the one resuming it: where things
# are (the data are checked by TFDS wherever they lie), and what only shapes the output.
_RESUME_FREE = {("output", "overwrite"), ("output", "progress"), ("output", "dir"),
                ("output", "num_images"), ("data", "data_dir"), ("data", "manual_dir")}


def _comparable(cfg: dict) -> dict:
    """The keys that must match to resume. Keys missing from a saved config (written before the
    key existed) count as their default value, so adding a config key does not orphan old runs."""
    from cae.config import Config, to_dict

    merged = {s: {**keys, **(cfg.get(s) or {})} for s, keys in to_dict(Config()).items()}
    merged.update({s: v for s, v in cfg.items() if s not in merged})
    return {s: {k: v for k, v in keys.items() if (s, k) not in _RESUME_FREE}
            for s, keys in merged.items()}


def config_difference(saved: dict, now: dict) -> str | None:
    """The first difference between a run's saved config and ``now`` (plain dicts) among the
    keys that must match to resume it (``"train.dtype: saved 'float32', now 'bfloat16'"``), or
    None: the run may be resumed with ``now``."""
    return _first_difference(_comparable(saved), _comparable(now))


def inspect_run_dir(run_dir: str | os.PathLike, resolved: dict) -> tuple[str, str | None]:
    """What ``run_dir`` holds, without touching it -> ``(kind, diff)``.

    kind: ``"not_a_dir"`` (a file is in the way), ``"new"`` (missing or empty), ``"finished"``
    (``summary.json``), ``"foreign"`` (not empty, no ``config.yaml``), ``"unstarted"`` (a config
    but no checkpoint: killed during epoch 1), ``"unfinished"`` (a committed checkpoint).
    diff: the first difference between the saved config and ``resolved`` among the keys that
    must match to resume (:func:`config_difference`; a missing or unreadable config differs), or
    None when they match (always None for "not_a_dir", "new" and "foreign").
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        return "not_a_dir", None
    if not run_dir.is_dir() or not _contents(run_dir):
        return "new", None
    try:
        saved = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
    except (OSError, yaml.YAMLError):
        saved = None
    diff = (f"no readable {CONFIG_FILE}" if not isinstance(saved, dict)
            else config_difference(saved, resolved))
    if (run_dir / SUMMARY_FILE).exists():
        return "finished", diff
    if not (run_dir / CONFIG_FILE).exists():
        return "foreign", None
    has_checkpoint = Checkpointer(run_dir).latest_epoch() is not None
    return ("unfinished" if has_checkpoint else "unstarted"), diff


def _contents(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.iterdir() if p.name not in _BOOKKEEPING]


def _refuse_unusable(kind: str, label: str) -> None:
    if kind == "not_a_dir":
        raise RunDirError(f"{label} exists and is not a directory")
    if kind == "foreign":
        raise RunDirError(f"{label} is not empty and is not a cae run directory (no config.yaml); "
                          "choose another output.dir")


def _label(run_dir: Path) -> str:
    return f"output.dir={str(run_dir)!r}"


def lock_run_dir(run_dir: str | os.PathLike) -> RunLock:
    """Take ``run_dir``'s lock (creating the dir if needed) -> the held :class:`RunLock`.
    A file or a foreign folder in the way is refused first, untouched."""
    run_dir = Path(run_dir)
    _refuse_unusable(inspect_run_dir(run_dir, {})[0], _label(run_dir))
    return RunLock(run_dir)


def plan_run_dir(run_dir: str | os.PathLike, resolved: dict, overwrite: bool, *,
                 reuse_finished: bool = False, label: str | None = None) -> str:
    """What a run of config ``resolved`` does with ``run_dir``, deciding from what it holds
    (:func:`inspect_run_dir`) without touching it. The one decision table of cae.train and
    cae.ablate:

    ``"new"`` (missing or empty), ``"restart"`` (a config but no checkpoint: killed in epoch 1;
    start afresh), ``"resume"`` (unfinished, same config), ``"reuse"`` (finished, same config,
    only with ``reuse_finished``: a sweep keeps its finished runs), ``"replace"`` (finished, or
    unfinished with another config, and ``overwrite``: start afresh). Raises RunDirError (one
    line naming the dir as ``label``, default ``output.dir='...'``) for a file or a foreign
    folder in the way, or a run it may not replace.
    """
    run_dir = Path(run_dir)
    label = _label(run_dir) if label is None else label
    kind, diff = inspect_run_dir(run_dir, resolved)
    _refuse_unusable(kind, label)
    if kind in ("new", "unstarted"):
        return "new" if kind == "new" else "restart"
    if diff is None and (kind == "unfinished" or reuse_finished):
        return "resume" if kind == "unfinished" else "reuse"
    if overwrite:
        return "replace"
    if kind == "finished":
        other = f"with another config ({diff})" if diff is not None else "(summary.json)"
        raise RunDirError(f"{label} holds a finished run {other}; choose another output.dir or "
                          "set output.overwrite=true to replace it")
    raise RunDirError(
        f"{label} holds an unfinished run with another config ({diff}); rerun with the saved "
        f"config ({run_dir / CONFIG_FILE}) to resume it, or choose another output.dir "
        "(output.overwrite=true would delete its checkpoints)")


def prepare_run_dir(run_dir: str | os.PathLike, resolved: dict, overwrite: bool) -> bool:
    """Make ``run_dir`` ready for a run of config ``resolved`` (a plain dict), as
    :func:`plan_run_dir` decides.

    Returns True if an unfinished run with the same config should be resumed, False for a fresh
    start (the directory is then empty except for ``config.yaml``). Raises :class:`RunDirError`
    for a finished run without ``overwrite``, a different config, or a foreign directory.
    """
    run_dir = Path(run_dir)
    plan = plan_run_dir(run_dir, resolved, overwrite)
    if plan == "resume":
        return True
    if plan != "new":
        # The lock file stays: removing it would let another process lock a new one.
        for path in _contents(run_dir):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / CONFIG_FILE, yaml.safe_dump(resolved, sort_keys=False))
    return False


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


class RunLock:
    """An exclusive ``flock`` on ``run_dir/.cae.lock``, held until :meth:`release` (or the
    process ends: the kernel drops the locks of dead processes, so kill -9 never blocks a rerun).

    The file says who holds it (pid, host, start time) for the refusal message.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self._fd: int | None = None
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / LOCK_FILE
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 300).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirError(
                f"output.dir={str(run_dir)!r} is in use by {owner}; wait for that run to end "
                "or stop it, or choose another output.dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()} (since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    __del__ = release  # a run that raised before releasing it: dropped with the object


class Checkpointer:
    """Orbax checkpoints of ``{"state": pytree, "history": json}`` keyed by epoch number."""

    def __init__(self, run_dir: str | os.PathLike, max_to_keep: int = 3,
                 agree: Callable[[str], list[str]] = lambda outcome: [outcome],
                 primary: bool = True):
        """In a multi-process job every process makes one; ``agree`` shares each process's
        outcome of a step with all (see ``cluster.all_outcomes``), so that they all take the
        same branch; only the ``primary`` moves folders."""
        self.directory = Path(run_dir).absolute() / CHECKPOINT_DIR
        self.max_to_keep = max_to_keep
        self._agree, self._primary = agree, primary
        self._manager = None

    @property
    def manager(self):
        if self._manager is None:
            import orbax.checkpoint as ocp

            # cleanup_tmp_directories: a save cut short (kill -9, disk full) leaves a temp dir.
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep, create=True,
                                                     cleanup_tmp_directories=True),
                item_names=("state", "history"),
            )
        return self._manager

    def epochs(self) -> list[int]:
        """The committed checkpoints' epochs, oldest first. Reads the folder only (no orbax
        manager, which in a multi-process job would wait for the other processes)."""
        import orbax.checkpoint as ocp

        if not self.directory.is_dir():
            return []
        return sorted(ocp.path.step.checkpoint_steps(self.directory))

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
        import orbax.checkpoint as ocp

        try:
            self._check_room(epoch, state)
            too_full = ""
        except StorageError as e:
            too_full = str(e)
        failures = [f for f in self._agree(too_full) if f]  # all save, or none does
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
        import jax

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
        import jax
        import orbax.checkpoint as ocp

        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        restored = self.manager.restore(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            history=ocp.args.JsonRestore(),
        ))
        return restored["state"], list(restored["history"]["metrics"])

    def restore_latest(self, abstract_state: Any, report: Callable[[str], None] = print
                       ) -> tuple[int, Any, list[dict]]:
        """Restore the newest checkpoint that can be restored -> (epoch, state, history).

        A newer one that cannot (truncated or missing files) is set aside (see
        :meth:`set_aside`) with one ``report``-ed line, and the one before it is tried. Raises
        RunDirError when none can be restored. In a multi-process job every process calls
        this, and they go through the same steps.
        """
        while (epoch := self.latest_epoch()) is not None:
            with quiet_background_failures():
                try:
                    state, history = self.restore(epoch, abstract_state)
                    failure = ""
                except Exception as e:  # whatever orbax / TensorStore raise for damaged files
                    failure = first_line(e)
                    gc.collect()  # as quiet_background_failures does for what it lets out
            failures = [f for f in self._agree(failure) if f]
            if not failures:
                return epoch, state, history
            self.close()  # the manager caches the steps it saw
            if self._primary:
                target = self.set_aside(epoch)
                report(f"warning: the checkpoint of epoch {epoch} cannot be restored "
                       f"({failures[0]}); moved it to {target} and trying the one before")
            self._agree("moved")  # the others look again only after the primary moved it
        raise RunDirError(
            f"no checkpoint in {self.directory} can be restored (the damaged ones are in "
            f"{self.directory.parent / DAMAGED_DIR}); run the same command again to start the "
            "run afresh, or restore the checkpoints from a backup")

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None


def dump_jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)
