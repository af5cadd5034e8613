"""Never the wrong process, never a lost timer: bad input, faults and odd process trees.

Every server built in this process passes ``signal_self=False``, and every request a running
server sees names a process this test started: a child, a grandchild, or an orphan it started
through a double fork (killed at teardown by pid, after checking it is still the same
process). Scenarios that need a process of their own (a seccomp filter, a fork of the
server's process, interpreter shutdown, signal handlers) run in a subprocess.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_for

from elastic_timer import (
    FileTimerClient,
    FileTimerRequest,
    FileTimerServer,
    LocalTimerClient,
    LocalTimerServer,
    expires,
)

CTX = mp.get_context("fork")
LOGGER = "elastic_timer"
FAR = 3600.0


# -- helpers ------------------------------------------------------------------------------------


def stat_fields(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` from field 3 (the state) on; None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def start_time(pid: int) -> int | None:
    fields = stat_fields(pid)
    return int(fields[19]) if fields else None


def running(pid: int, started: int) -> bool:
    """Whether the process ``pid`` that started at ``started`` still runs (not a zombie)."""
    fields = stat_fields(pid)
    return fields is not None and int(fields[19]) == started and fields[0] not in ("Z", "X")


def is_descendant(pid: int, ancestor: int) -> bool:
    fields = stat_fields(pid)
    while fields is not None:
        parent = int(fields[1])
        if parent == ancestor:
            return True
        if parent <= 1:
            return False
        fields = stat_fields(parent)
    return False


def error_messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in list(caplog.records)
        if r.levelno >= logging.ERROR and text in r.getMessage()
    ]


def run_script(source: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def result_of(run: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert run.returncode == 0, (run.stdout, run.stderr)
    [line] = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    result: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
    return result


# -- workers (module level: forked children run them) -------------------------------------------


def stuck_file(path: str, sig: int, after: float) -> None:
    with expires(after=after, client=FileTimerClient(path, signal=sig)):
        time.sleep(10)


def stuck_local(queue: Any, after: float) -> None:
    with expires(after=after, client=LocalTimerClient(queue)):
        time.sleep(10)


def stops_itself(path: str, acquired_at: Any) -> None:
    """Holds a 0.3 s SIGTERM timer and stops itself (SIGSTOP), as a debugger or ^Z would."""
    with expires(after=0.3, client=FileTimerClient(path, signal=signal.SIGTERM)):
        acquired_at.value = time.time()
        os.kill(os.getpid(), signal.SIGSTOP)
        time.sleep(10)


def through_a_child(target: Callable[..., None], args: tuple[Any, ...], exitcode: Any) -> None:
    """Runs ``target(*args)`` in a child of this process (a grandchild of the test) and
    records how it ended."""
    grandchild = CTX.Process(target=target, args=args)
    grandchild.start()
    grandchild.join(10)
    if grandchild.is_alive():
        grandchild.kill()
        grandchild.join()
    exitcode.value = grandchild.exitcode


def double_fork(target: Callable[..., None], args: tuple[Any, ...], pids: Connection) -> None:
    """The middle of a double fork: forks ``target(*args)`` into a session of its own and
    exits at once. The target waits until it has been reparented (to init, or the nearest
    subreaper): from then on it is no descendant of the test."""
    me = os.getpid()
    if os.fork() == 0:
        try:
            os.setsid()
            while os.getppid() == me:
                time.sleep(0.001)
            pids.send((os.getpid(), start_time(os.getpid())))
            target(*args)
        finally:
            os._exit(0)
    os._exit(0)


def orphan_acquires_file(path: str) -> None:
    client = FileTimerClient(path)
    for i in range(3):
        client.acquire(f"orphan-{i}", time.time() + 0.2)
    time.sleep(15)  # killed by the test long before


def orphan_acquires_local(queue: Any) -> None:
    client = LocalTimerClient(queue)
    for i in range(3):
        client.acquire(f"orphan-{i}", time.time() + 0.2)
    time.sleep(15)


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def orphans() -> Iterator[Callable[..., tuple[int, int]]]:
    """Starts processes that are not descendants of the test; each is killed at teardown, by
    pid, if it is still the process started (same start time)."""
    started: list[tuple[int, int]] = []

    def start(target: Callable[..., None], *args: Any) -> tuple[int, int]:
        receiver, sender = CTX.Pipe(duplex=False)
        middle = CTX.Process(target=double_fork, args=(target, args, sender))
        middle.start()
        # No timeout: join(timeout) waits on a pipe the orphan inherited, until it exits.
        middle.join()
        assert receiver.poll(10), "the orphan never reported"
        pid, began = receiver.recv()
        started.append((pid, began))
        assert not is_descendant(pid, os.getpid()), "a subreaper adopted it: not an orphan"
        return int(pid), int(began)

    try:
        yield start
    finally:
        for pid, began in started:
            if running(pid, began):
                os.kill(pid, signal.SIGKILL)


# -- descendants_only ---------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["file", "local"])
def test_descendants_only_reaps_a_grandchild_and_refuses_an_orphan(
    transport: str,
    fifo: str,
    servers: list[Any],
    children: list[Any],
    orphans: Callable[..., tuple[int, int]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With descendants_only=True, a stuck grandchild of the server's process is reaped, and
    an expired timer of a process outside its tree (an orphan of a double fork, in a session
    of its own) is refused: logged once at ERROR with the reason, counted for each of its
    three acquires, and the process lives on."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    server: FileTimerServer | LocalTimerServer
    orphan_target: Callable[..., None]
    orphan_args: tuple[Any, ...]
    if transport == "file":
        server = FileTimerServer(
            fifo, "descendants", max_interval=0.1, signal_self=False, descendants_only=True
        )
        stuck: tuple[Callable[..., None], tuple[Any, ...]] = (
            stuck_file,
            (fifo, signal.SIGKILL, 0.3),
        )
        orphan_target, orphan_args = orphan_acquires_file, (fifo,)
    else:
        queue = CTX.Queue()
        server = LocalTimerServer(queue, max_interval=0.1, descendants_only=True)
        stuck = (stuck_local, (queue, 0.3))
        orphan_target, orphan_args = orphan_acquires_local, (queue,)
    servers.append(server)
    server.start()

    exitcode = CTX.Value("i", 0)
    middle = CTX.Process(target=through_a_child, args=(*stuck, exitcode))
    middle.start()
    children.append(middle)
    orphan, began = orphans(orphan_target, *orphan_args)

    middle.join(10)
    assert exitcode.value == -signal.SIGKILL, "the stuck grandchild was not reaped"
    assert wait_for(lambda: server.stats()["refused"] == 3)
    time.sleep(0.5)  # the orphan's timers are long expired
    assert running(orphan, began), "a process outside the server's tree was signalled"
    stats = server.stats()
    assert (stats["reaped"], stats["refused"], stats["live_timers"]) == (1, 3, 0)
    refusal = "is not a descendant of the timer server's process"
    # Counted at intake, logged by the reporter thread (which may not have got to it yet).
    assert wait_for(lambda: error_messages(caplog, refusal))
    refusals = error_messages(caplog, refusal)
    assert len(refusals) == 1, refusals
    assert f"pid {orphan} is not a descendant" in refusals[0]
    assert "scope_id='orphan-0'" in refusals[0]


# -- a stopped worker ---------------------------------------------------------------------------


def test_a_stopped_worker_gets_sigcont_and_dies_of_its_sigterm(
    fifo: str, servers: list[Any], children: list[Any]
) -> None:
    """A worker stopped (SIGSTOP) inside its timer cannot act on the SIGTERM the server sends
    at the deadline; the server follows it with SIGCONT, and the worker dies of SIGTERM."""
    server = FileTimerServer(fifo, "stopped", max_interval=0.1, signal_self=False)
    servers.append(server)
    server.start()
    acquired_at = CTX.Value("d", 0.0)
    worker = CTX.Process(target=stops_itself, args=(fifo, acquired_at))
    worker.start()
    children.append(worker)
    assert worker.pid is not None
    pid = worker.pid
    assert wait_for(lambda: (stat_fields(pid) or ["?"])[0] == "T", timeout=2), "never stopped"
    worker.join(5)
    assert worker.exitcode == -signal.SIGTERM
    assert time.time() - acquired_at.value < 2.0
    assert server.stats()["reaped"] == 1


# -- without pidfds -----------------------------------------------------------------------------

# Runs a File server under a seccomp filter that fails pidfd_open with ENOSYS (an old kernel),
# so every worker is signalled by pid. Workers are the script's own children.
NO_PIDFD_SCRIPT = """
import ctypes, json, logging, multiprocessing as mp, os, signal, struct, sys, time

PIDFD_OPEN = 434  # the same number on every architecture
filters = [
    (0x20, 0, 0, 0),  # ld [0]: the syscall number
    (0x15, 0, 1, PIDFD_OPEN),  # jeq PIDFD_OPEN
    (0x06, 0, 0, 0x00050000 | 38),  # ret ERRNO(ENOSYS)
    (0x06, 0, 0, 0x7FFF0000),  # ret ALLOW
]
program = b"".join(struct.pack("HBBI", *f) for f in filters)
buffer = ctypes.create_string_buffer(program)

class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

fprog = SockFprog(len(filters), ctypes.addressof(buffer))
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0, ctypes.get_errno()  # SECCOMP_MODE_FILTER
try:
    os.pidfd_open(os.getpid())
    raise SystemExit("the filter did not apply")
except OSError as err:
    assert err.errno == 38

from elastic_timer import FileTimerClient, FileTimerServer, expires

warnings = []

class Capture(logging.Handler):
    def emit(self, record):
        if record.levelno >= logging.WARNING:
            warnings.append(record.getMessage())

logging.getLogger().addHandler(Capture())

def stuck(path, sig, stop):
    with expires(after=0.3, client=FileTimerClient(path, signal=sig)):
        if stop:
            os.kill(os.getpid(), signal.SIGSTOP)
        time.sleep(10)

path = sys.argv[1]
server = FileTimerServer(path, "no-pidfd", max_interval=0.1, signal_self=False,
                         descendants_only=True)
server.start()
ctx = mp.get_context("fork")
workers = [ctx.Process(target=stuck, args=(path, signal.SIGKILL, False)) for _ in range(3)]
workers.append(ctx.Process(target=stuck, args=(path, signal.SIGTERM, True)))
for worker in workers:
    worker.start()
for worker in workers:
    worker.join(10)
    if worker.is_alive():
        worker.kill()
        worker.join()
time.sleep(0.2)
stats = server.stats()
server.stop()
print("RESULT " + json.dumps({
    "exitcodes": [w.exitcode for w in workers], "stats": stats, "warnings": warnings,
}), flush=True)
"""


def test_without_pidfds_workers_are_signalled_by_pid_and_it_is_said_once(tmp_path: Path) -> None:
    """Where pidfd_open fails (ENOSYS, as on kernels before 5.3), the server signals workers
    by pid: three stuck workers die of SIGKILL and a stopped one of SIGTERM (it is sent
    SIGCONT), descendants_only still accepts them, and the fallback is logged once."""
    result = result_of(run_script(NO_PIDFD_SCRIPT, str(tmp_path / "timer.fifo")))
    assert result["exitcodes"] == [-9, -9, -9, -signal.SIGTERM]
    assert result["stats"]["reaped"] == 4
    assert result["stats"]["refused"] == 0
    fallback = [w for w in result["warnings"] if "pidfds unavailable" in w]
    assert len(fallback) == 1, result["warnings"]
    assert "Function not implemented" in fallback[0]


# -- a flood of garbage -------------------------------------------------------------------------

# A File server in a process of its own (its memory is measured from outside), logging at the
# default level to its stderr (a file). It prints its stats for each line read on stdin.
FLOOD_SERVER_SCRIPT = """
import json, sys
from elastic_timer import FileTimerServer

server = FileTimerServer(sys.argv[1], "flood", max_interval=0.1, signal_self=False)
server.start()
print("ready", flush=True)
for _ in sys.stdin:
    print(json.dumps(server.stats()), flush=True)
server.stop()
"""

MB = 1 << 20
FLOOD_MB = 1024  # half without a newline, half with random newlines


def flood(path: str, holding: Any, flooding: Any) -> None:
    """Leaves 16 KiB without a newline and holds the FIFO open for 0.6 s (``holding`` set),
    then writes 512 MiB without a newline and 512 MiB of random bytes (``flooding`` set).
    No byte is ``{``: nothing in it could ever decode as a request."""
    fd = os.open(path, os.O_WRONLY)
    block = bytearray(os.urandom(MB)).replace(b"{", b"(")
    without_newlines = bytes(block).replace(b"\n", b" ")
    try:
        os.write(fd, without_newlines[: 16 * 1024])
        holding.set()
        time.sleep(0.6)
        flooding.set()
        for _ in range(FLOOD_MB // 2):
            os.write(fd, without_newlines)
        for _ in range(FLOOD_MB // 2):
            os.write(fd, bytes(block))
    finally:
        os.close(fd)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_gigabyte_of_garbage_neither_stalls_the_server_nor_grows_it(
    fifo: str, tmp_path: Path, children: list[Any]
) -> None:
    """A writer leaves bytes without a newline and holds the FIFO open, then floods it with
    1 GiB of garbage (half without any newline). Meanwhile two stuck workers acquire 0.5 s
    timers: their requests, glued to the garbage, are still read, and each worker dies within
    0.5 s of its deadline (0.01 s on an idle machine). The server's RSS grows by less than
    16 MiB (it keeps at most PIPE_BUF bytes of a line, and a bounded queue of events)."""
    log = tmp_path / "server.log"
    with open(log, "w") as stderr:
        server = subprocess.Popen(
            [sys.executable, "-c", FLOOD_SERVER_SCRIPT, fifo],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    children.append(server)
    assert server.stdin is not None and server.stdout is not None
    assert server.stdout.readline() == "ready\n"
    baseline = rss_kib(server.pid)

    holding, flooding = CTX.Event(), CTX.Event()
    writer = CTX.Process(target=flood, args=(fifo, holding, flooding))
    writer.start()
    children.append(writer)
    deaths: list[float] = []
    for phase in (holding, flooding):
        assert phase.wait(10)
        acquired = time.time()
        worker = CTX.Process(target=stuck_file, args=(fifo, signal.SIGKILL, 0.5))
        worker.start()
        children.append(worker)
        worker.join(5)
        assert worker.exitcode == -signal.SIGKILL, "a stuck worker was not reaped"
        deaths.append(time.time() - acquired)
    peak = baseline
    while writer.is_alive():
        peak = max(peak, rss_kib(server.pid))
        time.sleep(0.02)
    writer.join()
    assert writer.exitcode == 0
    peak = max(peak, rss_kib(server.pid))

    server.stdin.write("stats\n")
    server.stdin.flush()
    stats = json.loads(server.stdout.readline())
    server.stdin.close()
    assert server.wait(10) == 0
    assert all(0.5 <= died < 1.0 for died in deaths), deaths
    assert (stats["requests"], stats["reaped"], stats["refused"]) == (2, 2, 0)
    assert stats["malformed"] > 1000  # every line of garbage, and the glued prefixes
    assert peak - baseline < 16 * 1024, (baseline, peak)
    assert "the request at its end was kept" in log.read_text()


# -- the FIFO deleted or replaced ---------------------------------------------------------------


def test_a_deleted_fifo_is_created_again_and_a_replacing_one_left_alone(
    fifo: str, servers: list[Any], children: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Deleting the FIFO while the server runs: the server creates it again at once (and says
    so), and a stuck worker that acquires afterwards is reaped. Another FIFO moved onto the
    path (another server's) is left alone, and stop() does not remove it."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = FileTimerServer(fifo, "deleted", max_interval=0.1, signal_self=False)
    servers.append(server)
    server.start()
    inode = os.stat(fifo).st_ino
    os.remove(fifo)
    assert wait_for(lambda: os.path.exists(fifo) and os.stat(fifo).st_ino != inode)
    worker = CTX.Process(target=stuck_file, args=(fifo, signal.SIGKILL, 0.3))
    worker.start()
    children.append(worker)
    worker.join(5)
    assert worker.exitcode == -signal.SIGKILL
    assert wait_for(
        lambda: any(
            r.levelno == logging.WARNING and f"{fifo} was deleted; created it again" in r.message
            for r in list(caplog.records)
        )
    )

    other = fifo + ".other"
    os.mkfifo(other)
    os.rename(other, fifo)
    theirs = os.stat(fifo).st_ino
    assert wait_for(
        lambda: any("is now another FIFO" in r.getMessage() for r in list(caplog.records))
    )
    server.stop()
    assert os.stat(fifo).st_ino == theirs


# -- a restart while clients run ----------------------------------------------------------------


def client_through_a_restart(path: str, done: Any, outcomes: Any, counts: Any) -> None:
    """Sends releases (harmless) until told to stop; records 1 per success and 0 per
    BrokenPipeError, in order, and counts both as it goes (``counts[1]``, ``counts[0]``)."""
    client = FileTimerClient(path, connect_timeout=0.02)
    sent: list[int] = []
    while not done.is_set() and len(sent) < 10_000:
        try:
            client.release("restart")
            sent.append(1)
        except BrokenPipeError:
            sent.append(0)
        counts[sent[-1]] += 1
        time.sleep(0.002)
    outcomes.put(sent)


def test_clients_get_broken_pipe_while_the_server_restarts_then_work_again(
    fifo: str, servers: list[Any], children: list[Any]
) -> None:
    """stop() then start() while a client keeps sending: the client's requests succeed, then
    fail with BrokenPipeError while there is no server, then succeed again; the server counts
    every request that succeeded."""
    server = FileTimerServer(fifo, "restart", max_interval=0.1, signal_self=False)
    servers.append(server)
    server.start()
    done, outcomes, counts = CTX.Event(), CTX.Queue(), CTX.Array("i", 2)
    client = CTX.Process(target=client_through_a_restart, args=(fifo, done, outcomes, counts))
    client.start()
    children.append(client)
    assert wait_for(lambda: counts[1] >= 10), "the client's requests never succeeded"
    server.stop()
    assert wait_for(lambda: counts[0] >= 10), "no BrokenPipeError without a server"
    succeeded = counts[1]
    server.start()
    assert wait_for(lambda: counts[1] >= succeeded + 10), "no success after the restart"
    done.set()
    sent: list[int] = outcomes.get(timeout=10)
    client.join(5)
    assert client.exitcode == 0
    # Successes, failures, successes: one run of each.
    runs = [value for i, value in enumerate(sent) if i == 0 or sent[i - 1] != value]
    assert runs == [1, 0, 1], (runs, len(sent), sum(sent))
    assert wait_for(lambda: server.stats()["requests"] == sum(sent)), (server.stats(), sum(sent))


# -- callbacks that raise -----------------------------------------------------------------------


def test_a_log_event_that_always_raises_never_stops_a_reap(
    fifo: str, servers: list[Any], children: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """log_event raising on every call (not just once, as in test_file): the stuck worker is
    reaped at its deadline all the same, and each failure is logged."""
    caplog.set_level(logging.INFO, logger=LOGGER)

    def log_event(name: str, request: FileTimerRequest | None) -> None:
        raise RuntimeError(f"log sink down ({name})")

    server = FileTimerServer(
        fifo, "raising", max_interval=0.1, signal_self=False, log_event=log_event
    )
    servers.append(server)
    server.start()
    worker = CTX.Process(target=stuck_file, args=(fifo, signal.SIGKILL, 0.3))
    worker.start()
    children.append(worker)
    worker.join(5)
    assert worker.exitcode == -signal.SIGKILL
    assert wait_for(lambda: len(error_messages(caplog, "log_event(")) >= 3)
    names = {m.split("'")[1] for m in error_messages(caplog, "log_event(")}
    assert names == {"watchdog started", "timer expired", "kill worker process"}
    assert server.stats()["reaped"] == 1


class RaisesOnceServer(FileTimerServer):
    """A ``_reap_worker`` override that raises on its first call, then kills its workers."""

    def __init__(self, *args: Any, workers: set[int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.workers = workers
        self.calls = 0

    def _reap_worker(self, worker_pid: int, signal: int) -> bool:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("reaper broke")
        if worker_pid in self.workers:
            os.kill(worker_pid, signal)
        return True


def gated_stuck_file(path: str, go: Any) -> None:
    go.wait(10)
    stuck_file(path, signal.SIGKILL, 0.3)


def test_a_raising_reap_worker_override_is_retried(
    fifo: str, servers: list[Any], children: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A FileTimerServer subclass whose _reap_worker raises: logged with its traceback, and
    the reap is tried again on a later pass, which kills the stuck worker."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    workers: set[int] = set()
    server = RaisesOnceServer(
        fifo, "raising-override", max_interval=0.1, signal_self=False, workers=workers
    )
    servers.append(server)
    server.start()
    go = CTX.Event()
    worker = CTX.Process(target=gated_stuck_file, args=(fifo, go))
    worker.start()
    children.append(worker)
    assert worker.pid is not None
    workers.add(worker.pid)
    go.set()
    worker.join(5)
    assert worker.exitcode == -signal.SIGKILL
    assert server.calls == 2
    [record] = [r for r in list(caplog.records) if "Error running _reap_worker" in r.message]
    assert record.exc_info is not None


# -- a fork of the server's process -------------------------------------------------------------

FORK_SCRIPT = """
import gc, json, multiprocessing as mp, os, signal, sys, time
from elastic_timer import FileTimerClient, FileTimerServer, expires

def stuck(path):
    with expires(after=0.3, client=FileTimerClient(path)):
        time.sleep(10)

path = sys.argv[1]
server = FileTimerServer(path, "fork", max_interval=0.1, signal_self=False)
server.start()
started = time.monotonic()
child = os.fork()
if child == 0:
    # A child of the server's process that touches its copy of the server, then exits
    # through interpreter shutdown (which drops the copy).
    server.stop()
    try:
        server.register_timers([])
        raise SystemExit("register_timers worked in a forked child")
    except RuntimeError:
        pass
    del server
    gc.collect()
    sys.exit(0)
_, status = os.waitpid(child, 0)
child_took = time.monotonic() - started
result = {"child_status": status, "child_took": child_took, "fifo_exists": os.path.exists(path)}
worker = mp.get_context("fork").Process(target=stuck, args=(path,))
worker.start()
worker.join(5)
result["worker_exitcode"] = worker.exitcode
result["stats"] = server.stats()
server.stop()
result["fifo_after_stop"] = os.path.exists(path)
print("RESULT " + json.dumps(result), flush=True)
"""


def test_a_fork_of_the_servers_process_leaves_the_server_alone(tmp_path: Path) -> None:
    """A child forked from a process with a running server calls stop() and register_timers()
    on its copy and exits normally: stop() is ignored (with a warning), register_timers()
    raises RuntimeError, the child exits 0 at once (no join of a thread it does not have),
    and the parent's FIFO and server are intact: a stuck worker is still reaped."""
    run = run_script(FORK_SCRIPT, str(tmp_path / "timer.fifo"))
    result = result_of(run)
    assert result["child_status"] == 0
    assert result["child_took"] < 3
    assert result["fifo_exists"] is True
    assert result["worker_exitcode"] == -signal.SIGKILL
    assert result["stats"]["reaped"] == 1
    assert result["fifo_after_stop"] is False
    assert "stop() ignored: this server belongs to process" in run.stderr


# -- interpreter shutdown -----------------------------------------------------------------------

SHUTDOWN_SCRIPT = """
import subprocess, sys, time
from elastic_timer import FileTimerRequest, FileTimerServer

server = FileTimerServer(sys.argv[1], "shutdown", max_interval=10)  # signal_self, daemon
server.start()
sleeper = subprocess.Popen(["sleep", "30"])
server.register_timers([FileTimerRequest(sleeper.pid, "far", time.time() + 3600, 9)])
sleeper.kill()  # only this script's own child: nothing else could be signalled
sleeper.wait()
print("returning", flush=True)
"""


def test_interpreter_shutdown_with_a_running_server(tmp_path: Path) -> None:
    """A script that starts a File server (torch's defaults: daemon thread, self-signal) and
    returns without stop() exits 0, promptly, without a crash or a hang."""
    started = time.monotonic()
    run = run_script(SHUTDOWN_SCRIPT, str(tmp_path / "timer.fifo"), timeout=20)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "returning\n"
    assert "panicked" not in run.stderr and "Traceback" not in run.stderr
    assert time.monotonic() - started < 5


# Registered before elastic_timer is imported, so it runs after elastic_timer's own exit hook.
EXIT_HOOK_SCRIPT = """
import atexit, os, sys, threading

def at_exit():
    reporters = [t for t in threading.enumerate() if t.name == "elastic-timer-reporter"]
    print("reporters", len(reporters), "fifo", os.path.exists(sys.argv[1]), flush=True)

atexit.register(at_exit)
from elastic_timer import FileTimerServer, LocalTimerServer
import multiprocessing as mp

file_server = FileTimerServer(sys.argv[1], "exit", max_interval=10)  # daemon, never stopped
file_server.start()
local_server = LocalTimerServer(mp.get_context("spawn").Queue(), max_interval=10)
local_server.start()
"""


def test_servers_nobody_stopped_are_stopped_before_the_interpreter_finalizes(
    tmp_path: Path,
) -> None:
    """Their reporters return before finalization: one waking during it would be ended with
    pthread_exit, unwinding through native frames (a crash in the zig-linked wheel)."""
    fifo = tmp_path / "timer.fifo"
    run = run_script(EXIT_HOOK_SCRIPT, str(fifo), timeout=20)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "reporters 0 fifo False\n", run.stderr


# -- stop() from another thread, and from a signal handler --------------------------------------

STOP_SCRIPT = """
import json, os, random, signal, sys, threading, time
from elastic_timer import FileTimerRequest, FileTimerServer

path = sys.argv[1]
server = FileTimerServer(path, "stop", max_interval=0.1, signal_self=False)
result = {}

# From another thread, while the main thread waits.
server.start()
stopper = threading.Thread(target=server.stop)
stopper.start()
stopper.join(5)
result["thread"] = not stopper.is_alive() and not server._core.running

# From a signal handler, while the main thread sleeps.
signal.signal(signal.SIGUSR1, lambda *args: server.stop())
server.start()
os.kill(os.getpid(), signal.SIGUSR1)
time.sleep(0.1)
result["handler"] = not server._core.running

# Signals arriving at random while the main thread uses the server and restarts it.
def fire():
    for _ in range(30):
        time.sleep(random.uniform(0, 0.02))
        os.kill(os.getpid(), signal.SIGUSR1)

firing = threading.Thread(target=fire)
firing.start()
calls = restarts = 0
before = server.stats()["requests"]
while firing.is_alive():
    if not server._core.running:
        server.start()
        restarts += 1
    server.stats()
    server.register_timers([FileTimerRequest(os.getpid(), "released", -1)])
    calls += 1
firing.join()
server.stop()
result["calls"] = calls
result["registered"] = server.stats()["requests"] - before
result["restarts"] = restarts
print("RESULT " + json.dumps(result), flush=True)
"""


def test_stop_from_another_thread_and_from_a_signal_handler(tmp_path: Path) -> None:
    """stop() called from another thread, from a SIGUSR1 handler, and from handlers firing
    at random while the main thread uses and restarts the server: it never deadlocks."""
    result = result_of(run_script(STOP_SCRIPT, str(tmp_path / "timer.fifo"), timeout=30))
    assert result["thread"] is True
    assert result["handler"] is True
    # Stopped by handlers and started again while in use, and no request was lost.
    assert result["restarts"] >= 1
    assert result["registered"] == result["calls"]
