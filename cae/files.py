"""Files written whole or not at all: a crash never leaves half of one in place.

Imports nothing of ``cae``: pictures, baselines, metrics and the run dir all write through it.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

__all__ = ["write_atomic", "dump_jsonl"]


def _create_temp(folder: Path, name: str) -> tuple[int, Path]:
    """A new, unique temp file in ``folder`` -> (fd, path), created with mode 0666 less the
    process's umask (``os.open`` applies the umask itself: no need to read or change it; a
    ``mkstemp`` file would be 0600, private to us)."""
    while True:
        tmp = folder / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:  # another writer's temp file of the same name: draw again
            continue


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = _create_temp(path.parent, path.name)
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is None:  # a failed write() names no file; the error should
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def dump_jsonl(records: list[dict]) -> str:
    """One JSON object per line (metrics.jsonl)."""
    return "".join(json.dumps(r) + "\n" for r in records)
