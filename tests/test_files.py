"""cae.files.write_atomic: whole files only, a normal file's mode under the process's umask, and
the umask itself never touched (no module changes process state at import or at a write)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
from conftest import REPO

from cae import files


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_write_atomic_gives_a_normal_files_mode_and_leaves_the_umask_alone(tmp_path, umask):
    # A child process: the umask is process-wide, and another test thread could be writing.
    code = ("import os, sys, stat; from cae import files; "
            "before = os.umask(0o022); os.umask(before); "
            "files.write_atomic(sys.argv[1], 'x'); after = os.umask(0o022); "
            "print(oct(before), oct(after), oct(stat.S_IMODE(os.stat(sys.argv[1]).st_mode)))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "f.txt")], cwd=REPO,
                         capture_output=True, text=True, umask=umask, check=True).stdout.split()
    assert out == [oct(umask), oct(umask), oct(0o666 & ~umask)]


def test_write_atomic_replaces_whole_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    files.write_atomic(path, files.dump_jsonl([{"epoch": 1}, {"epoch": 2}]))
    assert path.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'
    files.write_atomic(path, b"bytes")
    assert path.read_bytes() == b"bytes" and os.listdir(tmp_path) == ["metrics.jsonl"]
    assert stat.S_ISREG(path.stat().st_mode)


def test_a_failed_write_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"

    def refuse(fd):
        raise OSError(28, os.strerror(28))  # ENOSPC from fsync names no file

    monkeypatch.setattr(os, "fsync", refuse)
    with pytest.raises(OSError) as info:
        files.write_atomic(path, "{}")
    assert info.value.filename == str(path) and os.listdir(tmp_path) == []
