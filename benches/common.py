"""What the benchmarks share: the two sides, sizes, child processes, transports, statistics.

Every benchmark takes a ``Side`` whose ``module`` is either ``torch.distributed.elastic.timer``
or ``elastic_timer`` and runs the same code against it. Everything that could kill or hang runs
in a forked child of the harness (``spawn``); the harness itself starts no server and sends
no timer request.
"""

from __future__ import annotations

import contextlib
import ctypes
import inspect
import math
import multiprocessing
import os
import resource
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from types import ModuleType
from typing import Any, Callable, NoReturn

_START = time.monotonic()


def progress(message: str) -> None:
    """One line of progress on stderr, with the time since the harness started."""
    print(f"[{time.monotonic() - _START:7.1f} s] {message}", file=sys.stderr, flush=True)


# -- sides -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Side:
    """One of the two implementations under test."""

    key: str  # "torch" or "ours": the key in results.json
    label: str  # for humans
    module: ModuleType  # the timer module: the same benchmark code runs against either


def load_sides() -> list[Side]:
    """torch's timer module and ours, in the order the benchmarks alternate them."""
    import torch.distributed.elastic.timer as torch_timer

    import elastic_timer

    return [Side("torch", "torch", torch_timer), Side("ours", "elastic-timer", elastic_timer)]


# -- sizes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How much of everything to do; ``DEFAULT`` is what the figures in the report use."""

    name: str
    reps: int  # repetitions per side of every repeated measurement
    block_seconds: float  # client benchmarks: run blocks for this long per repetition...
    block_max: int  # ...or this many, whichever comes first
    tp_pairs: int  # throughput: acquire/release pairs per client process
    tp_clients: tuple[int, ...]  # throughput: numbers of client processes
    reap_workers: int  # reap latency: workers per configuration and side
    reap_cap: float  # reap latency, max_interval 0.1: give up on a worker after this (s)
    reap_cap_default: float  # the same at the class defaults (torch: up to 2 x 10 s or 60 s)
    reap_budget_default: float  # sequential configurations: no new worker after this (s)
    cpu_window: float  # server CPU: the measured window (s)
    cpu_timers: int  # server CPU: live timers of the loaded case
    scale_sizes: tuple[int, ...]  # scale: numbers of live timers
    scale_ops: int  # scale: timed operations per size (at most the size)
    scale_window: float  # scale: CPU window of a started server at the largest size (s)
    adaptive_workers: int  # adaptive: workers per side (every other one hangs)
    adaptive_after: float  # adaptive: the after every step asks for (s)


DEFAULT = Sizes(
    name="default",
    reps=5,
    block_seconds=0.5,
    block_max=500_000,
    tp_pairs=2_000,
    tp_clients=(4, 16),
    reap_workers=20,
    reap_cap=3.0,
    reap_cap_default=12.0,
    reap_budget_default=20.0,
    cpu_window=10.0,
    cpu_timers=100_000,
    scale_sizes=(10_000, 100_000, 1_000_000),
    scale_ops=20_000,
    scale_window=10.0,
    adaptive_workers=8,
    adaptive_after=10.0,
)

QUICK = Sizes(
    name="quick",
    reps=3,
    block_seconds=0.2,
    block_max=100_000,
    tp_pairs=500,
    tp_clients=(4, 16),
    reap_workers=8,
    reap_cap=2.0,
    reap_cap_default=3.0,
    reap_budget_default=5.0,
    cpu_window=2.0,
    cpu_timers=100_000,
    scale_sizes=(10_000, 100_000),
    scale_ops=5_000,
    scale_window=2.0,
    adaptive_workers=4,
    adaptive_after=5.0,
)

TINY = Sizes(
    name="tiny",
    reps=1,
    block_seconds=0.05,
    block_max=2_000,
    tp_pairs=20,
    tp_clients=(4, 16),
    reap_workers=2,
    reap_cap=1.0,
    reap_cap_default=0.5,
    reap_budget_default=0.5,
    cpu_window=0.3,
    cpu_timers=1_000,
    scale_sizes=(1_000, 10_000),
    scale_ops=500,
    scale_window=0.3,
    adaptive_workers=2,
    adaptive_after=2.0,
)


# -- child processes -------------------------------------------------------------------------


class ChildError(RuntimeError):
    """A child failed, exited, or did not answer in time."""


_PR_SET_PDEATHSIG = 1
_live: list[Child] = []


class Child:
    """
    A forked child of the harness, with a duplex pipe to it. The child answers with
    ``reply``; ``recv`` returns the answer or raises ``ChildError``.

    The pid stays ours until ``wait`` has reaped it, so ``kill`` never hits another process:
    a child that was killed but not waited for is a zombie, and its pid cannot be reused.
    """

    def __init__(self, name: str, pid: int, conn: Connection) -> None:
        self.name = name
        self.pid = pid
        self.conn = conn
        self.pidfd = os.pidfd_open(pid)
        self.status: int | None = None
        _live.append(self)

    def send(self, message: object) -> None:
        self.conn.send(message)

    def recv(self, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise ChildError(f"{self.name} (pid {self.pid}) did not answer within {timeout:.1f} s")
        try:
            kind, payload = self.conn.recv()
        except (EOFError, OSError) as err:
            raise ChildError(f"{self.name} (pid {self.pid}) exited without answering") from err
        if kind == "error":
            raise ChildError(f"{self.name} (pid {self.pid}) failed:\n{payload}")
        return payload

    def has_exited(self) -> bool:
        return self.status is not None or readable(self.pidfd, 0.0)

    def wait(self, timeout: float) -> bool:
        """Reaps the child if it exits within ``timeout``; whether it has been reaped."""
        if self.status is not None:
            return True
        if not readable(self.pidfd, timeout):
            return False
        _, self.status = os.waitpid(self.pid, 0)
        os.close(self.pidfd)
        self.conn.close()
        _live.remove(self)
        return True

    def kill(self) -> None:
        """SIGKILL, unless already reaped (then the pid may not be ours any more)."""
        if self.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def finish(self, timeout: float = 5.0) -> None:
        """Waits for the child to exit; kills it if it does not within ``timeout``."""
        if not self.wait(timeout):
            self.kill()
            self.wait(30.0)


def spawn(name: str, target: Callable[..., None], *args: Any) -> Child:
    """
    Forks a child running ``target(conn, *args)``. The child dies with the harness
    (PR_SET_PDEATHSIG), leaves with ``os._exit`` (no atexit handlers of the harness) and
    reports an uncaught exception as an ``("error", traceback)`` message.
    """
    parent_end, child_end = multiprocessing.Pipe()
    harness = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        parent_end.close()
        _live.clear()
        _become_child(harness)
        run_child(child_end, target, *args)
    child_end.close()
    return Child(name, pid, parent_end)


def spawn_exec(name: str, code: str, *args: str) -> Child:
    """
    Like ``spawn``, but the child execs a fresh interpreter running ``code`` with
    ``sys.argv[1:] == [<fd of its end of the pipe>, *args]`` and ``benches`` importable: a
    process that has not inherited the harness's memory (torch's included).
    """
    parent_end, child_end = multiprocessing.Pipe()
    harness = os.getpid()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            parent_end.close()
            _become_child(harness)
            os.set_inheritable(child_end.fileno(), True)
            argv = [sys.executable, "-c", code, str(child_end.fileno()), *args]
            os.execve(sys.executable, argv, env)
        finally:
            os._exit(127)
    child_end.close()
    return Child(name, pid, parent_end)


def _become_child(harness: int) -> None:
    # The harness turns SIGTERM into an exception and Ctrl-C is for the harness: a child
    # dies of SIGTERM (servers reap with it) and leaves Ctrl-C to its parent.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # kept across exec
    if os.getppid() != harness:
        os._exit(1)


def run_child(conn: Connection, target: Callable[..., None], *args: Any) -> NoReturn:
    """Runs a child's body, reports an uncaught exception, and leaves the process."""
    code = 1
    try:
        target(conn, *args)
        code = 0
    except BaseException:
        with contextlib.suppress(BaseException):
            conn.send(("error", traceback.format_exc()))
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def reply(conn: Connection, payload: object = None) -> None:
    """A child's answer to the harness."""
    conn.send(("ok", payload))


def command(conn: Connection, timeout: float) -> Any:
    """A child waits for the harness's next message; it exits if none comes in ``timeout``."""
    if not conn.poll(timeout):
        raise ChildError(f"no command from the harness within {timeout:.1f} s")
    return conn.recv()


def kill_all_children() -> None:
    """Kills and reaps every child still around (each by its own pid)."""
    for child in list(_live):
        child.kill()
    for child in list(_live):
        child.wait(30.0)


def readable(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0.0, timeout) * 1000.0))


def sleeper(conn: Connection, lifetime: float) -> None:
    """A child that only exists: its pid owns timers in the CPU and scale benchmarks."""
    reply(conn, os.getpid())
    conn.poll(lifetime)


def spawn_sleepers(count: int, lifetime: float) -> list[Child]:
    children = [spawn(f"sleeper {i}", sleeper, lifetime) for i in range(count)]
    for child in children:
        child.recv(30.0)
    return children


# -- servers, clients and transports ------------------------------------------------------------


@dataclass
class Transport:
    """A FIFO path (File) or a ``multiprocessing.Queue`` (Local), made by the harness."""

    kind: str  # "file" or "local"
    path: str = ""
    queue: Any = None

    def close(self) -> None:
        if self.kind == "file":
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
        else:
            self.queue.close()
            self.queue.join_thread()


def new_transport(kind: str, workdir: str, name: str) -> Transport:
    if kind == "file":
        return Transport("file", path=os.path.join(workdir, f"{name}.fifo"))
    return Transport("local", queue=multiprocessing.get_context("fork").Queue())


def _accepts(callable_: Any, parameter: str) -> bool:
    return parameter in inspect.signature(callable_).parameters


def make_server(
    timer: ModuleType, transport: Transport, max_interval: float | None, **extra: Any
) -> Any:
    """
    The transport's server, with the class's default ``max_interval`` if None. A server that
    can be told not to signal its own process after a reap (ours: ``signal_self``) is told so;
    torch's cannot, so servers that may reap run in children that survive it. ``extra``
    keywords go to the server as they are (ours only: the diagnostics).
    """
    kwargs: dict[str, Any] = dict(extra)
    if max_interval is not None:
        kwargs["max_interval"] = max_interval
    if transport.kind == "file":
        if _accepts(timer.FileTimerServer, "signal_self"):
            kwargs["signal_self"] = False
        return timer.FileTimerServer(transport.path, "bench", **kwargs)
    return timer.LocalTimerServer(transport.queue, **kwargs)


def make_client(timer: ModuleType, transport: Transport, sig: int = signal.SIGKILL) -> Any:
    if transport.kind == "file":
        return timer.FileTimerClient(transport.path, signal=sig)
    return timer.LocalTimerClient(transport.queue)


def wait_for_reader(transport: Transport, timeout: float = 10.0) -> None:
    """Returns once the FIFO has a reader, so that the first request is not refused."""
    if transport.kind != "file":
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(transport.path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            if time.monotonic() > deadline:
                raise ChildError(f"no server reads {transport.path}") from None
            time.sleep(0.005)
        else:
            os.close(fd)
            return


def _poke(conn: Connection, timer: ModuleType, transport: Transport) -> None:
    make_client(timer, transport).release("bench-poke")
    if transport.kind == "local":
        transport.queue.close()
        transport.queue.join_thread()
    reply(conn)


def poke(timer: ModuleType, transport: Transport) -> None:
    """
    Sends one release (of a timer that does not exist) from a short-lived child: torch's File
    server does nothing at all until a first client opens its FIFO.
    """
    child = spawn("poke", _poke, timer, transport)
    try:
        child.recv(30.0)
    finally:
        child.finish()


# -- measurements ----------------------------------------------------------------------------


def process_cpu() -> float:
    """CPU seconds of this process, all threads, user and system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def server_threads_cpu() -> float:
    """
    CPU seconds of this process's threads other than the calling one (the harness's agent in
    a server process, which only sleeps through a window): the server's own threads, from
    ``/proc/self/task/*/schedstat`` (nanoseconds, not ticks).
    """
    me = threading.get_native_id()
    total = 0
    for tid in os.listdir("/proc/self/task"):
        if int(tid) == me:
            continue
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as schedstat:
                total += int(schedstat.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):  # the thread has just ended
            pass
    return total / 1e9


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def at_depth(depth: int, function: Callable[[], Any]) -> Any:
    """Calls ``function`` with ``depth`` more frames on the stack."""
    if depth <= 0:
        return function()
    return at_depth(depth - 1, function)


def quantile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile; +inf samples (censored) sort last."""
    xs = sorted(samples)
    if not xs:
        return math.nan
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    frac = pos - lo
    if frac == 0.0 or xs[lo] == xs[hi]:
        return xs[lo]
    if math.isinf(xs[hi]):
        return math.inf
    return xs[lo] + (xs[hi] - xs[lo]) * frac


def median(samples: Sequence[float]) -> float:
    return quantile(samples, 0.5)


# -- results ---------------------------------------------------------------------------------


@dataclass
class Target:
    """What the issue asks. ``min_speedup``: how many times better ours must be than torch's;
    ``ours_max``: a bound on ours' figure in the metric's unit."""

    text: str
    min_speedup: float | None = None
    ours_max: float | None = None


STATS: dict[str, float] = {"median": 0.5, "p50": 0.5, "p99": 0.99}


@dataclass
class Metric:
    """
    One row of the report: samples of both sides in the row's unit, summarised by ``stat``.

    A sample of +inf was censored: the measurement gave up at ``*_cap`` (same unit), so the
    summary is then a lower bound. A figure under ``resolution`` is reported as below it.
    """

    family: str
    key: str
    title: str
    unit: str
    torch: list[float]
    ours: list[float]
    better: str = "lower"  # "lower", "higher", or "none" (counts: no ratio)
    stat: str = "median"
    target: Target | None = None
    torch_cap: float | None = None
    ours_cap: float | None = None
    resolution: float = 0.0
    notes: str = ""
    raw: dict[str, Any] = field(default_factory=dict)  # more data for results.json

    def value(self, side: str) -> float:
        return quantile(self.torch if side == "torch" else self.ours, STATS[self.stat])

    def bounded(self, side: str) -> tuple[float, str]:
        """The summary and a qualifier: "" exact, ">" lower bound, "<" upper bound."""
        value = self.value(side)
        cap = self.torch_cap if side == "torch" else self.ours_cap
        if math.isinf(value):
            return (cap if cap is not None else math.inf), ">"
        if self.resolution and value < self.resolution:
            return self.resolution, "<"
        return value, ""

    def display(self, side: str) -> str:
        if not (self.torch if side == "torch" else self.ours):
            return "n/a"
        value, qualifier = self.bounded(side)
        if math.isnan(value):
            return "n/a"
        return f"{qualifier} {fmt(value)}".strip()

    def speedup(self) -> tuple[float, str] | None:
        """How many times better ours is (torch/ours, or ours/torch for rates), qualified."""
        if self.better == "none" or not self.torch or not self.ours:
            return None
        (t, tq), (o, oq) = self.bounded("torch"), self.bounded("ours")
        if math.isnan(t) or math.isnan(o) or t <= 0 or o <= 0 or math.isinf(t) or math.isinf(o):
            return None
        if self.better == "lower":
            ratio = t / o
            # torch at least t, or ours at most o: ours is at least this much better.
            lower = tq == ">" or oq == "<"
            upper = tq == "<" or oq == ">"
        else:
            ratio = o / t
            lower = oq == ">" or tq == "<"
            upper = oq == "<" or tq == ">"
        if lower and upper:
            return None
        return ratio, ">" if lower else "<" if upper else ""

    def verdict(self) -> str:
        if self.target is None:
            return ""
        outcomes = []
        if self.target.min_speedup is not None:
            speedup = self.speedup()
            if speedup is None:
                outcomes.append("?")
            else:
                ratio, qualifier = speedup
                if ratio >= self.target.min_speedup:
                    outcomes.append("met" if qualifier in ("", ">") else "?")
                else:
                    outcomes.append("MISSED" if qualifier in ("", "<") else "?")
        if self.target.ours_max is not None:
            if not self.ours:
                outcomes.append("?")
            else:
                value, qualifier = self.bounded("ours")
                if value <= self.target.ours_max:
                    outcomes.append("met" if qualifier in ("", "<") else "?")
                else:
                    outcomes.append("MISSED" if qualifier in ("", ">") else "?")
        if "MISSED" in outcomes:
            return "MISSED"
        return "?" if "?" in outcomes else "met"


def fmt(value: float) -> str:
    """Three significant figures, without exponents for everyday magnitudes."""
    if math.isinf(value):
        return "inf"
    if value == int(value) and abs(value) < 1e15:  # counts
        return f"{value:,.0f}"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    if magnitude >= 0.001:
        return f"{value:.3g}"
    return f"{value:.2e}"
