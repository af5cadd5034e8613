"""
Benchmarks 1 and 2: the worker's cost of one ``with expires(after=60): pass`` block.

Each repetition forks a server (class of the side under test, in its own process) and a client
process that runs blocks for a fixed time and reports the time per block. The Local client's
figure includes flushing the queue (``close()`` + ``join_thread()``): torch's ``put`` only hands
the request to a feeder thread, whose pickling and writing are part of the cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from types import ModuleType

from . import common

# The servers' poll interval (torch's File server sleeps this long, up to 1 s, whenever the
# FIFO has no writer; 0.1 is what torch's own tests use and the kindest to it).
MAX_INTERVAL = 0.1
WARMUP_BLOCKS = 10
CHUNK = 10  # blocks between two looks at the clock
DEEP = 50  # extra frames for the deep-stack case
REP_TIMEOUT = 60.0  # a repetition never takes longer (timers are for 60 s: none expires)


@dataclass(frozen=True)
class Case:
    key: str
    title: str
    transport: str  # "file" or "local"
    scope: str | None  # None: expires() finds the default scope itself
    depth: int
    target: common.Target


CASES = [
    Case(
        "client.default_scope.shallow",
        "expires() block, default scope, File client, shallow stack",
        "file",
        None,
        0,
        common.Target(">= 100x", min_speedup=100),
    ),
    Case(
        "client.default_scope.deep",
        f"expires() block, default scope, File client, {DEEP} frames deeper",
        "file",
        None,
        DEEP,
        common.Target(">= 400x", min_speedup=400),
    ),
    Case(
        "client.default_scope.local",
        "expires() block, default scope, Local client (+ queue flush)",
        "local",
        None,
        0,
        common.Target(">= 100x", min_speedup=100),
    ),
    Case(
        "client.explicit_scope.file",
        "expires() block, explicit scope, File client",
        "file",
        "bench",
        0,
        common.Target(">= 5x", min_speedup=5),
    ),
    Case(
        "client.explicit_scope.local",
        "expires() block, explicit scope, Local client (+ queue flush)",
        "local",
        "bench",
        0,
        common.Target(">= 5x", min_speedup=5),
    ),
]


def _server(conn: Connection, timer: ModuleType, transport: common.Transport) -> None:
    server = common.make_server(timer, transport, MAX_INTERVAL)
    server.start()
    common.reply(conn)
    common.command(conn, REP_TIMEOUT)  # stop: leaving the process ends the server's threads


def _client(
    conn: Connection,
    timer: ModuleType,
    transport: common.Transport,
    case: Case,
    seconds: float,
    max_blocks: int,
) -> None:
    timer.configure(common.make_client(timer, transport))
    expires = timer.expires
    scope = case.scope

    def run() -> dict[str, float]:
        errors = 0
        for _ in range(WARMUP_BLOCKS):
            with expires(after=60, scope=scope):
                pass
        blocks = 0
        start, cpu_start = time.perf_counter(), time.process_time()
        while blocks < max_blocks:
            for _ in range(CHUNK):
                try:
                    with expires(after=60, scope=scope):
                        pass
                except OSError:  # torch's File client: BlockingIOError when the FIFO is full
                    errors += 1
            blocks += CHUNK
            if time.perf_counter() - start >= seconds:
                break
        if transport.kind == "local":  # wait for the feeder (if any) to write everything
            transport.queue.close()
            transport.queue.join_thread()
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
        return {"blocks": blocks, "wall": wall, "cpu": cpu, "errors": errors}

    common.reply(conn, common.at_depth(case.depth, run))


def _repetition(
    side: common.Side, case: Case, sizes: common.Sizes, workdir: str
) -> dict[str, float]:
    transport = common.new_transport(case.transport, workdir, f"client-{side.key}")
    server = common.spawn(f"{side.key} server", _server, side.module, transport)
    client = None
    try:
        server.recv(30.0)
        common.wait_for_reader(transport)
        client = common.spawn(
            f"{side.key} client",
            _client,
            side.module,
            transport,
            case,
            sizes.block_seconds,
            sizes.block_max,
        )
        result: dict[str, float] = client.recv(REP_TIMEOUT)
        return result
    finally:
        if client is not None:
            client.finish()
        server.send("stop")
        server.finish()
        transport.close()


def run(sides: list[common.Side], sizes: common.Sizes, workdir: str) -> list[common.Metric]:
    metrics = []
    for case in CASES:
        per_block: dict[str, list[float]] = {side.key: [] for side in sides}
        cpu: dict[str, list[float]] = {side.key: [] for side in sides}
        errors: dict[str, float] = {side.key: 0 for side in sides}
        blocks: dict[str, float] = {side.key: 0 for side in sides}
        failures: list[str] = []
        for rep in range(sizes.reps):
            for side in sides:
                try:
                    result = _repetition(side, case, sizes, workdir)
                except common.ChildError as err:
                    failures.append(f"{side.label}: {str(err).splitlines()[-1]}")
                    common.progress(f"{case.key} {side.label} rep {rep + 1} FAILED: {err}")
                    continue
                per_block[side.key].append(result["wall"] / result["blocks"] * 1e6)
                cpu[side.key].append(result["cpu"] / result["blocks"] * 1e6)
                errors[side.key] += result["errors"]
                blocks[side.key] += result["blocks"]
                common.progress(
                    f"{case.key} {side.label} rep {rep + 1}/{sizes.reps}: "
                    f"{per_block[side.key][-1]:.2f} us/block over {result['blocks']:.0f} blocks, "
                    f"{result['errors']:.0f} errors"
                )
        notes = [
            "CPU/block (client process, all threads): "
            f"torch {common.fmt(common.median(cpu['torch']))} us, "
            f"ours {common.fmt(common.median(cpu['ours']))} us",
            f"blocks failed with OSError: torch {errors['torch']:.0f}/{blocks['torch']:.0f}, "
            f"ours {errors['ours']:.0f}/{blocks['ours']:.0f}",
        ]
        if failures:
            notes.append("failed repetitions: " + "; ".join(failures))
        metrics.append(
            common.Metric(
                family="client",
                key=case.key,
                title=case.title,
                unit="us/block",
                torch=per_block["torch"],
                ours=per_block["ours"],
                target=case.target,
                notes="; ".join(notes),
                raw={"cpu_us_per_block": cpu, "errors": errors, "blocks": blocks},
            )
        )
    return metrics
