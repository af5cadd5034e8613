"""The job's hang report at 16,384 ranks: from the claim to the report written, over a real
TCPStore (torch's libuv server) on this machine, with the bytes through the store.

``python benches/hang_scale.py [--hosts N] [--ranks-per-host N] [--connections N]
[--scattered N] [--out DIR]``

Simulated hosts (2,048 of 8 ranks by default) on threads of this process, every rank with a
two-thread faulthandler dump. Two jobs: one culprit (every rank in all_reduce but one, which
loads a batch), and a pathological one (``--scattered`` ranks, 1,000 by default, each in a
different place of the code, the others in all_reduce). Each host waits on its wake key as
an agent's listener does, then builds its contribution (its ranks' stacks fingerprinted and
grouped) and publishes it (one append, one add); host 0 claims, wakes every host (one
multi_set), gathers, builds the report and writes it to the store. Measured: the seconds from
the claim to the report written, the bytes the claim, the contributions and the report put
through the store, and the report's size.

How it differs from a real job: the hosts share ``--connections`` store connections (torch's
client looks up its socket's name when it connects, ~0.2 s here, so 2,048 connections would
take minutes to open): each connection waits for the wake keys of the hosts it stands for,
and publishes their contributions one after another. The hosts' work runs on this machine's
cores, under one interpreter lock, where 2,048 real hosts would run it in parallel; the store
is a loopback away, where a real one is a network round trip away.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from torch._C._distributed_c10d import TCPStore

from elastic_timer.hang_report import (
    Keys,
    RankStacks,
    Report,
    build_report,
    claim,
    contribution,
    gather,
    publish,
    wake_all,
)

C10D = "/usr/lib/python3/site-packages/torch/distributed/distributed_c10d.py"
IN_ALL_REDUCE = [(C10D, 4181, "all_reduce"), ("/job/train.py", 37, "main")]
LOADER_THREAD = [("/usr/lib/python3.11/threading.py", 320, "wait")]


def dump(frames: list[tuple[str, int, str]], ids: int) -> str:
    """A faulthandler dump: the rank's main thread and a loader thread."""
    blocks = []
    for number, thread in enumerate((frames, LOADER_THREAD)):
        header = "Current thread" if number == 0 else "Thread"
        lines = [f"{header} 0x{ids + number:016x} (most recent call first):"]
        lines += [f'  File "{path}", line {line} in {func}' for path, line, func in thread]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def ranks_of(host: int, per_host: int, elsewhere: set[int]) -> list[RankStacks]:
    """A host's ranks: in all_reduce, or each in a place of its own."""
    ranks = []
    for local in range(per_host):
        rank = host * per_host + local
        frames = IN_ALL_REDUCE
        if rank in elsewhere:
            frames = [("/job/train.py", 1000 + rank, "load_batch"), ("/job/train.py", 36, "main")]
        ranks.append(RankStacks(rank, 100_000 + rank, ("train.py#36",), dump(frames, rank << 4)))
    return ranks


def run(hosts: int, per_host: int, connections: int, elsewhere: set[int]) -> dict[str, Any]:
    """One hang of a simulated job; the figures of its report."""
    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    clients = [
        TCPStore("127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=120))
        for _ in range(connections + 1)
    ]
    keys = Keys(0)
    listening = threading.Barrier(connections + 1)
    failures: list[BaseException] = []

    def stand_for(connection: int) -> None:
        """The hosts this connection stands for: wait for the claim, then contribute."""
        store = clients[connection + 1]
        mine = [h for h in range(1, hosts) if h % connections == connection]
        try:
            listening.wait()
            if mine:
                store.wait([keys.wake(h) for h in mine], timedelta(seconds=120))
            for host in mine:
                share = contribution(
                    f"host{host}", host, ranks_of(host, per_host, elsewhere), trigger=False
                )
                publish(store, share, keys)
        except BaseException as err:  # reported by the main thread
            failures.append(err)

    threads = [threading.Thread(target=stand_for, args=(c,)) for c in range(connections)]
    for thread in threads:
        thread.start()
    listening.wait()
    store = clients[0]
    started = time.monotonic()
    assert claim(store, "host0", keys)
    wake_all(store, hosts, "host0", keys)
    publish(store, contribution("host0", 0, ranks_of(0, per_host, elsewhere), trigger=True), keys)
    shares = gather(store, hosts, 120.0, keys)
    gathered = time.monotonic()
    report: Report = build_report(shares, expected_hosts=hosts)
    written = json.dumps(report)
    store.set(keys.report, written)
    elapsed = time.monotonic() - started
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    claim_bytes = sum(len(keys.wake(h)) + len("host0") for h in range(hosts))
    return {
        "hosts": hosts,
        "ranks": hosts * per_host,
        "connections": connections,
        "ranks_elsewhere": len(elsewhere),
        "seconds_claim_to_report": elapsed,
        "seconds_claim_to_gathered": gathered - started,
        "bytes_claim": claim_bytes,
        "bytes_contributions": len(store.get(keys.reports)),
        "bytes_report": len(written),
        "bytes_every_stack": sum(
            len(r.stacks or "") for h in range(hosts) for r in ranks_of(h, per_host, elsewhere)
        ),
        "groups": len(report["groups"]) + report["summarised"]["groups"],
        "groups_listed": len(report["groups"]),
        "suspects": len(report["suspects"]),
        "suspects_right": report["suspects"] == sorted(elsewhere),
        "missing_hosts": len(report["missing_hosts"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=2048)
    parser.add_argument("--ranks-per-host", type=int, default=8)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--scattered", type=int, default=1000, help="ranks each elsewhere")
    parser.add_argument("--out", type=Path, default=None, help="write results.json there")
    args = parser.parse_args()
    ranks = args.hosts * args.ranks_per_host
    # Spread over the job: every (ranks // scattered)-th rank.
    step = max(1, ranks // args.scattered)
    jobs = {
        "one culprit": {ranks // 2 + 3},
        "scattered": set(range(0, ranks, step)[: args.scattered]),
    }
    results = {}
    for name, elsewhere in jobs.items():
        results[name] = run(args.hosts, args.ranks_per_host, args.connections, elsewhere)
        figures = results[name]
        print(
            f"{name}: {figures['ranks']} ranks on {figures['hosts']} hosts "
            f"({figures['connections']} connections): report written "
            f"{figures['seconds_claim_to_report']:.2f} s after the claim (gathered in "
            f"{figures['seconds_claim_to_gathered']:.2f} s); through the store: claim "
            f"{figures['bytes_claim']} B, contributions {figures['bytes_contributions']} B "
            f"(every stack: {figures['bytes_every_stack']} B), report "
            f"{figures['bytes_report']} B; {figures['groups']} groups, "
            f"{figures['groups_listed']} listed, {figures['suspects']} suspects "
            f"({'right' if figures['suspects_right'] else 'WRONG'})",
            flush=True,
        )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    if not all(f["suspects_right"] and not f["missing_hosts"] for f in results.values()):
        sys.exit("a report named the wrong suspects or missed hosts")


if __name__ == "__main__":
    main()
