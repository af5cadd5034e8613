"""The README's demo job, for both transports and all three start methods.

8 workers each wrap their work in ``expires(after=1)``; the even ranks would sleep 5 s and
must be killed with SIGKILL at their deadline, the odd ones finish in 0.5 s, live on past
their released deadline, and exit 0. The demo prints each worker's exit code and exits 0
only if every one is as expected.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).parent.parent / "examples" / "demo.py"


@pytest.mark.parametrize("start_method", ["spawn", "fork", "forkserver"])
@pytest.mark.parametrize("transport", ["local", "file"])
def test_demo_reaps_the_stuck_half(transport: str, start_method: str) -> None:
    result = subprocess.run(
        [sys.executable, str(DEMO), "--transport", transport, "--start-method", start_method],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("worker")]
    assert len(lines) == 8
    for rank, line in enumerate(lines):
        expected = "exit code -9" if rank % 2 == 0 else "exit code 0"
        assert expected in line and "[ok]" in line, line
    assert "all workers ended as expected" in result.stdout
