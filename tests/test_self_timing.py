"""A process may time itself, as with torch: the server and the client in one process.

torch's own tests do so (``with expires(after=60)`` beside the server, then they read
``_timers``), and a single-process program can guard itself with an in-process server. Each
scenario runs in a subprocess of its own, since an expiry signals the process it runs in.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

PRELUDE = """
import logging, multiprocessing as mp, os, signal, sys, tempfile, time
import elastic_timer as timer

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")

def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.01)
    return predicate()

def say(*words):
    print(*words, flush=True)

fifo = os.path.join(tempfile.mkdtemp(), "timer.fifo")
"""

# torch's test pattern: configure() a client of an in-process server, and read _timers.
GUARDED_THEN_STUCK = """
server.start()
me = os.getpid()
with timer.expires(after=60, scope="guarded"):
    say("listed", wait_for(lambda: (me, "guarded") in server._timers))
say("released", wait_for(lambda: not server._timers))
say("hanging")
with timer.expires(after=0.5, scope="stuck"):
    time.sleep(30)
say("survived")
"""

FILE_SCENARIO = (
    """
server = timer.FileTimerServer(fifo, "self", max_interval=0.1, signal_self=False)
timer.configure(timer.FileTimerClient(fifo, signal=signal.SIGTERM))
"""
    + GUARDED_THEN_STUCK
)

LOCAL_SCENARIO = (
    """
queue = mp.get_context("spawn").Queue()
server = timer.LocalTimerServer(queue, max_interval=0.1)
timer.configure(timer.LocalTimerClient(queue))
"""
    + GUARDED_THEN_STUCK
)

# With descendants_only, the server's own process is refused: it does not descend from itself.
DESCENDANTS_ONLY_SCENARIO = """
server = timer.FileTimerServer(fifo, "self", signal_self=False, descendants_only=True)
server.start()
timer.configure(timer.FileTimerClient(fifo, signal=signal.SIGKILL))
say("hanging")
with timer.expires(after=0.3, scope="stuck"):
    time.sleep(1.0)
wait_for(lambda: server.stats()["refused"] == 1)
say("survived", server.stats()["refused"], server._timers)
server.stop()
"""


def run_scenario(children: list[Any], scenario: str) -> tuple[int, list[str], str, float]:
    """Runs a scenario; returns its exit code, its stdout lines, its stderr, and how long after
    it said "hanging" it ended."""
    source = PRELUDE + textwrap.dedent(scenario)
    child = subprocess.Popen(
        [sys.executable, "-c", source], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    children.append(child)
    assert child.stdout is not None and child.stderr is not None
    lines = []
    hanging_at = 0.0
    for line in child.stdout:
        lines.append(line.strip())
        if line.strip() == "hanging":
            hanging_at = time.monotonic()
    code = child.wait(30)
    ended_after = time.monotonic() - hanging_at
    return code, lines, child.stderr.read(), ended_after


@pytest.mark.parametrize(
    ("scenario", "signal_received"),
    [(FILE_SCENARIO, "SIGTERM"), (LOCAL_SCENARIO, "SIGKILL")],
    ids=["file", "local"],
)
def test_a_process_timing_itself_is_registered_released_and_signalled(
    children: list[Any], scenario: str, signal_received: str
) -> None:
    """Its timers are registered and listed in ``_timers``, released, and on expiry the process
    gets the signal it asked for (the Local transport's is SIGKILL), after the reap is logged."""
    code, lines, stderr, ended_after = run_scenario(children, scenario)
    assert lines == ["listed True", "released True", "hanging"], stderr
    assert code == -getattr(signal, signal_received), stderr
    assert ended_after >= 0.45, f"signalled {ended_after:.3f} s after a 0.5 s timer"
    assert "Refusing" not in stderr
    # The pass is reported before the process is signalled.
    assert any(f"Reaping worker_{k}=[" in stderr for k in ("pid", "id")), stderr


def test_descendants_only_refuses_the_servers_own_process(children: list[Any]) -> None:
    """With ``descendants_only=True`` the server's own pid is refused, and never signalled."""
    code, lines, stderr, _ = run_scenario(children, DESCENDANTS_ONLY_SCENARIO)
    assert code == 0, stderr
    assert lines == ["hanging", "survived 1 {}"], stderr
    assert "is not a descendant of the timer server's process" in stderr
