"""The suite's own rules (conftest.py), checked on a tiny suite run under them: a skipped test
fails the run, and a failed test's leftover processes are killed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers import wait_for

TINY_SUITE = """
import subprocess, pytest

def test_skipped():
    pytest.skip("a missing feature")

def test_fails_and_leaves_a_worker(tmp_path):
    worker = subprocess.Popen(["sleep", "60"])
    (tmp_path.parent.parent / "worker.pid").write_text(str(worker.pid))
    assert False, "failed on purpose"

def test_passes():
    pass
"""


def test_a_skip_fails_the_run_and_a_failed_tests_workers_are_killed(tmp_path: Path) -> None:
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_tiny.py").write_text(textwrap.dedent(TINY_SUITE))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--basetemp",
            str(tmp_path / "base"),
            str(tmp_path),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1, run.stdout
    assert "2 failed, 1 passed" in run.stdout
    assert "skipped, and this suite fails every skip" in run.stdout
    pid = int((tmp_path / "worker.pid").read_text())
    assert wait_for(lambda: not os.path.exists(f"/proc/{pid}")), "the leftover worker still runs"
