"""A run directory's life cycle: fresh / resume / finished, atomic files, orbax checkpoints.

A run dir is *complete* iff it holds ``summary.json``, which is written last and atomically.
An unfinished run (``config.yaml`` plus at least one committed checkpoint) is resumed by running
the same command again; orbax commits each checkpoint atomically (temp dir + rename), so a
process killed mid-save leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

__all__ = ["RunDirError", "write_atomic", "inspect_run_dir", "prepare_run_dir", "Checkpointer",
           "CONFIG_FILE", "SUMMARY_FILE", "METRICS_FILE"]

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
_UMASK = os.umask(0)
os.umask(_UMASK)


class RunDirError(RuntimeError):
    """output.dir cannot be used as asked; the message is one line saying why and what to do."""


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


# Keys that may differ between the interrupted process and the one resuming it.
_RESUME_FREE = {("output", "overwrite"), ("output", "progress"), ("output", "dir")}


def _comparable(cfg: dict) -> dict:
    """The keys that must match to resume. Keys missing from a saved config (written before the
    key existed) count as their default value, so adding a config key does not orphan old runs."""
    from cae.config import Config, to_dict

    merged = {s: {**keys, **(cfg.get(s) or {})} for s, keys in to_dict(Config()).items()}
    merged.update({s: v for s, v in cfg.items() if s not in merged})
    return {s: {k: v for k, v in keys.items() if (s, k) not in _RESUME_FREE}
            for s, keys in merged.items()}


def inspect_run_dir(run_dir: str | os.PathLike, resolved: dict) -> tuple[str, str | None]:
    """What ``run_dir`` holds, without touching it -> ``(kind, diff)``.

    kind: ``"not_a_dir"`` (a file is in the way), ``"new"`` (missing or empty), ``"finished"``
    (``summary.json``), ``"foreign"`` (not empty, no ``config.yaml``), ``"unstarted"`` (a config
    but no checkpoint: killed during epoch 1), ``"unfinished"`` (a committed checkpoint).
    diff: the first difference between the saved config and ``resolved`` among the keys that
    must match to resume (see ``_comparable``; a missing or unreadable config differs), or None when
    they match (always None for "not_a_dir", "new" and "foreign").
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        return "not_a_dir", None
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return "new", None
    try:
        saved = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
    except (OSError, yaml.YAMLError):
        saved = None
    diff = (f"no readable {CONFIG_FILE}" if not isinstance(saved, dict)
            else _first_difference(_comparable(saved), _comparable(resolved)))
    if (run_dir / SUMMARY_FILE).exists():
        return "finished", diff
    if not (run_dir / CONFIG_FILE).exists():
        return "foreign", None
    checkpointer = Checkpointer(run_dir)
    try:
        has_checkpoint = checkpointer.latest_epoch() is not None
    finally:
        checkpointer.close()
    return ("unfinished" if has_checkpoint else "unstarted"), diff


def prepare_run_dir(run_dir: str | os.PathLike, resolved: dict, overwrite: bool) -> bool:
    """Make ``run_dir`` ready for a run of config ``resolved`` (a plain dict).

    Returns True if an unfinished run with the same config should be resumed, False for a fresh
    start (the directory is then empty except for ``config.yaml``). Raises :class:`RunDirError`
    for a finished run without ``overwrite``, a different config, or a foreign directory.
    """
    run_dir = Path(run_dir)
    kind, diff = inspect_run_dir(run_dir, resolved)
    if kind == "not_a_dir":
        raise RunDirError(f"output.dir={str(run_dir)!r} exists and is not a directory")
    if kind == "finished" and not overwrite:
        raise RunDirError(
            f"output.dir={str(run_dir)!r} holds a finished run (summary.json); choose "
            "another output.dir or set output.overwrite=true to replace it"
        )
    if kind == "foreign":
        raise RunDirError(
            f"output.dir={str(run_dir)!r} is not empty and is not a cae run directory "
            "(no config.yaml); choose another output.dir"
        )
    if kind == "unfinished":
        if diff is None:
            return True
        if not overwrite:
            raise RunDirError(
                f"output.dir={str(run_dir)!r} holds an unfinished run with another "
                f"config ({diff}); rerun with the same config to resume, choose another "
                "output.dir, or set output.overwrite=true"
            )
    if kind != "new":
        # Finished (overwrite asked), killed during epoch 1, or overwrite asked: start afresh.
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / CONFIG_FILE, yaml.safe_dump(resolved, sort_keys=False))
    return False


class Checkpointer:
    """Orbax checkpoints of ``{"state": pytree, "history": json}`` keyed by epoch number."""

    def __init__(self, run_dir: str | os.PathLike, max_to_keep: int = 3):
        self.directory = Path(run_dir).absolute() / CHECKPOINT_DIR
        self.max_to_keep = max_to_keep
        self._manager = None

    @property
    def manager(self):
        if self._manager is None:
            import orbax.checkpoint as ocp

            self._manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep, create=True),
                item_names=("state", "history"),
            )
        return self._manager

    def latest_epoch(self) -> int | None:
        if not self.directory.is_dir():
            return None
        return self.manager.latest_step()

    def save(self, epoch: int, state: Any, history: list[dict]) -> None:
        """Save and wait until committed: after this returns, a SIGKILL cannot lose it."""
        import orbax.checkpoint as ocp

        self.manager.save(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            history=ocp.args.JsonSave({"metrics": history}),
        ))
        self.manager.wait_until_finished()

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

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None


def dump_jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)
