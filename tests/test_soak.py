"""A short soak (``benches/soak.py``): 16 client processes, 500 acquire/release pairs per
second in all, for 10 s, three of them hanging at random times.

The long version (64 clients, 1000 pairs per second, 5 minutes) is the same script with its
defaults: ``python benches/soak.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_soak(tmp_path: Path) -> None:
    """Every hung client is reaped by SIGKILL within 0.5 s of its deadline, no healthy client
    is touched, the server counts exactly the requests the clients sent (nothing malformed,
    refused or left over), and its RSS grows by less than 4 MiB after a 2 s warm-up."""
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benches" / "soak.py"),
            *("--clients", "16", "--rate", "500", "--duration", "10", "--hung", "3"),
            *("--fifo", str(tmp_path / "soak.fifo"), "--json"),
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    result = json.loads(run.stdout.splitlines()[-1]) if run.stdout else {}
    assert result.get("checks"), (run.stdout, run.stderr)
    assert [name for name, ok in result["checks"].items() if not ok] == [], result
    assert run.returncode == 0
    assert result["requests_counted"] == result["requests_sent"] > 3000
    assert result["server_stats"]["reaped"] == 3
    assert len(result["reap_delay_s"]) == 3
