"""Several workers expiring together, in torch's example's shape: 8 spawned workers with one
shared absolute deadline, the even ones stuck, and a File server that signals its own process
after a reap (``signal_self``, as torch 2.7+ does). Every stuck worker must be reaped before
the server signals itself: it runs in a process of its own (never pytest's), and dies last.

Reading the wall and the monotonic clock together is off by a few microseconds now and then
(more when the thread is interrupted in between). The second case makes that error large and
certain: the server runs under libfaketime, and its wall clock is moved by a fraction of a
millisecond before each stuck worker's acquire. A server that converted each expiration with
a reading of its own would put the four deadlines up to 0.6 ms apart, reap the first worker
alone and end its process.

The third case takes each stuck worker's stacks before the kill (``stack_dump``), and one of
them blocks the stack signal, so that its stacks never come and its reap waits out the whole
grace: the others' reaps come passes earlier, and the server must not signal itself until the
last one is reaped.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import libfaketime

from elastic_timer import FileTimerClient

SPAWN = mp.get_context("spawn")
WORKERS = 8
# Between the deadline being set and due: every worker acquires meanwhile, on loaded cores.
LEAD = 3.0
# A stuck worker left unreaped sleeps this long, far past the bound the test waits.
STUCK_FOR = 30.0
REAPED_WITHIN = 5.0  # generous on two loaded cores; an unreaped worker runs STUCK_FOR
# The server's wall clock before each stuck worker's acquire (seconds): within what the
# server takes for reading error, not for a step.
READING_ERRORS = [0.0, 0.0002, 0.0004, 0.0006]

# How long the server waits for a stuck worker's stacks, in the case that takes them.
STACK_GRACE = 2.0
# The stuck worker that never answers for its stacks (it blocks the stack signal).
SILENT_RANK = 6

# The server: answers each line on stdin with the pids that hold timers, as JSON.
SERVER = """\
import json, sys
import elastic_timer

server = elastic_timer.FileTimerServer(
    sys.argv[1], "together", signal_self=True, stack_dump=float(sys.argv[2]) or None
)
server.start()
print("ready", flush=True)
for _ in sys.stdin:  # until its own signal ends it, or the test closes stdin
    print(json.dumps(sorted({pid for pid, _ in server._timers})), flush=True)
server.stop()
"""


class Server:
    def __init__(
        self, tmp_path: Path, children: list[Any], reading_error: bool, stack_grace: float
    ) -> None:
        self.fifo = str(tmp_path / "timer.fifo")
        self.offset_file = tmp_path / "faketime"
        env = dict(os.environ)
        if reading_error:
            self.move_wall_clock(0.0)
            env.update(
                LD_PRELOAD=libfaketime(),
                FAKETIME_TIMESTAMP_FILE=str(self.offset_file),
                FAKETIME_NO_CACHE="1",
                FAKETIME_DONT_FAKE_MONOTONIC="1",
            )
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVER, self.fifo, str(stack_grace)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        children.append(self.process)
        assert self.read() == "ready"

    def read(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, f"the server exited with {self.process.poll()}"
        return line.strip()

    def pids_with_timers(self) -> list[int]:
        assert self.process.stdin is not None
        self.process.stdin.write("pids\n")
        self.process.stdin.flush()
        pids: list[int] = json.loads(self.read())
        return pids

    def move_wall_clock(self, seconds: float) -> None:
        self.offset_file.write_text(f"{seconds:+.6f}\n")


def worker(rank: int, fifo: str, started: Any, go: Any, deadline: Any, acquired: Any) -> None:
    if rank == SILENT_RANK:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})  # the stack signal
    client = FileTimerClient(fifo)
    started.put(rank)
    go.wait(60)
    client.acquire("step", deadline.value)
    acquired.put(rank)
    if rank % 2 == 0:
        time.sleep(STUCK_FOR)
        sys.exit(1)
    time.sleep(0.1)
    client.release("step")


@pytest.mark.parametrize(
    ("reading_error", "stack_grace"),
    [(False, 0.0), (True, 0.0), (False, STACK_GRACE)],
    ids=["together", "reading-error", "stacks-taken"],
)
def test_every_worker_due_at_a_shared_deadline_is_reaped_before_the_server_signals_itself(
    tmp_path: Path, children: list[Any], reading_error: bool, stack_grace: float
) -> None:
    server = Server(tmp_path, children, reading_error, stack_grace)
    started, acquired = SPAWN.Queue(), SPAWN.Queue()
    go = [SPAWN.Event() for _ in range(WORKERS)]
    deadline = SPAWN.Value("d", 0.0)
    workers = [
        SPAWN.Process(
            target=worker, args=(rank, server.fifo, started, go[rank], deadline, acquired)
        )
        for rank in range(WORKERS)
    ]
    for process in workers:
        process.start()
        children.append(process)
    for _ in workers:
        started.get(timeout=60)
    deadline.value = time.time() + LEAD
    due = time.monotonic() + LEAD
    if reading_error:
        # One stuck worker at a time, each read by the server at another wall-clock error.
        for rank, error in zip(range(0, WORKERS, 2), READING_ERRORS):
            server.move_wall_clock(error)
            go[rank].set()
            assert acquired.get(timeout=LEAD) == rank
            while workers[rank].pid not in server.pids_with_timers():
                assert time.monotonic() < due, "too slow: the server read an acquire late"
                time.sleep(0.01)
        for rank in range(1, WORKERS, 2):
            go[rank].set()
    else:
        for event in go:
            event.set()
    for _ in range(WORKERS // 2 if reading_error else WORKERS):
        acquired.get(timeout=LEAD)
    assert time.monotonic() < due, "too slow: a worker acquired after the deadline"

    for rank, process in enumerate(workers):
        process.join(max(due + stack_grace + REAPED_WITHIN - time.monotonic(), 0.1))
        expected = -signal.SIGKILL if rank % 2 == 0 else 0
        assert process.exitcode == expected, (rank, process.exitcode)
    assert server.process.wait(REAPED_WITHIN) == -signal.SIGKILL, "it did not signal itself"
