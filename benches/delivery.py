"""
Benchmark 5: signal delivery, from a timer's expiration time to the worker receiving the
server's SIGTERM (what the server itself adds to a reap, without the kernel's teardown of
the worker that ``reap.py`` includes).

Every worker is forked before the measurement starts, blocks SIGTERM, and waits. The harness
then tells them to start one after another (a random gap around ``STAGGER``, so expirations
fall at every phase of torch's polling loop, and the harness forks nothing meanwhile). A
started worker enters ``expires(after=AFTER)`` with the side's File client, asking for
SIGTERM, and waits for it in ``sigtimedwait``; it reports ``time.time()`` at its return minus
the expiration time its client was given (both wall clock, in the same process). A worker
that gets nothing ``cap`` seconds after its expiration reports a censored sample (+inf).

The server runs in a child of the harness that ignores SIGTERM (torch's File server signals
its own process after every pass that reaped); ours is told not to (``signal_self=False``).
The Local transport is not measured: its servers always send SIGKILL, which cannot be waited
for.
"""

from __future__ import annotations

import random
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from types import ModuleType

from . import common
from .reap import _Recording
from .reap import _server as reap_server

AFTER = 0.2
SCOPE = "delivery"
STAGGER = 0.25  # mean gap between two workers' starts (s)
READY_TIMEOUT = 60.0


@dataclass(frozen=True)
class Config:
    key: str
    title: str
    max_interval: float | None  # None: the class default (10 s)

    def cap(self, sizes: common.Sizes) -> float:
        """How long a worker waits past its expiration (s), as ``reap.py`` caps its own."""
        return sizes.reap_cap_default if self.max_interval is None else sizes.reap_cap


CONFIGS = [
    Config("0.1", "max_interval=0.1", 0.1),
    Config("1", "max_interval=1", 1.0),
    Config("default", "max_interval=10 (default)", None),
]


def _worker(conn: Connection, timer: ModuleType, transport: common.Transport, cap: float) -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    expiration: list[float] = []
    client = _Recording(common.make_client(timer, transport, signal.SIGTERM), expiration.append)
    common.reply(conn)
    common.command(conn, READY_TIMEOUT + cap)  # start
    with timer.expires(after=AFTER, scope=SCOPE, client=client):
        got = signal.sigtimedwait({signal.SIGTERM}, AFTER + cap)
        received = time.time()
    common.reply(conn, (received - expiration[0]) * 1000.0 if got is not None else float("inf"))


def _measure(side: common.Side, config: Config, sizes: common.Sizes, workdir: str) -> list[float]:
    rng = random.Random(5)
    transport = common.new_transport("file", workdir, f"delivery-{side.key}")
    server = common.spawn(
        f"{side.key} server", reap_server, side.module, transport, config.max_interval, {}
    )
    workers: list[common.Child] = []
    try:
        server.recv(30.0)
        common.wait_for_reader(transport)
        for i in range(sizes.reap_workers):
            workers.append(
                common.spawn(
                    f"{side.key} worker {i}", _worker, side.module, transport, config.cap(sizes)
                )
            )
        for worker in workers:
            worker.recv(READY_TIMEOUT)
        for worker in workers:
            worker.send("start")
            time.sleep(STAGGER * (0.5 + rng.random()))
        limit = AFTER + config.cap(sizes) + 30.0
        return [float(worker.recv(limit)) for worker in workers]
    finally:
        for worker in workers:
            worker.finish()
        server.send("stop")
        server.finish()
        transport.close()


def run(sides: list[common.Side], sizes: common.Sizes, workdir: str) -> list[common.Metric]:
    metrics: list[common.Metric] = []
    for config in CONFIGS:
        samples: dict[str, list[float]] = {"torch": [], "ours": []}
        failures: list[str] = []
        for side in sides:
            try:
                samples[side.key] = _measure(side, config, sizes, workdir)
            except common.ChildError as err:
                failures.append(f"{side.label}: {str(err).splitlines()[-1]}")
                common.progress(f"delivery {config.key} {side.label} FAILED: {err}")
            lat = samples[side.key]
            common.progress(
                f"delivery {config.key} {side.label}: {len(lat)} workers, "
                f"p50 {common.fmt(common.quantile(lat, 0.5))} ms, "
                f"p99 {common.fmt(common.quantile(lat, 0.99))} ms, "
                f"censored {sum(1 for x in lat if x == float('inf'))}"
            )
        notes = f"expires(after={AFTER}), SIGTERM awaited in sigtimedwait"
        if failures:
            notes += "; failed: " + "; ".join(failures)
        for stat, target in (("p50", None), ("p99", common.Target("ours <= 0.5 ms", ours_max=0.5))):
            metrics.append(
                common.Metric(
                    family="delivery",
                    key=f"delivery.{config.key}.{stat}",
                    title=f"deadline to signal {stat}, File, {config.title}",
                    unit="ms",
                    torch=samples["torch"],
                    ours=samples["ours"],
                    stat=stat,
                    target=target,
                    torch_cap=config.cap(sizes) * 1000.0,
                    ours_cap=config.cap(sizes) * 1000.0,
                    notes=notes,
                )
            )
    return metrics
