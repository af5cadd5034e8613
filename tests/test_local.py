"""LocalTimerServer/LocalTimerClient end to end: real worker processes, real SIGKILLs.

Every request a running server sees names a child process this test started (never a fake
pid, the test process, or anything else), and every child is reaped or killed at teardown.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import queue
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any
from unittest import mock

import pytest
from helpers import wait_for

from elastic_timer import LocalTimerClient, LocalTimerServer, TimerRequest, configure, expires

Children = list[Any]
Servers = list[Any]

FORK = mp.get_context("fork")


# -- workers (module level: spawn and forkserver pickle them by name) --------------------------


def _happy(rank: int, mp_queue: Any, deadlines: Any) -> None:
    configure(LocalTimerClient(mp_queue))
    deadlines[rank] = time.time() + 1
    with expires(after=1):
        time.sleep(0.5)


def _stuck(rank: int, mp_queue: Any, deadlines: Any) -> None:
    configure(LocalTimerClient(mp_queue))
    deadlines[rank] = time.time() + 1
    with expires(after=1):
        time.sleep(5)


def _hang(mp_queue: Any, after: float) -> None:
    """A worker stuck inside ``expires(after)``."""
    configure(LocalTimerClient(mp_queue))
    with expires(after=after):
        time.sleep(30)


def _recursive(n: int, mp_queue: Any, after: float, duration: float) -> None:
    """torch's ``func``/``func2``: every level enters the same ``with`` line."""
    if mp_queue is not None:
        configure(LocalTimerClient(mp_queue))
    if n > 0:
        with expires(after=after):
            _recursive(n - 1, None, after, duration)
            time.sleep(duration)


def _outer_still_armed(mp_queue: Any) -> None:
    """Hangs inside an outer block after an inner block (another line) finished."""
    configure(LocalTimerClient(mp_queue))
    with expires(after=1):
        with expires(after=10):
            time.sleep(0.05)
        time.sleep(10)


def _hang_in_a_long_scope(mp_queue: Any) -> None:
    """A worker stuck in a block whose request is too large for one atomic pipe write."""
    configure(LocalTimerClient(mp_queue))
    with expires(after=0.2, scope="x" * (2 * select.PIPE_BUF)):
        time.sleep(30)


def _put_many(mp_queue: Any, n: int) -> None:
    """Puts n harmless requests (releases of this process's own scopes)."""
    pid = os.getpid()
    for i in range(n):
        mp_queue.put(TimerRequest(pid, f"scope-{i}", -1))


def _put_bounded(mp_queue: Any, n: int, slowest: Any) -> None:
    """Acquires and releases n times through a bounded queue; records the slowest put."""
    client = LocalTimerClient(mp_queue)
    worst = 0.0
    for i in range(n):
        started = time.monotonic()
        if i % 2 == 0:
            client.acquire(f"scope-{i}", time.time() + 60)
        else:
            client.release(f"scope-{i - 1}")
        worst = max(worst, time.monotonic() - started)
    slowest.value = worst


def _exit_holding_a_timer(mp_queue: Any) -> None:
    """A worker that crashes (exits) while its timer is armed."""
    configure(LocalTimerClient(mp_queue))
    with expires(after=60):
        time.sleep(0.2)
        os._exit(3)


def _half_an_item(mp_queue: Any, written: Any) -> None:
    """A writer stuck in the middle of an item, as a ``put`` would be (holding the queue's
    write lock): half of a 60,000-byte item, then a byte now and then, never the rest."""
    mp_queue._sem.acquire()
    with mp_queue._wlock:
        fd = mp_queue._writer.fileno()
        os.write(fd, struct.pack("!i", 60_000) + b"x" * 30_000)
        written.set()
        while True:
            time.sleep(0.05)
            os.write(fd, b"x")


def _absurd_header(mp_queue: Any) -> None:
    """Puts an item header claiming 2 GiB, and a few bytes, then exits."""
    mp_queue._sem.acquire()
    with mp_queue._wlock:
        os.write(mp_queue._writer.fileno(), struct.pack("!i", 2**31 - 1) + b"junk")


class NotARequest:
    """An object a confused client might put on the timer queue."""

    def __init__(self) -> None:
        self.worker_id = 1234
        self.scope_id = "x"
        self.expiration_time = 0.0


# -- helpers -----------------------------------------------------------------------------------


def _start_server(servers: Servers, mp_queue: Any, max_interval: float = 0.01) -> LocalTimerServer:
    server = LocalTimerServer(mp_queue, max_interval=max_interval)
    servers.append(server)
    server.start()
    return server


def _start(children: Children, target: Callable[..., None], *args: Any) -> BaseProcess:
    process = FORK.Process(target=target, args=args)
    process.start()
    children.append(process)
    return process


def _sleeper(children: Children) -> subprocess.Popen[bytes]:
    """A real child process that would sleep 30 s: a worker pid the server may signal."""
    child = subprocess.Popen(["sleep", "30"])
    children.append(child)
    return child


def _join(process: BaseProcess, timeout: float = 10) -> int | None:
    process.join(timeout)
    assert not process.is_alive(), "worker still running: its timer never fired"
    return process.exitcode


def _messages(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


# -- torch's examples --------------------------------------------------------------------------


@pytest.mark.parametrize("start_method", ["spawn", "fork", "forkserver"])
def test_local_timer_example(start_method: str, servers: Servers, children: Children) -> None:
    """torch's local_timer_example: of 8 workers the stuck ones (even ranks) are SIGKILLed
    right after their 1 s deadline, not after their 5 s of work; the happy ones exit 0."""
    ctx: Any = mp.get_context(start_method)
    mp_queue = ctx.Queue()
    _start_server(servers, mp_queue)
    deadlines = ctx.Array("d", 8)
    processes = []
    for rank in range(8):
        target = _stuck if rank % 2 == 0 else _happy
        process = ctx.Process(target=target, args=(rank, mp_queue, deadlines))
        process.start()
        children.append(process)
        processes.append(process)

    exited: dict[int, float] = {}
    pending = {process.sentinel: rank for rank, process in enumerate(processes)}
    give_up = time.monotonic() + 20
    while pending and time.monotonic() < give_up:
        for sentinel in wait(list(pending), timeout=give_up - time.monotonic()):
            exited[pending.pop(sentinel)] = time.time()

    assert not pending, "some workers never ended"
    for rank, process in enumerate(processes):
        process.join(5)
        if rank % 2 == 0:
            assert process.exitcode == -signal.SIGKILL, rank
            late = exited[rank] - deadlines[rank]
            assert -0.01 <= late < 1.0, f"rank {rank} died {late:.3f} s after its deadline"
        else:
            assert process.exitcode == 0, rank


def test_recursive_blocks_share_one_scope(servers: Servers, children: Children) -> None:
    """torch's test_get_timer_recursive: recursion through one ``with`` line re-acquires one
    timer. func(4) outlives its first deadline (only the innermost acquisition counts, then it
    is released) and exits 0; func2(2) hangs inside the innermost block and is killed."""
    mp_queue = FORK.Queue()
    _start_server(servers, mp_queue)
    func = _start(children, _recursive, 4, mp_queue, 1.0, 0.35)
    func2 = _start(children, _recursive, 2, mp_queue, 0.3, 5.0)
    assert _join(func2) == -signal.SIGKILL
    assert _join(func) == 0


def test_outer_block_stays_armed_after_an_inner_block(servers: Servers, children: Children) -> None:
    """Nested blocks on different lines are different timers: leaving the inner one does not
    disarm the outer one, so a worker hanging in the outer block is still killed (torch's
    shared default scope would have released the outer timer and let it hang)."""
    mp_queue = FORK.Queue()
    _start_server(servers, mp_queue)
    started = time.monotonic()
    worker = _start(children, _outer_still_armed, mp_queue)
    assert _join(worker) == -signal.SIGKILL
    assert time.monotonic() - started < 4


# -- server lifecycle and torch's server-level API ----------------------------------------------


def test_stop_is_prompt_with_a_long_max_interval(servers: Servers) -> None:
    """An agent shutting down is not held up by max_interval: stop() returns at once even
    with max_interval=60 and no client ever connected."""
    server = _start_server(servers, FORK.Queue(), max_interval=60)
    time.sleep(0.05)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 0.5
    server.stop()  # idempotent


def test_server_can_be_restarted(servers: Servers, children: Children) -> None:
    """A stopped server started again still reads its queue and reaps."""
    mp_queue = FORK.Queue()
    server = _start_server(servers, mp_queue)
    server.stop()
    server.start()
    worker = _start(children, _hang, mp_queue, 0.3)
    assert _join(worker) == -signal.SIGKILL


def test_timer_map_api_with_real_pids(children: Children) -> None:
    """register_timers / _timers / get_expired_timers / clear_timers behave as torch's
    dict-backed server (keys (pid, scope), releases remove, deadlines inclusive)."""
    server = LocalTimerServer(FORK.Queue(), max_interval=0.01)  # never started: never reaps
    worker, other = _sleeper(children), _sleeper(children)
    now = time.time()
    a = TimerRequest(worker.pid, "a", now + 60)
    b = TimerRequest(worker.pid, "b", now + 120)
    c = TimerRequest(other.pid, "a", now + 90)
    server.register_timers([a, b, c])
    assert server._timers == {(worker.pid, "a"): a, (worker.pid, "b"): b, (other.pid, "a"): c}
    assert server.get_expired_timers(now) == {}
    assert server.get_expired_timers(now + 90) == {worker.pid: [a], other.pid: [c]}
    server.register_timers([TimerRequest(worker.pid, "b", -1), TimerRequest(other.pid, "zz", -1)])
    assert set(server._timers) == {(worker.pid, "a"), (other.pid, "a")}
    moved = TimerRequest(worker.pid, "a", now + 30)
    server.register_timers([moved])
    assert server._timers[(worker.pid, "a")] == moved
    server.clear_timers({worker.pid})
    assert server._timers == {(other.pid, "a"): c}
    assert worker.poll() is None and other.poll() is None


def test_run_watchdog_on_a_stopped_server(children: Children) -> None:
    """torch's server tests drive ``_run_watchdog()`` by hand: it reads the queue, SIGKILLs
    the worker with an expired timer, clears all of its timers, and leaves the others."""
    # An empty queue is fine (torch's test_watchdog_empty_queue): the pass waits max_interval.
    LocalTimerServer(FORK.Queue(), max_interval=0.01)._run_watchdog()
    mp_queue = FORK.Queue()
    server = LocalTimerServer(mp_queue, max_interval=1)
    victim, bystander = _sleeper(children), _sleeper(children)
    now = time.time()
    mp_queue.put(TimerRequest(victim.pid, "test1", now - 60))
    mp_queue.put(TimerRequest(victim.pid, "test2", now + 60))
    mp_queue.put(TimerRequest(bystander.pid, "test1", now + 60))
    mp_queue.put(TimerRequest(bystander.pid, "test2", now + 60))
    mp_queue.put(TimerRequest(bystander.pid, "test2", -1))
    server._run_watchdog()
    assert victim.wait(5) == -signal.SIGKILL
    assert bystander.poll() is None
    assert list(server._timers) == [(bystander.pid, "test1")]
    assert mp_queue.qsize() == 0


JUNK: list[Any] = ["garbage", None, b"bytes", 42]


def test_run_watchdog_keeps_the_good_requests_of_a_bad_batch(
    children: Children, caplog: pytest.LogCaptureFixture
) -> None:
    """torch's loop, driven by hand, reads junk beside a valid expired request: the junk is
    logged and counted, and the valid request's worker is still reaped in that same pass."""
    caplog.set_level(logging.WARNING, logger="elastic_timer")
    mp_queue = FORK.Queue()
    server = LocalTimerServer(mp_queue, max_interval=1)
    victim, bystander = _sleeper(children), _sleeper(children)
    now = time.time()
    for item in JUNK[:2]:
        mp_queue.put(item)
    mp_queue.put(TimerRequest(victim.pid, "expired", now - 60))
    mp_queue.put(TimerRequest(str(bystander.pid), "string-pid", now - 60))
    for item in JUNK[2:]:
        mp_queue.put(item)
    mp_queue.put(TimerRequest(bystander.pid, "later", now + 60))
    server._run_watchdog()
    assert victim.wait(5) == -signal.SIGKILL
    assert bystander.poll() is None
    assert list(server._timers) == [(bystander.pid, "later")]
    assert server.stats()["malformed"] == 5
    reasons = [r.getMessage() for r in _messages(caplog, "Skipping malformed timer request")]
    assert len(reasons) == 5, reasons
    assert "'garbage' is not a timer request" in reasons[0]
    assert "worker_id must be a pid (int), got '" in reasons[2]


def _junk(item: Any) -> Callable[[int, float], Any]:
    return lambda pid, far: item


# Bad items for a batch, made from a live worker's pid and a far expiration.
BAD_ITEMS: dict[str, Callable[[int, float], Any]] = {
    **{f"junk-{item!r}": _junk(item) for item in JUNK},
    "float-pid": lambda pid, far: TimerRequest(float(pid), "x", far),
    "int-scope": lambda pid, far: TimerRequest(pid, 42, far),  # type: ignore[arg-type]
    "str-expiration": lambda pid, far: TimerRequest(pid, "x", "soon"),  # type: ignore[arg-type]
    "huge-pid": lambda pid, far: TimerRequest(2**70, "x", far),
}


@pytest.mark.parametrize("bad", BAD_ITEMS.values(), ids=BAD_ITEMS.keys())
def test_register_timers_registers_every_valid_request_of_a_batch(
    children: Children, bad: Callable[[int, float], Any]
) -> None:
    """Any caller's batch: each bad item (junk, or a TimerRequest with a field of the wrong
    type or out of range) costs only itself; the requests around it are registered."""
    server = LocalTimerServer(FORK.Queue())  # never started: never reaps
    worker = _sleeper(children)
    far = time.time() + 60
    server.register_timers(
        [
            TimerRequest(worker.pid, "before", far),
            bad(worker.pid, far),
            TimerRequest(worker.pid, "after", far),
        ]
    )
    assert set(server._timers) == {(worker.pid, "before"), (worker.pid, "after")}
    assert server.stats()["malformed"] == 1


def test_timers_registered_before_start_fire_after_start(
    servers: Servers, children: Children
) -> None:
    """Requests registered (or queued) before start() are honoured once the server starts."""
    mp_queue = FORK.Queue()
    server = LocalTimerServer(mp_queue, max_interval=0.01)
    servers.append(server)
    registered, queued = _sleeper(children), _sleeper(children)
    server.register_timers([TimerRequest(registered.pid, "early", time.time() + 0.2)])
    mp_queue.put(TimerRequest(queued.pid, "queued", time.time() + 0.2))
    time.sleep(0.3)
    assert registered.poll() is None and queued.poll() is None
    server.start()
    assert registered.wait(5) == -signal.SIGKILL
    assert queued.wait(5) == -signal.SIGKILL


def test_a_worker_that_exits_drops_its_timers(
    servers: Servers, children: Children, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that dies with an armed timer loses its timers when it exits (its pid may
    be reused: the new process must never inherit the deadline)."""
    caplog.set_level(logging.INFO, logger="elastic_timer")
    mp_queue = FORK.Queue()
    server = _start_server(servers, mp_queue)
    worker = _start(children, _exit_holding_a_timer, mp_queue)
    assert wait_for(lambda: any(key[0] == worker.pid for key in server._timers))
    assert _join(worker) == 3
    assert wait_for(lambda: not server._timers)
    assert wait_for(lambda: bool(_messages(caplog, f"Worker pid={worker.pid} exited")))


def test_deadlines_follow_acquires_and_releases(
    servers: Servers, children: Children, caplog: pytest.LogCaptureFixture
) -> None:
    """The earliest armed deadline of a worker is the one that fires: re-acquiring a scope
    moves its deadline, releasing one leaves the others armed, and torch's int expirations
    (``0``: already expired) work. Each reap is logged as torch logs it."""
    caplog.set_level(logging.INFO, logger="elastic_timer")
    mp_queue = FORK.Queue()
    server = _start_server(servers, mp_queue)
    moved, released, expired = _sleeper(children), _sleeper(children), _sleeper(children)
    started = time.monotonic()
    now = time.time()
    mp_queue.put(TimerRequest(moved.pid, "a", now + 0.2))
    mp_queue.put(TimerRequest(moved.pid, "a", now + 2.0))
    mp_queue.put(TimerRequest(released.pid, "first", now + 0.2))
    mp_queue.put(TimerRequest(released.pid, "second", now + 2.0))
    mp_queue.put(TimerRequest(released.pid, "first", -1))
    mp_queue.put(TimerRequest(expired.pid, "zero", 0))
    assert expired.wait(5) == -signal.SIGKILL
    # Well past the replaced and released deadlines (0.2 s), well before the live ones (2 s).
    time.sleep(max(0.0, started + 1.0 - time.monotonic()))
    assert moved.poll() is None, "killed at the deadline its re-acquire replaced"
    assert released.poll() is None, "killed at the deadline of a released timer"
    assert moved.wait(5) == -signal.SIGKILL
    assert released.wait(5) == -signal.SIGKILL
    assert wait_for(lambda: server.stats()["reaped"] == 3)
    assert wait_for(lambda: len(_messages(caplog, "Successfully reaped worker=")) == 3)
    assert _messages(caplog, f"Reaping worker_id=[{released.pid}]. Expired timers: ['second']")
    assert _messages(caplog, f"Reaping worker_id=[{expired.pid}]. Expired timers: ['zero']")
    assert server._timers == {}


def test_a_request_too_large_for_one_write_goes_by_put(
    servers: Servers, children: Children
) -> None:
    """The client's native writer sends only what one atomic write holds; a larger request
    goes by the queue's own ``put``, and its worker is reaped as any other."""
    mp_queue = FORK.Queue()
    server = _start_server(servers, mp_queue)
    worker = _start(children, _hang_in_a_long_scope, mp_queue)
    worker.join(10)
    assert worker.exitcode == -signal.SIGKILL
    assert wait_for(lambda: server.stats()["reaped"] == 1)


# -- the queue stays a queue ---------------------------------------------------------------------


def test_queue_is_drained_and_consistent(servers: Servers, children: Children) -> None:
    """The native reader consumes items as ``Queue.get`` would: afterwards qsize() is 0,
    empty() is true, and the queue still works for Python put/get."""
    mp_queue = FORK.Queue()
    server = _start_server(servers, mp_queue)
    assert _join(_start(children, _put_many, mp_queue, 500)) == 0
    assert wait_for(lambda: server.stats()["requests"] == 500), server.stats()
    assert mp_queue.qsize() == 0
    assert mp_queue.empty()
    assert server.stats()["malformed"] == 0
    server.stop()
    mp_queue.put(TimerRequest(1234, "python", 1.5))
    assert mp_queue.qsize() == 1
    assert mp_queue.get(timeout=5) == TimerRequest(1234, "python", 1.5)
    assert mp_queue.qsize() == 0


def test_a_python_consumer_can_share_the_queue(servers: Servers, children: Children) -> None:
    """A Python ``get`` on the same queue, concurrently with the server, gets whole items:
    the two consumers split the stream without tearing a frame or losing an item."""
    mp_queue = FORK.Queue()
    server = _start_server(servers, mp_queue)
    taken: list[Any] = []
    done = threading.Event()

    def consume() -> None:
        while not done.is_set():
            try:
                taken.append(mp_queue.get(timeout=0.02))
            except queue.Empty:
                pass

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    try:
        producer = _start(children, _put_many, mp_queue, 300)
        assert _join(producer) == 0
        assert wait_for(lambda: server.stats()["requests"] + len(taken) == 300), (
            server.stats(),
            len(taken),
        )
    finally:
        done.set()
        consumer.join(5)
    assert server.stats()["malformed"] == 0
    assert server.stats()["requests"] + len(taken) == 300
    assert all(isinstance(r, TimerRequest) and r.worker_id == producer.pid for r in taken)
    assert len({r.scope_id for r in taken}) == len(taken)
    assert mp_queue.qsize() == 0


def test_a_bounded_queue_never_blocks_the_client(servers: Servers, children: Children) -> None:
    """With ``Queue(maxsize=2)`` a client's put waits for room; the server makes room as fast
    as the client fills it, so no put waits long."""
    mp_queue = FORK.Queue(maxsize=2)
    server = _start_server(servers, mp_queue)
    slowest = FORK.Value("d", -1.0)
    client = _start(children, _put_bounded, mp_queue, 200, slowest)
    assert _join(client, timeout=20) == 0
    assert 0 <= slowest.value < 1.0
    assert wait_for(lambda: server.stats()["requests"] == 200), server.stats()
    assert mp_queue.qsize() == 0


def test_malformed_items_are_logged_and_skipped(
    servers: Servers, children: Children, caplog: pytest.LogCaptureFixture
) -> None:
    """Garbage on the queue (not a TimerRequest, a wrong field type, an oversized item) is
    logged with the reason and skipped; timers registered before and after still work."""
    caplog.set_level(logging.INFO, logger="elastic_timer")
    mp_queue = FORK.Queue()
    server = _start_server(servers, mp_queue)
    keeper = _sleeper(children)
    far = time.time() + 60
    mp_queue.put(TimerRequest(keeper.pid, "before", far))
    mp_queue.put("garbage")
    mp_queue.put(NotARequest())
    mp_queue.put(TimerRequest(str(keeper.pid), "string-pid", far))
    mp_queue.put(TimerRequest(keeper.pid, 42, far))  # type: ignore[arg-type]
    mp_queue.put("x" * 100_000)
    worker = _start(children, _hang, mp_queue, 0.3)
    assert _join(worker) == -signal.SIGKILL
    assert wait_for(lambda: server.stats()["malformed"] == 5), server.stats()
    # The count is the loop's; the log records come from the reporter thread, just after.
    assert wait_for(lambda: len(_messages(caplog, "Skipping malformed timer request")) >= 5)

    reasons = [
        r.getMessage().split(": ", 1)[1]
        for r in _messages(caplog, "Skipping malformed timer request")
    ]
    assert len(reasons) == 5, reasons
    assert all(r.levelno == logging.WARNING for r in _messages(caplog, "Skipping malformed"))
    assert "holds a str" in reasons[0]
    assert "NotARequest" in reasons[1]
    assert "worker_id must be an int" in reasons[2]
    assert "scope_id must be a str" in reasons[3]
    assert "not a timer request" in reasons[4]
    assert set(server._timers) == {(keeper.pid, "before")}
    assert keeper.poll() is None


def test_a_writer_stuck_mid_item_does_not_stall_the_other_workers_timers(
    servers: Servers, children: Children
) -> None:
    """A worker that wrote half an item (and trickles a byte now and then, never finishing)
    holds nobody up: the loop keeps what came and goes on, so a stuck worker's timer, already
    registered, still fires on time."""
    mp_queue = FORK.Queue()
    server = _start_server(servers, mp_queue)
    started = time.monotonic()
    stuck = _start(children, _hang, mp_queue, 1.0)
    assert wait_for(lambda: any(pid == stuck.pid for pid, _ in server._timers))
    written = FORK.Event()
    _start(children, _half_an_item, mp_queue, written)
    assert written.wait(10)
    # Generous on two loaded cores; a stalled loop never reaps it (its sleep is 30 s).
    assert _join(stuck, timeout=started + 1.0 + 5.0 - time.monotonic()) == -signal.SIGKILL
    assert time.monotonic() >= started + 1.0
    assert server.stats()["malformed"] == 0


def test_an_item_header_claiming_gigabytes_is_corruption_and_later_items_are_served(
    servers: Servers, children: Children, caplog: pytest.LogCaptureFixture
) -> None:
    """A header claiming 2 GiB is no timer request: counted as malformed and logged once; the
    reader drops what it holds and reads the items written after it (torch's server recovers
    from it too)."""
    caplog.set_level(logging.INFO, logger="elastic_timer")
    mp_queue = FORK.Queue()
    server = _start_server(servers, mp_queue)
    assert _join(_start(children, _absurd_header, mp_queue)) == 0
    assert wait_for(lambda: server.stats()["malformed"] == 1), server.stats()
    assert wait_for(lambda: _messages(caplog, "the queue is corrupt"))
    [record] = _messages(caplog, "the queue is corrupt")
    assert record.levelno == logging.WARNING
    assert f"claims {2**31 - 1} bytes" in record.getMessage()
    worker = _start(children, _hang, mp_queue, 0.3)
    assert _join(worker) == -signal.SIGKILL
    assert server.stats()["malformed"] == 1
    assert mp_queue.qsize() == 0


# -- custom reaping --------------------------------------------------------------------------


class RecordingServer(LocalTimerServer):
    """Overrides ``_reap_worker``, as deployments do to reap in their own way: it records the
    call, fails the first ``failures`` times, then SIGKILLs the worker itself (only pids the
    test allows: its own children)."""

    def __init__(self, mp_queue: Any, allowed: set[int], failures: int = 0, raises: bool = False):
        super().__init__(mp_queue, max_interval=0.05)
        self.allowed = allowed
        self.failures = failures
        self.raises = raises
        self.calls: list[tuple[int, float]] = []

    def _reap_worker(self, worker_id: int) -> bool:
        self.calls.append((worker_id, time.monotonic()))
        if self.raises:
            raise RuntimeError("reaper broke")
        if len(self.calls) <= self.failures:
            return False
        if worker_id in self.allowed:
            os.kill(worker_id, signal.SIGKILL)
        return True


def _recorded_hang(
    servers: Servers, children: Children, mp_queue: Any, **kw: Any
) -> tuple[RecordingServer, BaseProcess]:
    """A started ``RecordingServer`` and a worker hanging past a 0.3 s timer, which the
    server may reap."""
    allowed: set[int] = set()
    server = RecordingServer(mp_queue, allowed, **kw)
    servers.append(server)
    server.start()
    worker = _start(children, _hang, mp_queue, 0.3)
    assert worker.pid is not None
    allowed.add(worker.pid)
    return server, worker


def test_reap_worker_override_is_called(servers: Servers, children: Children) -> None:
    """A subclass's ``_reap_worker`` is what reaps: called once with the worker's pid."""
    mp_queue = FORK.Queue()
    server, worker = _recorded_hang(servers, children, mp_queue)
    assert _join(worker) == -signal.SIGKILL
    # The reporter thread answers the loop after the override's kill; the timers go then.
    assert wait_for(lambda: server._timers == {})
    time.sleep(0.2)
    assert [pid for pid, _ in server.calls] == [worker.pid]


def test_a_failed_override_reap_is_retried(
    servers: Servers, children: Children, caplog: pytest.LogCaptureFixture
) -> None:
    """``_reap_worker`` returning False keeps the worker's timers; it is asked again (after
    about max_interval) until it succeeds."""
    caplog.set_level(logging.INFO, logger="elastic_timer")
    mp_queue = FORK.Queue()
    server, worker = _recorded_hang(servers, children, mp_queue, failures=2)
    assert _join(worker) == -signal.SIGKILL
    assert [pid for pid, _ in server.calls] == [worker.pid] * 3
    gaps = [b - a for (_, a), (_, b) in zip(server.calls, server.calls[1:])]
    assert all(0.03 <= gap < 1.0 for gap in gaps), gaps
    assert len(_messages(caplog, f"Error reaping worker=[{worker.pid}]")) == 2
    assert wait_for(lambda: bool(_messages(caplog, f"Successfully reaped worker=[{worker.pid}]")))


def test_a_raising_override_counts_as_reaped(
    servers: Servers, children: Children, caplog: pytest.LogCaptureFixture
) -> None:
    """torch's contract: an exception from ``_reap_worker`` is logged and counts as reaped,
    so the worker's timers are dropped and it is not asked again."""
    caplog.set_level(logging.INFO, logger="elastic_timer")
    mp_queue = FORK.Queue()
    server = RecordingServer(mp_queue, set(), raises=True)
    servers.append(server)
    server.start()
    worker = _start(children, _hang, mp_queue, 0.2)
    assert wait_for(lambda: len(server.calls) == 1)
    assert wait_for(lambda: not server._timers)
    time.sleep(0.3)
    assert len(server.calls) == 1
    assert worker.is_alive()
    (record,) = _messages(caplog, "Uncaught exception thrown from _reap_worker()")
    assert record.levelno == logging.ERROR and record.exc_info is not None


@pytest.mark.parametrize("when", ["before construction", "after construction"])
def test_reap_worker_patched_on_the_class_gets_the_reaps(
    when: str, servers: Servers, children: Children
) -> None:
    """torch's tests patch ``LocalTimerServer._reap_worker`` on the class (``mock.patch``),
    before or after building the server and before ``start()``: the patch gets the reap, and
    the stuck worker, which the patch does not kill, lives on."""
    mp_queue = FORK.Queue()
    with contextlib.ExitStack() as patches:
        patch = mock.patch.object(LocalTimerServer, "_reap_worker", return_value=True)
        reap = patches.enter_context(patch) if when == "before construction" else None
        server = LocalTimerServer(mp_queue, max_interval=0.05)
        servers.append(server)
        if reap is None:
            reap = patches.enter_context(patch)
        server.start()
        worker = _start(children, _hang, mp_queue, 0.2)
        assert wait_for(lambda: reap.call_count == 1)
        reap.assert_called_once_with(worker.pid)
        assert wait_for(lambda: not server._timers)  # reaped, as the patch answered
        assert worker.is_alive()


def test_a_second_start_is_harmless(servers: Servers, children: Children) -> None:
    """torch's tests call ``start()`` on a started server: it changes nothing, and the one
    loop still reaps once."""
    mp_queue = FORK.Queue()
    server = _start_server(servers, mp_queue)
    server.start()
    worker = _start(children, _hang, mp_queue, 0.2)
    assert _join(worker) == -signal.SIGKILL
    assert server.stats()["reaped"] == 1
    server.stop()
    assert not server._core.running


# -- the reap path does not need Python ------------------------------------------------------

GIL_SCRIPT = """
import ctypes, multiprocessing as mp, time
import elastic_timer as timer

def hang(q):
    timer.configure(timer.LocalTimerClient(q))
    with timer.expires(after=0.3):
        time.sleep(30)

if __name__ == "__main__":
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    server = timer.LocalTimerServer(q, max_interval=0.01)
    server.start()
    worker = ctx.Process(target=hang, args=(q,))
    worker.start()
    print("worker", worker.pid, flush=True)
    print("holding", time.time(), flush=True)
    ctypes.PyDLL(None).sleep(3)  # libc sleep through PyDLL: the GIL stays held throughout
    print("released", time.time(), flush=True)
    worker.join(10)
    print("exitcode", worker.exitcode, flush=True)
    server.stop()
"""


def _lines(stream: Any) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    return fields[0], int(fields[1])


@pytest.fixture
def gil_server() -> Iterator[subprocess.Popen[str]]:
    """The GIL script's process; on failure it and its worker (checked by ppid) are killed."""
    process = subprocess.Popen(
        [sys.executable, "-c", GIL_SCRIPT], stdout=subprocess.PIPE, text=True
    )
    yield process
    if process.poll() is None:
        process.kill()
    process.wait(10)


def test_workers_are_reaped_while_the_server_process_holds_the_gil(
    gil_server: subprocess.Popen[str],
) -> None:
    """The server process holds the GIL for 3 s (a C call through ``ctypes.PyDLL`` never
    releases it), so no Python thread of it can run: not the reporter, not a Python watchdog.
    The worker's acquire is read, its deadline kept and the SIGKILL sent all the same, within
    that window: we see the worker turn into a zombie (killed, and not yet waited for by its
    parent, whose only thread is stuck) from outside, before the GIL is released. So reading,
    deadline keeping and reaping need no GIL; a Python-loop server (torch's) would kill it only
    after the 3 s."""
    assert gil_server.stdout is not None
    lines = _lines(gil_server.stdout)
    worker_line = lines.get(timeout=10).split()
    assert worker_line[0] == "worker"
    worker = int(worker_line[1])
    holding_line = lines.get(timeout=10).split()
    assert holding_line[0] == "holding"
    holding_since = float(holding_line[1])
    try:
        state = _stat(worker)
        assert state is not None and state[1] == gil_server.pid
        assert wait_for(lambda: (_stat(worker) or ("?", 0))[0] == "Z", timeout=2.5)
        zombie_at = time.time()
        assert zombie_at - holding_since < 1.5
        released_line = lines.get(timeout=10).split()
        assert released_line[0] == "released"
        assert float(released_line[1]) > zombie_at, "the GIL was released before the kill"
        assert lines.get(timeout=10).split() == ["exitcode", str(-signal.SIGKILL)]
        assert gil_server.wait(10) == 0
    finally:
        state = _stat(worker)
        if state is not None and state[1] == gil_server.pid and state[0] != "Z":
            os.kill(worker, signal.SIGKILL)


# -- shutdown and other queue types ----------------------------------------------------------

SHUTDOWN_SCRIPT = """
import multiprocessing as mp, sys
import elastic_timer as timer

kind, daemon, stop = sys.argv[1], sys.argv[2] == "daemon", sys.argv[3] == "stop"
if kind == "manager":
    manager = mp.Manager()
    q = manager.Queue()
else:
    q = mp.get_context("fork").Queue()
server = timer.LocalTimerServer(q, max_interval=60, daemon=daemon)
server.start()
if stop:
    server.stop()
print("done", flush=True)
"""


@pytest.mark.parametrize(
    ("kind", "daemon", "stop"),
    [
        ("plain", "non-daemon", "stop"),
        ("manager", "non-daemon", "stop"),
        ("plain", "daemon", "no-stop"),
        ("manager", "daemon", "no-stop"),
    ],
)
def test_the_server_process_exits(kind: str, daemon: str, stop: str) -> None:
    """A process running a server ends normally: with daemon=False once it calls stop()
    (however long max_interval is), with daemon=True even without stop()."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", SHUTDOWN_SCRIPT, kind, daemon, stop],
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "done\n"
    assert time.monotonic() - started < 8


def test_a_manager_queue_works(servers: Servers, children: Children) -> None:
    """A ``Manager().Queue()`` (a proxy, no pipe to read natively) is served from Python:
    a stuck worker is still killed, a happy one is left alone."""
    with FORK.Manager() as manager:
        mp_queue = manager.Queue()
        server = _start_server(servers, mp_queue)
        try:
            stuck = _start(children, _hang, mp_queue, 0.3)
            happy = _start(children, _recursive, 1, mp_queue, 2.0, 0.1)
            assert _join(stuck) == -signal.SIGKILL
            assert _join(happy) == 0
        finally:
            server.stop()  # before the manager (and its queue) goes away


def test_a_manager_queue_skips_malformed_items(
    servers: Servers, children: Children, caplog: pytest.LogCaptureFixture
) -> None:
    """On a Manager queue too, garbage is skipped with a reason and the valid requests read
    with it are honoured (the worker's timer arrives in the same batch as the garbage)."""
    caplog.set_level(logging.INFO, logger="elastic_timer")
    with FORK.Manager() as manager:
        mp_queue = manager.Queue()
        server = LocalTimerServer(mp_queue, max_interval=0.01)
        servers.append(server)
        victim = _sleeper(children)
        mp_queue.put("garbage")
        mp_queue.put(TimerRequest(victim.pid, "after-garbage", time.time() + 0.3))
        server.start()
        try:
            assert victim.wait(3) == -signal.SIGKILL
        except subprocess.TimeoutExpired:
            pytest.fail("the valid request read in the same batch as garbage was dropped")
        finally:
            server.stop()  # before the manager (and its queue) goes away
    assert any(
        r.levelno >= logging.WARNING and "malformed" in r.getMessage() for r in caplog.records
    )


class _Counter(logging.Handler):
    """Counts ERROR records (without keeping them: a flood must not flood the test report)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def test_a_dead_manager_queue_does_not_flood_the_log(servers: Servers) -> None:
    """If the Manager serving the queue dies (it is a separate process), the server reports
    the broken queue and keeps retrying at a sane pace, instead of spinning a core and
    writing tens of thousands of tracebacks a second."""
    package_logger = logging.getLogger("elastic_timer")
    counter = _Counter()
    package_logger.addHandler(counter)
    propagate, package_logger.propagate = package_logger.propagate, False
    try:
        manager = FORK.Manager()
        try:
            server = _start_server(servers, manager.Queue())
            time.sleep(0.1)
        finally:
            manager.shutdown()
        time.sleep(0.5)
        server.stop()
    finally:
        package_logger.removeHandler(counter)
        package_logger.propagate = propagate
    assert counter.count > 0, "the broken queue was not reported"
    assert counter.count <= 20, f"{counter.count} error records in 0.5 s"
