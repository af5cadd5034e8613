"""What a healthy job costs the rendezvous store: requests per host per minute of a real
two-agent torchrun job, with and without elastic-timer, side by side.

``python benches/store_requests.py [--seconds N] [--out DIR]``

Two agents (c10d rendezvous on 127.0.0.1, 2 ranks each) run a job whose ranks each arm one
timer and sleep N seconds: once under torch's ``torchrun``, once under ``elastic-timer-run``
(stacks on, ``ELASTIC_TIMER_STACK_DUMP=5``, so each agent runs the hang report's listener).
Each agent counts the store requests it makes: torch's ``Store`` methods are wrapped in the
agent's process, so every request the agent makes from Python is counted (the rendezvous'
keep-alive, the hang report's), with the thread that made it. Counted over the window in which
every rank runs (from the last rank's start + 1 s to the first rank's end - 1 s), per agent.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# torch's Store methods that make a request (a new connection, ``clone``, included).
REQUESTS = (
    "add",
    "append",
    "check",
    "clone",
    "compare_set",
    "delete_key",
    "get",
    "list_keys",
    "multi_get",
    "multi_set",
    "num_keys",
    "queue_len",
    "queue_pop",
    "queue_push",
    "set",
    "wait",
)

# Runs an agent (argv: the side, where to write its requests, the launcher's arguments), its
# torch Store methods wrapped so that each request is recorded (time, method, thread).
AGENT = r"""
import atexit, json, sys, threading, time
from torch._C._distributed_c10d import Store

side, out, args = sys.argv[1], sys.argv[2], sys.argv[3:]
requests = []

def counting(name, method):
    def counted(self, *a, **k):
        requests.append((time.time(), name, threading.current_thread().name))
        return method(self, *a, **k)
    return counted

for name in NAMES:
    setattr(Store, name, counting(name, getattr(Store, name)))

def write():
    with open(out, "w") as f:
        json.dump(requests, f)

atexit.register(write)
if side == "torch":
    from torch.distributed.run import main
    sys.argv = ["torchrun", *args]
    main()
else:
    from elastic_timer.run import main
    main(args)
""".replace("NAMES", repr(REQUESTS))

# A rank: one timer armed (over elastic-timer's client when the agent serves one), asleep.
RANK = r"""
import os, sys, time
directory, seconds = sys.argv[1], float(sys.argv[2])
rank = os.environ["RANK"]
with open(f"{directory}/start-{rank}", "w") as f:
    f.write(repr(time.time()))
if os.environ.get("TORCHELASTIC_TIMER_FILE"):
    import elastic_timer
    elastic_timer.configure()
    with elastic_timer.expires(after=seconds + 60):
        time.sleep(seconds)
else:
    time.sleep(seconds)
with open(f"{directory}/end-{rank}", "w") as f:
    f.write(repr(time.time()))
"""

SIDES = ("torch", "elastic-timer")
# Threads of the hang report (its reporter and its listener).
HANG_THREADS = "elastic-timer-hang"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_side(side: str, seconds: float, directory: Path) -> dict[str, object]:
    """One job under two agents; the requests each made in the window, by method and thread."""
    directory.mkdir()
    rank = directory / "rank.py"
    rank.write_text(RANK)
    endpoint = f"127.0.0.1:{free_port()}"
    args = [
        "--nnodes",
        "2",
        "--nproc-per-node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        endpoint,
        "--rdzv-id",
        f"store-requests-{side}",
        "--monitor-interval",
        "0.1",
        str(rank),
        str(directory),
        str(seconds),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("TORCHELASTIC_ENABLE_FILE_TIMER", "TORCHELASTIC_TIMER_FILE"):
        env.pop(name, None)
    if side == "elastic-timer":
        env["ELASTIC_TIMER_STACK_DUMP"] = "5"
    outs = [directory / f"agent-{n}.json" for n in range(2)]
    agents = [
        subprocess.Popen(
            [sys.executable, "-c", AGENT, "torch" if side == "torch" else "ours", str(out), *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for out in outs
    ]
    try:
        errors = [agent.communicate(timeout=seconds + 300)[1] for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
    for agent, error in zip(agents, errors):
        if agent.returncode != 0:
            raise RuntimeError(f"{side} agent exited {agent.returncode}: {error[-3000:]}")
    starts = [float((directory / f"start-{r}").read_text()) for r in range(4)]
    ends = [float((directory / f"end-{r}").read_text()) for r in range(4)]
    window = (max(starts) + 1.0, min(ends) - 1.0)
    hosts = []
    for out in outs:
        requests = json.loads(out.read_text())
        inside = [(name, thread) for at, name, thread in requests if window[0] <= at < window[1]]
        hosts.append(
            {
                "requests": len(requests),
                "in_window": len(inside),
                "hang_report_in_window": sum(t.startswith(HANG_THREADS) for _, t in inside),
                "hang_report": sum(t.startswith(HANG_THREADS) for _, _, t in requests),
                "by_method": {m: sum(n == m for n, _ in inside) for m in {n for n, _ in inside}},
            }
        )
    minutes = (window[1] - window[0]) / 60
    return {
        "window_seconds": window[1] - window[0],
        "hosts": hosts,
        "per_host_per_minute": sum(h["in_window"] for h in hosts) / len(hosts) / minutes,
        "hang_report_per_host_per_minute": (
            sum(h["hang_report_in_window"] for h in hosts) / len(hosts) / minutes
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=90.0, help="how long the ranks run")
    parser.add_argument("--out", type=Path, default=None, help="write results.json there")
    args = parser.parse_args()
    if shutil.which("elastic-timer-run") is None:
        sys.exit("elastic-timer-run is not on PATH")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in SIDES:
            started = time.monotonic()
            results[side] = run_side(side, args.seconds, Path(tmp) / side)
            print(f"{side}: job ran in {time.monotonic() - started:.1f} s", file=sys.stderr)
    print(f"{'store requests per host per minute':40} {'torch':>10} {'elastic-timer':>14}")
    print(
        f"{'healthy two-agent job, all requests':40} "
        f"{results['torch']['per_host_per_minute']:10.1f} "
        f"{results['elastic-timer']['per_host_per_minute']:14.1f}"
    )
    print(
        f"{'  of which the hang report':40} {'':10} "
        f"{results['elastic-timer']['hang_report_per_host_per_minute']:14.1f}"
    )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
