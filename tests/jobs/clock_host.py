"""A timer server and its workers, for tests/test_clock.py.

Run as ``python clock_host.py file|local DIRECTORY SCOPES_JSON`` under libfaketime: the test
steps this process's wall clock. The workers are spawned without ``LD_PRELOAD``, so they keep
the real clocks. Each worker waits for ``go``, acquires one timer (a ``[scope, after]`` of
SCOPES_JSON) and then sleeps until it is reaped (at most 60 s, so none outlives a failed test).

The test drives it over stdin, one JSON line back per command:
- ``go``: every worker acquires; the answer lists ``[pid, scope, expiration, deadline]``, with
  the expiration the worker sent (real wall clock) and its deadline on the monotonic clock;
- ``clock``: this process's ``time.time()`` and the native core's wall clock (the server's last
  progress time while idle), both under libfaketime, and ``time.monotonic()``;
- ``timers``: the server's ``_timers`` as ``[pid, scope, expiration]``;
- ``exits``: ``[pid, exit code, monotonic time of the exit]`` of the workers that have exited.
End of input stops the server and the workers.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import threading
import time
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from typing import Any

import elastic_timer as timer


def worker(transport: str, target: Any, scope: str, after: float, go: Event, out: Any) -> None:
    client: timer.TimerClient
    if transport == "file":
        client = timer.FileTimerClient(target)
    else:
        client = timer.LocalTimerClient(target)
    out.put("started")
    go.wait()
    wall, mono = time.time(), time.monotonic()
    client.acquire(scope, wall + after)
    out.put([os.getpid(), scope, wall + after, mono + after])
    time.sleep(60)


def main() -> None:
    transport, directory, scopes = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    os.environ.pop("LD_PRELOAD", None)  # the spawned workers run on the real clocks
    ctx = mp.get_context("spawn")
    server: timer.FileTimerServer | timer.LocalTimerServer
    if transport == "file":
        target: Any = os.path.join(directory, "timer.fifo")
        server = timer.FileTimerServer(target, "clock", signal_self=False)
    else:
        target = ctx.Queue()
        server = timer.LocalTimerServer(target)
    server.start()
    go, acquired = ctx.Event(), ctx.Queue()
    workers = [
        ctx.Process(target=worker, args=(transport, target, scope, after, go, acquired))
        for scope, after in scopes
    ]
    for process in workers:
        process.start()
    # All started before "go", so the timers are acquired together.
    assert [acquired.get(timeout=60) for _ in workers] == ["started"] * len(workers)
    exits: list[list[float]] = []

    def record_exit(process: BaseProcess) -> None:
        process.join()
        exits.append([process.pid or 0, process.exitcode or 0, time.monotonic()])

    watchers = [threading.Thread(target=record_exit, args=(p,), daemon=True) for p in workers]
    for watcher in watchers:
        watcher.start()

    def answer(command: str) -> object:
        if command == "go":
            go.set()
            return [acquired.get(timeout=30) for _ in workers]
        if command == "clock":
            native = server._core.last_progress()
            return {"time": time.time(), "native": native, "monotonic": time.monotonic()}
        if command == "timers":
            timers = server._timers.items()
            return sorted([pid, scope, request.expiration_time] for (pid, scope), request in timers)
        if command == "exits":
            return list(exits)
        raise ValueError(f"unknown command {command!r}")

    print(json.dumps("ready"), flush=True)
    try:
        for line in sys.stdin:
            print(json.dumps(answer(line.strip())), flush=True)
    finally:
        server.stop()
        for process in workers:
            process.kill()
        for watcher in watchers:
            watcher.join()


if __name__ == "__main__":
    main()
