"""FileTimerServer and FileTimerClient with real worker processes, real signals and real FIFOs.

Every server built in this process passes ``signal_self=False``: torch's File server signals
its own process after a reap, which here would be pytest. The self-signal is tested with a
server running in a subprocess.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from helpers import wait_for

from elastic_timer import FileTimerClient, FileTimerRequest, FileTimerServer, expires
from elastic_timer._native import PIPE_BUF
from elastic_timer._torch_versions import installed_torch, signals_self

CTX = mp.get_context("fork")
FAR = 3600.0  # seconds: a deadline no test ever reaches
LOGGER = "elastic_timer"

Event = tuple[str, "FileTimerRequest | None"]

# -- workers (module level, so any start method can run them) ---------------------------------


def stuck_worker(path: str, sig: int, acquired_at: Any) -> None:
    """Acquires a 0.3 s timer, records when, and hangs far past it."""
    client = FileTimerClient(path, signal=sig)
    acquired_at.value = time.time()
    with expires(after=0.3, client=client):
        time.sleep(10)


def gated_stuck_worker(path: str, sig: int, acquired_at: Any, may_go: Any) -> None:
    """``stuck_worker``, once the test knows this worker's pid."""
    may_go.wait(10)
    stuck_worker(path, sig, acquired_at)


def happy_worker(path: str) -> None:
    """Finishes well within its timer."""
    with expires(after=2, client=FileTimerClient(path)):
        time.sleep(0.05)


def unsignalled_worker(path: str) -> None:
    """Overstays a timer that carries no signal, then exits normally."""
    with expires(after=0.2, client=FileTimerClient(path, signal=0)):
        time.sleep(1.0)


def raw_requests_worker(path: str, lines: list[tuple[str, float, int]]) -> None:
    """Sends (scope, seconds from now, signal) requests for itself in one write, then hangs.

    One write of less than PIPE_BUF bytes reaches the server whole, so all the requests are
    read in the same batch and expire in the same pass.
    """
    now = time.time()
    payload = "".join(
        FileTimerRequest(os.getpid(), scope, now + after, sig).to_json() + "\n"
        for scope, after, sig in lines
    ).encode()
    assert len(payload) < PIPE_BUF
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, payload)
    finally:
        os.close(fd)
    time.sleep(10)


def staggered_worker(path: str) -> None:
    """Holds a signal-0 timer due in 0.3 s and a SIGTERM timer due in 0.6 s, and hangs."""
    client = FileTimerClient(path)
    now = time.time()
    client._send_request(FileTimerRequest(os.getpid(), "a", now + 0.3, 0))
    client._send_request(FileTimerRequest(os.getpid(), "b", now + 0.6, signal.SIGTERM))
    time.sleep(2)


def acquire_release_worker(path: str, pairs: int) -> None:
    """Acquires and releases ``pairs`` timers as fast as it can; any exception exits nonzero."""
    client = FileTimerClient(path)
    for i in range(pairs):
        client.acquire(f"scope-{i}", time.time() + 60)
        client.release(f"scope-{i}")


def acquire_then_exit_worker(path: str, may_exit: Any) -> None:
    """Acquires a far timer and exits normally (without releasing) once told to."""
    FileTimerClient(path).acquire("left-behind", time.time() + FAR)
    may_exit.wait(10)


def late_client_worker(path: str, asking: Any, acquired_at: Any) -> None:
    """Sends an acquire and a release with a client willing to wait 3 s for a server, saying
    when it starts asking and when the acquire got through."""
    client = FileTimerClient(path, connect_timeout=3.0)
    asking.set()
    client.acquire("late", time.time() + 60)
    acquired_at.value = time.time()
    client.release("late")


def flooding_worker(path: str, timers: int) -> None:
    """Acquires ``timers`` timers, the first due in 1 s, the others far away; then hangs."""
    client = FileTimerClient(path)
    client.acquire("first", time.time() + 1.0)
    for i in range(1, timers):
        client.acquire(f"flood-{i}", time.time() + FAR)
    time.sleep(30)


# -- helpers and fixtures ---------------------------------------------------------------------


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.DEBUG) -> list[str]:
    return [r.getMessage() for r in list(caplog.records) if r.levelno >= level]


def logged(caplog: pytest.LogCaptureFixture, text: str, level: int = logging.DEBUG) -> bool:
    return any(text in m for m in messages(caplog, level))


@pytest.fixture
def make_server(fifo: str) -> Iterator[Callable[..., FileTimerServer]]:
    """Builds servers on the test's FIFO, never signalling pytest; all stopped at teardown."""
    built: list[FileTimerServer] = []

    def make(**kwargs: Any) -> FileTimerServer:
        kwargs.setdefault("signal_self", False)
        assert kwargs["signal_self"] is False, "a server in pytest must not signal pytest"
        server = FileTimerServer(fifo, "test-run", **kwargs)
        built.append(server)
        return server

    try:
        yield make
    finally:
        for server in built:
            server.stop()


@pytest.fixture
def server(make_server: Callable[..., FileTimerServer]) -> FileTimerServer:
    """A started server on the test's FIFO."""
    started = make_server(max_interval=0.1)
    started.start()
    return started


@pytest.fixture
def procs(children: list[Any]) -> Callable[..., BaseProcess]:
    """Starts worker processes (conftest's ``children`` kills the survivors at teardown)."""

    def start(target: Callable[..., None], *args: Any) -> BaseProcess:
        process = CTX.Process(target=target, args=args, daemon=True)
        process.start()
        children.append(process)
        return process

    return start


@pytest.fixture
def sleeper(children: list[Any]) -> Callable[[], subprocess.Popen[bytes]]:
    """Starts ``sleep 30`` processes: real pids for the server to accept; killed at teardown."""

    def start() -> subprocess.Popen[bytes]:
        process = subprocess.Popen(["sleep", "30"])
        children.append(process)
        return process

    return start


def process_state(pid: int) -> str:
    """A process's state letter from /proc (R running, S sleeping, Z zombie...)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def far_line(pid: int, scope: str, sig: int = signal.SIGKILL) -> bytes:
    return (FileTimerRequest(pid, scope, time.time() + FAR, sig).to_json() + "\n").encode()


def write_raw(path: str, data: bytes) -> None:
    """Writes bytes to the FIFO as any process could, bypassing the client."""
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        assert os.write(fd, data) == len(data)
    finally:
        os.close(fd)


def scopes_of(server: FileTimerServer, pid: int) -> set[str]:
    return {scope for (p, scope) in server._timers if p == pid}


# -- reaping ----------------------------------------------------------------------------------


def test_stuck_worker_is_killed_soon_after_its_deadline(
    server: FileTimerServer, procs: Callable[..., BaseProcess]
) -> None:
    """A worker hung past its 0.3 s timer dies of SIGKILL right after the deadline, not before."""
    acquired_at = CTX.Value("d", 0.0)
    worker = procs(stuck_worker, server._file_path, signal.SIGKILL, acquired_at)
    worker.join(5)
    died_after = time.time() - acquired_at.value
    assert worker.exitcode == -signal.SIGKILL
    assert 0.29 <= died_after < 1.5, died_after
    assert wait_for(lambda: server.stats()["reaped"] == 1)
    assert server._timers == {}


def test_happy_worker_exits_normally(
    server: FileTimerServer, procs: Callable[..., BaseProcess]
) -> None:
    """A worker that finishes inside its timer is never signalled and its timer is released."""
    worker = procs(happy_worker, server._file_path)
    worker.join(5)
    assert worker.exitcode == 0
    assert wait_for(lambda: server._request_count == 2)
    time.sleep(0.1)
    assert server.stats()["reaped"] == 0
    assert server._timers == {}


def test_client_signal_is_the_signal_the_worker_gets(
    server: FileTimerServer, procs: Callable[..., BaseProcess], caplog: pytest.LogCaptureFixture
) -> None:
    """FileTimerClient(signal=SIGTERM) makes the server reap the worker with SIGTERM."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    worker = procs(stuck_worker, server._file_path, signal.SIGTERM, CTX.Value("d", 0.0))
    worker.join(5)
    assert worker.exitcode == -signal.SIGTERM
    assert wait_for(
        lambda: logged(caplog, f"Successfully reaped worker=[{worker.pid}] with signal=15")
    )


def test_signal_zero_expires_without_signalling(
    make_server: Callable[..., FileTimerServer],
    procs: Callable[..., BaseProcess],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client with signal=0 overstays its timer and lives; the server says why it did not reap."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    events: list[Event] = []
    server = make_server(max_interval=0.1, log_event=lambda n, r: events.append((n, r)))
    server.start()
    worker = procs(unsignalled_worker, server._file_path)
    worker.join(5)
    assert worker.exitcode == 0
    assert wait_for(
        lambda: logged(caplog, f"No signal specified with worker=[{worker.pid}]. Do not reap it.")
    )
    expired = [r for n, r in events if n == "timer expired"]
    assert [(r.worker_pid, r.signal) for r in expired if r is not None] == [(worker.pid, 0)]
    assert not any(n == "kill worker process" for n, _ in events)
    assert server.stats()["reaped"] == 0
    assert server._timers == {}


def test_first_expired_timer_with_a_positive_signal_decides(
    make_server: Callable[..., FileTimerServer], procs: Callable[..., BaseProcess]
) -> None:
    """Of a worker's timers expired in one pass, in expiration order, the first with a positive
    signal picks the signal: neither the order they arrived in nor the strongest one."""
    events: list[Event] = []
    server = make_server(max_interval=0.1, log_event=lambda n, r: events.append((n, r)))
    server.start()
    # Arrival order c, b, a; expiration order a (no signal), b (SIGTERM), c (SIGKILL).
    lines = [("c", -1.0, signal.SIGKILL), ("b", -2.0, signal.SIGTERM), ("a", -3.0, 0)]
    worker = procs(raw_requests_worker, server._file_path, lines)
    worker.join(5)
    assert worker.exitcode == -signal.SIGTERM
    assert wait_for(lambda: any(n == "kill worker process" for n, _ in events))
    expired = [r.scope_id for n, r in events if n == "timer expired" and r is not None]
    killed = [r.scope_id for n, r in events if n == "kill worker process" and r is not None]
    assert expired == ["a", "b"]
    assert killed == ["b"]


def test_an_earlier_signal0_timer_does_not_disarm_a_later_sigterm_timer(
    make_server: Callable[..., FileTimerServer], procs: Callable[..., BaseProcess]
) -> None:
    """A worker still stuck when its SIGTERM timer "b" expires dies of SIGTERM, even though its
    signal-0 timer "a" expired (and was only logged) 0.3 s earlier.

    torch, polling every ``max_interval`` (10 s by default), sees both expired in one pass and
    sends SIGTERM. Firing "a" alone at its deadline must not silently drop "b".
    """
    server = make_server()  # torch's default max_interval
    server.start()
    worker = procs(staggered_worker, server._file_path)
    worker.join(5)
    assert worker.exitcode == -signal.SIGTERM


def test_log_event_names_and_arguments_match_torch(
    make_server: Callable[..., FileTimerServer], procs: Callable[..., BaseProcess]
) -> None:
    """log_event gets torch's four event names, with None or the FileTimerRequest concerned."""
    events: list[Event] = []
    server = make_server(max_interval=0.1, log_event=lambda n, r: events.append((n, r)))
    server.start()
    assert events == [("watchdog started", None)]
    worker = procs(stuck_worker, server._file_path, signal.SIGKILL, CTX.Value("d", 0.0))
    worker.join(5)
    assert worker.exitcode == -signal.SIGKILL
    assert wait_for(lambda: len(events) >= 3)
    server.stop()
    assert [name for name, _ in events] == [
        "watchdog started",
        "timer expired",
        "kill worker process",
        "watchdog stopped",
    ]
    for name, request in events[1:3]:
        assert isinstance(request, FileTimerRequest), name
        assert request.worker_pid == worker.pid
        assert request.signal == signal.SIGKILL
        assert request.expiration_time < time.time()
    assert events[-1] == ("watchdog stopped", None)


# -- run_once and the timer map ---------------------------------------------------------------


def test_run_once_counts_every_request_of_many_clients(
    server: FileTimerServer, procs: Callable[..., BaseProcess], fifo: str
) -> None:
    """torch's test_multiple_clients_interaction: N workers x M acquire/release pairs, then
    run_once: every request was counted, no timer is left, the server is stopped."""
    n, m = 4, 25
    workers = [procs(acquire_release_worker, fifo, m) for _ in range(n)]
    for worker in workers:
        worker.join(10)
        assert worker.exitcode == 0
    server.run_once()
    assert server._request_count == 2 * n * m
    assert server._timers == {}
    assert not os.path.exists(fifo)


def test_run_once_reads_requests_still_in_the_fifo(
    server: FileTimerServer, sleeper: Callable[[], subprocess.Popen[bytes]], fifo: str
) -> None:
    """run_once right after a burst of writes still processes every line already written."""
    pid = sleeper().pid
    lines = b"".join(far_line(pid, f"s{i}") for i in range(300))
    assert len(lines) < 60_000  # fits the pipe: one write, nothing waits for the reader
    write_raw(fifo, lines)
    server.run_once()
    assert server._request_count == 300
    assert len(server._timers) == 300


def test_timer_map_is_torchs_dict(
    make_server: Callable[..., FileTimerServer], sleeper: Callable[[], subprocess.Popen[bytes]]
) -> None:
    """register_timers/clear_timers/get_expired_timers/_timers on real pids, as torch's."""
    server = make_server()  # never started: nothing here can be signalled
    one, two = sleeper().pid, sleeper().pid
    now = time.time()
    a = FileTimerRequest(one, "a", now + 100, signal.SIGKILL)
    b = FileTimerRequest(one, "b", now + 200, signal.SIGTERM)
    c = FileTimerRequest(two, "a", now + 300, 0)
    server.register_timers([a, b, c])
    assert server._timers == {(one, "a"): a, (one, "b"): b, (two, "a"): c}
    assert all(type(r) is FileTimerRequest for r in server._timers.values())

    a2 = FileTimerRequest(one, "a", now + 50, signal.SIGUSR1)
    server.register_timers([a2])  # re-acquiring replaces
    assert server._timers[(one, "a")] == a2

    expired = server.get_expired_timers(now + 250)
    assert {pid: sorted(r.scope_id for r in rs) for pid, rs in expired.items()} == {one: ["a", "b"]}
    assert server.get_expired_timers(now) == {}

    server.register_timers([FileTimerRequest(one, "b", -1)])  # a release removes
    assert set(server._timers) == {(one, "a"), (two, "a")}
    server.register_timers([FileTimerRequest(one, "never-acquired", -1)])  # vacuous: no-op
    server.register_timers([FileTimerRequest(two, "b", -1)])
    assert set(server._timers) == {(one, "a"), (two, "a")}

    server.clear_timers({one})
    assert server._timers == {(two, "a"): c}
    assert server._request_count == 7


def test_register_timers_keeps_the_good_requests_of_a_bad_batch(
    make_server: Callable[..., FileTimerServer],
    sleeper: Callable[[], subprocess.Popen[bytes]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Junk, or a FileTimerRequest with a field of the wrong type, beside valid requests: the
    valid ones are registered, each bad one is logged and counted as malformed."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    server = make_server()  # never started: nothing here can be signalled
    pid = sleeper().pid
    far = time.time() + FAR
    bad: list[Any] = [
        "garbage",
        None,
        b"bytes",
        FileTimerRequest(pid, "x", far, "SIGKILL"),  # type: ignore[arg-type]
        FileTimerRequest(str(pid), "x", far, 9),  # type: ignore[arg-type]
    ]
    batch = [FileTimerRequest(pid, "first", far, 9), *bad, FileTimerRequest(pid, "last", far, 9)]
    server.register_timers(batch)
    assert set(server._timers) == {(pid, "first"), (pid, "last")}
    assert server.stats()["malformed"] == len(bad)
    skipped = [r for r in caplog.records if "Skipping malformed timer request" in r.getMessage()]
    assert len(skipped) == len(bad)
    assert "signal must be a signal number, got 'SIGKILL'" in skipped[3].getMessage()


def test_acquires_past_the_worker_cap_are_refused_counted_warned_once_and_nothing_is_lost(
    make_server: Callable[..., FileTimerServer],
    procs: Callable[..., BaseProcess],
    fifo: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = make_server(max_interval=0.1, max_worker_timers=5)
    server.start()
    started = time.monotonic()
    worker = procs(flooding_worker, fifo, 12)
    assert wait_for(lambda: server.stats()["over_cap"] == 7), server.stats()
    # The timers it holds are its first five; the first of them still fires.
    worker.join(started + 1.0 + 5.0 - time.monotonic())
    assert worker.exitcode == -signal.SIGKILL
    assert time.monotonic() >= started + 1.0
    stats = server.stats()
    assert (stats["over_cap"], stats["refused"], stats["live_timers"]) == (7, 0, 0), stats
    assert wait_for(lambda: logged(caplog, "the most a worker may", logging.WARNING))
    warnings = [m for m in messages(caplog, logging.WARNING) if "max_worker_timers" in m]
    assert warnings == [
        f"worker pid={worker.pid} holds 5 timers, the most a worker may (max_worker_timers): "
        f"new timers of worker pid={worker.pid} are refused, and it is not guarded by them "
        "(reported once per worker; stats()['over_cap'] counts them)"
    ]
    assert logged(caplog, f"Reaping worker_pid=[{worker.pid}]. Expired timers: ['first']")


def test_timers_of_a_dead_pid_are_not_kept(
    make_server: Callable[..., FileTimerServer],
) -> None:
    """A request naming a process that no longer exists registers nothing."""
    server = make_server()
    gone = subprocess.Popen(["true"])
    gone.wait(10)
    server.register_timers([FileTimerRequest(gone.pid, "late", time.time() + FAR, 9)])
    assert server._timers == {}


def test_timers_of_a_worker_that_exits_are_dropped(
    server: FileTimerServer, procs: Callable[..., BaseProcess], caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that exits holding a timer is forgotten: its timer goes, nobody is signalled."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    may_exit = CTX.Event()
    worker = procs(acquire_then_exit_worker, server._file_path, may_exit)
    assert wait_for(lambda: (worker.pid, "left-behind") in server._timers)
    may_exit.set()
    worker.join(5)
    assert worker.exitcode == 0
    assert wait_for(lambda: server._timers == {})
    assert wait_for(lambda: logged(caplog, f"Worker pid={worker.pid} exited; dropped its 1"))
    assert server.stats()["reaped"] == 0


# -- bad input on the FIFO --------------------------------------------------------------------


def _bad_lines(pid: int) -> list[tuple[str, bytes, str]]:
    """(case, line, reason logged). Each names a live sleeper and a far deadline, so even a
    line wrongly accepted could never signal anything."""
    far = time.time() + FAR

    def line(**fields: Any) -> bytes:
        base: dict[str, Any] = {
            "version": 1,
            "pid": pid,
            "scope_id": "bad",
            "expiration_time": far,
            "signal": 9,
        }
        base.update(fields)
        return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()

    return [
        ("not-json", b"this is not json", "invalid JSON"),
        ("missing-key", line(signal=...), "signal is missing"),
        ("pid-as-string", line(pid=str(pid)), "pid must be an int, not a str"),
        ("signal-as-float", line(signal=9.0), "signal must be an int, not a float"),
        ("bool-pid", line(pid=True), "pid must be an int, not a bool"),
        ("non-utf8", line().replace(b'"bad"', b'"b\xff\xfed"'), "invalid JSON"),
        ("json-array", json.dumps([pid, "bad", far, 9]).encode(), "not a JSON object"),
        ("too-long", line(scope_id="x" * 5000), "longer than PIPE_BUF"),
    ]


BAD_CASES = [case for case, _, _ in _bad_lines(2)]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_line_is_logged_and_the_rest_of_its_batch_kept(
    case: str,
    server: FileTimerServer,
    sleeper: Callable[[], subprocess.Popen[bytes]],
    caplog: pytest.LogCaptureFixture,
    fifo: str,
) -> None:
    """A malformed line in the middle of one write is skipped with a WARNING giving the reason;
    the good lines around it, and a timer registered before, are all kept (torch loses the
    whole batch and logs a traceback)."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    pid = sleeper().pid
    write_raw(fifo, far_line(pid, "before"))
    assert wait_for(lambda: (pid, "before") in server._timers)
    [(_, bad, reason)] = [c for c in _bad_lines(pid) if c[0] == case]
    write_raw(fifo, far_line(pid, "good-1") + bad + b"\n" + far_line(pid, "good-2"))
    assert wait_for(lambda: scopes_of(server, pid) == {"before", "good-1", "good-2"})
    assert wait_for(lambda: server.stats()["malformed"] == 1)
    assert wait_for(lambda: logged(caplog, reason, logging.WARNING)), messages(caplog)
    warning = [m for m in messages(caplog, logging.WARNING) if reason in m]
    assert warning[0].startswith("Skipping malformed timer request")
    assert not any(r.exc_info for r in caplog.records)


def test_server_keeps_reaping_after_bad_input(
    server: FileTimerServer,
    sleeper: Callable[[], subprocess.Popen[bytes]],
    procs: Callable[..., BaseProcess],
    fifo: str,
) -> None:
    """After every kind of bad line, in one write and one by one, a stuck worker registered
    afterwards is still killed at its deadline and the earlier timers are intact."""
    pid = sleeper().pid
    write_raw(fifo, far_line(pid, "before"))
    bad = [line for _, line, _ in _bad_lines(pid)]
    write_raw(fifo, b"\n".join(bad) + b"\n")
    for line in bad:
        write_raw(fifo, line + b"\n")
    assert wait_for(lambda: server.stats()["malformed"] == 2 * len(bad))
    worker = procs(stuck_worker, fifo, signal.SIGKILL, CTX.Value("d", 0.0))
    worker.join(5)
    assert worker.exitcode == -signal.SIGKILL
    assert scopes_of(server, pid) == {"before"}


def test_partial_line_completed_by_a_later_write(
    server: FileTimerServer, sleeper: Callable[[], subprocess.Popen[bytes]], fifo: str
) -> None:
    """A line split across two writes is registered once it is complete, not before."""
    pid = sleeper().pid
    line = far_line(pid, "split")
    write_raw(fifo, line[:25])
    time.sleep(0.2)
    assert server._timers == {}
    assert server.stats()["malformed"] == 0
    write_raw(fifo, line[25:])
    assert wait_for(lambda: (pid, "split") in server._timers)
    assert server.stats()["malformed"] == 0


def test_infinite_expiration_is_accepted_and_never_fires(
    server: FileTimerServer,
    sleeper: Callable[[], subprocess.Popen[bytes]],
    procs: Callable[..., BaseProcess],
    fifo: str,
) -> None:
    """``"expiration_time": Infinity`` (what json.dumps writes for inf) is a timer that never
    expires, while the server reaps a stuck worker whose deadline does pass."""
    never = sleeper()
    line = f'{{"version": 1, "pid": {never.pid}, "scope_id": "forever", '
    line += '"expiration_time": Infinity, "signal": 9}\n'
    write_raw(fifo, line.encode())
    assert wait_for(lambda: (never.pid, "forever") in server._timers)
    assert server._timers[(never.pid, "forever")].expiration_time == float("inf")
    worker = procs(stuck_worker, fifo, signal.SIGKILL, CTX.Value("d", 0.0))
    worker.join(5)
    assert worker.exitcode == -signal.SIGKILL
    time.sleep(0.2)
    assert never.poll() is None
    assert (never.pid, "forever") in server._timers
    assert server.stats()["malformed"] == 0


# -- client errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("fifo_exists", [False, True], ids=["no-fifo", "fifo-without-reader"])
def test_client_without_server_raises_broken_pipe_after_connect_timeout(
    fifo_exists: bool,
    make_server: Callable[..., FileTimerServer],
    fifo: str,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """With no server reading (no FIFO, or a server built but not started) the client waits
    about connect_timeout, then raises BrokenPipeError, quietly (torch logs 10 tracebacks)."""
    caplog.set_level(logging.DEBUG)
    if fifo_exists:
        make_server()
        assert os.path.exists(fifo)
    client = FileTimerClient(fifo, connect_timeout=0.2)
    started = time.monotonic()
    with pytest.raises(BrokenPipeError):
        client.release("anything")
    took = time.monotonic() - started
    assert 0.2 <= took < 1.0, took
    assert not any(r.exc_info or r.levelno >= logging.WARNING for r in caplog.records)
    assert capfd.readouterr().err == ""


def test_a_path_that_is_not_a_fifo_is_not_a_server(tmp_path: Path) -> None:
    """A client pointed at a regular file raises BrokenPipeError at once and writes nothing
    into it (torch's client silently appends to the file)."""
    path = tmp_path / "not-a-fifo"
    path.write_bytes(b"")
    started = time.monotonic()
    with pytest.raises(BrokenPipeError):
        FileTimerClient(str(path), connect_timeout=2.0).release("anything")
    assert time.monotonic() - started < 1.0
    assert path.read_bytes() == b""


def test_server_replaces_whatever_is_at_its_path(
    make_server: Callable[..., FileTimerServer], fifo: str
) -> None:
    """Like torch's, a new server removes what is at file_path and makes a FIFO there."""
    Path(fifo).write_text("stale")
    make_server()
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_request_of_exactly_pipe_buf_bytes_is_sent_and_one_more_is_refused(
    server: FileTimerServer, sleeper: Callable[[], subprocess.Popen[bytes]], fifo: str
) -> None:
    """The JSON of a request may be PIPE_BUF (4096) bytes, like torch's check; one byte more
    (a huge scope) raises RuntimeError before anything is written."""
    pid = sleeper().pid
    client = FileTimerClient(fifo)
    expiration = time.time() + FAR
    base = len(FileTimerRequest(pid, "", expiration, 9).to_json())
    fits = FileTimerRequest(pid, "x" * (PIPE_BUF - base), expiration, 9)
    assert len(fits.to_json()) == PIPE_BUF
    client._send_request(fits)
    assert wait_for(lambda: (pid, fits.scope_id) in server._timers)

    too_big = FileTimerRequest(pid, "x" * (PIPE_BUF - base + 1), expiration, 9)
    with pytest.raises(RuntimeError, match="4096"):
        client._send_request(too_big)
    with pytest.raises(RuntimeError):
        client.acquire("y" * 10_000, expiration)
    time.sleep(0.1)
    assert server.stats()["malformed"] == 0
    assert server._request_count == 1


def test_client_started_before_the_server_waits_for_it(
    make_server: Callable[..., FileTimerServer], fifo: str
) -> None:
    """A client sending while the server is still starting succeeds once it is up."""
    started_servers: list[FileTimerServer] = []

    def start_server_late() -> None:
        time.sleep(0.3)
        server = make_server(max_interval=0.1)
        server.start()
        started_servers.append(server)

    starter = threading.Thread(target=start_server_late)
    starter.start()
    client = FileTimerClient(fifo, connect_timeout=3.0)
    started = time.monotonic()
    try:
        client.release("late-scope")  # a release: harmless whoever reads it
    finally:
        starter.join(10)
    took = time.monotonic() - started
    assert 0.25 <= took < 3.0, took
    [server] = started_servers
    assert wait_for(lambda: server._request_count == 1)


def test_client_process_started_before_the_server(
    make_server: Callable[..., FileTimerServer], procs: Callable[..., BaseProcess], fifo: str
) -> None:
    """A worker whose first request comes before the server exists gets through, then works."""
    asking, acquired_at = CTX.Event(), CTX.Value("d", 0.0)
    worker = procs(late_client_worker, fifo, asking, acquired_at)
    assert asking.wait(10) and worker.pid is not None
    pid = worker.pid
    # Asleep inside the acquire (the client waits for the FIFO), not yet through it.
    assert wait_for(lambda: process_state(pid) == "S" and acquired_at.value == 0.0)
    created = time.time()
    server = make_server(max_interval=0.1)
    server.start()
    worker.join(10)
    assert worker.exitcode == 0
    assert acquired_at.value >= created, "the acquire did not wait for the server"
    server.run_once()
    assert server._request_count == 2


def test_no_request_is_lost_under_load(
    server: FileTimerServer, procs: Callable[..., BaseProcess], fifo: str
) -> None:
    """4 workers x 2000 acquire/release pairs as fast as possible: no client ever fails (a full
    pipe is waited on) and the server counts every one of the 16000 requests."""
    workers = [procs(acquire_release_worker, fifo, 2000) for _ in range(4)]
    for worker in workers:
        worker.join(60)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    server.run_once()
    assert server._request_count == 4 * 2 * 2000
    assert server._timers == {}
    assert server.stats()["malformed"] == 0


# -- lifecycle --------------------------------------------------------------------------------


def test_stop_is_prompt_removes_the_fifo_and_start_again_serves(
    make_server: Callable[..., FileTimerServer], procs: Callable[..., BaseProcess], fifo: str
) -> None:
    """stop() returns at once even with max_interval=10 and no client ever connected (torch's
    blocks in open()); clients then get BrokenPipeError; start() again recreates the FIFO and
    reaps as before."""
    server = make_server()  # default max_interval=10
    server.start()
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 0.5
    assert not os.path.exists(fifo)
    with pytest.raises(BrokenPipeError):
        FileTimerClient(fifo, connect_timeout=0.1).release("after-stop")

    server.start()
    assert os.path.exists(fifo)
    worker = procs(stuck_worker, fifo, signal.SIGKILL, CTX.Value("d", 0.0))
    worker.join(5)
    assert worker.exitcode == -signal.SIGKILL
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 0.5
    assert not os.path.exists(fifo)


NON_DAEMON_SCRIPT = textwrap.dedent(
    """
    import sys
    from elastic_timer import FileTimerServer

    server = FileTimerServer(sys.argv[1], "non-daemon", daemon=False, signal_self=False)
    server.start()
    server.stop()
    print("stopped", flush=True)
    """
)


def test_non_daemon_server_lets_the_interpreter_exit_after_stop(tmp_path: Path) -> None:
    """daemon=False keeps the process alive only until stop(): then it exits normally
    (torch's thread stays blocked in open() and the interpreter never exits)."""
    run = subprocess.run(
        [sys.executable, "-c", NON_DAEMON_SCRIPT, str(tmp_path / "nd.fifo")],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == "stopped\n"


def test_last_progress_time_is_now_while_idle(make_server: Callable[..., FileTimerServer]) -> None:
    """get_last_progress_time() is an int near time.time(), before start and while idle."""
    server = make_server()
    before = server.get_last_progress_time()
    assert isinstance(before, int)
    assert abs(before - time.time()) <= 1
    server.start()
    time.sleep(0.3)
    idle = server.get_last_progress_time()
    assert isinstance(idle, int)
    assert abs(idle - time.time()) <= 1


# -- the self-signal and _reap_worker overrides -----------------------------------------------

SELF_SIGNAL_SCRIPT = textwrap.dedent(
    """
    import logging, multiprocessing as mp, sys, time
    from elastic_timer import FileTimerClient, FileTimerServer, expires

    def stuck(path, sig, go):
        go.wait(10)
        with expires(after=0.3, client=FileTimerClient(path, signal=sig)):
            time.sleep(10)

    if __name__ == "__main__":
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        path, sig, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
        server = FileTimerServer(path, "self-signal", max_interval=0.1, signal_self=mode == "on")
        server.start()
        ctx = mp.get_context("fork")
        go = ctx.Event()
        worker = ctx.Process(target=stuck, args=(path, sig, go))
        worker.start()
        print(worker.pid, flush=True)
        go.set()
        worker.join(10)
        print(f"worker exitcode {worker.exitcode}", flush=True)
        time.sleep(2)  # the self-signal, if any, comes well within this (1 s at most)
        server.stop()
    """
)


def process_gone(pid: int) -> bool:
    """Whether ``pid`` no longer runs (exited: reaped, or a zombie awaiting its reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_server_process_signals_itself_after_a_reap(sig: int, tmp_path: Path) -> None:
    """torch's behaviour (from torch 2.7 on): after reaping a worker, the server's own process
    gets the same signal (under torchrun that ends the agent). The worker dies first, and it
    is logged."""
    fifo = str(tmp_path / "self.fifo")
    run = subprocess.run(
        [sys.executable, "-c", SELF_SIGNAL_SCRIPT, fifo, str(int(sig)), "on"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    worker_pid = int(run.stdout.split()[0])
    try:
        assert run.returncode == -sig, (run.stdout, run.stderr)
        # Signalled before the server's process, but its teardown may finish after that one's.
        assert wait_for(lambda: process_gone(worker_pid))
        assert f"Successfully reaped worker=[{worker_pid}] with signal={int(sig)}" in run.stderr
        assert "Terminating the server process" in run.stderr
    finally:
        if not process_gone(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)


def test_server_process_lives_with_signal_self_false(tmp_path: Path) -> None:
    """signal_self=False: the worker is reaped and the server's process carries on."""
    fifo = str(tmp_path / "self.fifo")
    run = subprocess.run(
        [sys.executable, "-c", SELF_SIGNAL_SCRIPT, fifo, str(int(signal.SIGKILL)), "off"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, (run.stdout, run.stderr)
    assert f"worker exitcode {-signal.SIGKILL}" in run.stdout
    assert "Terminating the server process" not in run.stderr


@pytest.mark.parametrize(
    ("version", "expected"),
    [("2.4.1+cu121", False), ("2.6.0", False), ("2.7.0", True), ("2.15.0", True), (None, True)],
)
def test_signal_self_defaults_to_what_that_torchs_server_does(
    version: str | None, expected: bool
) -> None:
    """torch's FileTimerServer signals its own process from 2.7 on; without torch, as the
    newest does."""
    assert signals_self(version) is expected


def test_signal_self_default_follows_the_installed_torch(
    fifo: str, servers: list[FileTimerServer]
) -> None:
    server = FileTimerServer(fifo, "default")
    servers.append(server)
    assert server._signal_self is signals_self(installed_torch())


class RecordingServer(FileTimerServer):
    """Overrides torch's ``_reap_worker(worker_pid, signal)`` hook; reaps only its workers."""

    def __init__(self, fifo: str, workers: set[int], fail_first: bool = False, **kw: Any):
        super().__init__(fifo, "override", max_interval=0.2, signal_self=False, **kw)
        self.workers = workers
        self.calls: list[tuple[int, int]] = []
        self.fail_first = fail_first

    def _reap_worker(self, worker_pid: int, signal: int) -> bool:
        self.calls.append((worker_pid, signal))
        if worker_pid not in self.workers:
            return False
        if self.fail_first and len(self.calls) == 1:
            return False
        os.kill(worker_pid, signal)
        return True


@pytest.mark.parametrize("fail_first", [False, True], ids=["reaped", "retried"])
def test_reap_worker_override_is_called_with_pid_and_signal(
    fail_first: bool,
    fifo: str,
    procs: Callable[..., BaseProcess],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A subclass's _reap_worker(pid, signal) does the reaping at expiry; when it returns
    False it is called again on a later pass (torch: "Will retry on next watchdog")."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    workers: set[int] = set()
    server = RecordingServer(fifo, workers, fail_first=fail_first)
    try:
        server.start()
        may_go = CTX.Event()
        acquired_at = CTX.Value("d", 0.0)
        worker = procs(gated_stuck_worker, fifo, signal.SIGTERM, acquired_at, may_go)
        assert worker.pid is not None
        workers.add(worker.pid)
        may_go.set()
        worker.join(5)
        assert worker.exitcode == -signal.SIGTERM
        expected_calls = 2 if fail_first else 1
        assert server.calls == [(worker.pid, signal.SIGTERM)] * expected_calls
        assert wait_for(lambda: server._timers == {})
        assert wait_for(lambda: logged(caplog, f"Successfully reaped worker=[{worker.pid}]"))
        if fail_first:
            assert logged(caplog, f"Error reaping worker=[{worker.pid}]", logging.ERROR)
    finally:
        server.stop()


def test_a_failing_log_event_does_not_cancel_an_overridden_reap(
    fifo: str, procs: Callable[..., BaseProcess]
) -> None:
    """With a _reap_worker override, a log_event that raises once (a logging backend hiccup)
    costs at most one pass: the stuck worker is still reaped (torch retries on its next pass)."""
    workers: set[int] = set()
    failures = [RuntimeError("transient log_event failure")]

    def log_event(name: str, request: FileTimerRequest | None) -> None:
        if name == "timer expired" and failures:
            raise failures.pop()

    server = RecordingServer(fifo, workers, log_event=log_event)
    try:
        server.start()
        may_go = CTX.Event()
        worker = procs(gated_stuck_worker, fifo, signal.SIGKILL, CTX.Value("d", 0.0), may_go)
        assert worker.pid is not None
        workers.add(worker.pid)
        may_go.set()
        worker.join(4)
        assert not failures, "log_event was never called"
        assert worker.exitcode == -signal.SIGKILL, "the stuck worker was never reaped"
        assert server.calls == [(worker.pid, signal.SIGKILL)]
    finally:
        server.stop()


@pytest.mark.parametrize("when", ["before construction", "after construction"])
def test_reap_worker_patched_on_the_class_gets_the_reaps(
    when: str, fifo: str, procs: Callable[..., BaseProcess], servers: list[FileTimerServer]
) -> None:
    """torch's tests patch ``FileTimerServer._reap_worker`` on the class (``mock.patch``),
    before or after building the server and before ``start()``: the patch gets the reap with
    the worker's pid and signal, and the stuck worker, which the patch does not kill, lives on."""
    with contextlib.ExitStack() as patches:
        patch = mock.patch.object(FileTimerServer, "_reap_worker", return_value=True)
        reap = patches.enter_context(patch) if when == "before construction" else None
        server = FileTimerServer(fifo, "patched", max_interval=0.05, signal_self=False)
        servers.append(server)
        if reap is None:
            reap = patches.enter_context(patch)
        server.start()
        may_go = CTX.Event()
        worker = procs(gated_stuck_worker, fifo, signal.SIGTERM, CTX.Value("d", 0.0), may_go)
        may_go.set()
        assert wait_for(lambda: reap.call_count == 1)
        reap.assert_called_once_with(worker.pid, signal.SIGTERM)
        assert wait_for(lambda: server._timers == {})  # reaped, as the patch answered
        assert worker.is_alive()


def test_a_second_start_is_harmless(
    fifo: str, procs: Callable[..., BaseProcess], make_server: Callable[..., FileTimerServer]
) -> None:
    """torch's tests call ``start()`` on a started server: no error, one loop, one reap, and
    the FIFO goes on ``stop()``."""
    server = make_server()
    server.start()
    server.start()
    worker = procs(stuck_worker, fifo, signal.SIGKILL, CTX.Value("d", 0.0))
    worker.join(10)
    assert worker.exitcode == -signal.SIGKILL
    assert server.stats()["reaped"] == 1
    server.stop()
    assert not os.path.exists(fifo)


def test_expiries_go_through_log_debug_info_for_expired_timers_of_this_module(
    fifo: str, procs: Callable[..., BaseProcess], make_server: Callable[..., FileTimerServer]
) -> None:
    """As torch's server, each pass's expired timers go to
    ``file_based_local_timer.log_debug_info_for_expired_timers(run_id, {pid: [json]})``,
    looked up at the call: torch's tests patch it by that path."""
    path = "elastic_timer.file_based_local_timer.log_debug_info_for_expired_timers"
    with mock.patch(path) as debug_info:
        server = make_server(max_interval=0.1)
        server.start()
        acquired_at = CTX.Value("d", 0.0)
        worker = procs(stuck_worker, fifo, signal.SIGKILL, acquired_at)
        worker.join(10)
        assert worker.exitcode == -signal.SIGKILL
        assert wait_for(lambda: debug_info.call_count == 1)
    [(run_id, expired)] = [c.args for c in debug_info.call_args_list]
    assert run_id == "test-run"
    [line] = expired[worker.pid]
    assert json.loads(line)["pid"] == worker.pid
    assert json.loads(line)["signal"] == signal.SIGKILL


class BlockingHandler(logging.Handler):
    """Holds up the reporting thread (a stalled log sink) on the first record it sees, until
    released (at most 10 s)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocked = threading.Event()
        self.unblock = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if not self.blocked.is_set():
            self.blocked.set()
            self.unblock.wait(10)


def test_an_overridden_reap_survives_a_reporter_that_fell_behind(
    fifo: str, procs: Callable[..., BaseProcess]
) -> None:
    """While Python is stalled (a log sink blocks the reporting thread) and a flood of bad
    lines fills the event queue, a worker's timer expires. Once Python catches up, the
    override is still asked to reap the stuck worker: a dropped report must not cancel a reap."""
    workers: set[int] = set()
    server = RecordingServer(fifo, workers)
    handler = BlockingHandler()
    logger = logging.getLogger(LOGGER)
    try:
        server.start()
        may_go = CTX.Event()
        acquired_at = CTX.Value("d", 0.0)
        worker = procs(gated_stuck_worker, fifo, signal.SIGKILL, acquired_at, may_go)
        assert worker.pid is not None
        workers.add(worker.pid)
        logger.addHandler(handler)
        write_raw(fifo, b"x\n" * 10_000)  # 10000 malformed-line events, more than are queued
        assert handler.blocked.wait(5)
        may_go.set()
        assert wait_for(lambda: acquired_at.value > 0)
        assert wait_for(lambda: time.time() > acquired_at.value + 0.8)  # expired, unreported
        assert server.stats()["events_dropped"] > 0, "the event queue never filled up"
        handler.unblock.set()
        worker.join(5)
        assert worker.exitcode == -signal.SIGKILL, "the stuck worker was never reaped"
    finally:
        handler.unblock.set()
        logger.removeHandler(handler)
        server.stop()
