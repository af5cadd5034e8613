"""
Benchmarks 3 and 5: a File server's throughput under many clients, and the CPU a started
server burns while nothing happens.

Throughput: one server process, N client processes that send acquire/release pairs (expiring
in an hour: nothing expires while the server lives) as fast as they can, all released at
once. Clients count what they sent and what failed (torch's client raises BlockingIOError
when the FIFO is full; the failure is counted and the client goes on). The server process
samples its request counter every 10 ms; the rate is the requests it counted over the time
from the start until its counter reached its final value.

CPU: server processes with the class defaults (File, ``max_interval=10``), each poked by one
client so that torch's loop runs (it blocks in ``open`` until a client comes). Inside the
process, the thread that started the server sleeps through the window and then sums the CPU
of the other threads (the server's: torch's watchdog thread; our native loop and reporter)
from ``/proc/self/task/*/schedstat``; ``getrusage`` for the whole process is in the notes (it
adds the measuring thread's own wake-up, ~0.1 ms). Idle, and with live timers
registered through ``register_timers`` for pids of sleeping children of the harness, expiring
in an hour. All servers of a repetition are measured over the same window; torch's File loop
runs one pass every ~10 s, and the window starts 1 s after the loop began, so it holds
torch's first pass.
"""

from __future__ import annotations

import os
import signal
import time
from multiprocessing.connection import Connection
from types import ModuleType
from typing import Any

from . import common

MAX_INTERVAL = 0.1  # throughput servers: the shortest EOF sleep of torch's File server
SAMPLE_PERIOD = 0.01  # the throughput server looks at its counter this often
SETTLE = 1.0  # the throughput server gives up this long after its counter last moved
CPU_SETTLE = 1.0  # the CPU window starts this long after the servers' loops began
REP_TIMEOUT = 60.0
SCOPE = "bench"
CPU_SLEEPERS = 32  # the pids that own the registered timers
REGISTER_BATCH = 1000


# -- throughput ------------------------------------------------------------------------------


def _throughput_server(conn: Connection, timer: ModuleType, transport: common.Transport) -> None:
    server = common.make_server(timer, transport, MAX_INTERVAL)
    server.start()
    cpu_start = common.process_cpu()
    common.reply(conn)
    count, changed = 0, time.time()
    expected: int | None = None
    give_up = time.time() + REP_TIMEOUT
    while True:
        if expected is None and conn.poll(SAMPLE_PERIOD):
            expected = int(common.command(conn, 0.0)[1])
            give_up = time.time() + REP_TIMEOUT / 2
        elif expected is not None:
            time.sleep(SAMPLE_PERIOD)
        now, current = time.time(), int(server._request_count)
        if current != count:
            count, changed = current, now
        if expected is not None and (count >= expected or now - changed > SETTLE or now > give_up):
            break
    common.reply(conn, {"count": count, "done": changed, "cpu": common.process_cpu() - cpu_start})


def _throughput_client(
    conn: Connection, timer: ModuleType, transport: common.Transport, pairs: int, go: int
) -> None:
    client = common.make_client(timer, transport)
    expiration = time.time() + 3600
    common.reply(conn)
    os.read(go, 1)
    sent = errors = 0
    for _ in range(pairs):
        try:
            client.acquire(SCOPE, expiration)
            sent += 1
        except OSError:
            errors += 1
        try:
            client.release(SCOPE)
            sent += 1
        except OSError:
            errors += 1
    common.reply(conn, {"sent": sent, "errors": errors, "end": time.time()})


def _throughput_rep(side: common.Side, clients: int, pairs: int, workdir: str) -> dict[str, float]:
    transport = common.new_transport("file", workdir, f"throughput-{side.key}")
    server = common.spawn(f"{side.key} server", _throughput_server, side.module, transport)
    children: list[common.Child] = []
    go_read, go_write = os.pipe()
    try:
        server.recv(30.0)
        common.wait_for_reader(transport)
        for i in range(clients):
            children.append(
                common.spawn(
                    f"{side.key} client {i}",
                    _throughput_client,
                    side.module,
                    transport,
                    pairs,
                    go_read,
                )
            )
        for child in children:
            child.recv(30.0)
        start = time.time()
        os.write(go_write, b"x" * clients)
        results = [child.recv(REP_TIMEOUT) for child in children]
        sent = sum(r["sent"] for r in results)
        server.send(("expect", sent))
        counted = server.recv(REP_TIMEOUT)
        return {
            "sent": sent,
            "errors": sum(r["errors"] for r in results),
            "counted": counted["count"],
            "server_rate": counted["count"] / max(1e-9, counted["done"] - start),
            "client_rate": sent / max(1e-9, max(r["end"] for r in results) - start),
            "server_cpu_us_per_request": counted["cpu"] / max(1, counted["count"]) * 1e6,
        }
    finally:
        os.close(go_read)
        os.close(go_write)
        for child in children:
            child.finish()
        server.finish()
        transport.close()


def _column(samples: dict[str, list[dict[str, float]]], side: str, name: str) -> list[float]:
    return [r[name] for r in samples[side]]


def _median(samples: dict[str, list[dict[str, float]]], side: str, name: str) -> str:
    return common.fmt(common.median(_column(samples, side, name)))


def _lost(samples: dict[str, list[dict[str, float]]], side: str) -> list[float]:
    return [r["sent"] - r["counted"] for r in samples[side]]


def run_throughput(
    sides: list[common.Side], sizes: common.Sizes, workdir: str
) -> list[common.Metric]:
    metrics: list[common.Metric] = []
    for clients in sizes.tp_clients:
        samples: dict[str, list[dict[str, float]]] = {side.key: [] for side in sides}
        failures: list[str] = []
        for rep in range(sizes.reps):
            for side in sides:
                try:
                    result = _throughput_rep(side, clients, sizes.tp_pairs, workdir)
                except common.ChildError as err:
                    failures.append(f"{side.label}: {str(err).splitlines()[-1]}")
                    common.progress(f"throughput {clients} clients {side.label} FAILED: {err}")
                    continue
                samples[side.key].append(result)
                common.progress(
                    f"throughput {clients} clients {side.label} rep {rep + 1}/{sizes.reps}: "
                    f"{result['server_rate']:,.0f} req/s counted, sent {result['sent']:.0f}, "
                    f"errors {result['errors']:.0f}, counted {result['counted']:.0f}"
                )

        total = clients * sizes.tp_pairs * 2
        raw: dict[str, Any] = {"requests_per_repetition": total, "samples": samples}
        notes = (
            f"{clients} clients x {sizes.tp_pairs} acquire/release pairs, File server "
            f"max_interval={MAX_INTERVAL}; accepted by the FIFO per s (client side): "
            f"torch {_median(samples, 'torch', 'client_rate')}, "
            f"ours {_median(samples, 'ours', 'client_rate')}; server CPU per request: "
            f"torch {_median(samples, 'torch', 'server_cpu_us_per_request')} us, "
            f"ours {_median(samples, 'ours', 'server_cpu_us_per_request')} us"
        )
        if failures:
            notes += "; failed repetitions: " + "; ".join(failures)
        metrics.append(
            common.Metric(
                family="throughput",
                key=f"throughput.{clients}_clients.rate",
                title=f"File server throughput, {clients} clients",
                unit="req/s",
                torch=_column(samples, "torch", "server_rate"),
                ours=_column(samples, "ours", "server_rate"),
                better="higher",
                target=common.Target(">= 10x", min_speedup=10),
                notes=notes,
                raw=raw,
            )
        )
        metrics.append(
            common.Metric(
                family="throughput",
                key=f"throughput.{clients}_clients.errors",
                title=f"client errors per repetition ({total} requests), {clients} clients",
                unit="requests",
                torch=_column(samples, "torch", "errors"),
                ours=_column(samples, "ours", "errors"),
                better="none",
                target=common.Target("ours 0", ours_max=0),
            )
        )
        metrics.append(
            common.Metric(
                family="throughput",
                key=f"throughput.{clients}_clients.lost",
                title=f"requests lost (sent, never counted), {clients} clients",
                unit="requests",
                torch=_lost(samples, "torch"),
                ours=_lost(samples, "ours"),
                better="none",
                target=common.Target("ours 0", ours_max=0),
                notes=(
                    "requests the clients sent without error minus requests the server "
                    "counted; negative for torch: its client raises BlockingIOError from the "
                    "first flush, and the flush inside close() may then get the line through"
                ),
            )
        )
    return metrics


# -- CPU of a started server -----------------------------------------------------------------


def register_far_timers(
    timer: ModuleType, server: Any, count: int, pids: list[int], expiration: float
) -> float:
    """Registers ``count`` timers of the given pids, batch by batch; CPU seconds it took."""
    cpu = 0.0
    for first in range(0, count, REGISTER_BATCH):
        batch = [
            timer.FileTimerRequest(pids[i % len(pids)], f"scope-{i}", expiration, signal.SIGKILL)
            for i in range(first, min(count, first + REGISTER_BATCH))
        ]
        start = time.process_time()
        server.register_timers(batch)
        cpu += time.process_time() - start
    return cpu


def measure_window(conn: Connection, window: float) -> None:
    """
    Child side of a CPU window: waits for "measure", then sleeps through the window. Reports
    the CPU of the server's threads (all but this one) and of the whole process.
    """
    common.command(conn, REP_TIMEOUT + window)
    wall_start = time.monotonic()
    threads_start, process_start = common.server_threads_cpu(), common.process_cpu()
    time.sleep(window)
    threads, process = (
        common.server_threads_cpu() - threads_start,
        common.process_cpu() - process_start,
    )
    common.reply(
        conn, {"cpu": threads, "process_cpu": process, "wall": time.monotonic() - wall_start}
    )


def _cpu_server(
    conn: Connection,
    timer: ModuleType,
    transport: common.Transport,
    timers: int,
    pids: list[int],
    window: float,
) -> None:
    server = common.make_server(timer, transport, None)
    register_far_timers(timer, server, timers, pids, time.time() + 3600)
    server.start()
    common.reply(conn)
    measure_window(conn, window)
    common.command(conn, REP_TIMEOUT)  # leave: the process's end stops the server


def run_window(
    servers: list[common.Child],
    transports: list[common.Transport],
    sides: list[common.Side],
    settle: float,
    window: float,
) -> list[dict[str, float]]:
    """Pokes started servers, lets them settle, and measures all of them over one window."""
    for server in servers:
        server.recv(REP_TIMEOUT)
    for transport, side in zip(transports, sides):
        common.wait_for_reader(transport)
        common.poke(side.module, transport)
    time.sleep(settle)
    for server in servers:
        server.send("measure")
    results = [server.recv(REP_TIMEOUT + window) for server in servers]
    for server in servers:
        server.send("leave")
    return results


def run_cpu(sides: list[common.Side], sizes: common.Sizes, workdir: str) -> list[common.Metric]:
    cases = [0, sizes.cpu_timers]
    per_10s: dict[tuple[str, int], list[float]] = {
        (side.key, n): [] for side in sides for n in cases
    }
    process_per_10s: dict[tuple[str, int], list[float]] = {key: [] for key in per_10s}
    failures: list[str] = []
    settle = CPU_SETTLE
    sleepers = common.spawn_sleepers(CPU_SLEEPERS, 3600.0)
    pids = [child.pid for child in sleepers]
    try:
        for rep in range(sizes.reps):
            servers: list[common.Child] = []
            transports: list[common.Transport] = []
            window_sides: list[common.Side] = []
            keys: list[tuple[str, int]] = []
            try:
                for n in cases:
                    for side in sides:
                        transport = common.new_transport("file", workdir, f"cpu-{side.key}-{n}")
                        transports.append(transport)
                        window_sides.append(side)
                        keys.append((side.key, n))
                        servers.append(
                            common.spawn(
                                f"{side.key} server ({n} timers)",
                                _cpu_server,
                                side.module,
                                transport,
                                n,
                                pids,
                                sizes.cpu_window,
                            )
                        )
                results = run_window(servers, transports, window_sides, settle, sizes.cpu_window)
            except common.ChildError as err:
                failures.append(str(err).splitlines()[-1])
                common.progress(f"server CPU rep {rep + 1} FAILED: {err}")
                continue
            finally:
                for server in servers:
                    server.finish()
                for transport in transports:
                    transport.close()
            for key, result in zip(keys, results):
                per_10s[key].append(result["cpu"] / result["wall"] * 10.0 * 1000.0)
                process_per_10s[key].append(result["process_cpu"] / result["wall"] * 10.0 * 1000.0)
            common.progress(
                f"server CPU rep {rep + 1}/{sizes.reps}: "
                + ", ".join(f"{k[0]}/{k[1]} timers {per_10s[k][-1]:.2f} ms" for k in keys)
            )
    finally:
        for child in sleepers:
            child.kill()
            child.wait(10.0)
    metrics = []
    for n in cases:
        label = "idle" if n == 0 else f"{n:,} live timers"
        notes = (
            f"File server, class defaults (max_interval=10), {sizes.cpu_window:g} s window "
            f"starting {settle:g} s after its loop began; CPU of the server's threads (the "
            f"measuring thread, asleep, excluded) per 10 s; whole process (getrusage): torch "
            f"{common.fmt(common.median(process_per_10s[('torch', n)]))} ms, ours "
            f"{common.fmt(common.median(process_per_10s[('ours', n)]))} ms"
        )
        if failures:
            notes += "; failed repetitions: " + "; ".join(failures)
        metrics.append(
            common.Metric(
                family="cpu",
                key=f"cpu.{'idle' if n == 0 else f'{n}_timers'}",
                title=f"CPU of a started server, {label}",
                unit="ms CPU/10 s",
                torch=per_10s[("torch", n)],
                ours=per_10s[("ours", n)],
                target=common.Target("ours <= 1/20 of torch", min_speedup=20),
                resolution=0.001,
                notes=notes,
                raw={"process_ms_per_10s": {k: process_per_10s[(k, n)] for k in ("torch", "ours")}},
            )
        )
    return metrics
