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


def bench(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``benches/SCRIPT ARGS``, which must succeed."""
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benches" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed


def test_harness_writes_table_samples_and_chart(tmp_path: Path) -> None:
    out = tmp_path / "results"
    completed = bench("run.py", "--tiny", "--out", str(out), timeout=120)

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


def test_store_requests_of_a_healthy_two_agent_job(tmp_path: Path) -> None:
    """benches/store_requests.py at a tiny size: two real agents per side; while the ranks run,
    the hang report makes no store request (its listener's one waiting request was made
    before), and it did run (its requests before and after the window are counted)."""
    completed = bench("store_requests.py", "--seconds", "8", "--out", str(tmp_path), timeout=300)
    results = json.loads((tmp_path / "results.json").read_text())
    ours, theirs = results["elastic-timer"], results["torch"]
    assert all(host["hang_report_in_window"] == 0 for host in ours["hosts"])
    assert all(host["hang_report"] >= 3 for host in ours["hosts"])  # add, clone, wait at least
    assert all(host["hang_report"] == 0 for host in theirs["hosts"])
    assert theirs["per_host_per_minute"] > 0  # torch's rendezvous keep-alive is counted
    assert "store requests per host per minute" in completed.stdout


def test_hang_scale_names_the_suspects_and_bounds_the_report(tmp_path: Path) -> None:
    """benches/hang_scale.py at a tiny size (64 hosts of 8 ranks over a real TCPStore): the
    one culprit and the 100 scattered ranks are the suspects, no host is missing, and the
    scattered job's report lists MAX_GROUPS groups of its 101."""
    bench(
        "hang_scale.py",
        *("--hosts", "64", "--connections", "4", "--scattered", "100"),
        *("--out", str(tmp_path)),
        timeout=300,
    )
    results = json.loads((tmp_path / "results.json").read_text())
    one, scattered = results["one culprit"], results["scattered"]
    assert (one["suspects"], one["groups"], one["ranks"]) == (1, 2, 512)
    assert (scattered["suspects"], scattered["groups"], scattered["groups_listed"]) == (
        100,
        101,
        32,
    )
    assert all(r["suspects_right"] and r["missing_hosts"] == 0 for r in (one, scattered))
    assert scattered["bytes_report"] < scattered["bytes_contributions"]
