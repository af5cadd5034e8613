"""Diagnostics: stacks before the kill, escalation, unreapable workers, dry runs and events.

Real worker processes, real signals and exit codes. Every server here passes
``signal_self=False`` (torch's File server would otherwise signal pytest after a reap).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_for
from unkillable import HungFilesystem, hung_filesystem

from elastic_timer import FileTimerClient, FileTimerServer, LocalTimerServer, options
from elastic_timer.stack_dump import arm_stack_dump

STACK_DUMP_ENV = options.env("stack_dump")
STACKS_DIR_ENV = options.env("stacks_dir")

LOGGER = "elastic_timer"

# A worker that hangs in a function with a name to look for in its stacks. `{client}` builds
# the client from `path`; the timer expires after 0.3 s.
WORKER = """
import os, signal, sys, time
path = sys.argv[1]
{setup}

def stuck_in_a_collective():
    time.sleep(60)

with expires(after=0.3, client=client):
    print("acquired", flush=True)
    stuck_in_a_collective()
"""

OUR_CLIENT = """
from elastic_timer import FileTimerClient, expires
client = FileTimerClient(path, signal=int(sys.argv[2]))
"""

TORCH_CLIENT = """
from torch.distributed.elastic.timer import FileTimerClient, expires
client = FileTimerClient(path, signal=int(sys.argv[2]))
"""

IGNORES_SIGTERM = OUR_CLIENT + "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"


def start_worker(
    children: list[Any], fifo: str, setup: str, sig: int = signal.SIGKILL
) -> subprocess.Popen[bytes]:
    """Starts a worker (inheriting this process's environment now) and waits for its timer."""
    script = WORKER.format(setup=setup)
    worker = subprocess.Popen(
        [sys.executable, "-c", script, fifo, str(int(sig))], stdout=subprocess.PIPE
    )
    children.append(worker)
    assert worker.stdout is not None
    assert worker.stdout.readline() == b"acquired\n"
    return worker


def events_named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == name]


@pytest.fixture
def file_server(fifo: str) -> Iterator[Callable[..., tuple[FileTimerServer, list[dict[str, Any]]]]]:
    """Starts FileTimerServers on the test's FIFO with an event recorder; stops them after."""
    built: list[FileTimerServer] = []

    def make(**kwargs: Any) -> tuple[FileTimerServer, list[dict[str, Any]]]:
        events: list[dict[str, Any]] = []
        server = FileTimerServer(
            fifo, "diag", max_interval=0.1, signal_self=False, on_event=events.append, **kwargs
        )
        built.append(server)
        server.start()
        return server, events

    yield make
    for server in built:
        server.stop()


# -- stacks before the kill -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "source"),
    [(OUR_CLIENT, "faulthandler"), pytest.param(TORCH_CLIENT, "py-spy", marks=pytest.mark.torch)],
)
def test_the_stacks_of_an_expired_worker_are_logged_before_it_is_killed(
    file_server: Callable[..., Any],
    fifo: str,
    children: list[Any],
    caplog: pytest.LogCaptureFixture,
    setup: str,
    source: str,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server, events = file_server(stack_dump=10.0)
    worker = start_worker(children, fifo, setup)
    assert worker.wait(15) == -signal.SIGKILL
    assert wait_for(lambda: events_named(events, "timer expired"))
    (expired,) = events_named(events, "timer expired")
    assert expired["pid"] == worker.pid
    assert expired["outcome"] == "signalled"
    assert expired["stacks_source"] == source
    assert expired["stacks_complete"] is True
    assert "stuck_in_a_collective" in expired["stacks"], expired["stacks"]
    (record,) = [r for r in caplog.records if r.getMessage().startswith("Stacks of expired")]
    assert f"pid={worker.pid} (timers [" in record.getMessage()
    assert f"; from {source})" in record.getMessage()
    assert "stuck_in_a_collective" in record.getMessage()
    # Logged before the reap's own lines.
    reaped = [r for r in caplog.records if "Successfully reaped" in r.getMessage()]
    assert caplog.records.index(record) < caplog.records.index(reaped[0])
    assert server.stats()["stack_dumps"] == 1


@pytest.mark.torch
def test_a_worker_with_no_way_to_dump_it_is_killed_at_its_deadline(
    file_server: Callable[..., Any],
    fifo: str,
    children: list[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A torch client (faulthandler not armed) and no py-spy installed: the kill is not
    # delayed by the 10 s grace.
    monkeypatch.setattr(options, "_find_py_spy", lambda: None)
    server, events = file_server(stack_dump=10.0)
    worker = start_worker(children, fifo, TORCH_CLIENT)
    acquired = time.monotonic()
    assert worker.wait(15) == -signal.SIGKILL
    assert time.monotonic() - acquired < 2.0
    assert wait_for(lambda: events_named(events, "timer expired"))
    assert events_named(events, "timer expired")[0]["stacks"] is None
    assert server.stats()["stack_dumps"] == 0


def test_the_environment_turns_stack_dumps_on_for_a_server_built_without_them(
    fifo: str,
    children: list[Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # As under torchrun, where the agent builds the server: only the environment says so.
    monkeypatch.setenv(STACK_DUMP_ENV, "5")
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = FileTimerServer(fifo, "env", max_interval=0.1, signal_self=False)
    server.start()
    try:
        stacks_dir = os.environ[STACKS_DIR_ENV]
        worker = start_worker(children, fifo, OUR_CLIENT)
        assert worker.wait(15) == -signal.SIGKILL
        assert wait_for(
            lambda: any("stuck_in_a_collective" in r.getMessage() for r in caplog.records)
        )
    finally:
        server.stop()
    assert STACKS_DIR_ENV not in os.environ, "the server's variable goes with it"
    assert not os.path.exists(stacks_dir), "the directory it made goes too"


def test_a_forked_worker_writes_its_stacks_to_a_file_of_its_own(tmp_path: Path) -> None:
    (tmp_path / "signal").write_text(f"{int(signal.SIGUSR2)}\n")
    script = textwrap.dedent(
        """
        import os, signal, sys, time
        from elastic_timer.stack_dump import arm_stack_dump
        assert arm_stack_dump()
        pid = os.fork()
        if pid == 0:
            def only_in_the_child():
                os.kill(os.getpid(), signal.SIGUSR2)
                time.sleep(0.2)
            only_in_the_child()
            os._exit(0)
        os.waitpid(pid, 0)
        print(pid)
        """
    )
    env = {**os.environ, STACKS_DIR_ENV: str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, check=True, capture_output=True, timeout=30
    )
    child = int(out.stdout)
    files = {int(p.name.split("-")[0]): p.read_text() for p in tmp_path.glob("*.stacks")}
    assert len(files) == 2 and child in files, files
    assert "only_in_the_child" in files.pop(child)
    assert list(files.values()) == [""], "the parent's file gets nothing of the child's"


def test_arming_without_a_server_asking_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(STACKS_DIR_ENV, raising=False)
    assert arm_stack_dump() is False


def test_a_stacks_dir_without_the_servers_signal_file_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    script = "from elastic_timer.stack_dump import arm_stack_dump; print(arm_stack_dump())"
    env = {**os.environ, STACKS_DIR_ENV: str(tmp_path / "missing")}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=30
    )
    assert out.stdout.strip() == "False"
    assert "Cannot arm stack dumps" in out.stderr


# A worker that arms (its client's constructor), says where its stacks file is, and waits for
# a line on stdin before it acquires a timer and hangs.
ARMED_WORKER = """
import glob, os, sys, time
from elastic_timer import FileTimerClient, expires
client = FileTimerClient(sys.argv[1])
(path,) = glob.glob(os.path.join(os.environ["ELASTIC_TIMER_STACKS_DIR"], f"{os.getpid()}-*.stacks"))
print(path, flush=True)
sys.stdin.readline()

def stuck_in_a_collective():
    time.sleep(60)

with expires(after=0.3, client=client):
    print("acquired", flush=True)
    stuck_in_a_collective()
"""


def plant_symlink(path: Path, secret: Path) -> None:
    path.symlink_to(secret)


def plant_other_users_file(path: Path, secret: Path) -> None:
    path.write_text(secret.read_text())
    os.chown(path, 54321, -1)  # the suite runs as root


@pytest.mark.parametrize(
    ("plant", "reason"),
    [
        (plant_symlink, "it is a symbolic link"),
        (plant_other_users_file, "it belongs to uid 54321, not to "),
    ],
)
def test_a_stacks_file_swapped_for_another_is_not_read(
    file_server: Callable[..., Any],
    fifo: str,
    tmp_path: Path,
    children: list[Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    plant: Callable[[Path, Path], None],
    reason: str,
) -> None:
    # The stacks directory is one others can write: what is at the worker's name by the time
    # it expires is not the worker's file. The server must not show it (no py-spy here).
    caplog.set_level(logging.INFO, logger=LOGGER)
    monkeypatch.setattr(options, "_find_py_spy", lambda: None)
    secret = tmp_path / "secret"
    secret.write_text("root's secret, not for the log\n")
    server, events = file_server(stack_dump=10.0)
    worker = subprocess.Popen(
        [sys.executable, "-c", ARMED_WORKER, fifo],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    children.append(worker)
    assert worker.stdin is not None and worker.stdout is not None
    stacks_file = Path(worker.stdout.readline().decode().strip())
    stacks_file.unlink()
    plant(stacks_file, secret)
    worker.stdin.write(b"go\n")
    worker.stdin.flush()
    assert worker.stdout.readline() == b"acquired\n"
    acquired = time.monotonic()
    assert worker.wait(15) == -signal.SIGKILL
    assert time.monotonic() - acquired < 5.0, "killed at its deadline, not after the grace"
    assert wait_for(lambda: events_named(events, "timer expired"))
    (expired,) = events_named(events, "timer expired")
    assert expired["stacks"] is None
    warning = f"Not reading {stacks_file}, the stacks file of worker pid={worker.pid}: {reason}"
    assert any(r.getMessage().startswith(warning) for r in caplog.records), caplog.text
    (logged,) = events_named(events, "warning")
    assert logged["message"].startswith(warning)
    assert "secret" not in caplog.text.replace(str(secret), "")
    assert "not for the log" not in json.dumps(events)
    assert server.stats()["stack_dumps"] == 0


def test_a_file_server_names_its_stacks_directory_beside_its_fifo_while_it_runs(
    fifo: str, tmp_path: Path
) -> None:
    sidecar = Path(fifo + ".stacks")
    server = FileTimerServer(fifo, "sidecar", signal_self=False, stack_dump=5.0)
    assert not sidecar.exists(), "named when it starts"
    server.start()
    stacks_dir = server._diagnostics.stacks_dir
    assert stacks_dir is not None and os.path.isabs(stacks_dir)
    assert sidecar.read_text() == f"{stacks_dir}\n"
    assert oct(sidecar.stat().st_mode & 0o777) == oct(0o644)
    server.stop()
    assert not sidecar.exists()
    # Another server's sidecar at the path by the time this one stops is left alone.
    server.start()
    sidecar.unlink()
    sidecar.write_text("/another/servers/stacks\n")
    server.stop()
    assert sidecar.read_text() == "/another/servers/stacks\n"
    # Without stack dumps there is nothing to name, and one left by a server that died with
    # the FIFO this one replaced goes.
    plain = FileTimerServer(fifo, "plain", signal_self=False)
    plain.start()
    try:
        assert not sidecar.exists()
    finally:
        plain.stop()


def test_the_servers_stacks_directory_comes_from_its_environment(
    fifo: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_dir = tmp_path / "job" / "stacks"
    monkeypatch.setenv(STACKS_DIR_ENV, str(job_dir))
    server = FileTimerServer(fifo, "env-dir", signal_self=False, stack_dump=5.0)
    server.start()
    try:
        assert job_dir.is_dir(), "created if missing"
        assert server._diagnostics.stacks_dir == str(job_dir)
        # A second server while the first runs: the variable is the user's, so it shares it.
        other = FileTimerServer(str(tmp_path / "other.fifo"), "other", stack_dump=5.0)
        assert other._diagnostics.stacks_dir == str(job_dir)
    finally:
        server.stop()
    assert os.environ[STACKS_DIR_ENV] == str(job_dir), "the user's variable stays"
    assert job_dir.is_dir(), "and so does the job's directory"
    monkeypatch.delenv(STACKS_DIR_ENV)
    server = FileTimerServer(fifo, "own-dir", signal_self=False, stack_dump=5.0)
    server.start()
    try:
        # Set by this server for the workers it starts: not a directory a later server of
        # this process should take for the user's.
        own_dir = os.environ[STACKS_DIR_ENV]
        later = FileTimerServer(str(tmp_path / "later.fifo"), "later", stack_dump=5.0)
        assert later._diagnostics.stacks_dir not in (None, own_dir)
        assert later._diagnostics.owns_stacks_dir
        later.stop()
    finally:
        server.stop()
    assert STACKS_DIR_ENV not in os.environ


# -- escalation and unreapable workers --------------------------------------------------------


def test_a_worker_that_ignores_its_signal_is_killed_after_the_grace(
    file_server: Callable[..., Any], fifo: str, children: list[Any]
) -> None:
    server, events = file_server(escalate_after=0.5)
    worker = start_worker(children, fifo, IGNORES_SIGTERM, sig=signal.SIGTERM)
    started = time.monotonic()
    assert worker.wait(15) == -signal.SIGKILL
    assert time.monotonic() - started >= 0.5
    assert wait_for(lambda: events_named(events, "escalated"))
    (escalated,) = events_named(events, "escalated")
    assert (escalated["pid"], escalated["signal"]) == (worker.pid, signal.SIGTERM)
    assert escalated["after"] >= 0.5
    stats = server.stats()
    assert (stats["reaped"], stats["escalated"], stats["unreapable"]) == (1, 1, 0)


def test_without_escalation_a_worker_that_ignores_its_signal_keeps_running(
    file_server: Callable[..., Any], fifo: str, children: list[Any]
) -> None:
    # torch's behaviour, the default: one signal, and the worker is forgotten.
    server, events = file_server()
    worker = start_worker(children, fifo, IGNORES_SIGTERM, sig=signal.SIGTERM)
    assert wait_for(lambda: server.stats()["reaped"] == 1)
    time.sleep(1.0)
    assert worker.poll() is None
    assert not events_named(events, "escalated")


@pytest.fixture
def hung_fs(tmp_path: Path, children: list[Any]) -> Iterator[HungFilesystem]:
    """A FUSE mount on which a worker's stat hangs until released, so that the worker survives
    SIGKILL as on a hung network filesystem. It uses ``children``, so it is released and
    unmounted first at teardown, before ``children`` kills and reaps what is left."""
    with hung_filesystem(tmp_path / "mnt") as filesystem:
        yield filesystem


def test_a_worker_that_survives_sigkill_is_reported_once_as_unreapable(
    file_server: Callable[..., Any],
    fifo: str,
    children: list[Any],
    hung_fs: HungFilesystem,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server, events = file_server(escalate_after=0.3)
    # Returns once the filesystem holds the worker's lookup: SIGKILL cannot end its wait.
    worker = hung_fs.start_worker(children.append)
    # The worker is stuck in its stat and cannot send its own request: send it on its behalf.
    FileTimerClient(fifo)._send(worker.pid, "hung", time.time() + 0.1, signal.SIGKILL)
    assert wait_for(lambda: events_named(events, "unreapable"))
    (unreapable,) = events_named(events, "unreapable")
    assert unreapable["pid"] == worker.pid
    assert unreapable["after"] >= 0.3
    # What /proc says: killed while the filesystem holds its request, it sleeps uninterruptibly.
    assert "state D (disk sleep), waiting in " in unreapable["state"], unreapable["state"]
    assert worker.poll() is None, "still there after SIGKILL"
    time.sleep(1.0)
    messages = [r.getMessage() for r in caplog.records if "cannot be reaped" in r.getMessage()]
    assert len(messages) == 1, "reported once"
    assert server.stats()["unreapable"] == 1
    hung_fs.release()
    assert worker.wait(10) == -signal.SIGKILL, "the pending SIGKILL lands once the stat returns"


# -- dry run ------------------------------------------------------------------------------------


def dry_run_worker(queue: Any) -> None:
    from elastic_timer import LocalTimerClient, configure, expires

    configure(LocalTimerClient(queue))
    with expires(after=0.2, scope="slow step"):
        time.sleep(1.5)


def test_a_dry_run_reports_the_expiry_and_kills_nothing(
    children: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    events: list[dict[str, Any]] = []
    server = LocalTimerServer(queue, max_interval=0.1, dry_run=True, on_event=events.append)
    server.start()
    try:
        worker = ctx.Process(target=dry_run_worker, args=(queue,))
        worker.start()
        children.append(worker)
        worker.join(20)
        assert worker.exitcode == 0, "the block ran to its end"
    finally:
        server.stop()
    (expired,) = events_named(events, "timer expired")
    assert (expired["pid"], expired["scopes"], expired["outcome"]) == (
        worker.pid,
        ["slow step"],
        "dry_run",
    )
    assert any(
        f"Dry run: worker pid={worker.pid} would be reaped with signal 9" in r.getMessage()
        for r in caplog.records
    )
    stats = server.stats()
    assert (stats["expired"], stats["reaped"]) == (1, 0)


# -- events and figures -------------------------------------------------------------------------


def test_every_event_goes_to_the_event_log_as_one_json_object(
    fifo: str, tmp_path: Path, children: list[Any]
) -> None:
    log = tmp_path / "events.jsonl"
    server = FileTimerServer(
        fifo, "events", max_interval=0.1, signal_self=False, event_log=str(log)
    )
    server.start()
    try:
        worker = start_worker(children, fifo, OUR_CLIENT)
        assert worker.wait(15) == -signal.SIGKILL
        with open(fifo, "wb") as f:
            f.write(b"not json\n")
        assert wait_for(lambda: server.stats()["malformed"] == 1)
    finally:
        server.stop()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    names = [r["event"] for r in records]
    assert names[0] == "watchdog started" and names[-1] == "watchdog stopped", names
    (expired,) = events_named(records, "timer expired")
    assert expired["pid"] == worker.pid
    assert expired["signal"] == signal.SIGKILL
    assert expired["outcome"] == "signalled"
    assert expired["stacks"] is None
    (malformed,) = events_named(records, "malformed")
    assert malformed["reason"].startswith("invalid JSON: "), malformed
    assert all(r["server_pid"] == os.getpid() and r["time"] > 0 for r in records)


def test_a_failing_event_callback_is_logged_and_reaping_goes_on(
    fifo: str, children: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: dict[str, Any]) -> None:
        raise RuntimeError("callback bug")

    server = FileTimerServer(fifo, "broken", max_interval=0.1, signal_self=False, on_event=broken)
    server.start()
    try:
        for _ in range(2):
            worker = start_worker(children, fifo, OUR_CLIENT)
            assert worker.wait(15) == -signal.SIGKILL
        assert wait_for(lambda: server.stats()["reaped"] == 2)
    finally:
        server.stop()
    assert any("on_event callback raised" in r.getMessage() for r in caplog.records)


def test_a_second_start_does_nothing_and_leaves_the_running_servers_diagnostics_alone(
    fifo: str, tmp_path: Path, children: list[Any]
) -> None:
    """torch's start() on a started server just starts; ours does nothing (no error), and the
    running loop keeps its stacks directory and event log."""
    log = tmp_path / "events.jsonl"
    server = FileTimerServer(fifo, "twice", signal_self=False, stack_dump=5.0, event_log=str(log))
    server.start()
    try:
        stacks_dir = os.environ[STACKS_DIR_ENV]
        server.start()
        assert os.environ[STACKS_DIR_ENV] == stacks_dir
        worker = start_worker(children, fifo, OUR_CLIENT)
        assert worker.wait(15) == -signal.SIGKILL
        assert wait_for(lambda: "timer expired" in log.read_text())
    finally:
        server.stop()
    assert "stuck_in_a_collective" in log.read_text()


def test_an_event_log_that_cannot_be_opened_fails_start_and_announces_nothing(
    fifo: str, tmp_path: Path
) -> None:
    server = FileTimerServer(
        fifo,
        "no-log",
        signal_self=False,
        stack_dump=5.0,
        event_log=str(tmp_path / "missing" / "events.jsonl"),
    )
    with pytest.raises(FileNotFoundError):
        server.start()
    assert STACKS_DIR_ENV not in os.environ, "no worker is told of a server that did not start"
    server.stop()


def test_counters_are_readable_from_python(file_server: Callable[..., Any]) -> None:
    server, _ = file_server()
    assert set(server.stats()) == {
        "requests",
        "malformed",
        "refused",
        "over_cap",
        "expired",
        "reaped",
        "escalated",
        "unreapable",
        "stack_dumps",
        "live_timers",
        "events_dropped",
        "learned_expiries",
        "learned_scopes",
    }


@pytest.mark.parametrize(
    ("keyword", "value", "message"),
    [
        ("stack_dump", -1.0, "stack_dump must be a positive number of seconds"),
        ("escalate_after", 0.0, "escalate_after must be a positive number of seconds"),
        ("stack_signal", "NOPE", "unknown signal 'NOPE'"),
        ("stack_signal", 999, "not a valid signal number"),
        ("stack_signal", "KILL", "SIGKILL cannot be caught"),
        ("max_timers", 0, "max_timers must be a positive whole number"),
        ("max_worker_timers", 2.5, "max_worker_timers must be a positive whole number"),
    ],
)
def test_bad_diagnostics_keywords_are_a_clear_error(
    fifo: str, keyword: str, value: Any, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        FileTimerServer(fifo, "bad", signal_self=False, **{keyword: value})


@pytest.mark.parametrize("server", [FileTimerServer, LocalTimerServer])
def test_the_diagnostics_keywords_are_those_documented_and_a_typo_is_an_error(
    fifo: str, server: type[Any]
) -> None:
    assert set(options.DiagnosticsOptions.__annotations__) == {
        "stack_dump",
        "stack_signal",
        "stacks_dir",
        "escalate_after",
        "dry_run",
        "event_log",
        "on_event",
        "adaptive",
        "adaptive_factor",
        "adaptive_floor",
        "state_file",
        "max_timers",
        "max_worker_timers",
    }
    args = (fifo, "typo") if server is FileTimerServer else (mp.get_context("spawn").Queue(),)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\): stack_dum$"):
        server(*args, stack_dum=5.0)


def test_a_bad_environment_variable_is_a_warning_and_ignored(
    fifo: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("ELASTIC_TIMER_ESCALATE_AFTER", "soon")
    monkeypatch.setenv("ELASTIC_TIMER_DRY_RUN", "maybe")
    monkeypatch.setenv("ELASTIC_TIMER_MAX_TIMERS", "-3")
    server = FileTimerServer(fifo, "env", signal_self=False)
    assert server._diagnostics.escalate_after is None
    assert server._diagnostics.dry_run is False
    assert server._diagnostics.max_timers == 100_000
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "Ignoring ELASTIC_TIMER_ESCALATE_AFTER='soon'" in text
    assert "Ignoring ELASTIC_TIMER_DRY_RUN='maybe'" in text
    assert "Ignoring ELASTIC_TIMER_MAX_TIMERS='-3'" in text


def test_the_timer_caps_come_from_keywords_else_the_environment_else_the_defaults(
    fifo: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = FileTimerServer(fifo, "caps", signal_self=False)._diagnostics
    assert (default.max_worker_timers, default.max_timers) == (10_000, 100_000)
    monkeypatch.setenv("ELASTIC_TIMER_MAX_WORKER_TIMERS", "7")
    monkeypatch.setenv("ELASTIC_TIMER_MAX_TIMERS", "70")
    from_env = FileTimerServer(fifo, "caps", signal_self=False)._diagnostics
    assert (from_env.max_worker_timers, from_env.max_timers) == (7, 70)
    keywords = FileTimerServer(fifo, "caps", signal_self=False, max_timers=9)._diagnostics
    assert (keywords.max_worker_timers, keywords.max_timers) == (7, 9)
    assert keywords.native_options()["max_timers"] == 9
