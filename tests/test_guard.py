"""cae.guard on its own, with stand-in children (no JAX): the one line and exit 75 when the
runtime aborts a process because a peer is gone, everything else passed through unchanged.
The real thing, two training processes and a kill -9, is tests/test_multiprocess.py's."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import REPO

from cae import guard

# What jaxlib 0.10.2 printed in these cases (tests/test_multiprocess.py makes it happen).
UNHEALTHY = (
    "E1207 17:21:47.923798   12204 coordination_service.cc:1549] [144] Use error polling to "
    "propagate the following error to all tasks: UNAVAILABLE: The following tasks are unhealthy "
    "(stopped sending heartbeats):\n1\nThe tasks have crashed. Check the task logs for an "
    "earlier error.\n"
    "E1207 17:21:47.924339   12215 coordination_service_agent.cc:289] Polled an error from "
    "coordination service (this can be an error from this or another task).\n"
    "F1207 17:21:47.924400   12215 client.h:80] Terminating process because the JAX "
    "distributed service detected fatal errors.\n*** Check failure stack trace: ***\n"
    "    @     0x7f0000000000  (unknown)\n")
LEADER_GONE = (
    "F1207 17:36:06.077946   25704 client.h:80] Terminating process because the JAX distributed "
    "service detected fatal errors. absl::Status: UNAVAILABLE: Failed to send RPC to "
    "coordination service. Either the leader task was preempted/died/restarted unexpectedly\n"
    ":UNKNOWN:Error received from peer  {grpc_status:14, grpc_message:\"Socket closed\"}\n")


def _guard(tmp_path, child_code: str, **popen):
    """A process that runs ``guard.run_guarded`` on a stand-in child module -> Popen."""
    (tmp_path / "standin.py").write_text(textwrap.dedent(child_code))
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
    env.pop(guard.GUARDED_ENV, None)
    code = "import sys; from cae import guard; sys.exit(guard.run_guarded('standin', ['x']))"
    return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _run(tmp_path, child_code: str) -> tuple[int, str, str]:
    proc = _guard(tmp_path, child_code)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


ABORT = "sys.stderr.flush(); os.abort()"


def test_an_abort_because_a_worker_stopped_is_one_line_naming_it_and_exit_75(tmp_path):
    code, out, err = _run(tmp_path, f"""
        import os, sys
        print("epoch 1/4: train_loss 0.1", flush=True)
        sys.stderr.write("a warning of ours\\n")
        sys.stderr.write({UNHEALTHY!r})
        {ABORT}
    """)
    assert code == guard.EXIT_PROCESS_LOST == 75
    assert out == "epoch 1/4: train_loss 0.1\n"
    lines = err.splitlines()
    assert lines[0] == "a warning of ours" and len(lines) == 2
    assert lines[1].startswith("error: process 1 of this multi-process job was lost")
    assert "run the same command again on every process" in lines[1]


def test_an_abort_because_the_coordinator_is_gone_names_process_0(tmp_path):
    code, _, err = _run(tmp_path, f"""
        import os, sys
        sys.stderr.write({LEADER_GONE!r})
        {ABORT}
    """)
    assert code == 75
    assert err.splitlines() == [
        "error: " + guard.lost_process_line("process 0 (the coordinator)")]


def test_the_childs_own_line_is_said_once_whoever_wins_the_race(tmp_path):
    line = "error: " + guard.lost_process_line("process 0")
    for ending in (ABORT, "sys.stderr.flush(); os._exit(75)"):  # the abort or our exit first
        code, _, err = _run(tmp_path, f"""
            import os, sys
            sys.stderr.write({LEADER_GONE!r})
            sys.stderr.write({line + chr(10)!r})
            {ending}
        """)
        assert code == 75 and err.splitlines() == [line], ending


def test_any_other_ending_passes_through_unchanged(tmp_path):
    code, out, err = _run(tmp_path, """
        import sys
        print("done", flush=True)
        sys.stderr.write("E1207 17:00:00.000000   1 some.cc:1] a runtime error line\\nerror: x\\n")
        sys.exit(3)
    """)
    assert (code, out) == (3, "done\n")
    assert err.splitlines() == ["E1207 17:00:00.000000   1 some.cc:1] a runtime error line",
                                "error: x"]
    # An abort that is not about a lost process is a bug: all of it is shown, with its code.
    code, _, err = _run(tmp_path, f"""
        import os, sys
        sys.stderr.write("F1207 17:00:00.000000   1 some.cc:1] Check failed: x == y\\n")
        {ABORT}
    """)
    assert code == 134 and "Check failed: x == y" in err


def test_sigterm_reaches_the_child_and_kill_9_takes_it_along(tmp_path):
    child = """
        import os, signal, sys, time
        def bye(signum, frame):
            sys.stderr.write("interrupted: run the same command again\\n")
            sys.exit(143)
        signal.signal(signal.SIGTERM, bye)
        print(os.getpid(), flush=True)
        time.sleep(60)
    """
    proc = _guard(tmp_path, child)
    proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert err.splitlines() == ["interrupted: run the same command again"]

    proc = _guard(tmp_path, child)
    pid = int(proc.stdout.readline())
    proc.kill()
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    assert not _alive(pid), "the guarded child outlived its guard"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_the_filter_passes_progress_bars_and_holds_only_the_runtimes_errors():
    out = io.BytesIO()
    stream = guard._StderrFilter(out)
    stream.feed(b"\repoch 1:  10%|#  | 1/10")
    stream.feed(b"\repoch 1:  20%|## | 2/10")
    stream.feed(b"\nW1207 17:00:00.000000   1 a.cc:1] a warning\nE1207 17:00:00.0000")
    assert out.getvalue() == (b"\repoch 1:  10%|#  | 1/10\repoch 1:  20%|## | 2/10\n"
                              b"W1207 17:00:00.000000   1 a.cc:1] a warning\n")
    stream.feed(b"00   1 b.cc:2] an error\nafter it\n")
    assert stream.finish() == b"E1207 17:00:00.000000   1 b.cc:2] an error\nafter it\n"


@pytest.mark.parametrize("text, expected", [
    ("UNKNOWN: Gloo all-reduce failed: [pair.cc:538] Read error [127.0.0.1]:2465: Connection "
     "reset by peer", "process 1"),
    ("UNKNOWN: Gloo all-reduce failed: [pair.cc:547] Connection closed by peer", "process 1"),
    ("ValueError: shapes do not match", None)])
def test_a_collective_whose_peer_is_gone_is_a_lost_process_and_nothing_else_is(text, expected):
    lost = guard.lost_process_error(RuntimeError(text), process=0, num_processes=2)
    if expected is None:
        assert lost is None
    else:
        assert str(lost).startswith(f"{expected} of this multi-process job was lost")
        assert lost.exit_code == 75
    three = guard.lost_process_error(RuntimeError(text), process=2, num_processes=3)
    assert expected is None or str(three).startswith("another process")
