"""A run directory's life cycle: fresh / resume / finished, its lock, and opening it for a job
of one or several processes.

A run dir is *complete* iff it holds ``summary.json``, which is written last and atomically.
An unfinished run (``config.yaml`` plus at least one committed checkpoint, ``cae.checkpoints``)
is resumed by running the same command again. A run holds ``.cae.lock`` (``flock``) for its
life, so two runs never share a run dir.

Opening takes the job's ``agree`` and ``primary`` as arguments (``cae.cluster.all_outcomes`` and
``is_primary`` in a multi-process job; :func:`cae.checkpoints.alone` and True for one process),
as the checkpointer does: this module knows files, not devices.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cae.checkpoints import CHECKPOINT_DIR, Agree, alone, committed_epochs
from cae.config import Config, read_yaml_file, to_dict
from cae.errors import ConfigError, RunDirError, StorageError, storage_error_message
from cae.files import write_atomic

__all__ = ["RunDirError", "StorageError", "config_difference", "inspect_run_dir",
           "plan_run_dir", "prepare_run_dir", "open_run_dir", "read_saved_config", "RunLock",
           "lock_run_dir", "CONFIG_FILE", "SUMMARY_FILE", "METRICS_FILE", "LOCK_FILE",
           "CHECKPOINT_DIR"]

T = TypeVar("T")
CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".cae.lock"  # flock-ed for the run's life; says who holds it
SHARED_CHECK_FILE = ".cae-shared-check"  # multi-process: proves every process sees the run dir
_BOOKKEEPING = {LOCK_FILE, SHARED_CHECK_FILE}  # not content: a dir with only these is empty


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
    saved = read_saved_config(run_dir)
    diff = (f"no readable {CONFIG_FILE}" if saved is None
            else config_difference(saved, resolved))
    if (run_dir / SUMMARY_FILE).exists():
        return "finished", diff
    if not (run_dir / CONFIG_FILE).exists():
        return "foreign", None
    return ("unfinished" if committed_epochs(run_dir) else "unstarted"), diff


def read_saved_config(run_dir: str | os.PathLike, strict: bool = False) -> dict | None:
    """``run_dir/config.yaml`` as a plain dict; None where it is missing or not a YAML mapping,
    or with ``strict`` a ConfigError naming the file (the one reader of a saved config)."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        return read_yaml_file(path, label=str(path)) or None  # an empty one holds no config
    except ConfigError:
        if strict:
            raise
        return None


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


# ----------------------------------------------------------------------------------------------
# Opening a run dir for a job of one or several processes
# ----------------------------------------------------------------------------------------------


def _attempt(fn: Callable[[], T]) -> tuple[T | None, str]:
    """(fn(), "") or (None, the one-line reason of a user or storage error)."""
    try:
        return fn(), ""
    except (RunDirError, StorageError) as e:
        return None, str(e)
    except OSError as e:
        return None, storage_error_message(e)


def _agree_or_raise(agree: Agree, outcome: str, step: str, timeout_s: float = 120.0
                    ) -> list[str]:
    """Share ``outcome`` (``"error:..."``: this process failed); if any process failed, every
    process raises the first failure (naming the process) as a RunDirError."""
    outcomes = agree(outcome, step, timeout_s)
    for process, failure in enumerate(outcomes):
        if failure.startswith("error:"):
            who = f"process {process}: " if len(outcomes) > 1 else ""
            raise RunDirError(who + failure.removeprefix("error:"))
    return outcomes


def _check_shared(run_dir: Path, created: bool, lock: RunLock | None, agree: Agree,
                  primary: bool) -> None:
    """Process 0 writes a nonce into the run dir; every process must read it back there."""
    token = run_dir / SHARED_CHECK_FILE
    nonce, failure = secrets.token_hex(16), ""
    if primary:
        _, failure = _attempt(lambda: write_atomic(token, nonce))
    nonce = _agree_or_raise(agree, "error:" + failure if failure else nonce,
                            "the shared run dir check")[0]
    try:
        seen = token.read_text() == nonce
    except OSError:
        seen = False
    outcomes = agree("" if seen else socket.gethostname(), "the shared run dir check", 120.0)
    if primary:
        token.unlink(missing_ok=True)
    blind = [(p, host) for p, host in enumerate(outcomes) if host]
    if blind:
        if primary:
            lock.release()
            if created:  # leave no empty run dir behind on process 0's storage either
                (run_dir / LOCK_FILE).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    run_dir.rmdir()
        process, host = blind[0]
        raise RunDirError(
            f"output.dir={str(run_dir)!r} must be on storage all processes share: process "
            f"{process} (host {host}) does not see the file process 0 wrote there; put "
            "output.dir on a shared file system (checkpoints are written by all processes)")


def open_run_dir(run_dir: str | os.PathLike, resolved: dict, overwrite: bool, *,
                 agree: Agree = alone, primary: bool = True, several: bool = False
                 ) -> tuple[bool, RunLock | None]:
    """Lock and prepare ``run_dir`` for this job -> (resume?, the lock: the primary's, else None).

    One process (``several`` False): lock, then :func:`prepare_run_dir`. Several: the
    ``primary`` takes the lock (another job using the dir is refused; the processes of this job
    share it), every process proves it sees the dir (a token the primary writes there), the
    primary prepares it, and every process learns each outcome through ``agree``. Raises
    RunDirError / StorageError / OSError, on every process, before anything is trained.
    """
    run_dir = Path(run_dir)
    if not several:
        lock = lock_run_dir(run_dir)
        try:
            return prepare_run_dir(run_dir, resolved, overwrite), lock
        except BaseException:
            lock.release()
            raise
    lock, failure, created = None, "", not run_dir.exists()
    if primary:
        lock, failure = _attempt(lambda: lock_run_dir(run_dir))
    # Generous: the processes get here after loading the data, which one may prepare first.
    _agree_or_raise(agree, failure and "error:" + failure, "locking the run dir", timeout_s=600)
    _check_shared(run_dir, created, lock, agree, primary)
    resume, failure = (_attempt(lambda: prepare_run_dir(run_dir, resolved, overwrite))
                       if primary else (None, ""))
    try:
        outcomes = _agree_or_raise(agree, "error:" + failure if failure else str(int(bool(resume))),
                                   "preparing the run dir")
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return outcomes[0] == "1", lock


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
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # less the umask
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


