"""The no-false-kill proof of ``--watch``, at length: N clean runs of the watched two-agent
DDP job (tests/jobs/watched_ddp.py, as tests/test_watch.py runs it) with two busy loops
beside them; every run must end 0 with no timer expired.

``PYTHONPATH=$PWD/python python scripts/watch_clean_runs.py [--runs 10] [--busy 2]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_watch import job_log, read_events, two_watched_agents, watch_env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--busy", type=int, default=2, help="busy loops beside the job")
    args = parser.parse_args()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    results = []
    try:
        for run in range(args.runs):
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp)
                started = time.monotonic()
                outcomes = two_watched_agents(watch_env(path), f"watch-soak-{run}")
                expired = [
                    e for e in read_events(path / "events.jsonl") if e["event"] == "timer expired"
                ]
                done = sum("done 130" in line for line in job_log(path))
                result = {
                    "run": run,
                    "exit_codes": [code for code, _ in outcomes],
                    "ranks_done": done,
                    "expired": [(e["pid"], e["scopes"], e["outcome"]) for e in expired],
                    "seconds": round(time.monotonic() - started, 1),
                }
                print(json.dumps(result), flush=True)
                results.append(result)
    finally:
        for loop in busy:
            loop.kill()
            loop.wait()
    bad = [r for r in results if r["exit_codes"] != [0, 0] or r["expired"] or r["ranks_done"] != 4]
    print(f"{len(results)} runs, {len(bad)} with a failure or an expiry")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
