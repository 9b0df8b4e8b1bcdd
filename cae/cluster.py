"""Devices and processes: the mesh, joining a multi-process job, who writes what, agreeing on
the run dir, ending promptly.

One mesh axis (``batch``) spans every device of every process: batches are split along it,
everything else is replicated. Where the environment says this is one process of several
(``CLUSTER_ENV_VARS``), :func:`maybe_initialize_distributed` joins them before JAX does anything.

In a job of several processes (``jax.distributed``) every process trains (the collectives need
all of them) and every process calls orbax (it coordinates the checkpoint writes itself), but
only process 0 writes the run dir's own files (config, metrics, TensorBoard, pictures, summary)
and holds the run dir's lock. Before anything is trained, process 0 leaves a token with a random
nonce in the run dir and every other process must read the same nonce there: a run dir that is
not on storage all processes share is refused up front, by every process, with one line.

The processes tell each other how each step went through the coordinator's key-value store,
polled in short waits with a deadline, so a lost process means an error within that deadline and
a SIGTERM is handled between two polls.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cae import rundir
from cae.config import ConfigError

__all__ = ["BATCH_AXIS", "CLUSTER_ENV_VARS", "make_mesh", "sharding", "put",
           "maybe_initialize_distributed", "launched_as_several_processes", "Terminated",
           "is_primary", "several", "all_outcomes", "open_run_dir", "terminate_promptly",
           "say_once"]

T = TypeVar("T")
_POLL_MS = 200  # one wait on the key-value store; signals are handled between two
_rounds = itertools.count()  # every process goes through the same steps in the same order


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
# Processes: who writes, agreeing on each step's outcome, ending promptly
# ----------------------------------------------------------------------------------------------


class Terminated(BaseException):
    """SIGTERM arrived (e.g. from Slurm or ``timeout``); like KeyboardInterrupt, not an error."""


def several() -> bool:
    return jax.process_count() > 1


def is_primary() -> bool:
    """Process 0 writes the run dir's files; the others only train and checkpoint."""
    return jax.process_index() == 0


def _client():
    from jax._src import distributed  # the coordinator's client; JAX has no public handle

    return distributed.global_state.client


def all_outcomes(outcome: str, step: str, timeout_s: float = 120.0) -> list[str]:
    """Every process's ``outcome`` (a string) of ``step``, indexed by process id.

    One process: ``[outcome]``. Raises RunDirError when a process does not report within
    ``timeout_s`` (it died or is stuck), instead of waiting for ever.
    """
    client = _client() if several() else None
    if client is None:
        return [outcome]
    prefix = f"cae/{next(_rounds)}/"
    client.key_value_set(prefix + str(jax.process_index()), "|" + outcome)  # never empty
    deadline = time.monotonic() + timeout_s
    outcomes = []
    for process in range(jax.process_count()):
        while True:
            try:
                outcomes.append(client.blocking_key_value_get(prefix + str(process),
                                                              _POLL_MS)[1:])
                break
            except Exception:  # DEADLINE_EXCEEDED of one short wait: look at the clock
                if time.monotonic() > deadline:
                    raise rundir.RunDirError(
                        f"process {process} did not reach '{step}' within {timeout_s:.0f} s "
                        "(it stopped or is stuck); stop the job and start it again") from None
    return outcomes


def _attempt(fn: Callable[[], T]) -> tuple[T | None, str]:
    """(fn(), "") or (None, the one-line reason of a user or storage error)."""
    try:
        return fn(), ""
    except (rundir.RunDirError, rundir.StorageError) as e:
        return None, str(e)
    except OSError as e:
        return None, rundir.storage_error_message(e)


def _agree(outcome: str, step: str, timeout_s: float = 120.0) -> list[str]:
    """Share ``outcome`` (empty: fine); if any process failed, every process raises the first
    failure (naming the process) as a RunDirError."""
    outcomes = all_outcomes(outcome, step, timeout_s)
    for process, failure in enumerate(outcomes):
        if failure.startswith("error:"):
            who = f"process {process}: " if several() else ""
            raise rundir.RunDirError(who + failure.removeprefix("error:"))
    return outcomes


def _check_shared(run_dir: Path, created: bool, lock: rundir.RunLock | None) -> None:
    """Process 0 writes a nonce into the run dir; every process must read it back there."""
    token = run_dir / rundir.SHARED_CHECK_FILE
    nonce, failure = secrets.token_hex(16), ""
    if is_primary():
        _, failure = _attempt(lambda: rundir.write_atomic(token, nonce))
    nonce = _agree("error:" + failure if failure else nonce, "the shared run dir check")[0]
    try:
        seen = token.read_text() == nonce
    except OSError:
        seen = False
    outcomes = all_outcomes("" if seen else socket.gethostname(), "the shared run dir check")
    if is_primary():
        token.unlink(missing_ok=True)
    blind = [(p, host) for p, host in enumerate(outcomes) if host]
    if blind:
        if is_primary():
            lock.release()
            if created:  # leave no empty run dir behind on process 0's storage either
                (run_dir / rundir.LOCK_FILE).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    run_dir.rmdir()
        process, host = blind[0]
        raise rundir.RunDirError(
            f"output.dir={str(run_dir)!r} must be on storage all processes share: process "
            f"{process} (host {host}) does not see the file process 0 wrote there; put "
            "output.dir on a shared file system (checkpoints are written by all processes)")


def open_run_dir(run_dir: Path, resolved: dict, overwrite: bool
                 ) -> tuple[bool, rundir.RunLock | None]:
    """Lock and prepare ``run_dir`` for this job -> (resume?, the lock: process 0's, else None).

    Process 0 takes the lock (another job using the dir is refused; the processes of this job
    share it) and prepares the dir (:func:`rundir.prepare_run_dir`); every process learns the
    outcome. Raises RunDirError / StorageError / OSError, on every process, before anything is
    trained.
    """
    if not several():
        lock = rundir.lock_run_dir(run_dir)
        try:
            return rundir.prepare_run_dir(run_dir, resolved, overwrite), lock
        except BaseException:
            lock.release()
            raise
    lock, failure, created = None, "", not run_dir.exists()
    if is_primary():
        lock, failure = _attempt(lambda: rundir.lock_run_dir(run_dir))
    # Generous: the processes get here after loading the data, which one may prepare first.
    _agree(failure and "error:" + failure, "locking the run dir", timeout_s=600)
    _check_shared(run_dir, created, lock)
    resume, failure = (_attempt(lambda: rundir.prepare_run_dir(run_dir, resolved, overwrite))
                       if is_primary() else (None, ""))
    try:
        outcomes = _agree("error:" + failure if failure else str(int(bool(resume))),
                          "preparing the run dir")
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return outcomes[0] == "1", lock


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

    old_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    old_handler = signal.signal(signal.SIGTERM, raise_terminated)
    threading.Thread(target=_hard_exit_after, args=(read_fd, grace_s, message),
                     daemon=True, name="cae-sigterm-watchdog").start()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        signal.set_wakeup_fd(old_fd)
        os.close(write_fd)  # the watchdog reads end-of-file and ends
