"""The ground floor: exit codes, the user-facing error classes they belong to, and the wording
of storage errors. Imports nothing of ``cae``; every other module may import it.

Exit codes (README, *Reliability*): a user mistake (config, data, run dir, RUN_DIR) 2; the
storage failing (disk full, read-only, not a directory) 3; a diverged run 1; Ctrl-C 130; SIGTERM
143. A process of a multi-process job lost 75 (sysexits' EX_TEMPFAIL: rerun to resume). A
user-facing exception class says its own code in ``exit_code``; ``cae.cli.run_command``
turns it into one ``error:`` line on stderr and that code, never a traceback.
"""

from __future__ import annotations

import errno
import os

__all__ = ["EXIT_DIVERGED", "EXIT_USER", "EXIT_STORAGE", "EXIT_PROCESS_LOST", "EXIT_INTERRUPTED",
           "EXIT_TERMINATED", "ConfigError", "RunDirError", "StorageError", "ProcessLost",
           "first_line", "storage_error_message"]

EXIT_DIVERGED, EXIT_USER, EXIT_STORAGE = 1, 2, 3
# A process of a multi-process job was lost; rerun to resume. sysexits' EX_TEMPFAIL: "a temporary
# failure; the user is invited to retry", which schedulers can requeue on.
EXIT_PROCESS_LOST = 75
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # 128 + SIGINT, 128 + SIGTERM, as shells report


class ConfigError(ValueError):
    """A user mistake in a config file, an override or the environment; one line."""

    exit_code = EXIT_USER


class RunDirError(RuntimeError):
    """output.dir cannot be used as asked; the message is one line saying why and what to do."""

    exit_code = EXIT_USER


class StorageError(RuntimeError):
    """Reading or writing the run's files failed (disk full, read-only, ...); one line."""

    exit_code = EXIT_STORAGE


class ProcessLost(RuntimeError):
    """Another process of this multi-process job is gone; one line (``cae.guard``)."""

    exit_code = EXIT_PROCESS_LOST


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
