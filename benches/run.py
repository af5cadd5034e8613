"""
Benchmarks elastic-timer against ``torch.distributed.elastic.timer``.

    python benches/run.py [--quick | --tiny] [--only NAME[,NAME...]] [--out DIR]

Runs each benchmark for torch and for elastic-timer in alternation, with the same code for
both (each benchmark takes the timer module as a parameter), prints a table and writes
DIR/results.md, DIR/results.json (raw samples) and DIR/results.png (default DIR:
benches/results). Progress goes to stderr. The benchmarks, in the issue's order:

- client: the cost of one ``with expires(after=60): pass`` block (default scope from a
  shallow and a deep stack, explicit scope over File and Local);
- throughput: requests/s one File server takes from 4 and 16 client processes;
- reap: from a timer's expiration to the worker's death seen by ``waitpid``;
- delivery: from a timer's expiration to the worker receiving its signal;
- cpu: CPU of a started server, idle and with 100k live timers;
- scale: memory and CPU per operation at 10k, 100k and 1M live timers;
- adaptive: from a hang to its reap, torch at the after asked for, ours learning the steps.

Every server, client and worker runs in a forked child of this process; the harness sends no
timer request itself and signals only its own children, by pid.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from typing import Callable, NoReturn

if __package__ in (None, ""):  # run as a script: make the ``benches`` package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benches import adaptive, client, delivery, reap, report, scale, server
from benches.common import (
    DEFAULT,
    QUICK,
    TINY,
    Metric,
    Side,
    Sizes,
    kill_all_children,
    load_sides,
    progress,
)

Benchmark = Callable[[list[Side], Sizes, str], list[Metric]]

BENCHMARKS: dict[str, Benchmark] = {
    "client": client.run,
    "throughput": server.run_throughput,
    "reap": reap.run,
    "delivery": delivery.run,
    "cpu": server.run_cpu,
    "scale": scale.run,
    "adaptive": adaptive.run,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes (a minute or two)")
    size.add_argument("--tiny", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument(
        "--only",
        metavar="NAME",
        help=f"comma-separated benchmarks to run, of: {', '.join(BENCHMARKS)}",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
        help="where to write results.md, results.json and results.png (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.only:
        unknown = set(args.only.split(",")) - set(BENCHMARKS)
        if unknown:
            parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}")
    return args


def _terminate(signum: int, frame: object) -> NoReturn:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = TINY if args.tiny else QUICK if args.quick else DEFAULT
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    names = [name for name in BENCHMARKS if name in names]
    signal.signal(signal.SIGTERM, _terminate)
    started = time.time()
    loadavg = os.getloadavg()
    progress(f"loading torch and elastic_timer (sizes: {sizes.name})")
    sides = load_sides()
    import torch

    metrics: list[Metric] = []
    failed: list[str] = []
    workdir = tempfile.mkdtemp(prefix="elastic-timer-bench-")
    try:
        for name in names:
            progress(f"== {name}")
            begin = time.monotonic()
            try:
                metrics += BENCHMARKS[name](sides, sizes, workdir)
            except Exception:
                failed.append(name)
                progress(f"benchmark {name} crashed:\n{traceback.format_exc()}")
            finally:
                kill_all_children()
            progress(f"== {name} done in {time.monotonic() - begin:.1f} s")
    finally:
        kill_all_children()
        shutil.rmtree(workdir, ignore_errors=True)
    arguments = " ".join(["", *(argv if argv is not None else sys.argv[1:])])
    meta = {
        "arguments": arguments,
        "sizes": sizes.name,
        "benchmarks": names,
        "failed": failed,
        "cpus": os.cpu_count(),
        "loadavg_start": " ".join(f"{x:.2f}" for x in loadavg),
        "loadavg_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "duration_s": time.time() - started,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    paths = report.write(metrics, meta, args.out)
    print(report.text_table(metrics))
    print()
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    progress(f"done in {time.time() - started:.0f} s")
    if failed:
        progress(f"FAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
