"""elastic-timer and the real torch, mixed in every pairing.

Each scenario is run with the server and the clients taken from either package: the stuck
worker must die with the requested signal, the happy one must exit 0, and a File server must
report the same ``log_event`` events. Servers that signal their own process after a reap
(torch's File server does from torch 2.7 on) run in a subprocess.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch.distributed.elastic.timer as torch_timer
from helpers import open_rings, wait_for

import elastic_timer
from elastic_timer._torch_versions import torch_signals_self

PACKAGES: dict[str, Any] = {"torch": torch_timer, "ours": elastic_timer}
CTX = mp.get_context("fork")

# A File server in its own process. It logs each log_event call as a JSON line to EVENTS,
# prints "ready" once serving, and serves until it is killed (by itself, after a reap).
FILE_SERVER_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    package, fifo, events = sys.argv[1:4]
    if package == "torch":
        import torch.distributed.elastic.timer as timer
    else:
        import elastic_timer as timer

    def log_event(name, request):
        fields = None if request is None else [request.worker_pid, request.scope_id, request.signal]
        with open(events, "a") as out:
            out.write(json.dumps([name, fields]) + "\\n")

    server = timer.FileTimerServer(fifo, "interop", max_interval=0.05, log_event=log_event)
    server.start()
    print("ready", flush=True)
    time.sleep(30)
    server.stop()
    """
)


# A happy worker's block: done well within its timer, then it lives on past the deadline it
# released, so a lost release would get it killed.
HAPPY = {"after": 0.5, "work": 0.1, "linger": 0.8}


def file_worker(
    package: str, fifo: str, after: float, work: float, sig: int, linger: float = 0.0
) -> None:
    timer = PACKAGES[package]
    timer.configure(timer.FileTimerClient(fifo, signal=sig))
    with timer.expires(after=after, scope="work"):
        time.sleep(work)
    time.sleep(linger)


def local_worker(
    package: str, mp_queue: Any, after: float, work: float, linger: float = 0.0
) -> None:
    timer = PACKAGES[package]
    timer.configure(timer.LocalTimerClient(mp_queue))
    with timer.expires(after=after):
        time.sleep(work)
    time.sleep(linger)


def start_file_server(package: str, tmp_path: Path) -> tuple[subprocess.Popen[str], str, Path]:
    fifo = str(tmp_path / f"{package}.fifo")
    events = tmp_path / f"{package}-events.jsonl"
    server = subprocess.Popen(
        [sys.executable, "-c", FILE_SERVER_SCRIPT, package, fifo, str(events)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    assert server.stdout.readline().strip() == "ready"
    return server, fifo, events


def run_file_scenario(
    server_package: str, client_package: str, sig: int, tmp_path: Path
) -> dict[str, Any]:
    """A happy worker, then a stuck one, against one File server in its own process.

    The stuck one comes last: a server that signals itself after a reap serves no more. One
    that does not (torch before 2.7, and ours with it) still reaps a second stuck worker, whose
    deadline comes after the latest our self-signal could (1 s after the reap).
    """
    server, fifo, events = start_file_server(server_package, tmp_path)
    second = None
    server_exit: int | None
    try:
        happy = CTX.Process(
            target=file_worker, args=(client_package, fifo), kwargs={**HAPPY, "sig": sig}
        )
        happy.start()
        happy.join(15)
        stuck = CTX.Process(target=file_worker, args=(client_package, fifo, 0.3, 30, sig))
        stuck.start()
        stuck.join(15)
        if torch_signals_self():
            server_exit = server.wait(15)
        else:
            second = CTX.Process(target=file_worker, args=(client_package, fifo, 1.5, 30, sig))
            second.start()
            second.join(15)
            # The server logs the second reap after its kill: let it, before it is killed.
            wait_for(lambda: len(events.read_text().splitlines()) >= 5)
            server_exit = server.poll()
    finally:
        if second is not None and second.is_alive():
            second.kill()
            second.join()
        if server.poll() is None:
            server.kill()
            server.wait()
    recorded = [json.loads(line) for line in events.read_text().splitlines()]
    return {
        "happy": happy.exitcode,
        "stuck": stuck.exitcode,
        "second": None if second is None else second.exitcode,
        "server": server_exit,
        "events": [
            (name, None if f is None else (f[0] == stuck.pid, f[1], f[2])) for name, f in recorded
        ],
    }


@pytest.mark.parametrize("server_package", ["torch", "ours"])
@pytest.mark.parametrize("client_package", ["torch", "ours"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_file_transport_pairings(
    server_package: str, client_package: str, sig: int, tmp_path: Path
) -> None:
    """torch's client works with our server and ours with torch's: the stuck worker dies of
    the signal it asked for, the happy one exits 0, the server then signals itself (torch's
    behaviour from 2.7 on, kept by default) or serves on (before 2.7), and the log_event calls
    are the same."""
    outcome = run_file_scenario(server_package, client_package, sig, tmp_path)
    reap = [("timer expired", (True, "work", sig)), ("kill worker process", (True, "work", sig))]
    assert outcome["happy"] == 0
    assert outcome["stuck"] == -sig
    if torch_signals_self():
        assert outcome["server"] == -sig
        assert outcome["events"] == [("watchdog started", None), *reap]
    else:
        assert outcome["server"] is None, "the server signalled itself"
        assert outcome["second"] == -sig
        second = [(name, (False, *fields[1:])) for name, fields in reap]
        assert outcome["events"] == [("watchdog started", None), *reap, *second]


def test_mixed_file_clients_on_one_server(tmp_path: Path) -> None:
    """Half the workers use torch's client and half ours, on one of our servers."""
    fifo = str(tmp_path / "mixed.fifo")
    server = elastic_timer.FileTimerServer(fifo, "mixed", signal_self=False)
    server.start()
    try:
        workers = [
            CTX.Process(
                target=file_worker,
                args=(package, fifo, 0.3, work, signal.SIGKILL, 0.0 if work == 30 else 0.5),
            )
            for package in ("torch", "ours", "torch", "ours")
            for work in (30, 0.05)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(15)
        assert [w.exitcode for w in workers] == [-signal.SIGKILL, 0] * 4
    finally:
        server.stop()


@pytest.mark.parametrize("server_package", ["torch", "ours"])
@pytest.mark.parametrize("client_package", ["torch", "ours"])
def test_local_transport_pairings(server_package: str, client_package: str) -> None:
    """Pickled TimerRequests cross between the packages in both directions."""
    mp_queue = CTX.Queue()
    server = PACKAGES[server_package].LocalTimerServer(mp_queue, max_interval=0.05)
    server.start()
    try:
        stuck = CTX.Process(target=local_worker, args=(client_package, mp_queue, 0.3, 30))
        happy = CTX.Process(target=local_worker, args=(client_package, mp_queue), kwargs=HAPPY)
        for worker in (stuck, happy):
            worker.start()
        for worker in (stuck, happy):
            worker.join(15)
        assert stuck.exitcode == -signal.SIGKILL
        assert happy.exitcode == 0
    finally:
        server.stop()


def many_blocks_then_stuck(mp_queue: Any, conn: Any) -> None:
    """Our client: enough blocks to offer a ring (to our server), then a stuck one."""
    client = elastic_timer.LocalTimerClient(mp_queue)
    for _ in range(50):
        with elastic_timer.expires(after=60, client=client):
            pass
    conn.send(open_rings())
    with elastic_timer.expires(after=0.3, client=client):
        time.sleep(30)


@pytest.mark.parametrize(("server_package", "ring"), [("torch", 0), ("ours", 1)])
def test_our_local_client_offers_a_ring_only_to_our_server(server_package: str, ring: int) -> None:
    """torch's server never sees a ring's announcement (our client finds no mark on its
    queue) and still reaps; ours takes the ring and reaps from it."""
    mp_queue = CTX.Queue()
    server = PACKAGES[server_package].LocalTimerServer(mp_queue, max_interval=0.05)
    server.start()
    try:
        parent, child = CTX.Pipe()
        worker = CTX.Process(target=many_blocks_then_stuck, args=(mp_queue, child))
        worker.start()
        assert parent.poll(30)
        assert parent.recv() == ring
        worker.join(15)
        assert worker.exitcode == -signal.SIGKILL
    finally:
        server.stop()


def test_mixed_local_clients_on_one_server() -> None:
    """torch's and our LocalTimerClients share one queue and one (native) server."""
    mp_queue = CTX.Queue()
    server = elastic_timer.LocalTimerServer(mp_queue, max_interval=0.05)
    server.start()
    try:
        workers = [
            CTX.Process(
                target=local_worker, args=(package, mp_queue, 0.3, work, 0.0 if work == 30 else 0.5)
            )
            for package in ("torch", "ours")
            for work in (30, 0.05)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(15)
        assert [w.exitcode for w in workers] == [-signal.SIGKILL, 0, -signal.SIGKILL, 0]
    finally:
        server.stop()


def test_torch_request_on_our_queue_decodes_natively() -> None:
    """The native reader decodes torch's own pickles, byte for byte as torch's client sends."""
    from multiprocessing.reduction import ForkingPickler

    request = torch_timer.api.TimerRequest(os.getpid(), "scope", 12.5)
    payload = bytes(ForkingPickler.dumps(request))
    assert elastic_timer._native.decode_pickle(payload) == (
        os.getpid(),
        "scope",
        12.5,
        signal.SIGKILL,
    )
