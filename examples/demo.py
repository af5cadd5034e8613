"""The demo job: 8 workers, half of them stuck; the timer server reaps the stuck half.

    python examples/demo.py [--transport local|file] [--start-method spawn|fork|forkserver]

Like torch's local_timer_example: every worker wraps its work in ``expires(after=1)``; the
happy ones finish in 0.5 s, outlive their released deadline by half a second, and exit 0;
the stuck ones would take 5 s and are killed with SIGKILL at their deadline. Exits 0 when
every worker ended as expected.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import time
from typing import Any

import elastic_timer as timer

WORKERS = 8


def worker(rank: int, transport: str, channel: Any) -> None:
    if transport == "local":
        timer.configure(timer.LocalTimerClient(channel))
    else:
        timer.configure(timer.FileTimerClient(channel))
    stuck = rank % 2 == 0
    with timer.expires(after=1):
        time.sleep(5 if stuck else 0.5)
    # Past the deadline the release cancelled: a lost release would get this worker killed.
    time.sleep(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transport", choices=["local", "file"], default="local")
    parser.add_argument("--start-method", choices=mp.get_all_start_methods(), default="spawn")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(name)s: %(message)s")

    ctx = mp.get_context(args.start_method)
    server: timer.LocalTimerServer | timer.FileTimerServer
    if args.transport == "local":
        channel: Any = ctx.Queue()
        server = timer.LocalTimerServer(channel, max_interval=0.01)
    else:
        channel = os.path.join(tempfile.mkdtemp(), "timer.fifo")
        # The demo's server runs in this process: do not let a reap signal it too.
        server = timer.FileTimerServer(channel, run_id="demo", signal_self=False)
    server.start()

    started = time.monotonic()
    processes = [
        ctx.Process(target=worker, args=(rank, args.transport, channel)) for rank in range(WORKERS)
    ]
    for process in processes:
        process.start()
    ok = True
    for rank, process in enumerate(processes):
        process.join()
        expected = -signal.SIGKILL if rank % 2 == 0 else 0
        verdict = "ok" if process.exitcode == expected else "UNEXPECTED"
        ok &= process.exitcode == expected
        state = "stuck" if rank % 2 == 0 else "happy"
        print(f"worker {rank} ({state}): exit code {process.exitcode} [{verdict}]")
    server.stop()
    elapsed = time.monotonic() - started
    print(f"{'all workers ended as expected' if ok else 'FAILED'} in {elapsed:.2f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
