"""What every command-line entry point shares: flag parsing, errors as one line, exit codes,
and ending promptly on Ctrl-C or SIGTERM.

Exit codes are :mod:`cae.errors`'s (README, *Reliability*). A user-facing exception class says
its own code in ``exit_code`` (``ConfigError``, ``DataError``, ``RunDirError``,
``StorageError``, ``TrainingDiverged``, ``VisualizeError``); :func:`run_command` turns it into
one ``error:`` line on stderr and that code, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from cae.errors import (
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    EXIT_PROCESS_LOST,
    EXIT_STORAGE,
    EXIT_TERMINATED,
    EXIT_USER,
    storage_error_message,
)

__all__ = ["CommandLineParser", "run_command", "exit_with", "add_config_flags", "Terminated",
           "terminate_promptly", "say_once", "EXIT_DIVERGED", "EXIT_USER", "EXIT_STORAGE",
           "EXIT_PROCESS_LOST", "EXIT_INTERRUPTED", "EXIT_TERMINATED"]


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
        return EXIT_STORAGE, storage_error_message(e)
    return None


def run_command(body: Callable[[], Any], interrupted: str) -> tuple[int, Any]:
    """Run a command-line entry point's ``body()``; returns (exit code, its result or None).

    Errors with an ``exit_code`` (and OSError: the storage) print one ``error:`` line; Ctrl-C
    and SIGTERM print ``interrupted`` (a hint how to go on). Other exceptions are bugs and
    propagate with their traceback.
    """
    try:
        with terminate_promptly(interrupted):
            return 0, body()
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return EXIT_INTERRUPTED, None
    except Terminated:
        say_once(interrupted)  # the SIGTERM watchdog may have said it already
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
    processes of a job (jax.distributed's shutdown would wait minutes for a lost one).
    Everything committed is on disk already (orbax waits for each save,
    the other files are renamed into place)."""
    if code not in (EXIT_STORAGE, EXIT_PROCESS_LOST, EXIT_INTERRUPTED, EXIT_TERMINATED):
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ----------------------------------------------------------------------------------------------
# Ending promptly: SIGTERM raises in the main thread, and a watchdog ends a process stuck in C++
# ----------------------------------------------------------------------------------------------


class Terminated(BaseException):
    """SIGTERM arrived (e.g. from Slurm or ``timeout``); like KeyboardInterrupt, not an error."""


_said = threading.Lock()  # the interruption's line is printed once, by whichever thread is first


def say_once(message: str) -> None:
    """Print ``message`` on stderr unless it was printed already (main thread or watchdog)."""
    if _said.acquire(blocking=False):
        print(message, file=sys.stderr, flush=True)


def _hard_exit_after(read_fd: int, grace_s: float, message: str) -> None:
    """Watchdog thread: once SIGTERM's byte comes through the wakeup fd, give the main thread
    ``grace_s`` to end; if it is stuck in a C++ wait (a collective whose peer is gone) it never
    gets to the Python handler, or its exit waits for a peer (jax.distributed's shutdown) or
    for a checkpoint being written, so end the process from here, saying ``message`` if the
    main thread has not."""
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while data := pipe.read(64):
            if signal.SIGTERM in data:
                time.sleep(grace_s)
                say_once(message)
                sys.stderr.flush()
                os._exit(128 + signal.SIGTERM)


@contextlib.contextmanager
def terminate_promptly(message: str, grace_s: float = 5.0):
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread, and ends the
    process (exit 143, ``message``) after ``grace_s`` if the main thread cannot take it.

    Needed because ``jax.distributed`` installs its own SIGTERM handler (preemption notices)
    that leaves the process running. Outside the main thread: no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)

    def raise_terminated(signum: int, frame: Any) -> None:
        raise Terminated()

    def unraisable(info: Any) -> None:
        # Terminated raised where Python cannot pass it on (a __del__, a gc callback such as
        # JAX's) would be printed as "Exception ignored in ..." with a traceback, and dropped:
        # say nothing and ask again in a moment, when the main thread is back in our code.
        if isinstance(info.exc_value, Terminated):
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM)).start()
            return
        old_hook(info)

    old_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    old_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    old_handler = signal.signal(signal.SIGTERM, raise_terminated)
    threading.Thread(target=_hard_exit_after, args=(read_fd, grace_s, message),
                     daemon=True, name="cae-sigterm-watchdog").start()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        signal.set_wakeup_fd(old_fd)
        if sys.unraisablehook is unraisable:
            sys.unraisablehook = old_hook
        os.close(write_fd)  # the watchdog reads end-of-file and ends
