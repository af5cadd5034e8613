"""Soak: many clients acquiring and releasing timers for minutes, some hanging at random times.

    python benches/soak.py                      # 64 clients, 1000 pairs/s, 5 minutes, 3 hang
    python benches/soak.py --clients 16 --rate 500 --duration 10 --json   # tests/test_soak.py

A ``FileTimerServer`` (``signal_self=False``) runs in a process of its own, so its memory and
CPU are its own. Each client process paces ``with expires(after=30): ...`` blocks (one
acquire and one release each) at ``rate / clients`` per second. ``--hung`` of them, at random
times, acquire a short timer instead and hang. Checked at the end, and printed:

- every hung client is reaped (SIGKILL), soon after its deadline;
- no healthy client is touched (each exits 0);
- every request a client sent is counted: the server's ``stats()["requests"]`` equals the
  clients' own count, with nothing malformed or refused and no timer left;
- the server's RSS is flat after a warm-up.

Exits 1 if a check fails. Every request names a client this script started; nothing else is
ever signalled.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import time
from typing import Any

from elastic_timer import FileTimerClient, expires

CTX = mp.get_context("fork")
HEALTHY_AFTER = 30.0  # a healthy block's timer: never reached
HUNG_AFTER = 0.5  # a hung client's timer
REAP_SLACK = 0.5  # a hung client must be dead within this of its deadline
RSS_GROWTH_LIMIT_KIB = 4 * 1024  # after the warm-up

SERVER_SCRIPT = """
import json, sys
from elastic_timer import FileTimerServer

server = FileTimerServer(sys.argv[1], "soak", max_interval=1, signal_self=False)
server.start()
print("ready", flush=True)
for _ in sys.stdin:
    print(json.dumps(server.stats()), flush=True)
server.stop()
"""


def client(
    path: str,
    rate: float,
    start: float,
    end: float,
    hang_at: float | None,
    sent: Any,
    slot: int,
    hung_since: Any,
    latencies: Any,
) -> None:
    """Paces acquire/release pairs at ``rate`` per second from ``start`` to ``end`` (wall
    clock); counts in ``sent[slot]`` each request the server accepted from it. With
    ``hang_at``, acquires a ``HUNG_AFTER`` timer at that time and hangs (until killed)."""
    timer_client = FileTimerClient(path)
    own: list[float] = []
    next_at = start
    while True:
        now = time.time()
        if now >= end:
            break
        if hang_at is not None and now >= hang_at:
            acquired = time.time()
            timer_client.acquire("hang", acquired + HUNG_AFTER)
            sent[slot] += 1
            hung_since[slot] = acquired
            time.sleep(end - now + 60)  # the server kills it long before
            return
        began = time.perf_counter()
        with expires(after=HEALTHY_AFTER, client=timer_client):
            acquired = time.perf_counter()
        released = time.perf_counter()
        sent[slot] += 2
        own += [acquired - began, released - acquired]
        next_at += 1.0 / rate
        delay = next_at - time.time()
        if delay > 0:
            time.sleep(delay)
    latencies.put(own)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def soak(
    clients: int, rate: float, duration: float, hung: int, seed: int, path: str
) -> dict[str, Any]:
    """Runs one soak and returns its figures and checks."""
    rng = random.Random(seed)
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdin is not None and server.stdout is not None
    processes: list[Any] = []
    try:
        if server.stdout.readline() != "ready\n":
            raise RuntimeError("the server did not start")

        def stats() -> dict[str, int]:
            assert server.stdin is not None and server.stdout is not None
            server.stdin.write("stats\n")
            server.stdin.flush()
            result: dict[str, int] = json.loads(server.stdout.readline())
            return result

        sent = CTX.RawArray("q", clients)
        hung_since = CTX.RawArray("d", clients)
        latencies = CTX.Queue()
        start = time.time() + 0.5
        end = start + duration
        hung_slots = set(rng.sample(range(clients), hung))
        hang_at = {slot: start + rng.uniform(0.2, 0.8) * duration for slot in sorted(hung_slots)}
        for slot in range(clients):
            process = CTX.Process(
                target=client,
                args=(
                    path,
                    rate / clients,
                    start,
                    end,
                    hang_at.get(slot),
                    sent,
                    slot,
                    hung_since,
                    latencies,
                ),
                daemon=True,
            )
            process.start()
            processes.append(process)

        samples: list[tuple[float, int, float]] = []  # (seconds since start, RSS KiB, CPU s)
        deaths: dict[int, float] = {}
        next_sample = start
        while time.time() < end + 1.0 or len(deaths) < hung:
            now = time.time()
            for slot in hung_slots - deaths.keys():
                if processes[slot].exitcode is not None:
                    deaths[slot] = now
            if now >= next_sample:
                samples.append((now - start, rss_kib(server.pid), cpu_seconds(server.pid)))
                next_sample += max(1.0, duration / 100)
            if now > end + 30:
                break
            time.sleep(0.01)

        healthy_latencies: list[float] = []
        for _ in range(clients - hung):
            healthy_latencies += latencies.get(timeout=30)
        for process in processes:
            process.join(10)
        total_sent = sum(sent)
        deadline = time.monotonic() + 10
        final = stats()
        while final["requests"] < total_sent and time.monotonic() < deadline:
            time.sleep(0.05)
            final = stats()

        warm = [rss for at, rss, _ in samples if at >= min(10.0, duration * 0.2)]
        reap_delays = {
            slot: deaths[slot] - hung_since[slot] - HUNG_AFTER
            for slot in hung_slots
            if slot in deaths and hung_since[slot] > 0
        }
        healthy = [p for slot, p in enumerate(processes) if slot not in hung_slots]
        checks = {
            "every hung client reaped by SIGKILL": all(
                processes[slot].exitcode == -signal.SIGKILL for slot in hung_slots
            ),
            f"each reaped within {REAP_SLACK} s of its deadline": len(reap_delays) == hung
            and all(0 <= d <= REAP_SLACK for d in reap_delays.values()),
            "no healthy client touched": all(p.exitcode == 0 for p in healthy),
            "every request counted": final["requests"] == total_sent,
            "nothing malformed or refused": final["malformed"] == final["refused"] == 0,
            "server reaped exactly the hung clients": final["reaped"] == hung,
            "no timer left": final["live_timers"] == 0,
            f"server RSS flat (< {RSS_GROWTH_LIMIT_KIB} KiB growth after warm-up)": bool(warm)
            and max(warm) - min(warm) < RSS_GROWTH_LIMIT_KIB,
        }
        elapsed = samples[-1][0] if samples else duration
        return {
            "clients": clients,
            "rate_pairs_per_s": rate,
            "duration_s": duration,
            "hung": hung,
            "requests_sent": total_sent,
            "requests_counted": final["requests"],
            "achieved_pairs_per_s": (total_sent - hung) / 2 / duration,
            "server_stats": final,
            "reap_delay_s": sorted(reap_delays.values()),
            "client_send_latency_s": {
                "p50": percentile(healthy_latencies, 0.5),
                "p99": percentile(healthy_latencies, 0.99),
                "max": max(healthy_latencies, default=float("nan")),
            },
            "server_rss_kib": {
                "first": samples[0][1] if samples else None,
                "warm_min": min(warm, default=None),
                "warm_max": max(warm, default=None),
                "last": samples[-1][1] if samples else None,
            },
            "server_cpu_s": samples[-1][2] if samples else None,
            "server_cpu_percent": 100 * samples[-1][2] / elapsed if samples and elapsed else None,
            "checks": checks,
            "ok": all(checks.values()),
        }
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join(10)
        if server.stdin is not None:
            server.stdin.close()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rate", type=float, default=1000, help="pairs per second, in all")
    parser.add_argument("--duration", type=float, default=300, help="seconds")
    parser.add_argument("--hung", type=int, default=3, help="clients that hang")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fifo", default=None, help="default: a fresh path in /tmp")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    path = args.fifo or f"/tmp/elastic-timer-soak-{os.getpid()}.fifo"
    result = soak(args.clients, args.rate, args.duration, args.hung, args.seed, path)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            if key == "checks":
                for check, passed in value.items():
                    print(f"  [{'ok' if passed else 'FAILED'}] {check}")
            else:
                print(f"{key}: {value}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
