"""The job's hang report: stacks fingerprinted and grouped, suspects chosen, and the protocol
over a real torch TCPStore on 127.0.0.1 (bounded waits, a store that is gone, a few hundred
simulated hosts). The end-to-end test with real torchrun agents is in test_torchrun.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from helpers import faulthandler_dump, wait_for
from torch._C._distributed_c10d import PrefixStore, TCPStore

from elastic_timer import FileTimerServer, hang_report
from elastic_timer.hang_report import (
    GENERATION,
    MAX_DETAILS,
    MAX_GROUPS,
    MAX_PLACES,
    MAX_STACK,
    Collectives,
    CollectivesMissing,
    Contribution,
    Group,
    HangReporter,
    Keys,
    RankStacks,
    Report,
    build_report,
    choose_suspects,
    claim,
    contribution,
    fingerprint,
    format_report,
    gather,
    publish,
)

C10D = "/site-packages/torch/distributed/distributed_c10d.py"


IN_ALL_REDUCE = [(C10D, 4181, "all_reduce"), ("/job/train.py", 37, "main")]
IN_BARRIER = [(C10D, 4900, "barrier"), ("/job/train.py", 39, "main")]
LOADING = [("/job/train.py", 24, "load_batch"), ("/job/train.py", 36, "main")]
LOADER_THREAD = [("/usr/lib/python3.11/threading.py", 320, "wait")]
IN_BACKWARD = [
    ("/site-packages/torch/autograd/graph.py", 1113, "_engine_run_backward"),
    ("/site-packages/torch/autograd/__init__.py", 395, "backward"),
    ("/job/train.py", 41, "main"),
]


# -- fingerprints and groups ----------------------------------------------------------------


def test_a_fingerprint_ignores_thread_ids_and_their_order() -> None:
    one = faulthandler_dump(IN_ALL_REDUCE, LOADER_THREAD, ids=0x7F00)
    other = faulthandler_dump(LOADER_THREAD, IN_ALL_REDUCE, ids=0x5500)
    assert one != other
    assert fingerprint(one) == fingerprint(other)
    assert fingerprint(one) != fingerprint(faulthandler_dump(LOADING, LOADER_THREAD))
    moved = [(C10D, 4182, "all_reduce"), ("/job/train.py", 37, "main")]
    assert fingerprint(one) != fingerprint(faulthandler_dump(moved, LOADER_THREAD))


def test_a_dump_taken_twice_has_the_fingerprint_of_one() -> None:
    """A worker asked for its stacks by its own expiry and by another host's report appends
    two dumps to its file (seen in a loaded run): it still groups with its peers."""
    once = faulthandler_dump(IN_ALL_REDUCE)
    assert fingerprint(once + once) == fingerprint(once)
    assert fingerprint(once + faulthandler_dump(LOADING)) != fingerprint(once)


def test_py_spy_dumps_are_read_too() -> None:
    py_spy = (
        'Thread 4242 (idle): "MainThread"\n'
        f"    all_reduce ({C10D}:4181)\n"
        "    main (/job/train.py:37)\n"
    )
    assert hang_report.threads(py_spy) == [IN_ALL_REDUCE]
    assert fingerprint(py_spy) == fingerprint(faulthandler_dump(IN_ALL_REDUCE))
    assert hang_report.collective(py_spy) == "all_reduce"


def test_a_host_contributes_one_stack_per_group_and_names_ranks_without_stacks() -> None:
    ranks = [
        RankStacks(0, 100, ("s",), faulthandler_dump(IN_ALL_REDUCE, ids=0x1000)),
        RankStacks(1, 101, (), faulthandler_dump(IN_ALL_REDUCE, ids=0x2000)),
        RankStacks(3, 103, ("s",), faulthandler_dump(LOADING)),
        RankStacks(2, 102, (), None),
        RankStacks(4, 104, (), ""),  # a dump that came back empty
    ]
    share = contribution("h", 0, ranks, trigger=True)
    assert share["unanswered"] == [2, 4]
    assert [(g["ranks"], g["pids"]) for g in share["groups"]] == [
        ([0, 1], [100, 101]),
        ([3], [103]),
    ]
    assert share["groups"][0]["stack"] == ranks[0].stacks  # one stack, not one per rank
    assert share["groups"][0]["scopes"] == ["s"]


def group(ranks: list[int], frames: list[tuple[str, int, str]]) -> Group:
    """The two keys of a group the suspects are chosen by."""
    return cast(
        Group, {"ranks": ranks, "collective": hang_report.collective(faulthandler_dump(frames))}
    )


def test_the_suspects_are_the_ranks_not_in_the_collective_the_majority_waits_in() -> None:
    assert choose_suspects([group([0, 1, 2], IN_ALL_REDUCE), group([3], LOADING)]) == [3]
    # Fewer ranks wait than not: still the ones outside the collective.
    assert choose_suspects([group([0], IN_ALL_REDUCE), group([1, 2], LOADING)]) == [1, 2]
    # Everyone in a collective, one in another: a mismatch, and that rank is the suspect.
    assert choose_suspects([group([0, 1, 2], IN_ALL_REDUCE), group([5], IN_BARRIER)]) == [5]
    # Nobody in a collective: the ranks outside a strictly largest group; a tie names nobody.
    assert choose_suspects([group([0, 1], LOADING), group([2], LOADER_THREAD)]) == [2]
    assert choose_suspects([group([0], LOADING), group([1], LOADER_THREAD)]) == []
    assert choose_suspects([group([0, 1], IN_ALL_REDUCE)]) == []
    # A backward pass waits too (a DDP model's all-reduce runs in it), even one to one.
    assert hang_report.collective(faulthandler_dump(IN_BACKWARD)) == "backward"
    assert choose_suspects([group([0], IN_BACKWARD), group([1], LOADING)]) == [1]
    assert choose_suspects([group([0, 1, 2], IN_BACKWARD), group([3], LOADING)]) == [3]


def test_the_report_merges_hosts_and_names_those_that_did_not_answer() -> None:
    shares = [
        contribution(
            "a", 0, [RankStacks(0, 1, (), faulthandler_dump(IN_ALL_REDUCE))], trigger=True
        ),
        contribution(
            "b",
            1,
            [
                RankStacks(2, 3, (), faulthandler_dump(IN_ALL_REDUCE)),
                RankStacks(3, 4, ("x",), faulthandler_dump(LOADING)),
            ],
            trigger=False,
        ),
    ]
    report = build_report(shares, expected_hosts=3)
    assert report["suspects"] == [3]
    assert report["missing_hosts"] == [2]
    assert report["triggered_by"] == ["a"]
    waiting, suspect = report["groups"]
    assert (waiting["ranks"], waiting["hosts"], waiting["where"]) == (
        [0, 2],
        ["a", "b"],
        "in all_reduce",
    )
    # Each rank's pid and host, beside its rank, whichever host's line came first.
    assert (waiting["pids"], waiting["rank_hosts"]) == ([1, 3], [0, 1])
    assert (suspect["ranks"], suspect["suspect"], suspect["where"]) == (
        [3],
        True,
        "in load_batch (train.py:24)",
    )
    text = format_report(report)
    assert text.startswith(
        "Hang report: 3 rank(s) from 2 of 3 host(s), in 2 group(s); suspects: rank 3"
    )
    assert "hosts (group ranks) that did not answer: 2" in text
    assert "group 2: rank(s) 3 on b, in load_batch (train.py:24)  <- suspect" in text
    assert 'File "/job/train.py", line 24 in load_batch' in text
    json.dumps(report)  # what the event log gets


def test_the_report_stays_bounded_whatever_the_job_does() -> None:
    """1,000 ranks each in a different place beside 1,048 waiting in all_reduce, each with its
    Flight Recorder summary: the report lists MAX_GROUPS groups (the largest, then suspects),
    counts the others with their places, keeps MAX_DETAILS ranks' collectives a group, and
    names every rank and suspect somewhere."""
    elsewhere = range(0, 2000, 2)
    ranks = [
        RankStacks(
            rank,
            10_000 + rank,
            (),
            faulthandler_dump(
                [("/job/train.py", 1000 + rank, "step"), ("/job/train.py", 9, "main")]
            )
            if rank in elsewhere
            else faulthandler_dump(IN_ALL_REDUCE, ids=rank),
            summary(5, 4),
        )
        for rank in range(2048)
    ]
    shares = [
        contribution(f"host{h}", h, ranks[h * 8 : h * 8 + 8], trigger=h == 0) for h in range(256)
    ]
    report = build_report(shares, expected_hosts=256)
    assert report["suspects_from"] == "stacks"  # every rank enqueued #5: no one behind
    assert report["suspects"] == list(elsewhere)
    listed, summarised = report["groups"], report["summarised"]
    assert len(listed) == MAX_GROUPS
    assert listed[0]["ranks"] == sorted(set(range(2048)) - set(elsewhere))
    assert not listed[0]["suspect"] and all(g["suspect"] for g in listed[1:])
    assert summarised["groups"] == 1001 - MAX_GROUPS
    assert summarised["suspects"] == len(summarised["ranks"]) == 1000 - (MAX_GROUPS - 1)
    every = sorted([r for g in listed for r in g["ranks"]] + summarised["ranks"])
    assert every == list(range(2048))
    assert len(summarised["places"]) == MAX_PLACES
    assert all((p["groups"], p["ranks"]) == (1, 1) for p in summarised["places"])
    assert len(listed[0]["collectives"]) == MAX_DETAILS
    assert listed[0]["details_omitted"] == 1048 - MAX_DETAILS
    # The bound: the listed groups' stacks and details, and one integer per rank.
    size = len(json.dumps(report))
    assert size < MAX_GROUPS * 2_000 + MAX_DETAILS * 300 + 2048 * 8 + 256 * 12, size
    text = format_report(report)
    assert text.startswith(
        "Hang report: 2048 rank(s) from 256 of 256 host(s), in 1001 group(s); suspects: rank 0,"
    )
    assert f"and {1000 - 32} more\n" in text
    assert f"  and {1001 - MAX_GROUPS} more group(s) of {1000 - (MAX_GROUPS - 1)} rank(s)" in text
    assert f"    (collectives of {1048 - MAX_DETAILS} more rank(s) left out)" in text


def test_a_stack_past_the_bound_is_cut_but_grouped_by_all_of_it() -> None:
    """A process with 400 threads: its stack is cut at MAX_STACK bytes (saying so), and it
    still groups with its peers by the whole stack."""
    deep = faulthandler_dump(IN_ALL_REDUCE, *([LOADER_THREAD] * 400))
    assert len(deep) > 2 * MAX_STACK
    share = contribution(
        "h", 0, [RankStacks(0, 1, (), deep), RankStacks(1, 2, (), deep)], trigger=True
    )
    [group] = share["groups"]
    assert group["ranks"] == [0, 1]
    assert len(group["stack"]) <= MAX_STACK + 60
    kept, note = group["stack"].rsplit("... ", 1)
    assert deep.startswith(kept)
    assert note == f"{len(deep) - len(kept)} more bytes of stacks cut\n"
    assert build_report([share], expected_hosts=1)["groups"][0]["where"] == "in all_reduce"


# -- over a real TCPStore -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tcp_store(port: int = 0) -> TCPStore:
    """The store's server (port 0) or a client of it, on 127.0.0.1."""
    return TCPStore(
        "127.0.0.1",
        port,
        is_master=port == 0,
        wait_for_workers=False,
        timeout=timedelta(seconds=10),
    )


def test_the_first_host_to_claim_writes_the_report() -> None:
    server = tcp_store()
    store = PrefixStore("round-1/", tcp_store(server.port))
    assert claim(store, "a")
    assert not claim(store, "b")
    assert not claim(store, "a-again")


def empty_share(host: int) -> Contribution:
    return contribution(str(host), host, [], trigger=False)


def test_gathering_waits_for_every_host_but_no_longer_than_its_timeout() -> None:
    server = tcp_store()
    store = tcp_store(server.port)
    for host in range(2):
        publish(store, empty_share(host))
    started = time.monotonic()
    assert len(gather(store, 2, timeout=30)) == 2
    assert time.monotonic() - started < 1.0  # all there: no waiting
    started = time.monotonic()
    shares = gather(store, 3, timeout=0.5)
    assert 0.5 <= time.monotonic() - started < 3.0
    assert [s["host"] for s in shares] == ["0", "1"]
    late = threading.Timer(0.3, publish, (tcp_store(server.port), empty_share(2)))
    late.start()
    assert len(gather(store, 3, timeout=30)) == 3  # woken by the count, not the timeout
    late.join()


def reporter(
    store: Any,
    ranks: dict[int, int],
    stacks: dict[int, str],
    peeked: list[float] | None = None,
    **kwargs: Any,
) -> tuple[HangReporter, list[Report]]:
    """A host's reporter; ``peeked`` gets the times its ranks' stacks are taken."""
    reports: list[Report] = []

    def peek(pids: list[int]) -> list[tuple[int, str | None]]:
        if peeked is not None:
            peeked.append(time.monotonic())
        return [(pid, stacks.get(pid)) for pid in pids]

    return (
        HangReporter(
            store=store,
            workers=lambda: ranks,
            peek=peek,
            emit=reports.append,
            grace=0.5,
            patience=1.0,
            poll=0.05,
            **{"collectives": lambda pid, timeout: None, **kwargs},
        ),
        reports,
    )


def test_two_hosts_report_once_and_the_other_host_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    """Host 1's rank times out; host 0 had no expiry but sees the trigger and contributes."""
    server = tcp_store()
    first, first_reports = reporter(
        tcp_store(server.port),
        {11: 2, 12: 3},
        {11: faulthandler_dump(IN_ALL_REDUCE), 12: faulthandler_dump(LOADING)},
        group_rank=1,
        group_world_size=2,
    )
    other, other_reports = reporter(
        tcp_store(server.port),
        {21: 0, 22: 1},
        {21: faulthandler_dump(IN_ALL_REDUCE), 22: faulthandler_dump(IN_ALL_REDUCE)},
        group_rank=0,
        group_world_size=2,
    )
    other.start()
    first.start()
    first.expiring(12, ["train.py#36"])
    first.close()
    other.close()
    (report,) = first_reports
    assert other_reports == []  # one report for the job
    assert report["suspects"] == [3]
    assert report["missing_hosts"] == []
    assert report["groups"][1]["scopes"] == ["train.py#36"]
    store = tcp_store(server.port)
    assert json.loads(store.get(Keys(0).report)) == report
    assert store.add(GENERATION, 0) == 1  # the next hang (after a restart) gets new keys
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Hang report")]
    assert len(logged) == 2  # both agents log it
    # The worker group restarts over the same store (static rendezvous): the new agents'
    # servers do not take the last hang's trigger for a new one.
    restarted, restarted_reports = reporter(
        tcp_store(server.port), {31: 0}, {31: "x"}, group_rank=0, group_world_size=2
    )
    restarted.start()
    restarted.close()  # it looks for a trigger once more as it closes
    assert restarted_reports == []
    assert store.add(Keys(0).count, 0) == 2  # it did not join the last hang's report
    assert store.add(Keys(1).count, 0) == 0


def test_a_host_whose_store_is_gone_reports_its_own_ranks() -> None:
    """The store's host (another agent) has exited: the report says so, at once."""
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, datetime, torch.distributed as d\n"
            "s = d.TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False)\n"
            "print(s.port, flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None
        port = int(owner.stdout.readline())
        store = tcp_store(port)
        owner.send_signal(signal.SIGKILL)
        assert owner.wait(10) == -signal.SIGKILL
        host, reports = reporter(
            store, {5: 0}, {5: faulthandler_dump(LOADING)}, group_rank=0, group_world_size=4
        )
        host.start()
        started = time.monotonic()
        host.expiring(5, ["s"])
        host.close()
        assert time.monotonic() - started < 5.0
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
    (report,) = reports
    assert report["store_gone"] is True
    assert report["hosts"] == 1
    assert report["groups"][0]["ranks"] == [0]
    assert "the job's store is gone" in format_report(report)


class CountingStore:
    """A store client that counts the requests made through it and its clones (by name)."""

    def __init__(self, store: Any, requests: list[str]) -> None:
        self._store = store
        self.requests = requests

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.requests.append(name)
            result = method(*args, **kwargs)
            return CountingStore(result, self.requests) if name == "clone" else result

        return counted


def listening(requests: list[str], times: int = 1) -> bool:
    return wait_for(lambda: requests.count("wait") >= times)


def test_a_claim_reaches_every_host_within_half_a_second() -> None:
    """Four hosts wait on their wake keys, each over its own connection; one host's rank
    expires: every host takes its ranks' stacks within 0.5 s of it."""
    server = tcp_store()
    hosts: list[HangReporter] = []
    peeked: list[list[float]] = []
    requests: list[list[str]] = []
    for number in range(4):
        requests.append([])
        peeked.append([])
        host, _ = reporter(
            CountingStore(tcp_store(server.port), requests[-1]),
            {100 + number: number},
            {100 + number: faulthandler_dump(IN_ALL_REDUCE)},
            peeked[-1],
            group_rank=number,
            group_world_size=4,
        )
        host.start()
        hosts.append(host)
    assert all(listening(r) for r in requests)
    expired = time.monotonic()
    hosts[2].expiring(102, ["train.py#37"])
    assert wait_for(lambda: all(peeked))
    latest = max(p[0] for p in peeked) - expired
    assert latest < 0.5, latest
    for host in hosts:
        host.close()
    # The others wait for the report as they waited for the claim: one request, no polling.
    for number in (0, 1, 3):
        assert requests[number] == [
            *("add", "clone", "wait", "get"),  # the claim heard
            *("append", "add"),  # its share published
            *("wait", "get"),  # the report, once written
        ], requests[number]


def test_a_healthy_host_asks_the_store_nothing_and_stops_at_once() -> None:
    """Once its one waiting request is made, an idle reporter makes none for seconds; it
    stops within a second (its own wake key ends its wait); a short re-arm still hears a
    claim."""
    server = tcp_store()
    requests: list[str] = []
    idle, reports = reporter(
        CountingStore(tcp_store(server.port), requests),
        {5: 0},
        {5: "x"},
        group_rank=0,
        group_world_size=2,
    )
    idle.start()
    assert listening(requests)
    before = list(requests)
    window = time.monotonic() + 3.0
    while time.monotonic() < window:  # a window to count in: nothing is to happen in it
        time.sleep(0.1)
    assert requests == before == ["add", "clone", "wait"]
    started = time.monotonic()
    idle.close()
    assert time.monotonic() - started < 1.0
    assert reports == []
    # Its own stop is gone from the store: the next reporter of this generation listens.
    rearmed: list[str] = []
    peeked: list[float] = []
    again, _ = reporter(
        CountingStore(tcp_store(server.port), rearmed),
        {6: 0},
        {6: faulthandler_dump(IN_ALL_REDUCE)},
        peeked,
        group_rank=0,
        group_world_size=2,
        listen=0.2,
    )
    again.start()
    assert listening(rearmed, times=3)  # re-armed after each timeout
    other, _ = reporter(
        tcp_store(server.port),
        {7: 1},
        {7: faulthandler_dump(LOADING)},
        group_rank=1,
        group_world_size=2,
    )
    other.start()
    other.expiring(7, ["s"])
    assert wait_for(lambda: peeked)
    other.close()
    again.close()


HOSTS, RANKS_PER_HOST = 256, 8
# Store connections the simulated hosts share (a real host has one of its own). torch's
# client looks up its own socket's name when it connects, which takes ~0.15 s per
# connection here (no DNS), so 256 of them would take 40 s before the test begins.
CONNECTIONS = 16


def test_a_few_hundred_hosts_report_in_one_read(capsys: pytest.CaptureFixture[str]) -> None:
    """256 simulated hosts of 8 ranks each, every rank in all_reduce but rank 1234 (each rank
    with two threads' stacks), on threads of their own. Each host appends its one line and
    counts itself, and one host gathers: the time from the hosts' start to the report and the
    bytes through the store are what docs/hang-report.md gives."""
    server = tcp_store()
    connections = [tcp_store(server.port) for _ in range(CONNECTIONS)]
    clients = [connections[n % CONNECTIONS] for n in range(HOSTS)]
    suspect = 1234
    ready = threading.Barrier(HOSTS + 1)

    def host(number: int) -> None:
        ranks = []
        for local in range(RANKS_PER_HOST):
            rank = number * RANKS_PER_HOST + local
            frames = LOADING if rank == suspect else IN_ALL_REDUCE
            stacks = faulthandler_dump(frames, LOADER_THREAD, ids=0x7000 + rank)
            ranks.append(RankStacks(rank, 1000 + rank, ("train.py#36",), stacks))
        ready.wait()
        publish(clients[number], contribution(f"host{number}", number, ranks, trigger=False))

    threads = [threading.Thread(target=host, args=(n,)) for n in range(HOSTS)]
    for thread in threads:
        thread.start()
    ready.wait()
    started = time.monotonic()
    shares = gather(clients[0], HOSTS, timeout=60)
    report = build_report(shares, expected_hosts=HOSTS)
    elapsed = time.monotonic() - started
    for thread in threads:
        thread.join()
    assert report["suspects"] == [suspect]
    assert report["missing_hosts"] == []
    assert sum(len(g["ranks"]) for g in report["groups"]) == HOSTS * RANKS_PER_HOST
    gathered = len(clients[0].get(Keys().reports))
    report_bytes = len(json.dumps(report))
    assert clients[0].add(Keys().count, 0) == HOSTS
    assert elapsed < 30
    every_stack = HOSTS * RANKS_PER_HOST * len(faulthandler_dump(IN_ALL_REDUCE, LOADER_THREAD))
    assert gathered < every_stack / 4  # one stack per local group, not one per rank
    with capsys.disabled():
        print(
            f"\nhang report, {HOSTS} hosts x {RANKS_PER_HOST} ranks over {CONNECTIONS} "
            f"connections: gathered in {elapsed:.3f} s, "
            f"{gathered} bytes through the store ({every_stack} for every stack), "
            f"report {report_bytes} bytes"
        )


# -- the native server's stacks of workers whose timers have not expired --------------------

WORKER = """
import sys, time
from elastic_timer import FileTimerClient, expires
client = FileTimerClient(sys.argv[1])

def waiting_in_a_collective():
    print("acquired", flush=True)
    time.sleep(60)

with expires(after=60, client=client):
    waiting_in_a_collective()
"""


def test_peek_stacks_takes_a_running_workers_stacks_without_reaping_it(
    fifo: str, children: list[Any]
) -> None:
    server = FileTimerServer(fifo, "peek", max_interval=0.1, signal_self=False, stack_dump=5.0)
    server.start()
    try:
        worker = subprocess.Popen([sys.executable, "-c", WORKER, fifo], stdout=subprocess.PIPE)
        children.append(worker)
        assert worker.stdout is not None
        assert worker.stdout.readline() == b"acquired\n"
        started = time.monotonic()
        ((pid, stacks), (other, none)) = server._core.peek_stacks([worker.pid, 424242])
        assert time.monotonic() - started < 2.0
        assert (pid, other, none) == (worker.pid, 424242, None)
        assert stacks is not None and stacks.source == "faulthandler" and stacks.complete
        assert "in waiting_in_a_collective" in stacks.text, stacks.text
        assert worker.poll() is None  # still running, timer still armed
        assert len(server._timers) == 1
        # Asked again, it answers again (only with what it wrote since).
        ((_, again),) = server._core.peek_stacks([worker.pid])
        assert again is not None and again.text.count("most recent call first") == 1
    finally:
        server.stop()


# -- Flight Recorder, through torch's worker control plane ----------------------------------


def summary(enqueued: int, completed: int) -> Collectives:
    status = {"enqueued": enqueued, "started": -1, "completed": completed}
    last = [{"pg": 0, "seq": enqueued, "op": "gloo:all_reduce", "state": "scheduled"}]
    return cast(Collectives, {"pg_status": {"0": status}, "last": last})


def test_the_ranks_behind_in_sequence_numbers_are_the_suspects() -> None:
    assert hang_report.behind({0: summary(3, 2), 1: summary(3, 2), 3: summary(2, 2)}) == [3]
    assert hang_report.behind({0: summary(3, 2), 1: summary(3, 2)}) == []
    assert hang_report.behind({0: summary(3, 2)}) == []  # nobody to compare with
    # Flight Recorder wins over the stacks: rank 1 is in all_reduce, but an older one.
    ranks = [
        RankStacks(0, 1, (), faulthandler_dump(IN_ALL_REDUCE), summary(5, 4)),
        RankStacks(1, 2, (), faulthandler_dump(IN_ALL_REDUCE, ids=9), summary(4, 4)),
        RankStacks(2, 3, (), faulthandler_dump(IN_ALL_REDUCE, ids=7), summary(5, 4)),
    ]
    report = build_report([contribution("h", 0, ranks, trigger=True)], expected_hosts=1)
    assert (report["suspects"], report["suspects_from"]) == ([1], "flight recorder")
    text = format_report(report)
    assert "suspects: rank 1 (behind the others in Flight Recorder's sequence numbers)" in text
    assert "rank 1 collectives: pg 0 last enqueued #4, completed #4" in text
    # Without it, the stacks decide.
    plain = [RankStacks(r.rank, r.pid, r.scopes, r.stacks) for r in ranks]
    report = build_report([contribution("h", 0, plain, trigger=True)], expected_hosts=1)
    assert (report["suspects"], report["suspects_from"]) == ([], "stacks")


class EveryOtherRank(hang_report.Source):
    """A made-up source: the odd ranks."""

    name = "odd ranks"
    why = " (odd)"

    def suspects(self, groups: Sequence[Group]) -> list[int]:
        return sorted(r for g in groups for r in g["ranks"] if r % 2)

    def lines(self, group: Group) -> list[str]:
        return [f"odd ranks here: {[r for r in group['ranks'] if r % 2]}"]


def test_a_new_source_of_suspects_is_one_entry_in_the_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sources are tried in the table's order, the first that names suspects names them,
    and each adds its lines under every group of the text."""
    ranks = [RankStacks(r, r + 10, (), faulthandler_dump(IN_ALL_REDUCE, ids=r)) for r in range(3)]
    shares = [contribution("h", 0, ranks, trigger=True)]
    assert build_report(shares, expected_hosts=1)["suspects"] == []
    monkeypatch.setattr(
        hang_report.report,
        "SOURCES",
        (*hang_report.SOURCES[:1], EveryOtherRank(), hang_report.SOURCES[1]),
    )
    report = build_report(shares, expected_hosts=1)
    assert (report["suspects"], report["suspects_from"]) == ([1], "odd ranks")
    text = format_report(report)
    assert "suspects: rank 1 (odd)" in text
    assert "    odd ranks here: [1]" in text.splitlines()


SERVES_THE_CONTROL_PLANE = """
import os, sys, torch, torch.distributed as dist
from torch.distributed.elastic.control_plane import worker_main
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], TORCH_FR_BUFFER_SIZE="20")
os.environ["TORCH_WORKER_SERVER_SOCKET"] = sys.argv[1]
with worker_main():
    dist.init_process_group("gloo", rank=0, world_size=1)
    for _ in range(2):
        dist.all_reduce(torch.ones(2))
    print("ready", flush=True)
    sys.stdin.read()
"""


def test_a_workers_last_collectives_come_from_its_control_plane_socket(
    socket_dir: Path, children: list[Any]
) -> None:
    # 108 bytes: torch binds it (without the NUL), connect() refuses it by that path.
    for socket_path in (str(socket_dir / "rank0.sock"), long_path(socket_dir, 108)):
        worker = ready_child(children, [SERVES_THE_CONTROL_PLANE, socket_path, str(free_port())])
        assert hang_report.listening_sockets(worker.pid) == [socket_path]
        collectives = hang_report.rank_collectives(worker.pid)
        assert collectives is not None
        assert collectives["pg_status"]["0"]["enqueued"] == 2
        assert [(e["op"], e["seq"]) for e in collectives["last"]] == [
            ("gloo:all_reduce", 1),
            ("gloo:all_reduce", 2),
        ]
    assert hang_report.rank_collectives(os.getpid()) is None  # serves none, names none
    with pytest.raises(CollectivesMissing, match=r"no answer from .*nothing\.sock: .*No such file"):
        hang_report.fetch_trace(str(socket_dir / "nothing.sock"))


def ready_child(children: list[Any], args: list[str], **env: str) -> subprocess.Popen[str]:
    """``python -c ARGS`` with ``env`` added to its environment, once it printed ``ready``."""
    worker = subprocess.Popen(
        [sys.executable, "-c", *args],
        env={**os.environ, **env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    children.append(worker)
    assert worker.stdout is not None
    assert worker.stdout.readline() == "ready\n"
    return worker


def long_path(directory: Path, length: int) -> str:
    """A path of ``length`` bytes for a socket in a new subdirectory of ``directory``."""
    padding = length - len(f"{directory}/") - len("/rank.sock")
    (directory / ("d" * padding)).mkdir()
    path = f"{directory}/{'d' * padding}/rank.sock"
    assert len(path) == length
    return path


# A worker that listens on the Unix socket argv[1] and never answers, once it says "ready".
LISTENS_AND_NEVER_ANSWERS = """
import socket, sys
server = socket.socket(socket.AF_UNIX)
server.bind(sys.argv[1])
server.listen()
print("ready", flush=True)
sys.stdin.read()
"""

# A worker that does not listen at all.
LISTENS_NOWHERE = """
import sys
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("case", ["too long", "not listening", "not answering"])
def test_a_rank_that_gives_no_collectives_says_why_in_the_report(
    case: str, socket_dir: Path, children: list[Any]
) -> None:
    """A rank that names a control-plane socket in its environment (TORCH_WORKER_SERVER_SOCKET)
    but gives no collectives: the report says why, with the path. A path past the 108 bytes of
    a Unix socket's (as under a long TMPDIR: torch's worker_main() cannot listen there);
    nothing listening there; a socket that does not answer in time."""
    path = long_path(socket_dir, 109) if case == "too long" else str(socket_dir / "rank3.sock")
    script = LISTENS_AND_NEVER_ANSWERS if case == "not answering" else LISTENS_NOWHERE
    worker = ready_child(children, [script, path], TORCH_WORKER_SERVER_SOCKET=path)
    expected = {
        "too long": "its TORCH_WORKER_SERVER_SOCKET is 109 bytes long, past the 108 of a Unix "
        f"socket path, so worker_main() cannot listen there: {path}",
        "not listening": f"no socket found listening at its TORCH_WORKER_SERVER_SOCKET, {path}",
        "not answering": f"no answer from {path} within 0.3 s",
    }[case]
    with pytest.raises(CollectivesMissing) as missing:
        hang_report.rank_collectives(worker.pid, timeout=0.3)
    assert str(missing.value) == expected
    # In the report, under the rank's group.
    ranks = [RankStacks(3, worker.pid, (), faulthandler_dump(LOADING), None, str(missing.value))]
    report = build_report([contribution("h", 0, ranks, trigger=True)], expected_hosts=1)
    assert report["groups"][0]["collectives_missing"] == {"3": expected}
    assert f"    rank 3 collectives: none, {expected}" in format_report(report).splitlines()


def test_the_hang_report_gives_the_control_plane_the_stack_grace() -> None:
    """A rank's control plane is asked with the stack grace as its timeout (a busy host
    answers late, and the rank lives that long), and a rank that gives none says why."""
    asked: list[float] = []

    def collectives(pid: int, timeout: float) -> Collectives | None:
        asked.append(timeout)
        raise CollectivesMissing(f"no answer from /x/{pid}.sock within {timeout:.1f} s")

    server = tcp_store()
    one, reports = reporter(
        tcp_store(server.port),
        {100: 0},
        {100: faulthandler_dump(LOADING)},
        group_rank=0,
        group_world_size=1,
        collectives=collectives,
    )
    one.start()
    one.expiring(100, ("s",))
    one.close()  # once its part is done
    assert asked == [0.5]
    [group] = reports[0]["groups"]
    assert group["collectives_missing"] == {"0": "no answer from /x/100.sock within 0.5 s"}
