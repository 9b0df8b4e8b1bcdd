"""What every command-line entry point shares: flag parsing, errors as one line, exit codes.

Exit codes (README, *Reliability*): a user mistake (config, data, run dir, RUN_DIR) 2; the
storage failing (disk full, read-only, not a directory) 3; a diverged run 1; Ctrl-C 130; SIGTERM
143. A user-facing exception class says its own code in ``exit_code`` (``ConfigError``,
``DataError``, ``RunDirError``, ``StorageError``, ``TrainingDiverged``, ``VisualizeError``);
:func:`run_command` turns it into one ``error:`` line on stderr and that code, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["CommandLineParser", "run_command", "exit_with", "add_config_flags", "EXIT_DIVERGED",
           "EXIT_USER", "EXIT_STORAGE", "EXIT_INTERRUPTED", "EXIT_TERMINATED"]

EXIT_DIVERGED, EXIT_USER, EXIT_STORAGE = 1, 2, 3
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # 128 + SIGINT, 128 + SIGTERM, as shells report


class CommandLineParser(argparse.ArgumentParser):
    """argparse for the ``python -m cae.*`` tools: a bad flag is one ``error:`` line, exit 2."""

    def error(self, message):  # one line, not usage + traceback-looking text
        self.exit(EXIT_USER, f"error: {message} (see --help)\n")


def add_config_flags(parser: argparse.ArgumentParser, config_help: str, set_help: str,
                     config_default: str | None = None) -> None:
    """``--config FILE`` (required unless ``config_default``) and repeatable ``--set KEY=VALUE``."""
    parser.add_argument("--config", required=config_default is None, default=config_default,
                        help=config_help)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)


def _error_code(e: BaseException) -> tuple[int, str] | None:
    """(exit code, the line after ``error: ``) of a user-facing error; None for a bug."""
    code = getattr(type(e), "exit_code", None)
    if code is not None:
        return code, str(e)
    if isinstance(e, OSError):
        from cae import rundir

        return EXIT_STORAGE, rundir.storage_error_message(e)
    return None


def run_command(body: Callable[[], Any], interrupted: str) -> tuple[int, Any]:
    """Run a command-line entry point's ``body()``; returns (exit code, its result or None).

    Errors with an ``exit_code`` (and OSError: the storage) print one ``error:`` line; Ctrl-C
    and SIGTERM print ``interrupted`` (a hint how to go on). Other exceptions are bugs and
    propagate with their traceback.
    """
    from cae import cluster

    try:
        with cluster.terminate_promptly(interrupted):
            return 0, body()
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return EXIT_INTERRUPTED, None
    except cluster.Terminated:
        cluster.say_once(interrupted)  # the SIGTERM watchdog may have said it already
        return EXIT_TERMINATED, None
    except Exception as e:
        known = _error_code(e)
        if known is None:
            raise
        print(f"error: {known[1]}", file=sys.stderr)
        return known[0], None


def exit_with(code: int) -> None:
    """Exit with ``code``. After a storage failure or an interruption, without the exit
    handlers and the interpreter's teardown: they would retry the writes that just failed
    (TensorBoard's, orbax's) and print their tracebacks after our one line, or, interrupted
    amid JAX's and orbax's threads, crash (SIGSEGV seen after SIGTERM) or wait for the other
    processes of a job. Everything committed is on disk already (orbax waits for each save,
    the other files are renamed into place)."""
    if code not in (EXIT_STORAGE, EXIT_INTERRUPTED, EXIT_TERMINATED):
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
