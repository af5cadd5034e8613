"""The shared-memory request ring between our LocalTimerClient and our LocalTimerServer.

The server marks the queue it reads (an abstract socket named after the queue's pipe), so a
worker finds it whichever way it got the queue (fork, spawn, a sibling of the server's
process): every request counts, in order; a worker stuck with the GIL held is reaped; a
restarted server is found again; a bad announcement on the queue costs nothing.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import signal
import subprocess
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import pytest
from helpers import open_rings, wait_for

import elastic_timer as timer

FORK = mp.get_context("fork")
SPAWN = mp.get_context("spawn")
RING = "memfd:elastic-timer-ring"


def maps_ring() -> int:
    """How many rings this process (the server's) has mapped."""
    with open("/proc/self/maps") as maps:
        return sum(RING in entry for entry in maps)


def blocks_then_hold(mp_queue: Any, conn: Connection, blocks: int) -> None:
    """``blocks`` blocks over 7 scopes, then one held open: says how many rings it has and
    waits for the test's word."""
    client = timer.LocalTimerClient(mp_queue)
    for i in range(blocks):
        with timer.expires(after=60, scope=f"s{i % 7}", client=client):
            pass
    with timer.expires(after=60, scope="last", client=client):
        conn.send(open_rings())
        conn.recv()


def serve(mp_queue: Any, conn: Connection) -> None:
    """A LocalTimerServer in its own process: says how many requests it saw, when asked."""
    server = timer.LocalTimerServer(mp_queue, max_interval=0.1)
    server.start()
    conn.send("ready")
    while conn.recv() == "count":
        conn.send((server.stats()["requests"], maps_ring()))
    server.stop()


def start(
    ctx: Any, children: list[Any], target: Callable[..., None], mp_queue: Any, *args: Any
) -> tuple[Connection, Any]:
    """Starts ``target(mp_queue, conn, *args)``; returns the test's end of ``conn``, and the
    process."""
    parent, child = ctx.Pipe()
    process = ctx.Process(target=target, args=(mp_queue, child, *args))
    process.start()
    children.append(process)
    return parent, process


def scopes(server: timer.LocalTimerServer, pid: int | None) -> set[str]:
    return {scope for (worker_pid, scope) in server._timers if worker_pid == pid}


@pytest.fixture
def mp_queue() -> Any:
    return FORK.Queue()


@pytest.fixture
def server(mp_queue: Any, servers: list[Any]) -> timer.LocalTimerServer:
    started = timer.LocalTimerServer(mp_queue, max_interval=0.1)
    servers.append(started)
    started.start()
    return started


def test_a_spawned_worker_sends_by_ring_and_every_request_counts_in_order(
    servers: list[Any], children: list[Any]
) -> None:
    """20,000 blocks from a spawned worker (it got the queue by pickle, not by fork): every
    acquire and release is counted, none is left live, and the ring carried them."""
    mp_queue = SPAWN.Queue()
    server = timer.LocalTimerServer(mp_queue, max_interval=0.1)
    servers.append(server)
    server.start()
    parent, worker = start(SPAWN, children, blocks_then_hold, mp_queue, 20_000)
    assert parent.poll(60)
    assert parent.recv() == 1
    assert maps_ring() == 1
    assert wait_for(lambda: scopes(server, worker.pid) == {"last"})
    assert server.stats()["requests"] == 2 * 20_000 + 1
    assert server.stats()["malformed"] == 0
    parent.send("go")
    worker.join(30)
    assert worker.exitcode == 0
    assert wait_for(lambda: server.stats()["requests"] == 2 * 20_000 + 2)
    assert wait_for(lambda: maps_ring() == 0)
    assert server.stats()["live_timers"] == 0


def test_a_sibling_of_the_servers_process_finds_the_mark(
    mp_queue: Any, children: list[Any]
) -> None:
    """Server and worker are both children of this process (neither inherits anything from
    the other): the worker still sends by ring."""
    server_end, server = start(FORK, children, serve, mp_queue)
    assert server_end.poll(30) and server_end.recv() == "ready"
    parent, worker = start(FORK, children, blocks_then_hold, mp_queue, 100)
    assert parent.poll(30)
    assert parent.recv() == 1

    def counted() -> tuple[int, int]:
        server_end.send("count")
        return server_end.recv()  # type: ignore[no-any-return]

    assert wait_for(lambda: counted() == (201, 1))
    parent.send("go")
    worker.join(30)
    assert worker.exitcode == 0
    assert wait_for(lambda: counted() == (202, 0))
    server_end.send("stop")
    server.join(30)
    assert server.exitcode == 0


def hold_the_gil(mp_queue: Any, conn: Connection) -> None:
    client = timer.LocalTimerClient(mp_queue)
    for _ in range(2):
        with timer.expires(after=60, scope="connect", client=client):
            pass
    conn.send(open_rings())
    with timer.expires(after=1.0, scope="stuck", client=client):
        ctypes.PyDLL(None).sleep(60)


def test_a_worker_holding_the_gil_is_reaped_at_its_deadline(
    mp_queue: Any, server: timer.LocalTimerServer, children: list[Any]
) -> None:
    """The acquire is in the ring; the worker then sleeps in C with the GIL held (nothing in
    it runs again): the server still sees the acquire and kills it at the deadline."""
    parent, worker = start(FORK, children, hold_the_gil, mp_queue)
    assert parent.poll(30)
    assert parent.recv() == 1
    started = time.monotonic()
    worker.join(30)
    assert worker.exitcode == -signal.SIGKILL
    assert time.monotonic() - started < 10
    assert server.stats()["reaped"] == 1


def blocks_on_command(mp_queue: Any, conn: Connection) -> None:
    client = timer.LocalTimerClient(mp_queue)
    while (blocks := conn.recv()) > 0:
        for _ in range(blocks):
            with timer.expires(after=60, scope="step", client=client):
                pass
        conn.send(open_rings())


def test_a_restarted_server_is_found_again(
    mp_queue: Any,
    server: timer.LocalTimerServer,
    servers: list[Any],
    children: list[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Stopping closes the ring: the worker sends on the queue again, looks for the mark
    now and then (every 1,000 requests), and offers the restarted server a new ring. The
    worker was forked while the first server marked the queue: it did not keep the mark,
    so the second server marks the queue itself."""
    caplog.set_level(logging.WARNING, logger="elastic_timer")
    parent, worker = start(FORK, children, blocks_on_command, mp_queue)
    parent.send(10)
    assert parent.recv() == 1
    assert wait_for(lambda: server.stats()["requests"] == 20)
    server.stop()
    second = timer.LocalTimerServer(mp_queue, max_interval=0.1)
    servers.append(second)
    second.start()
    parent.send(1)
    assert parent.recv() == 0  # the old ring is closed; on the queue to the new server...
    parent.send(600)
    assert parent.recv() == 1  # ...until it looked for the mark again and offered a ring
    assert wait_for(lambda: second.stats()["requests"] == 2 + 1200)
    assert wait_for(lambda: scopes(second, worker.pid) == set())
    assert not [r.getMessage() for r in caplog.records if "cannot mark" in r.getMessage()]
    parent.send(0)
    worker.join(30)
    assert worker.exitcode == 0


def test_a_bad_announcement_on_the_queue_is_reported_and_costs_nothing(
    mp_queue: Any,
    server: timer.LocalTimerServer,
    children: list[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An announcement naming another process's stdin, then a real expired request: the
    first is refused with a warning, the second still reaps."""
    caplog.set_level(logging.WARNING, logger="elastic_timer")
    sleeper = subprocess.Popen(["sleep", "60"])
    children.append(sleeper)
    bogus = f'{{"elastic_timer_ring": 1, "pid": {sleeper.pid}, "fd": 0}}'
    mp_queue.put(timer.TimerRequest(sleeper.pid, bogus, -1))
    mp_queue.put(timer.TimerRequest(sleeper.pid, "expired", time.time() - 1))
    assert sleeper.wait(30) == -signal.SIGKILL
    refused = f"ring of pid {sleeper.pid} refused: /proc/{sleeper.pid}/fd/0 is"
    assert wait_for(lambda: any(refused in r.getMessage() for r in caplog.records))
    assert server.stats()["requests"] == 1
    assert maps_ring() == 0


def test_a_second_server_on_a_marked_queue_warns_and_serves_without_rings(
    mp_queue: Any,
    server: timer.LocalTimerServer,
    servers: list[Any],
    children: list[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The mark is the first server's: a second one reading the same queue says it cannot
    mark it, and still reaps what it reads."""
    caplog.set_level(logging.WARNING, logger="elastic_timer")
    second = timer.LocalTimerServer(mp_queue, max_interval=0.1)
    servers.append(second)
    second.start()
    assert wait_for(lambda: any("cannot mark the queue" in r.getMessage() for r in caplog.records))
    server.stop()
    sleeper = subprocess.Popen(["sleep", "60"])
    children.append(sleeper)
    mp_queue.put(timer.TimerRequest(sleeper.pid, "expired", time.time() - 1))
    assert sleeper.wait(30) == -signal.SIGKILL
    assert second.stats()["reaped"] == 1
