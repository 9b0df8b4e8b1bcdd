"""Devices and processes: the mesh, joining a multi-process job, who is who, and how the
processes share each step's outcome.

One mesh axis (``batch``) spans every device of every process: batches are split along it,
everything else is replicated. Where the environment says this is one process of several
(``CLUSTER_ENV_VARS``), :func:`maybe_initialize_distributed` joins them before JAX does anything.

In a job of several processes (``jax.distributed``) every process trains (the collectives need
all of them) and every process calls orbax (it coordinates the checkpoint writes itself), but
only process 0 (:func:`is_primary`) writes the run dir's own files. The processes tell each other
how each step went through the coordinator's key-value store (:func:`all_outcomes`, the ``agree``
that ``cae.rundir`` takes), polled in short waits with a deadline, so a lost process means an
error within that deadline and a SIGTERM is handled between two polls.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cae.errors import ConfigError, RunDirError

__all__ = ["BATCH_AXIS", "CLUSTER_ENV_VARS", "make_mesh", "sharding", "put",
           "maybe_initialize_distributed", "launched_as_several_processes", "is_primary",
           "several", "all_outcomes", "heartbeat_timeout_s", "HEARTBEAT_ENV"]

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
    # process running; put back the one we had (cli.terminate_promptly's, or the default).
    sigterm = signal.getsignal(signal.SIGTERM)
    # A process that stops sending heartbeats for this long is declared lost (cae.guard).
    heartbeat = heartbeat_timeout_s()
    if env.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"],
                                   _env_int("JAX_NUM_PROCESSES"), _env_int("JAX_PROCESS_ID"),
                                   heartbeat_timeout_seconds=heartbeat)
    else:
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat)
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


HEARTBEAT_ENV = "CAE_HEARTBEAT_TIMEOUT_S"
DEFAULT_HEARTBEAT_TIMEOUT_S = 30  # JAX's own default is 100 s


def heartbeat_timeout_s() -> int:
    """``$CAE_HEARTBEAT_TIMEOUT_S`` (whole seconds >= 5; default 30): how long JAX's
    coordination service waits for a silent process before it declares it lost and the others
    stop (docs/reliability.md, *Several hosts*)."""
    value = _env_int(HEARTBEAT_ENV, DEFAULT_HEARTBEAT_TIMEOUT_S)
    if value < 5:
        raise ConfigError(f"${HEARTBEAT_ENV}={value}: must be a whole number of seconds >= 5")
    return value


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
# Processes: who writes, sharing each step's outcome
# ----------------------------------------------------------------------------------------------


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
            except Exception as e:  # DEADLINE_EXCEEDED of one short wait: look at the clock
                if "DEADLINE_EXCEEDED" not in str(e):
                    raise  # the coordinator is gone (UNAVAILABLE): cae.guard's to say so
                if time.monotonic() > deadline:
                    raise RunDirError(
                        f"process {process} did not reach '{step}' within {timeout_s:.0f} s "
                        "(it stopped or is stuck); stop the job and start it again") from None
    return outcomes
