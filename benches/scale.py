"""
Benchmark 6: many live timers. Memory per timer, CPU per operation, and the CPU of a started
server holding the largest number.

For each size n, the torch and the ours server processes run at the same time (one core
each on a two-core machine), so both see the same machine. Each builds a File server with the
class defaults, unstarted, and registers n timers through ``register_timers`` (batches of
1000, pids of sleeping children of the harness, expiring in an hour):

- memory: RSS after minus RSS before the fill (after ``gc.collect()``), divided by n;
- fill: CPU of the ``register_timers`` calls only (building the request objects is not
  counted), per timer;
- release / acquire at size n: the CPU of releasing m random live timers (one call), then of
  acquiring them again, per operation.

At the largest size the servers are then started, poked by a client (torch's loop waits for
one), and measured like the CPU benchmark over ``scale_window`` seconds, starting 3 s after
the loop began so the window holds torch's first full pass (every ~10 s; a pass over 1M
timers takes seconds).
"""

from __future__ import annotations

import gc
import math
import random
import signal
import time
from multiprocessing.connection import Connection
from types import ModuleType
from typing import Any

from . import common
from .server import REGISTER_BATCH, measure_window, register_far_timers, run_window

SLEEPERS = 64
SETTLE = 3.0
LIMIT = 300.0  # a size's repetition never takes longer (torch at 1M needs ~10 s)


def _scale_server(
    conn: Connection,
    timer: ModuleType,
    transport: common.Transport,
    n: int,
    ops: int,
    pids: list[int],
    window: float,
) -> None:
    server = common.make_server(timer, transport, None)
    expiration = time.time() + 3600
    gc.collect()
    rss_before = common.rss_bytes()
    fill = register_far_timers(timer, server, n, pids, expiration)
    gc.collect()
    rss_after = common.rss_bytes()

    def request(i: int, expiration: float, sig: int) -> Any:
        return timer.FileTimerRequest(pids[i % len(pids)], f"scope-{i}", expiration, sig)

    chosen = random.Random(n).sample(range(n), ops)
    releases = [request(i, -1, 0) for i in chosen]
    acquires = [request(i, expiration + 1, signal.SIGKILL) for i in chosen]
    start = time.process_time()
    server.register_timers(releases)
    release = time.process_time() - start
    start = time.process_time()
    server.register_timers(acquires)
    acquire = time.process_time() - start
    stats = getattr(server, "stats", None)
    live = stats()["live_timers"] if stats is not None else len(server._timers)
    common.reply(
        conn,
        {
            "bytes_per_timer": (rss_after - rss_before) / n,
            "fill_us": fill / n * 1e6,
            "release_us": release / ops * 1e6,
            "acquire_us": acquire / ops * 1e6,
            "live": live,
        },
    )
    if window > 0:
        common.command(conn, LIMIT)  # start
        server.start()
        common.reply(conn)
        measure_window(conn, window)
        common.command(conn, LIMIT)  # leave: the process's end stops the server


def _repetition(
    sides: list[common.Side],
    n: int,
    sizes: common.Sizes,
    pids: list[int],
    workdir: str,
    window: float,
) -> dict[str, dict[str, float]]:
    ops = min(n, sizes.scale_ops)
    transports = [common.new_transport("file", workdir, f"scale-{side.key}") for side in sides]
    servers: list[common.Child] = []
    try:
        for side, transport in zip(sides, transports):
            servers.append(
                common.spawn(
                    f"{side.key} server ({n} timers)",
                    _scale_server,
                    side.module,
                    transport,
                    n,
                    ops,
                    pids,
                    window,
                )
            )
        results: dict[str, dict[str, float]] = {
            side.key: server.recv(LIMIT) for side, server in zip(sides, servers)
        }
        if window > 0:
            for server in servers:
                server.send("start")
            windows = run_window(servers, transports, sides, SETTLE, window)
            for side, measured in zip(sides, windows):
                results[side.key]["core_percent"] = measured["cpu"] / measured["wall"] * 100.0
                results[side.key]["process_core_percent"] = (
                    measured["process_cpu"] / measured["wall"] * 100.0
                )
        return results
    finally:
        for server in servers:
            server.finish()
        for transport in transports:
            transport.close()


def run(sides: list[common.Side], sizes: common.Sizes, workdir: str) -> list[common.Metric]:
    samples: dict[int, dict[str, list[dict[str, float]]]] = {
        n: {side.key: [] for side in sides} for n in sizes.scale_sizes
    }
    failures: list[str] = []
    largest = max(sizes.scale_sizes)
    sleepers = common.spawn_sleepers(SLEEPERS, 3600.0)
    pids = [child.pid for child in sleepers]
    try:
        for rep in range(sizes.reps):
            for n in sizes.scale_sizes:
                window = sizes.scale_window if n == largest else 0.0
                try:
                    results = _repetition(sides, n, sizes, pids, workdir, window)
                except common.ChildError as err:
                    failures.append(f"{n}: {str(err).splitlines()[-1]}")
                    common.progress(f"scale {n} rep {rep + 1} FAILED: {err}")
                    continue
                for key, result in results.items():
                    samples[n][key].append(result)
                common.progress(
                    f"scale {n:,} rep {rep + 1}/{sizes.reps}: "
                    + "; ".join(
                        f"{key} " + ", ".join(f"{k} {v:.3g}" for k, v in result.items())
                        for key, result in results.items()
                    )
                )
    finally:
        for child in sleepers:
            child.kill()
            child.wait(10.0)

    def column(n: int, side: str, name: str) -> list[float]:
        return [r[name] for r in samples[n][side] if name in r]

    metrics: list[common.Metric] = []
    fail_note = ("; failed repetitions: " + "; ".join(failures)) if failures else ""
    for n in sizes.scale_sizes:
        ops = min(n, sizes.scale_ops)
        fill_note = (
            f"fill (register_timers of new timers, batches of {REGISTER_BATCH}): "
            f"torch {common.fmt(common.median(column(n, 'torch', 'fill_us')))} us/timer, "
            f"ours {common.fmt(common.median(column(n, 'ours', 'fill_us')))} us/timer"
        )
        metrics.append(
            common.Metric(
                family="scale",
                key=f"scale.{n}.memory",
                title=f"memory per live timer, {n:,} timers",
                unit="B/timer",
                torch=column(n, "torch", "bytes_per_timer"),
                ours=column(n, "ours", "bytes_per_timer"),
                notes=f"RSS delta / n after filling; {fill_note}{fail_note}",
                raw={"samples": samples[n]},
            )
        )
        for op in ("acquire", "release"):
            metrics.append(
                common.Metric(
                    family="scale",
                    key=f"scale.{n}.{op}",
                    title=f"{op} CPU per op at {n:,} live timers",
                    unit="us/op",
                    torch=column(n, "torch", f"{op}_us"),
                    ours=column(n, "ours", f"{op}_us"),
                    notes=f"{ops:,} {op}s in one register_timers call",
                )
            )
    smallest = min(sizes.scale_sizes)
    log_growth = math.log(largest) / math.log(smallest)
    for op in ("acquire", "release"):
        growth = {
            side.key: _growth(
                column(smallest, side.key, f"{op}_us"), column(largest, side.key, f"{op}_us")
            )
            for side in sides
        }
        # torch's timers are a dict: O(1) per operation, so its growth is what the caches
        # alone cost at the larger size. O(log n) may grow by log n's growth on top of that.
        allowed = common.median(growth["torch"]) * log_growth if growth["torch"] else math.nan
        metrics.append(
            common.Metric(
                family="scale",
                key=f"scale.{op}_growth",
                title=f"{op} per-op cost growth, {smallest:,} -> {largest:,} timers",
                unit="x",
                torch=growth["torch"],
                ours=growth["ours"],
                better="none",
                target=common.Target(f"O(log n): ours <= {common.fmt(allowed)}x", ours_max=allowed),
                notes=(
                    f"per-op CPU at {largest:,} / median at {smallest:,}. torch keeps a dict "
                    f"(O(1) per op), so its growth is the cost of caches and memory at the "
                    f"larger size; the target allows ours that times the growth of log n "
                    f"({common.fmt(log_growth)}x)"
                ),
            )
        )
    metrics.append(
        common.Metric(
            family="scale",
            key=f"scale.{largest}.served_cpu",
            title=f"CPU of a started server holding {largest:,} live timers",
            unit="% of a core",
            torch=column(largest, "torch", "core_percent"),
            ours=column(largest, "ours", "core_percent"),
            target=common.Target("ours < 10 %", ours_max=10.0),
            resolution=0.001,
            notes=(
                f"File server, class defaults, {sizes.scale_window:g} s window from "
                f"{SETTLE:g} s after its loop began"
            ),
        )
    )
    return metrics


def _growth(small: list[float], large: list[float]) -> list[float]:
    """Each sample at the large size over the median at the small size."""
    if not small:
        return []
    base = common.median(small)
    return [x / base for x in large]
