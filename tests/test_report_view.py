"""``elastic-timer report``: a hang report from an event log, for a terminal and as a web page.

The reports are built by hang_report's own functions from synthetic stacks, and written to the
event log as the server writes them (``EventSink``). The pages are rendered by a real headless
browser (Debian's chromium, which scripts/test.sh installs): the tests read the pixels of its
screenshots where the suspects' cells are, and its console for errors.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import pty
import re
import select
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from helpers import CLI, faulthandler_dump, run_cli
from matplotlib.image import imread

from elastic_timer import cli
from elastic_timer.events import EventSink
from elastic_timer.hang_report import RankStacks, build_report, contribution

C10D = "/site-packages/torch/distributed/distributed_c10d.py"
IN_ALL_REDUCE = [(C10D, 4181, "all_reduce"), ("/job/train.py", 37, "main")]
LOADING = [("/job/train.py", 24, "load_batch"), ("/job/train.py", 36, "main")]
LOADER_THREAD = [("/usr/lib/python3.11/threading.py", 320, "wait")]

# The page's colours (report_view/page.py).
SUSPECT = (0xE5, 0x48, 0x4D)
GROUP_1 = (0x4E, 0x79, 0xA7)
NO_STACKS = (0xB9, 0xBD, 0xC6)
SUMMARISED = (0x7E, 0x87, 0x94)


def flight_recorder(enqueued: int) -> Any:  # Any: hang_report's TypedDict, where it has one
    """A rank's Flight Recorder summary (``summarize_trace``'s shape)."""
    return {
        "pg_status": {"0": {"enqueued": enqueued, "started": enqueued, "completed": 11}},
        "last": [{"pg": 0, "seq": enqueued, "op": "nccl:all_reduce", "state": "scheduled"}],
    }


def small_report() -> Mapping[str, Any]:
    """Two of three hosts answer; rank 3 loads a batch while the others wait in all_reduce,
    one collective behind them in Flight Recorder's numbers; rank 6 gives no stacks."""
    waiting = faulthandler_dump(IN_ALL_REDUCE, LOADER_THREAD)
    loading = faulthandler_dump(LOADING, LOADER_THREAD)

    def rank(number: int, stacks: str | None, enqueued: int) -> RankStacks:
        return RankStacks(number, 1000 + number, ("step",), stacks, flight_recorder(enqueued))

    shares = [
        contribution(
            "node-a[0]",
            0,
            [
                rank(0, waiting, 12),
                rank(1, waiting, 12),
                rank(2, waiting, 12),
                rank(3, loading, 11),
            ],
            trigger=True,
        ),
        contribution(
            "node-b[1]",
            1,
            [rank(4, waiting, 12), rank(5, waiting, 12), rank(6, None, 12), rank(7, waiting, 12)],
            trigger=False,
        ),
    ]
    return build_report(shares, expected_hosts=3)


class Run(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def report_command(capsys: pytest.CaptureFixture[str], *args: str) -> Run:
    """``elastic-timer report ARGS`` in this process (cheaper than a child on a busy machine;
    the first test runs the command as a child too)."""
    try:
        code = cli.main(["report", *args])
    except SystemExit as e:  # argparse's bad arguments
        code = int(str(e.code))
    out, err = capsys.readouterr()
    return Run(code, out, err)


def bounded_report() -> dict[str, Any]:
    """small_report as a bounded report has it (hang_report's ``summarised`` groups and
    ``details_omitted``): ranks 8-11 in two groups past the bound, rank 9 a suspect too, and
    the collectives of 4 waiting ranks left out."""
    report: dict[str, Any] = json.loads(json.dumps(small_report()))
    report["suspects"] = [3, 9]
    report["summarised"] = {
        "groups": 2,
        "ranks": [8, 9, 10, 11],
        "suspects": 1,
        "places": [
            {"where": "in all_reduce", "groups": 1, "ranks": 3},
            {"where": "in save (train.py:50)", "groups": 1, "ranks": 1},
        ],
    }
    report["groups"][0]["details_omitted"] = 4
    return report


def one_rank_report(host: str, frames: list[tuple[str, int, str]]) -> Mapping[str, Any]:
    stacks = faulthandler_dump(frames)
    share = contribution(host, 0, [RankStacks(0, 9, (), stacks)], trigger=True)
    return build_report([share], expected_hosts=1)


def event_log(path: Path, *reports: Mapping[str, Any]) -> Path:
    """An event log as the server writes it, with other events around the reports."""
    sink = EventSink(str(path), None)
    sink.emit("watchdog started", pid=42)
    for report in reports:
        sink.emit("timer expired", pid=1003, scopes=["step"])
        sink.emit("hang report", **report)
    sink.close()
    return path


# -- the terminal -----------------------------------------------------------------------------


def test_the_terminal_shows_the_suspects_first_with_ranges_hosts_and_where_the_stacks_part(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    older = build_report(
        [
            contribution(
                "old[0]", 0, [RankStacks(0, 9, (), faulthandler_dump(LOADING))], trigger=True
            )
        ],
        expected_hosts=1,
    )
    log = event_log(tmp_path / "events.jsonl", older, small_report())
    result = run_cli("report", str(log))
    assert (result.returncode, result.stderr) == (0, "")
    out = result.stdout
    assert "\033" not in out  # not a terminal: no colour
    lines = out.splitlines()
    assert lines[0].startswith("Hang report 2 of 2, written ")
    assert lines[0].endswith(" UTC (first expiry on node-a[0])")
    assert lines[1:5] == [
        "7 rank(s) from 2 of 3 host(s), in 2 group(s)",
        "Suspects: rank 3 (behind the others in Flight Recorder's sequence numbers)",
        "  hosts (group ranks) that did not answer: 2",
        "  ranks that gave no stacks: 6",
    ]
    suspect, waiting = out.index("group 2  SUSPECT"), out.index("group 1  ")
    assert suspect < waiting
    suspect_part, waiting_part = out[suspect:waiting], out[waiting:]
    assert suspect_part.splitlines()[:5] == [
        "group 2  SUSPECT  1 rank(s): 3",
        "  in load_batch (train.py:24)",
        "  on 1 host(s): node-a[0]",
        "  scopes: step",
        "  Flight Recorder, rank 3: pg 0 last enqueued #11, completed #11 "
        "(last: nccl:all_reduce #11 scheduled)",
    ]
    assert waiting_part.splitlines()[:4] == [
        "group 1  6 rank(s): 0-2, 4-5, 7",
        "  in all_reduce",
        "  on 2 host(s): node-a[0], node-b[1]",
        "  scopes: step",
    ]
    assert (
        "  Flight Recorder, ranks 0-2, 4-5, 7: pg 0 last enqueued #12, completed #11 "
        "(last: nccl:all_reduce #12 scheduled)"
    ) in waiting_part
    # The frames where the groups part are marked; the loader thread both share is not.
    assert '  >   File "/job/train.py", line 24 in load_batch' in suspect_part
    assert '  >   File "/job/train.py", line 36 in main' in suspect_part
    assert f'  >   File "{C10D}", line 4181 in all_reduce' in waiting_part
    assert '      File "/usr/lib/python3.11/threading.py", line 320 in wait' in suspect_part

    coloured = report_command(capsys, str(log), "--color", "always").stdout
    assert "\033[1;31mgroup 2  SUSPECT\033[0m" in coloured
    assert '  > \033[1;33m  File "/job/train.py", line 24 in load_batch\033[0m' in coloured

    first = report_command(capsys, str(log), "--index", "0")
    assert first.returncode == 0
    assert first.stdout.startswith("Hang report 1 of 2, ")
    assert "Suspects: none found" in first.stdout
    assert report_command(capsys, str(log), "--index", "-2").stdout == first.stdout


def test_many_suspects_are_ranges_and_a_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """40 ranks: the even ones wait in all_reduce, each odd one is somewhere of its own."""
    waiting = faulthandler_dump(IN_ALL_REDUCE)
    ranks = [
        RankStacks(r, r, (), faulthandler_dump([("/job/t.py", r, "f")]) if r % 2 else waiting)
        for r in range(40)
    ]
    report = build_report([contribution("h[0]", 0, ranks, trigger=True)], expected_hosts=1)
    result = report_command(capsys, str(event_log(tmp_path / "events.jsonl", report)))
    suspects = ", ".join(str(r) for r in range(1, 32, 2))
    assert f"Suspects: ranks {suspects} and 4 more (not where the others wait)" in result.stdout
    assert result.stdout.count("  SUSPECT  1 rank(s): ") == 20


def test_the_groups_a_bounded_report_counts_are_shown_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = event_log(tmp_path / "events.jsonl", bounded_report())
    result = report_command(capsys, str(log))
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[1:3] == [
        "11 rank(s) from 2 of 3 host(s), in 4 group(s)",
        "Suspects: ranks 3, 9 (behind the others in Flight Recorder's sequence numbers)",
    ]
    assert "  Flight Recorder, 4 more rank(s) left out of the report" in lines
    assert lines[-3:] == [
        "and 2 more group(s), summarised  4 rank(s), 1 suspect(s): 8-11",
        "  3 rank(s) in 1 group(s) in all_reduce",
        "  1 rank(s) in 1 group(s) in save (train.py:50)",
    ]


def on_a_terminal(*args: str, env: dict[str, str]) -> str:
    """What ``elastic-timer report ARGS`` writes when its stdout is a terminal (a pty)."""
    leader, follower = pty.openpty()
    with subprocess.Popen(
        [*CLI, "report", *args], stdout=follower, stderr=subprocess.DEVNULL, env=env
    ) as child:
        os.close(follower)
        out = b""
        with contextlib.suppress(OSError):  # EIO once the child closed its end
            while chunk := os.read(leader, 1 << 16):
                out += chunk
        assert child.wait(timeout=60) == 0
    os.close(leader)
    return out.decode()


def test_colour_on_a_terminal_unless_no_color(tmp_path: Path) -> None:
    log = str(event_log(tmp_path / "events.jsonl", small_report()))
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    assert "\033[1;31mSuspects: rank 3\033[0m" in on_a_terminal(log, env=env)
    assert "\033" not in on_a_terminal(log, env={**env, "NO_COLOR": "1"})


def test_text_from_the_job_cannot_drive_the_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evil = [("/job/train.py", 7, "f\033]0;owned\a\033[2J")]
    report = build_report(
        [
            contribution(
                "h\033[31m[0]", 0, [RankStacks(0, 9, (), faulthandler_dump(evil))], trigger=True
            )
        ],
        expected_hosts=1,
    )
    result = report_command(capsys, str(event_log(tmp_path / "events.jsonl", report)))
    assert result.returncode == 0
    assert "\033" not in result.stdout and "\a" not in result.stdout
    assert "in f\\x1b]0;owned\\x07\\x1b[2J" in result.stdout
    assert "h\\x1b[31m[0]" in result.stdout


def test_errors_are_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = report_command(capsys, str(tmp_path / "nowhere.jsonl"))
    assert missing.returncode == 1
    assert (
        missing.stderr == f"elastic-timer report: error: no such file: {tmp_path}/nowhere.jsonl\n"
    )

    quiet = event_log(tmp_path / "quiet.jsonl")
    none = report_command(capsys, str(quiet))
    assert (none.returncode, none.stdout) == (1, "")
    assert none.stderr == f"elastic-timer report: error: no hang report in {quiet}\n"

    log = event_log(tmp_path / "events.jsonl", small_report())
    out_of_range = report_command(capsys, str(log), "--index", "1")
    assert out_of_range.returncode == 1
    assert out_of_range.stderr == (
        f"elastic-timer report: error: --index 1 is out of range: {log} has 1 hang report(s), "
        "0 to 0 (or -1 to -1 from the latest)\n"
    )

    # Another user could have left a link (or a file of theirs) where the log is looked for.
    link = tmp_path / "link.jsonl"
    link.symlink_to(log)
    refused = report_command(capsys, str(link))
    assert refused.returncode == 1
    assert refused.stderr.startswith(f"elastic-timer report: error: cannot read {link}: ")
    open_to_all = event_log(tmp_path / "shared.jsonl", small_report())
    open_to_all.chmod(0o666)
    assert report_command(capsys, str(open_to_all)).returncode == 1

    nowhere = tmp_path / "no-such-dir" / "hang.html"
    unwritable = report_command(capsys, str(log), "--html", str(nowhere))
    assert unwritable.returncode == 1
    assert unwritable.stderr == (
        f"elastic-timer report: error: cannot write {nowhere}: No such file or directory\n"
    )

    bad_index = report_command(capsys, str(log), "--index", "last")
    assert bad_index.returncode == 2
    assert "argument --index: invalid int value: 'last'" in bad_index.stderr


def test_a_malformed_line_is_skipped_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = event_log(tmp_path / "events.jsonl", small_report())
    with open(log, "ab") as file:
        file.write(b'{"event": "hang report", "suspects": [3], "grou\n')  # torn by a crash
        file.write(b'["not", "an", "object"]\n')
        file.write(json.dumps({"event": "hang report", "suspects": "3"}).encode() + b"\n")
        file.write(b'{"event": "hang \xff report"}\n')  # not UTF-8
    result = report_command(capsys, str(log))
    assert result.returncode == 0
    assert result.stdout.startswith("Hang report 1 of 1")  # the good one, before them
    assert result.stderr.splitlines() == [
        f"elastic-timer report: warning: {log}:4: not a JSON line, skipped",
        f"elastic-timer report: warning: {log}:5: not a JSON object, skipped",
        f"elastic-timer report: warning: {log}:6: a hang report with no valid 'suspects', skipped",
        f"elastic-timer report: warning: {log}:7: not a JSON line, skipped",
    ]


def test_odd_values_in_a_report_are_shown_or_skipped_never_a_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "events.jsonl"
    far_future = {"time": 1e300, "event": "hang report", **small_report()}
    huge_rank = {"time": 0, "event": "hang report", **small_report()}
    huge_rank["groups"][0]["collectives"]["9" * 5000] = flight_recorder(12)
    log.write_text(json.dumps(far_future) + "\n" + json.dumps(huge_rank) + "\n")
    log.chmod(0o600)
    result = report_command(capsys, str(log))
    assert result.returncode == 0
    assert result.stdout.startswith("Hang report 1 of 1 (first expiry on node-a[0])\n")
    assert result.stderr == (
        f"elastic-timer report: warning: {log}:2: a hang report with collectives of something "
        "that is not a rank in group 1, skipped\n"
    )


# -- the page, in a real browser ----------------------------------------------------------------


@pytest.fixture(autouse=True)
def short_tmpdir(socket_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """chromium makes its singleton socket in TMPDIR: under a long one (a CI job's) that
    socket's path passes the 108 bytes of a Unix socket's, and chromium dies (SIGTRAP)."""
    monkeypatch.setenv("TMPDIR", str(socket_dir))


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Debian's chromium, headless, on a profile of its own; its console goes to stderr."""
    binary = shutil.which("chromium")
    if binary is None:
        pytest.fail("chromium is missing: scripts/test.sh installs it (apt-get install chromium)")
    sandbox = ["--no-sandbox"] if os.geteuid() == 0 else []  # refused as root otherwise
    return subprocess.run(
        [
            binary,
            "--headless",
            *sandbox,
            "--disable-gpu",
            "--force-device-scale-factor=1",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--enable-logging=stderr",
            "--v=0",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def console(stderr: str) -> list[str]:
    """What the page wrote to the console (its errors, uncaught exceptions among them)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.fixture
def page_of(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Any:
    def write(report: Mapping[str, Any], name: str) -> Path:
        log = event_log(tmp_path / f"{name}.jsonl", report)
        out = tmp_path / f"{name}.html"
        result = report_command(capsys, str(log), "--html", str(out))
        assert result.returncode == 0, result.stderr
        assert result.stderr == f"elastic-timer report: wrote hang report 1 of 1 to {out}\n"
        return out

    return write


def rendered(tmp_path: Path, page: Path, width: int, height: int) -> tuple[dict[str, str], Any]:
    """The page's DOM once its script ran (the body's data attributes, and the HTML), and a
    screenshot of it, at ``width`` x ``height``; no console message in either run."""
    size = f"--window-size={width},{height}"
    dom = chromium(tmp_path, size, "--dump-dom", page.as_uri())
    assert console(dom.stderr) == []
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body is not None
    attributes = dict(re.findall(r'data-([\w-]+)="([^"]*)"', body[1]))
    shot = page.with_suffix(".png")
    taken = chromium(tmp_path, size, f"--screenshot={shot}", page.as_uri())
    assert console(taken.stderr) == []
    attributes["dom"] = dom.stdout
    return attributes, imread(shot)


def colour_of(pixels: Any, grid: dict[str, Any], rank: int) -> tuple[int, int, int]:
    """The colour at the centre of ``rank``'s cell in a screenshot."""
    pitch, size = grid["pitch"], grid["size"]
    x = int(grid["left"] + (rank % grid["cols"]) * pitch + size / 2)
    y = int(grid["top"] + (rank // grid["cols"]) * pitch + size / 2)
    r, g, b = (round(float(c) * 255) for c in pixels[y, x, :3])
    return r, g, b


def near(actual: tuple[int, int, int], expected: tuple[int, int, int]) -> bool:
    return all(abs(a - e) <= 3 for a, e in zip(actual, expected))


def test_the_console_check_sees_a_page_that_fails(tmp_path: Path) -> None:
    """The check the page tests rely on: chromium writes an uncaught error to stderr."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><script>notDefined();</script>")
    result = chromium(tmp_path, "--dump-dom", page.as_uri())
    (line,) = console(result.stderr)
    assert "Uncaught ReferenceError: notDefined is not defined" in line


def test_the_page_colours_the_suspect_red_and_names_what_it_shows(
    tmp_path: Path, page_of: Any
) -> None:
    page = page_of(small_report(), "small")
    assert "http:" not in page.read_text() and "https:" not in page.read_text()
    state, pixels = rendered(tmp_path, page, 1200, 900)
    grid = json.loads(state["grid"].replace("&quot;", '"'))
    assert near(colour_of(pixels, grid, 3), SUSPECT)
    for rank in (0, 1, 2, 4, 5, 7):
        assert near(colour_of(pixels, grid, rank), GROUP_1)
    assert near(colour_of(pixels, grid, 6), NO_STACKS)
    dom = state["dom"]
    assert "Suspects: rank 3 " in dom
    assert "6 rank(s): 0-2, 4-5, 7" in dom
    assert "Flight Recorder, rank 3: pg 0 last enqueued #11, completed #11" in dom
    assert '<span class="parting">  File "/job/train.py", line 24 in load_batch</span>' in dom
    # The suspects' card comes first.
    assert dom.index("in load_batch (train.py:24)</div>") < dom.index("in all_reduce</div>")


def test_the_page_draws_the_ranks_of_summarised_groups(tmp_path: Path, page_of: Any) -> None:
    state, pixels = rendered(tmp_path, page_of(bounded_report(), "bounded"), 1200, 900)
    grid = json.loads(state["grid"].replace("&quot;", '"'))
    for rank in (8, 10, 11):
        assert near(colour_of(pixels, grid, rank), SUMMARISED)
    for rank in (3, 9):
        assert near(colour_of(pixels, grid, rank), SUSPECT)
    assert "and 2 more groups, summarised" in state["dom"]
    assert "4 rank(s), 1 suspect(s): 8-11" in state["dom"]


def test_text_from_the_job_stays_text_on_the_page(tmp_path: Path, page_of: Any) -> None:
    evil = "</script><script>document.title='owned'</script><img src=x onerror=alert(1)><!--"
    frames = [("/job/train.py", 7, evil)]
    report = one_rank_report(f"{evil}[0]", frames)
    page = page_of(report, "evil")
    assert "</script><script>document" not in page.read_text()
    state, _ = rendered(tmp_path, page, 1000, 700)
    dom = state["dom"]
    assert "<img" not in dom and "owned</title>" not in dom
    assert "&lt;/script&gt;&lt;script&gt;document.title='owned'" in dom  # shown, as text


def test_a_16384_rank_page_renders_in_under_2_s(tmp_path: Path, page_of: Any) -> None:
    """2,048 hosts of 8 ranks wait in all_reduce but rank 12,345, which loads a batch."""
    waiting = faulthandler_dump(IN_ALL_REDUCE, LOADER_THREAD)
    loading = faulthandler_dump(LOADING, LOADER_THREAD)
    shares = [
        contribution(
            f"node-{host:04d}[{host}]",
            host,
            [
                RankStacks(rank, 1000 + rank, ("step",), loading if rank == 12345 else waiting)
                for rank in range(host * 8, host * 8 + 8)
            ],
            trigger=host == 0,
        )
        for host in range(2048)
    ]
    page = page_of(build_report(shares, expected_hosts=2048), "large")
    size = page.stat().st_size
    # The stacks once per group; per rank only small numbers (its group, host and pid).
    assert size < 320_000, size
    state, pixels = rendered(tmp_path, page, 1280, 1400)
    grid = json.loads(state["grid"].replace("&quot;", '"'))
    assert grid["cols"] == 128
    assert near(colour_of(pixels, grid, 12345), SUSPECT)
    for rank in (0, 12344, 12346, 16383):
        assert near(colour_of(pixels, grid, rank), GROUP_1)
    assert "Suspects: rank 12345 " in state["dom"]
    # From navigation to the last cell drawn (the page measures it itself).
    milliseconds = int(state["render-ms"])
    print(f"\n16,384-rank page ({size} bytes): drawn {milliseconds} ms after navigation")
    assert milliseconds < 2000


class DevTools:
    """A headless chromium driven through the DevTools protocol (``--remote-debugging-pipe``:
    commands on its fd 3, answers and events on its fd 4), for what a person does with the
    page: move the mouse over a cell, click it."""

    def __init__(self, tmp_path: Path, width: int, height: int) -> None:
        binary = shutil.which("chromium")
        if binary is None:
            pytest.fail("chromium is missing: scripts/test.sh installs it")
        commands, self._commands = os.pipe()
        self._answers, answers = os.pipe()

        def onto_3_and_4() -> None:
            # Through fds above both: either pipe end may itself be fd 3 or 4.
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (commands, answers)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        sandbox = ["--no-sandbox"] if os.geteuid() == 0 else []
        self._process = subprocess.Popen(
            [
                binary,
                "--headless",
                *sandbox,
                "--disable-gpu",
                "--remote-debugging-pipe",
                f"--user-data-dir={tmp_path / 'devtools-profile'}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=False,
            preexec_fn=onto_3_and_4,
        )
        os.close(commands)
        os.close(answers)
        self._buffer = b""
        self._next = 0
        self.events: list[dict[str, Any]] = []
        self._session: str | None = None
        (target,) = [
            t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page"
        ]
        attached = self.send("Target.attachToTarget", targetId=target["targetId"], flatten=True)
        self._session = attached["sessionId"]
        for domain in ("Page", "Runtime"):
            self.send(f"{domain}.enable")
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._next += 1
        message: dict[str, Any] = {"id": self._next, "method": method, "params": params}
        if self._session is not None:
            message["sessionId"] = self._session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:
            answer = self._receive()
            if answer.get("id") == self._next:
                assert "error" not in answer, answer
                result: dict[str, Any] = answer["result"]
                return result
            self.events.append(answer)

    def _receive(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._answers], [], [], 60)
            assert ready, "chromium did not answer within 60 s"
            chunk = os.read(self._answers, 1 << 16)
            assert chunk, "chromium closed its DevTools pipe"
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        parsed: dict[str, Any] = json.loads(message)
        return parsed

    def open(self, page: Path) -> None:
        self.send("Page.navigate", url=page.as_uri())
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._receive())

    def evaluate(self, expression: str) -> Any:
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)[
            "result"
        ].get("value")

    def mouse(self, kind: str, x: float, y: float) -> None:
        self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def screenshot(self, path: Path) -> None:
        png = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(png))

    def console(self) -> list[dict[str, Any]]:
        """What the page wrote to the console, and the exceptions it did not catch."""
        kinds = ("Runtime.consoleAPICalled", "Runtime.exceptionThrown")
        return [e for e in self.events if e.get("method") in kinds]

    def close(self) -> None:
        """Asks chromium to quit (without waiting for its answer), and waits for it."""
        with contextlib.suppress(OSError):  # it may be gone already
            os.write(self._commands, b'{"id": 0, "method": "Browser.close"}\0')
        os.close(self._commands)
        os.close(self._answers)
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()  # ours, by its pid
            self._process.wait()
            raise


def test_hovering_and_clicking_a_cell_show_its_host_pid_and_stack(
    tmp_path: Path, page_of: Any
) -> None:
    page = page_of(small_report(), "small")
    browser = DevTools(tmp_path, 1200, 900)
    try:
        browser.open(page)
        grid = json.loads(browser.evaluate("document.body.dataset.grid"))
        x = grid["left"] + 3 * grid["pitch"] + grid["size"] / 2
        y = grid["top"] + grid["size"] / 2
        browser.mouse("mouseMoved", x, y)
        tip = browser.evaluate(
            "(t => t.hidden ? null : t.textContent)(document.getElementById('tip'))"
        )
        assert tip.splitlines()[:3] == [
            "rank 3  (suspect)",
            "group 2, in load_batch (train.py:24)",
            "host node-a[0], pid 1003",
        ]
        assert 'File "/job/train.py", line 24 in load_batch' in tip
        browser.mouse("mousePressed", x, y)
        browser.mouse("mouseReleased", x, y)
        detail = browser.evaluate("document.getElementById('detail').textContent")
        assert detail.startswith(
            "rank 3 (host node-a[0], pid 1003) · group 2SUSPECTin load_batch (train.py:24)"
        )
        assert 'File "/job/train.py", line 24 in load_batch' in detail
        # The other group's cells are dimmed, the clicked one's card outlined.
        assert browser.evaluate("document.querySelectorAll('.card.selected').length") == 1
        browser.screenshot(tmp_path / "clicked.png")
        pixels = imread(tmp_path / "clicked.png")
        dimmed = colour_of(pixels, grid, 0)
        assert not near(dimmed, GROUP_1) and dimmed[2] > dimmed[0]  # paler, still blue
        assert browser.console() == []
    finally:
        browser.close()
