"""
Benchmark 4: reap latency, from a timer's expiration time to the harness's ``waitpid``
seeing the worker die.

Three kinds of process: the harness (which forks every worker, so it is the one that waits
for them), the server (a child of the harness, started per configuration and side), and the
workers. A worker builds the side's client, enters ``expires(after=0.2)`` through a thin
wrapper of the client that first sends the expiration time it is given to the harness, and
sleeps. The harness polls the workers' pidfds; latency = time ``waitpid`` returned minus that
expiration time (both wall clock).

File workers ask to be reaped with SIGTERM, and the server process ignores SIGTERM: torch's
File server signals its own process after every pass that reaped, and must survive that to
reap the next worker. Ours is told not to (``signal_self=False``). The Local servers always
send SIGKILL.

Workers are started one after another with a random gap around ``stagger`` (their expirations
then fall at every phase of torch's polling loop; none starts from 50 ms before another
worker's expiration to 200 ms after it, since the harness does not watch while it forks), or
one at a time for torch's Local server at its default ``max_interval`` of 60 s: it checks for
expiries whenever a request arrives, so another worker's request would end its wait early. A
worker not reaped ``cap`` seconds after its expiration is killed by the harness and counted as
censored (its latency is "> cap").
Killed workers are not waited for until the server is gone, so their pids cannot be reused
while a server might still signal them.

A worker forked from the harness maps everything the harness maps (torch: ~500 MB), and the
kernel needs several milliseconds to tear such a process down once signalled: that floor,
measured as kill() to waitpid() of an idle child, is in the notes, and is part of every
figure of both sides. Real workers import torch too. To show what the server itself adds, one
more configuration (ours only) uses lean workers: fresh interpreters (fork + exec) that import
only the timer module.
"""

from __future__ import annotations

import importlib
import logging
import os
import random
import select
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from types import ModuleType
from typing import Any

from elastic_timer.options import env

from . import common

AFTER = 0.2  # the workers' timers: expires(after=AFTER)
SCOPE = "reap"
NO_EXPIRATION_LIMIT = 10.0  # a worker that has not acquired by then has failed
# No worker is forked from QUIET_BEFORE before another's expiration to QUIET_AFTER after it.
QUIET_BEFORE = 0.05
QUIET_AFTER = 0.2
SERVER_LIMIT = 600.0


@dataclass(frozen=True)
class Config:
    key: str
    title: str
    transport: str
    max_interval: float | None  # None: the class default (File 10 s, Local 60 s)
    stagger: float  # mean gap between worker starts (s); 0: one worker at a time
    default_interval: bool  # capped with Sizes.reap_cap_default instead of reap_cap
    lean: bool = False  # exec'd workers that import only the timer module (ours only)
    stack_dump: bool = False  # the server takes the workers' stacks first (ours, lean only)
    note: str = ""


CONFIGS = [
    Config("file_0.1", "File, max_interval=0.1", "file", 0.1, 0.25, False),
    Config("file_default", "File, max_interval=10 (default)", "file", None, 0.5, True),
    Config(
        "local_0.1",
        "Local, max_interval=0.1",
        "local",
        0.1,
        0.25,
        False,
        note=(
            "torch's Local loop waits max_interval from the last request it got, so with "
            "after=0.2 (two intervals) its checks often fall just after the expiration"
        ),
    ),
    Config("local_default", "Local, max_interval=60 (default)", "local", None, 0.0, True),
    Config(
        "file_lean",
        "File, lean worker (exec'd, elastic_timer only; ours only)",
        "file",
        0.1,
        0.25,
        False,
        lean=True,
    ),
    Config(
        "file_lean_stacks",
        "File, lean worker, stacks taken before the kill (ours only)",
        "file",
        0.1,
        0.25,
        False,
        lean=True,
        stack_dump=True,
        note="stack_dump=5: the worker's faulthandler dump is read before it is signalled",
    ),
]
STACK_DUMP_GRACE = 5.0
LEAN_CODE = "from benches.reap import lean_worker; lean_worker()"


class _Recording:
    """A client that first tells ``noted`` the expiration time it was asked for."""

    def __init__(self, client: Any, noted: Callable[[float], None]) -> None:
        self._client = client
        self._noted = noted

    def acquire(self, scope_id: str, expiration_time: float) -> None:
        self._noted(expiration_time)
        self._client.acquire(scope_id, expiration_time)

    def release(self, scope_id: str) -> None:
        self._client.release(scope_id)


def _worker(
    conn: Connection, timer: ModuleType, transport: common.Transport, lifetime: float
) -> None:
    client = _Recording(
        common.make_client(timer, transport, signal.SIGTERM), lambda t: common.reply(conn, t)
    )
    with timer.expires(after=AFTER, scope=SCOPE, client=client):
        time.sleep(lifetime)


def lean_worker() -> None:
    """An exec'd worker: ``sys.argv[1:] == [pipe fd, timer module, FIFO path, lifetime]``."""
    timer = importlib.import_module(sys.argv[2])
    conn = Connection(int(sys.argv[1]))
    common.run_child(
        conn, _worker, timer, common.Transport("file", path=sys.argv[3]), float(sys.argv[4])
    )


def _server(
    conn: Connection,
    timer: ModuleType,
    transport: common.Transport,
    max_interval: float | None,
    extra: dict[str, Any],
) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torch's File server signals itself
    # The stacks it takes are logged at WARNING: not what the benchmark's output is for.
    logging.getLogger("elastic_timer._server").setLevel(logging.ERROR)
    server = common.make_server(timer, transport, max_interval, **extra)
    server.start()
    common.reply(conn)
    common.command(conn, SERVER_LIMIT)  # stop: leaving the process ends the server


@dataclass
class _Worker:
    child: common.Child
    started: float  # monotonic
    expiration: float | None = None  # wall clock, as sent


def _death_due(workers: Iterable[_Worker]) -> bool:
    """
    Whether a worker may die any moment now. The harness does not fork then: forking a
    process that maps torch takes it milliseconds, during which it would not see the death.
    """
    now = time.time()
    return any(
        w.expiration is not None and -QUIET_BEFORE <= now - w.expiration <= QUIET_AFTER
        for w in workers
    )


@dataclass
class Outcome:
    latencies_ms: list[float] = field(default_factory=list)  # +inf: censored at the cap
    failures: list[str] = field(default_factory=list)
    not_started: int = 0


def _measure(side: common.Side, config: Config, sizes: common.Sizes, workdir: str) -> Outcome:
    cap = sizes.reap_cap_default if config.default_interval else sizes.reap_cap
    budget = sizes.reap_budget_default if config.stagger == 0 else None
    workers = sizes.reap_workers
    limit = workers * max(config.stagger * 1.5, AFTER + cap) + cap + 60.0
    rng = random.Random(4)
    transport = common.new_transport(config.transport, workdir, f"reap-{side.key}")
    outcome = Outcome()
    extra: dict[str, Any] = {}
    if config.stack_dump:
        # The server is the harness's child, not the workers' parent: they are told the
        # stacks directory in their environment, as workers of `elastic-timer serve` are.
        stacks_dir = os.path.join(workdir, f"stacks-{side.key}")
        extra = {"stack_dump": STACK_DUMP_GRACE, "stacks_dir": stacks_dir}
        os.environ[env("stacks_dir")] = stacks_dir
    server = common.spawn(
        f"{side.key} server", _server, side.module, transport, config.max_interval, extra
    )
    active: dict[int, _Worker] = {}  # by pidfd
    messages: dict[int, _Worker] = {}  # by pipe fd
    killed: list[common.Child] = []  # censored workers: waited for only once the server is gone
    try:
        server.recv(30.0)
        common.wait_for_reader(transport)
        begin = time.monotonic()
        next_start, launched = begin, 0
        while launched < workers or active:
            now = time.monotonic()
            if now - begin > limit:
                raise common.ChildError(f"reap run exceeded {limit:.0f} s")
            out_of_budget = budget is not None and now - begin >= budget
            if launched < workers and out_of_budget and not active:
                outcome.not_started = workers - launched
                break
            if (
                launched < workers
                and now >= next_start
                and not out_of_budget
                and (config.stagger > 0 or not active)
                and not _death_due(active.values())
            ):
                name = f"{side.key} worker {launched}"
                if config.lean:
                    lifetime = str(cap + 60.0)
                    module = side.module.__name__
                    child = common.spawn_exec(name, LEAN_CODE, module, transport.path, lifetime)
                else:
                    child = common.spawn(name, _worker, side.module, transport, cap + 60.0)
                worker = _Worker(child, time.monotonic())
                active[child.pidfd] = worker
                messages[child.conn.fileno()] = worker
                launched += 1
                next_start = now + config.stagger * (0.5 + rng.random())
            poller = select.poll()
            for fd in active:
                poller.register(fd, select.POLLIN)
            for fd in messages:
                poller.register(fd, select.POLLIN)
            wait = 0.05
            if launched < workers and (config.stagger > 0 or not active):
                wait = min(wait, max(0.0, next_start - time.monotonic()))
            events = poller.poll(wait * 1000.0)
            ready = {fd for fd, _ in events}
            for fd in ready & messages.keys():  # expirations first: a worker may also be dead
                worker = messages.pop(fd)
                try:
                    worker.expiration = float(worker.child.recv(0.0))
                except common.ChildError as err:  # the worker failed; its exit is handled below
                    outcome.failures.append(str(err).splitlines()[-1])
            for fd in ready & active.keys():
                worker = active.pop(fd)
                child = worker.child
                messages.pop(child.conn.fileno(), None)
                if worker.expiration is None and child.conn.poll(0):
                    try:
                        worker.expiration = float(child.recv(0.0))
                    except common.ChildError as err:
                        outcome.failures.append(str(err).splitlines()[-1])
                child.wait(0.0)
                died = time.time()
                status = child.status if child.status is not None else 0
                if worker.expiration is None:
                    outcome.failures.append(f"{child.name} died before acquiring")
                elif not os.WIFSIGNALED(status):
                    outcome.failures.append(f"{child.name} exited with status {status}")
                else:
                    outcome.latencies_ms.append((died - worker.expiration) * 1000.0)
            for fd, worker in list(active.items()):
                expired = worker.expiration is not None and time.time() > worker.expiration + cap
                stuck = (
                    worker.expiration is None
                    and time.monotonic() - worker.started > NO_EXPIRATION_LIMIT
                )
                if expired or stuck:
                    worker.child.kill()
                    killed.append(worker.child)
                    del active[fd]
                    messages.pop(worker.child.conn.fileno(), None)
                    if expired:
                        outcome.latencies_ms.append(float("inf"))
                    else:
                        outcome.failures.append(f"{worker.child.name} never acquired")
        return outcome
    finally:
        for worker in active.values():
            worker.child.kill()
            killed.append(worker.child)
        server.send("stop")
        server.finish()
        for child in killed:
            child.finish()
        transport.close()
        if config.stack_dump:
            os.environ.pop(env("stacks_dir"), None)
            dumped = _dumps_taken(extra["stacks_dir"])
            reaped = sum(1 for x in outcome.latencies_ms if x != float("inf"))
            if dumped < reaped:
                outcome.failures.append(f"stacks taken of {dumped} of {reaped} reaped workers")


def _dumps_taken(stacks_dir: str) -> int:
    """Workers whose stacks file has something in it (each worker has a file of its own)."""
    names = os.listdir(stacks_dir) if os.path.isdir(stacks_dir) else []
    paths = [os.path.join(stacks_dir, n) for n in names if n.endswith(".stacks")]
    return sum(1 for path in paths if os.path.getsize(path) > 0)


LEAN_SLEEPER = (
    "import sys; from multiprocessing.connection import Connection; "
    "from benches.common import run_child, sleeper; "
    "run_child(Connection(int(sys.argv[1])), sleeper, 60.0)"
)


def _floor(samples: int, lean: bool) -> list[float]:
    """kill() to waitpid() of an idle child: what a reap costs at the very least (ms)."""
    floor = []
    for i in range(samples):
        if lean:
            child = common.spawn_exec(f"lean floor {i}", LEAN_SLEEPER)
        else:
            child = common.spawn(f"floor {i}", common.sleeper, 60.0)
        child.recv(30.0)
        time.sleep(0.02)
        start = time.time()
        os.kill(child.pid, signal.SIGTERM)
        child.wait(30.0)
        floor.append((time.time() - start) * 1000.0)
    return floor


def _describe(outcome: Outcome, cap: float) -> str:
    censored = sum(1 for x in outcome.latencies_ms if x == float("inf"))
    text = f"{len(outcome.latencies_ms)} workers, {censored} censored at {cap:g} s"
    if outcome.not_started:
        text += f", {outcome.not_started} not started (time budget)"
    if outcome.failures:
        text += f", failures: {'; '.join(outcome.failures[:3])}"
    return text


def run(sides: list[common.Side], sizes: common.Sizes, workdir: str) -> list[common.Metric]:
    metrics: list[common.Metric] = []
    floors = {lean: _floor(min(20, sizes.reap_workers * 2), lean) for lean in (False, True)}
    floor_notes = {
        lean: (
            f"floor (harness kill() to waitpid() of an idle {kind}): "
            f"p50 {common.fmt(common.quantile(floor, 0.5))} ms, "
            f"p99 {common.fmt(common.quantile(floor, 0.99))} ms"
        )
        for (lean, floor), kind in zip(
            floors.items(), ("child forked from the harness (maps torch)", "exec'd child")
        )
    }
    for note in floor_notes.values():
        common.progress("reap: " + note)
    for config in CONFIGS:
        cap = sizes.reap_cap_default if config.default_interval else sizes.reap_cap
        outcomes: dict[str, Outcome] = {"torch": Outcome(), "ours": Outcome()}
        for side in sides:
            if config.lean and side.key != "ours":
                continue
            try:
                outcome = _measure(side, config, sizes, workdir)
            except common.ChildError as err:
                outcome = Outcome(failures=[str(err).splitlines()[-1]])
                common.progress(f"reap {config.key} {side.label} FAILED: {err}")
            outcomes[side.key] = outcome
            lat = outcome.latencies_ms
            common.progress(
                f"reap {config.key} {side.label}: {len(lat)} workers, "
                f"p50 {common.fmt(common.quantile(lat, 0.5))} ms, "
                f"p99 {common.fmt(common.quantile(lat, 0.99))} ms, "
                f"censored {sum(1 for x in lat if x == float('inf'))}, "
                f"failures {len(outcome.failures)}"
            )

        floor = common.quantile(floors[config.lean], 0.5)
        notes = f"expires(after={AFTER}); " + (f"{config.note}; " if config.note else "")
        for side in sides:
            if config.lean and side.key != "ours":
                continue
            outcome = outcomes[side.key]
            notes += (
                f"{side.label}: {_describe(outcome, cap)}, p50 - floor p50 = "
                f"{common.fmt(common.quantile(outcome.latencies_ms, 0.5) - floor)} ms; "
            )
        notes += floor_notes[config.lean]
        # The 10 ms target is for the reap itself; a stack dump adds its own time on purpose.
        p99_target = None if config.stack_dump else common.Target("ours <= 10 ms", ours_max=10.0)
        for stat, target in (("p50", None), ("p99", p99_target)):
            metrics.append(
                common.Metric(
                    family="reap",
                    key=f"reap.{config.key}.{stat}",
                    title=f"reap latency {stat}, {config.title}",
                    unit="ms",
                    torch=outcomes["torch"].latencies_ms,
                    ours=outcomes["ours"].latencies_ms,
                    stat=stat,
                    target=target,
                    torch_cap=cap * 1000.0,
                    ours_cap=cap * 1000.0,
                    notes=notes,
                    raw={"floor_ms": floors[config.lean]} if stat == "p50" else {},
                )
            )
    return metrics
