"""The benchmark harness runs end to end (tiny sizes) and writes its three reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ["client", "throughput", "reap", "delivery", "cpu", "scale", "adaptive"]

pytestmark = pytest.mark.torch  # the harness measures torch's timers too (and needs matplotlib)


def test_harness_writes_table_samples_and_chart(tmp_path: Path) -> None:
    out = tmp_path / "results"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benches" / "run.py"), "--tiny", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )
    assert completed.returncode == 0, completed.stderr[-4000:]

    document = json.loads((out / "results.json").read_text())
    metrics = document["metrics"]
    assert {m["family"] for m in metrics} == set(FAMILIES)
    for metric in metrics:
        assert set(metric["samples"]) == {"torch", "ours"}
        assert metric["samples"]["ours"], metric["key"]

    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| benchmark |")
    titles = [row.split(" | ")[0].removeprefix("| ") for row in rows[1:]]
    assert titles == [m["title"] for m in metrics]  # one row per measurement, in order

    png = out / "results.png"
    assert png.stat().st_size > 0
    assert png.read_bytes().startswith(b"\x89PNG")
    # The table is printed too.
    assert "speedup" in completed.stdout
