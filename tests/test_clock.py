"""Monotonic deadlines, end to end: the server's wall clock stepped while timers are pending.

The server (tests/jobs/clock_host.py) runs under libfaketime with the monotonic clock left
alone, and its wall-clock offset is read from a file on every call, so the test can step it an
hour forward and back at run time. Its workers keep the real clocks. A server that went by the
wall clock would reap every worker at once after the step forward, and reap late (by an hour)
after the step back. Neither may happen, and ``_timers`` keeps showing what the clients sent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import libfaketime, wait_for

HOST = str(Path(__file__).parent / "jobs" / "clock_host.py")
# Early: due after the step forward. Late: due after the step back. Pending: due in 2 h, never
# here; a server that fired by the wall clock would still not reach it (1 h forward at most).
SCOPES = [["early", 3.0], ["late", 6.0], ["pending", 7200.0]]
HOUR = 3600.0
LATE_MARGIN = 1.0  # generous on 2 loaded cores; a wall-clock reap would be an hour off


class Host:
    """The clock_host.py process: one JSON answer per command."""

    def __init__(self, transport: str, tmp_path: Path) -> None:
        self.offset_file = tmp_path / "faketime"
        self.step(0)
        env = dict(
            os.environ,
            LD_PRELOAD=libfaketime(),
            FAKETIME_TIMESTAMP_FILE=str(self.offset_file),
            FAKETIME_NO_CACHE="1",
            FAKETIME_DONT_FAKE_MONOTONIC="1",
        )
        self.process = subprocess.Popen(
            [sys.executable, HOST, transport, str(tmp_path), json.dumps(SCOPES)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        assert self.read() == "ready"

    def step(self, offset: float) -> None:
        """Sets the server's wall clock to the real one plus ``offset`` seconds."""
        self.offset_file.write_text(f"{offset:+.0f}\n")

    def read(self) -> Any:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, f"clock_host.py exited with {self.process.wait()}"
        return json.loads(line)

    def ask(self, command: str) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()

    def assert_offset(self, offset: float) -> None:
        """The step took effect in the server process: in Python and in the native core."""
        clock, real = self.ask("clock"), time.time()
        for name in ("time", "native"):
            seen = clock[name] - real
            assert abs(seen - offset) < 5, (
                f"libfaketime did not step the server's {name} clock: "
                f"{seen:+.1f} s from real time, expected {offset:+.0f} s"
            )
        assert abs(clock["monotonic"] - time.monotonic()) < 5, "the monotonic clock was faked"

    def exit_of(self, pid: int) -> tuple[int, float] | None:
        for exited, code, when in self.ask("exits"):
            if exited == pid:
                return code, when
        return None

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(30)


@pytest.fixture(params=["file", "local"])
def host(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Host]:
    started = Host(request.param, tmp_path)
    try:
        yield started
    finally:
        if started.process.poll() is None:
            started.close()


def assert_reaped_at(host: Host, pid: int, deadline: float) -> None:
    """The worker died of SIGKILL at its deadline (monotonic clock): not before, not late."""
    wait_for(lambda: host.exit_of(pid), timeout=deadline + LATE_MARGIN - time.monotonic())
    exit = host.exit_of(pid)
    assert exit is not None, f"worker {pid} still runs {LATE_MARGIN} s after its deadline"
    code, when = exit
    assert code == -signal.SIGKILL
    assert when >= deadline, f"worker {pid} was reaped {deadline - when:.3f} s before its deadline"
    assert when <= deadline + LATE_MARGIN, f"worker {pid} was reaped {when - deadline:.3f} s late"


def test_a_wall_clock_step_neither_fires_a_timer_early_nor_late(host: Host) -> None:
    acquired = host.ask("go")
    sent = sorted([pid, scope, expiration] for pid, scope, expiration, _ in acquired)
    deadlines = {scope: (pid, deadline) for pid, scope, _, deadline in acquired}
    assert wait_for(lambda: host.ask("timers") == sent), "the server did not register the timers"

    host.step(HOUR)
    host.assert_offset(HOUR)
    early_pid, early_deadline = deadlines["early"]
    assert time.monotonic() < early_deadline - 1, (
        "too slow: the step came too close to the deadline"
    )
    assert host.ask("timers") == sent

    assert_reaped_at(host, early_pid, early_deadline)

    host.step(-HOUR)
    host.assert_offset(-HOUR)
    late_pid, late_deadline = deadlines["late"]
    assert time.monotonic() < late_deadline - 1, "too slow: the step came too close to the deadline"
    assert host.ask("timers") == [entry for entry in sent if entry[1] != "early"], (
        "the step back changed or fired timers"
    )

    assert_reaped_at(host, late_pid, late_deadline)

    pending_pid, _ = deadlines["pending"]
    assert host.exit_of(pending_pid) is None, "the worker with a 2 h timer was reaped"
    assert host.ask("timers") == [entry for entry in sent if entry[1] == "pending"]
