"""A lost process: when one process of a multi-process job dies, the others stop by themselves,
promptly, with one line and exit code 75 (``EXIT_PROCESS_LOST``), never an abort.

Why a guard process. JAX's distributed runtime reacts to a lost peer in C++: the coordination
service marks a process that stopped sending heartbeats as dead (after the heartbeat timeout)
and every other process's client then *aborts* (``LOG(FATAL)``: a C++ stack trace, exit 134);
a process whose coordinator (process 0) is gone aborts within a second. Nothing in Python can
stop that (jaxlib 0.10's ``missed_heartbeat_callback`` cannot even be called: converting its
``absl::Status`` argument throws ``std::bad_cast``, which aborts too). So each process of a
job runs its command in a child (:func:`run_guarded`): the parent streams the child's stderr,
holds back the runtime's own log lines, and when the child dies by the runtime's abort, says
the one line below and exits 75 instead. A collective whose peer is gone (gloo's "Connection
reset by peer") is seen first in Python, in the child itself, which says the same line and
exits 75 at once (:func:`lost_process_error`).

How long the survivors take to notice: at once when they are in a collective (training and
evaluation steps, most of a run); within the heartbeat timeout (``CAE_HEARTBEAT_TIMEOUT_S``,
default 30 s) when they wait elsewhere (checkpoint agreement, orbax's barriers); within a
second when process 0 is gone. The checkpoints committed so far are intact (orbax commits each
atomically; a save cut short is a temp dir that the rerun removes) and the run dir's lock is
an ``flock`` the kernel drops with the process: running the same command again on every
process resumes from the last checkpoint.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

from cae.errors import EXIT_PROCESS_LOST, ProcessLost

__all__ = ["run_guarded", "guarded", "lost_process_error", "lost_process_line",
           "stderr_is_tty", "GUARDED_ENV"]

GUARDED_ENV = "CAE_GUARDED"  # set in the child: it runs the command itself
STDERR_TTY_ENV = "CAE_STDERR_IS_TTY"  # the child's stderr is our pipe: is ours a terminal?

# A line of the runtime's own log (absl/glog: "E1207 17:21:47.923798   12204 file.cc:1549] ..."),
# or of its abort: C++ stack trace, std::terminate.
_RUNTIME_LINE = re.compile(
    rb"^([IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ [^\]]+\] |\*\*\* Check failure stack trace|"
    rb"terminate called |  what\(\): )")
# What the runtime says before it aborts because a process of the job is gone.
_UNHEALTHY = re.compile(rb"tasks are unhealthy \(stopped sending heartbeats\):\s*\n([\d\s,]+)")
_COORDINATOR_GONE = (b"leader task was preempted/died", b"Failed to send RPC to coordination",
                     b"Socket closed", b"connect to all addresses")
_LOST_MARKERS = (b"JAX distributed service detected fatal errors", b"Polled an error from "
                 b"coordination service", *_COORDINATOR_GONE, b"stopped sending heartbeats")
# A collective (gloo on CPU, NCCL on GPU) or a key-value call whose peer is gone.
_PEER_GONE = re.compile(r"(Gloo|NCCL|gloo|nccl).*(Connection reset|Connection closed|Read error|"
                        r"Broken pipe|remote process exited)|UNAVAILABLE|Socket closed")


_LOST_LINE = b"of this multi-process job was lost"


def lost_process_line(who: str) -> str:
    """The one line a survivor says (after ``error: ``)."""
    return (f"{who} of this multi-process job was lost (killed, crashed or its host is gone); "
            "the checkpoints committed so far are intact: run the same command again on every "
            "process to resume from the last one")


def lost_process_error(e: BaseException, process: int, num_processes: int) -> ProcessLost | None:
    """``e`` as a :class:`ProcessLost` when it says a peer of this job is gone (a collective or
    the coordinator's connection failed), else None (a bug, to be raised as it is)."""
    if not _PEER_GONE.search(str(e)):
        return None
    if process != 0 and ("UNAVAILABLE" in str(e) or "Socket closed" in str(e)):
        who = "process 0 (the coordinator)"
    elif num_processes == 2:
        who = f"process {1 - process}"
    else:
        who = "another process"
    return ProcessLost(lost_process_line(who))


def guarded() -> bool:
    """Is this the guarded child (the process that runs the command)?"""
    return os.environ.get(GUARDED_ENV) == "1"


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the guard dies (kill -9 of the process the
    launcher started must take the job's process with it, as losing the host would)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the child outlives a kill -9 of the guard
        pass


def _who_was_lost(runtime: bytes) -> str:
    found = _UNHEALTHY.search(runtime)
    if found:
        ids = sorted({int(t) for t in re.findall(rb"\d+", found.group(1))})
        return ("process " if len(ids) == 1 else "processes ") + ", ".join(map(str, ids))
    if any(marker in runtime for marker in _COORDINATOR_GONE):
        return "process 0 (the coordinator)"
    return "a process"


class _StderrFilter:
    """The child's stderr, passed on as it comes, less the runtime's log lines: those are held
    (from the first error-level one, everything after it too, since its message spans several
    lines) until the child's end says whether they were an abort's or real output."""

    def __init__(self, out):
        self.out, self.partial, self.held = out, b"", b""
        self.said_lost = False

    def feed(self, data: bytes) -> None:
        self.partial += data
        while True:
            cut = max(self.partial.rfind(b"\n"), self.partial.rfind(b"\r"))
            if cut < 0:
                break
            ready, self.partial = self.partial[:cut + 1], self.partial[cut + 1:]
            for line in re.split(rb"(?<=[\r\n])", ready):
                if line:
                    self._line(line)
        if self.partial and not self.held and not _could_be_runtime(self.partial):
            self._pass(self.partial)  # a progress bar's unfinished line
            self.partial = b""

    def _line(self, line: bytes) -> None:
        if self.held or (_RUNTIME_LINE.match(line) and line[:1] not in (b"I", b"W")):
            self.held += line  # an error-level line of the runtime, or anything after one
            return
        self._pass(line)

    def _pass(self, data: bytes) -> None:
        if data.startswith(b"error: ") and _LOST_LINE in data:
            self.said_lost = True
        self.out.write(data)
        self.out.flush()

    def finish(self) -> bytes:
        """At the child's end: what was held back (not passed on)."""
        held, self.held, self.partial = self.held + self.partial, b"", b""
        return held


def _could_be_runtime(partial: bytes) -> bool:
    return partial[:1] in (b"I", b"W", b"E", b"F", b"*", b"t", b" ")


def run_guarded(module: str, argv: list[str]) -> int:
    """Run ``python -m module argv`` as this process's guarded child -> the exit code to end
    with: the child's own, or 75 with the one line when the runtime aborted it because a process
    of the job was lost. SIGTERM and SIGHUP are passed on to the child (Ctrl-C reaches it from
    the terminal itself); a ``kill -9`` of this process takes the child with it."""
    env = dict(os.environ, **{GUARDED_ENV: "1", STDERR_TTY_ENV: "1" if _stderr_is_tty() else "0"})
    child = subprocess.Popen([sys.executable, "-m", module, *argv], env=env,
                             stderr=subprocess.PIPE, preexec_fn=_die_with_parent)

    def forward(signum, frame):
        if child.poll() is None:
            child.send_signal(signum)

    handlers = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM,
                                                                       signal.SIGHUP)}
    handlers[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's
    stream = _StderrFilter(sys.stderr.buffer)  # Ctrl-C reaches the child by itself
    try:
        fd = child.stderr.fileno()
        while data := os.read(fd, 65536):
            stream.feed(data)
        code = child.wait()
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    held = stream.finish()
    aborted = code in (-signal.SIGABRT, 128 + signal.SIGABRT)
    if code == EXIT_PROCESS_LOST or (aborted and any(m in held for m in _LOST_MARKERS)):
        # The child said it, or the runtime aborted it first (or both, racing): one line.
        if not stream.said_lost:
            said = [line for line in held.splitlines() if line.startswith(b"error: ")
                    and _LOST_LINE in line]
            line = said[0].decode(errors="replace") if said else \
                f"error: {lost_process_line(_who_was_lost(held))}"
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        return EXIT_PROCESS_LOST
    sys.stderr.buffer.write(held)  # real output after all, or an abort of another kind: a bug
    sys.stderr.flush()
    return 128 - code if code < 0 else code


def _stderr_is_tty() -> bool:
    try:
        return os.isatty(sys.stderr.fileno())
    except (OSError, ValueError):
        return False


def stderr_is_tty() -> bool:
    """Whether the user's stderr is a terminal (in the guarded child: the guard's)."""
    if guarded():
        return os.environ.get(STDERR_TTY_ENV) == "1"
    return _stderr_is_tty()
