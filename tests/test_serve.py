"""``elastic-timer serve`` (the standalone timer-server daemon) and its Prometheus metrics.

Real processes and real signals: the daemon runs as ``python -m elastic_timer.cli serve`` and
the workers as ``python -c`` scripts, each sending requests for its own pid only. Every
process a test starts goes into the ``children`` fixture, which kills survivors by pid.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import pytest
from helpers import CLI, run_cli, wait_for

from elastic_timer.metrics import CONTENT_TYPE, MetricsServer, prometheus_text, serve_metrics

# The same command with py-spy out of the server's reach (its lookup finds none), so that
# stacks can only come from the worker's own faulthandler.
CLI_WITHOUT_PY_SPY = [
    sys.executable,
    "-c",
    "import sys; from elastic_timer import cli, options; "
    "options._find_py_spy = lambda: None; sys.exit(cli.main())",
]

Children = list["BaseProcess | subprocess.Popen[bytes]"]

# A worker: builds a client on the FIFO (argv[1]), says "armed" once its timer (argv[2]
# seconds) is acquired, and hangs far past it.
ELASTIC_WORKER = """\
import sys, time
import elastic_timer

def hang_here():
    time.sleep(60)

client = elastic_timer.FileTimerClient(sys.argv[1])
with elastic_timer.expires(after=float(sys.argv[2]), client=client):
    print("armed", flush=True)
    hang_here()
"""

# The same, with torch's client and torch's expires (the wire format is the same).
TORCH_WORKER = """\
import sys, time
from torch.distributed.elastic.timer import FileTimerClient, expires

client = FileTimerClient(sys.argv[1])
with expires(after=float(sys.argv[2]), client=client):
    print("armed", flush=True)
    time.sleep(60)
"""


def clean_env() -> dict[str, str]:
    """This environment without the variables that would change a server's or a client's
    behaviour behind the test's back (diagnostics, a torchrun FIFO)."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ELASTIC_TIMER_") and k != "TORCHELASTIC_TIMER_FILE"
    }


class Daemon:
    """``elastic-timer serve --fifo <tmp>/t.fifo ARGS``, its stderr in a file."""

    def __init__(
        self,
        tmp_path: Path,
        children: Children,
        args: list[str],
        cli: list[str] = CLI,
        env: dict[str, str] | None = None,
    ) -> None:
        self.fifo = str(tmp_path / "t.fifo")
        self.log_path = tmp_path / "daemon.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [*cli, "serve", "--fifo", self.fifo, *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=clean_env() if env is None else env,
            )
        children.append(self.process)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        """Until the FIFO exists and the daemon has said it listens."""
        ready = wait_for(
            lambda: os.path.exists(self.fifo) and "listening on FIFO" in self.log(), timeout=15
        )
        assert ready, f"daemon not ready (exit code {self.process.poll()}):\n{self.log()}"

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Sends ``sig`` (to the daemon's pid) and returns its exit code, within 5 s."""
        self.process.send_signal(sig)
        return self.process.wait(5)


@pytest.fixture
def start_daemon(tmp_path: Path, children: Children) -> Iterator[Callable[..., Daemon]]:
    def start(*args: str, cli: list[str] = CLI, env: dict[str, str] | None = None) -> Daemon:
        daemon = Daemon(tmp_path, children, list(args), cli, env)
        daemon.wait_ready()
        return daemon

    yield start


def start_worker(
    children: Children, script: str, fifo: str, after: float, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Starts a worker and returns once its timer is acquired (it printed "armed")."""
    worker = subprocess.Popen(
        [sys.executable, "-c", script, fifo, str(after)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        env=clean_env() if env is None else env,
    )
    children.append(worker)
    assert worker.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(worker.stdout, selectors.EVENT_READ)
        # torch's import alone can take several seconds.
        assert selector.select(60), "the worker did not acquire its timer within 60 s"
    assert worker.stdout.readline() == b"armed\n", f"worker exited with {worker.wait(5)}"
    return worker


def samples(text: str) -> dict[str, float]:
    """The samples of a Prometheus text page, by metric name."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.split(" ")
            found[name] = float(value)
    return found


def scrape(port: int, path: str = "/metrics") -> tuple[int, str, str]:
    """(status, Content-Type, body) of a GET on 127.0.0.1:port."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def events_of(path: Path, name: str) -> list[dict[str, Any]]:
    """The events called ``name`` in the event log of a daemon that may be writing to it: a
    last line without its newline is one it has not finished writing."""
    lines = path.read_text().split("\n")[:-1]
    return [e for e in map(json.loads, lines) if e["event"] == name]


# -- the command line ---------------------------------------------------------------------------


def test_help_explains_every_option_and_how_workers_connect() -> None:
    result = run_cli("serve", "--help")
    assert result.returncode == 0, result.stderr
    for option in (
        "--fifo",
        "--fifo-mode",
        "--max-interval",
        "--run-id",
        "--stack-dump",
        "--stack-signal",
        "--stacks-dir",
        "--escalate-after",
        "--dry-run",
        "--max-worker-timers",
        "--max-timers",
        "--descendants-only",
        "--event-log",
        "--metrics",
        "--log-level",
    ):
        assert option in result.stdout, option
    for how in ("FileTimerClient", "TORCHELASTIC_TIMER_FILE", "configure()", "SIGTERM"):
        assert how in result.stdout, how
    top = run_cli("--help")
    assert top.returncode == 0 and "serve" in top.stdout


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--max-interval", "-1"], "--max-interval: must be a positive number of seconds"),
        (["--max-interval", "0"], "--max-interval: must be a positive number of seconds"),
        (["--max-interval", "soon"], "--max-interval: must be a positive number of seconds"),
        (["--escalate-after", "nan"], "--escalate-after: must be a positive number"),
        (["--stack-dump", "1", "--stack-signal", "NOPE"], "--stack-signal: unknown signal"),
        (["--stack-dump", "1", "--stack-signal", "KILL"], "SIGKILL cannot be caught"),
        (["--stack-signal", "USR1"], "--stack-signal only applies with --stack-dump"),
        (["--metrics", "localhost"], "--metrics: expected HOST:PORT"),
        (["--metrics", "127.0.0.1:70000"], "--metrics: expected HOST:PORT"),
        (["--log-level", "LOUD"], "--log-level: unknown log level"),
        (["--max-timers", "0"], "--max-timers: must be a positive whole number"),
        (["--max-worker-timers", "many"], "--max-worker-timers: must be a positive whole"),
        (["--fifo-mode", "0800"], "--fifo-mode: not an octal mode"),
        (["--fifo-mode", "01600"], "--fifo-mode: expected permission bits 0000-0777"),
    ],
)
def test_bad_arguments_exit_2_with_one_line_naming_the_problem(
    tmp_path: Path, args: list[str], problem: str
) -> None:
    fifo = tmp_path / "t.fifo"
    result = run_cli("serve", "--fifo", str(fifo), *args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == [result.stderr.splitlines()[-1]], result.stderr
    assert errors[0].startswith("elastic-timer serve: error: ")
    assert problem in errors[0], errors[0]
    assert not fifo.exists()


def test_a_fifo_in_a_missing_directory_exits_2() -> None:
    result = run_cli("serve", "--fifo", "/nonexistent/dir/x")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last == "elastic-timer serve: error: --fifo: directory /nonexistent/dir does not exist"


def test_a_fifo_that_cannot_be_created_exits_1_with_one_line() -> None:
    """The directory exists, but nothing can be created in it (even by root)."""
    result = run_cli("serve", "--fifo", "/proc/elastic-timer-test.fifo")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith(
        "elastic-timer serve: error: cannot create the FIFO at /proc/elastic-timer-test.fifo: "
    )


def test_a_metrics_port_in_use_exits_1_and_removes_the_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "t.fifo"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            "serve", "--fifo", str(fifo), "--metrics", f"127.0.0.1:{port}", env=clean_env()
        )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith(
        f"elastic-timer serve: error: cannot serve metrics on 127.0.0.1:{port}: "
    )
    assert not fifo.exists()


# -- the daemon ---------------------------------------------------------------------------------


def test_daemon_reaps_a_hung_worker_and_stops_on_sigterm(
    start_daemon: Callable[..., Daemon], children: Children
) -> None:
    daemon = start_daemon()
    worker = start_worker(children, ELASTIC_WORKER, daemon.fifo, 0.5)
    armed = time.monotonic()
    assert worker.wait(5) == -signal.SIGKILL
    assert time.monotonic() - armed >= 0.45  # not before its deadline
    assert daemon.process.poll() is None  # the daemon outlives the reap (no self-signal)
    # Logged by the daemon's reporter thread, after the kill.
    assert wait_for(lambda: f"Successfully reaped worker=[{worker.pid}]" in daemon.log())
    assert daemon.stop(signal.SIGTERM) == 0
    assert not os.path.exists(daemon.fifo)
    assert "SIGTERM received, stopping" in daemon.log()
    assert "Traceback" not in daemon.log()


def test_fifo_mode_sets_the_fifos_permissions_whatever_the_umask(
    start_daemon: Callable[..., Daemon], children: Children
) -> None:
    under_umask_000 = ["sh", "-c", 'umask 000; exec "$0" "$@"', *CLI]
    daemon = start_daemon(cli=under_umask_000)
    # By default the mode follows the umask (as torch's server), plus our mark.
    assert stat.S_IMODE(os.stat(daemon.fifo).st_mode) == 0o1666
    assert daemon.stop() == 0
    daemon = start_daemon("--fifo-mode", "0600", cli=under_umask_000)
    assert stat.S_IMODE(os.stat(daemon.fifo).st_mode) == 0o1600
    worker = start_worker(children, ELASTIC_WORKER, daemon.fifo, 0.5)
    assert worker.wait(5) == -signal.SIGKILL
    assert daemon.stop() == 0


@pytest.mark.torch
def test_daemon_reaps_a_torch_client_worker(
    start_daemon: Callable[..., Daemon], children: Children
) -> None:
    daemon = start_daemon()
    worker = start_worker(children, TORCH_WORKER, daemon.fifo, 0.5)
    assert worker.wait(5) == -signal.SIGKILL
    assert daemon.stop() == 0
    assert not os.path.exists(daemon.fifo)


def test_sigint_stops_the_daemon_cleanly(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon()
    assert daemon.stop(signal.SIGINT) == 0
    assert not os.path.exists(daemon.fifo)
    assert "SIGINT received, stopping" in daemon.log()
    assert "Traceback" not in daemon.log()


def test_a_healthy_worker_is_left_alone(
    start_daemon: Callable[..., Daemon], children: Children
) -> None:
    daemon = start_daemon()
    # Done within its timer, then alive past the deadline it released (a lost release kills it).
    script = ELASTIC_WORKER.replace("hang_here()\n", "time.sleep(0.1)\n")
    script += "time.sleep(float(sys.argv[2]) + 0.5)\n"
    worker = start_worker(children, script, daemon.fifo, 1.0)
    assert worker.wait(10) == 0
    assert "Reaping" not in daemon.log()
    assert daemon.stop() == 0


LEARNING_WORKER = """\
import sys, time
import elastic_timer

client = elastic_timer.FileTimerClient(sys.argv[1])
for _ in range(12):  # 2 warm-up blocks, then 10 samples of 10 ms
    with elastic_timer.expires(after=60, scope="step", client=client):
        time.sleep(0.01)
with elastic_timer.expires(after=60, scope="step", client=client):
    print("armed", flush=True)
    time.sleep(120)
"""


def test_adaptive_flags_learn_reap_at_the_bound_expose_and_save_it(
    start_daemon: Callable[..., Daemon], children: Children, tmp_path: Path
) -> None:
    """``--adaptive --adaptive-floor --state-file``: the hang asking for 60 s is reaped at the
    learned bound, the metrics show the scope's durations and timeout, and the state file is
    saved at stop."""
    state = tmp_path / "learned.json"
    daemon = start_daemon(
        "--adaptive",
        "--adaptive-floor",
        "0.5",
        "--state-file",
        str(state),
        "--metrics",
        "127.0.0.1:0",
    )
    found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", daemon.log())
    assert found, daemon.log()
    worker = start_worker(children, LEARNING_WORKER, daemon.fifo, 60)
    armed = time.monotonic()
    assert worker.wait(30) == -signal.SIGKILL
    assert time.monotonic() - armed < 10, "reaped at its after, not the learned bound"
    body = scrape(int(found.group(1)))[2]
    assert 'elastic_timer_scope_timeout_seconds{scope="step"} 0.5\n' in body, body
    assert 'elastic_timer_scope_duration_seconds_count{scope="step"} 10\n' in body
    assert samples(body)["elastic_timer_learned_expiries_total"] == 1
    # Logged by the daemon's reporter thread, after the kill.
    assert wait_for(lambda: "Learned timeout fired" in daemon.log())
    assert daemon.stop() == 0
    assert json.loads(state.read_text())["scopes"][0]["scope"] == "step"


def test_metrics_count_requests_and_the_reap(
    start_daemon: Callable[..., Daemon], children: Children
) -> None:
    daemon = start_daemon("--metrics", "127.0.0.1:0")
    found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", daemon.log())
    assert found, daemon.log()
    port = int(found.group(1))

    worker = start_worker(children, ELASTIC_WORKER, daemon.fifo, 0.3)
    assert worker.wait(5) == -signal.SIGKILL

    def reaped_once() -> bool:
        return samples(scrape(port)[2]).get("elastic_timer_reaped_total") == 1

    assert wait_for(reaped_once)
    status, content_type, body = scrape(port)
    assert status == 200
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    values = samples(body)
    assert values["elastic_timer_requests_total"] >= 1
    assert values["elastic_timer_reaped_total"] == 1
    assert values["elastic_timer_live_timers"] == 0
    assert "# TYPE elastic_timer_reaped_total counter\n" in body
    assert "# TYPE elastic_timer_live_timers gauge\n" in body
    assert scrape(port, "/")[0] == 404

    assert daemon.stop() == 0
    with pytest.raises(OSError):  # the metrics server is gone with the daemon
        scrape(port)


def listening_addresses(port: int) -> set[str]:
    """The local addresses (hex, as /proc/net/tcp{,6} gives them) listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, _, hex_port = local.partition(":")
                if state == "0A" and int(hex_port, 16) == port:
                    found.add(address)
    return found


def metrics_port(daemon: Daemon) -> int:
    found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", daemon.log())
    assert found, daemon.log()
    return int(found.group(1))


# The daemon's process with a soft limit of 256 fds.
CLI_WITH_256_FDS = [
    sys.executable,
    "-c",
    "import resource, sys; from elastic_timer import cli; "
    "_, hard = resource.getrlimit(resource.RLIMIT_NOFILE); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)); sys.exit(cli.main())",
]


def test_a_flood_of_idle_metrics_connections_stops_neither_reaps_nor_metrics(
    start_daemon: Callable[..., Daemon], children: Children
) -> None:
    """400 idle connections to a daemon allowed 256 fds: they hold at most 64 of its fds, a
    worker that registers meanwhile is reaped at its deadline, a fresh client is answered,
    and an idle connection is closed after the timeout."""
    daemon = start_daemon("--metrics", ":0", cli=CLI_WITH_256_FDS)
    port = metrics_port(daemon)
    assert listening_addresses(port) == {"0100007F"}, ":PORT binds loopback only"
    assert "every interface" not in daemon.log()
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(400)]
    for sock in idle:
        sock.setblocking(False)

    def closed_by_the_daemon(sock: socket.socket) -> bool:
        try:
            return sock.recv(1) == b""
        except BlockingIOError:
            return False
        except ConnectionResetError:
            return True

    def still_open() -> list[socket.socket]:
        return [sock for sock in idle if not closed_by_the_daemon(sock)]

    try:
        assert wait_for(lambda: len(still_open()) <= 64), len(still_open())
        fds = len(os.listdir(f"/proc/{daemon.process.pid}/fd"))
        assert fds < 128, f"the daemon holds {fds} fds"
        worker = start_worker(children, ELASTIC_WORKER, daemon.fifo, 1.0)
        assert worker.wait(10) == -signal.SIGKILL
        status, _, body = scrape(port)
        assert status == 200 and samples(body)["elastic_timer_reaped_total"] == 1
        assert wait_for(lambda: not still_open(), timeout=15), "idle connections time out"
    finally:
        for sock in idle:
            sock.close()
    assert "exited; dropped" not in daemon.log()
    assert daemon.stop() == 0


def test_metrics_on_every_interface_only_when_asked_and_with_a_warning(
    start_daemon: Callable[..., Daemon],
) -> None:
    daemon = start_daemon("--metrics", "0.0.0.0:0")
    found = re.search(r"metrics on http://0\.0\.0\.0:(\d+)/metrics", daemon.log())
    assert found, daemon.log()
    assert listening_addresses(int(found.group(1))) == {"00000000"}
    assert "[WARNING] elastic_timer.metrics: Metrics are served on every interface" in daemon.log()
    assert scrape(int(found.group(1)))[0] == 200
    assert daemon.stop() == 0


def test_dry_run_reports_the_expiry_in_the_event_log_and_kills_nothing(
    start_daemon: Callable[..., Daemon], children: Children, tmp_path: Path
) -> None:
    events = tmp_path / "events.jsonl"
    daemon = start_daemon("--dry-run", "--event-log", str(events))
    worker = start_worker(children, ELASTIC_WORKER, daemon.fifo, 0.5)
    time.sleep(0.5 + 1.0)
    assert worker.poll() is None, "dry run: the worker must not be signalled"

    def expiries() -> list[dict[str, Any]]:
        return [e for e in events_of(events, "timer expired") if e["pid"] == worker.pid]

    assert wait_for(expiries), events.read_text()
    event = expiries()[0]
    assert event["outcome"] == "dry_run", event
    worker.kill()
    assert worker.wait(5) == -signal.SIGKILL
    assert daemon.stop() == 0


def test_max_worker_timers_refuses_a_workers_timers_past_it(
    start_daemon: Callable[..., Daemon], children: Children
) -> None:
    daemon = start_daemon("--max-worker-timers", "1")
    flooding = ELASTIC_WORKER.replace(
        'print("armed", flush=True)',
        'client.acquire("second", time.time() + 600)\n    print("armed", flush=True)',
    )
    worker = start_worker(children, flooding, daemon.fifo, 0.5)
    assert worker.wait(10) == -signal.SIGKILL
    assert wait_for(lambda: "the most a worker may (max_worker_timers)" in daemon.log())
    assert daemon.stop() == 0


def test_escalate_after_kills_a_worker_that_ignores_its_signal(
    start_daemon: Callable[..., Daemon], children: Children
) -> None:
    daemon = start_daemon("--escalate-after", "0.5")
    stubborn = ELASTIC_WORKER.replace(
        "client = elastic_timer.FileTimerClient(sys.argv[1])",
        "import signal\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "client = elastic_timer.FileTimerClient(sys.argv[1], signal=signal.SIGTERM)",
    )
    worker = start_worker(children, stubborn, daemon.fifo, 0.3)
    armed = time.monotonic()
    assert worker.wait(5) == -signal.SIGKILL
    assert time.monotonic() - armed >= 0.3 + 0.45  # SIGTERM at the deadline, SIGKILL later
    assert daemon.stop() == 0


def test_stack_dump_through_the_directory_the_daemon_names(
    start_daemon: Callable[..., Daemon], children: Children, tmp_path: Path
) -> None:
    """A worker given the ELASTIC_TIMER_STACKS_DIR the daemon logs has its stacks taken before
    it is killed."""
    events = tmp_path / "events.jsonl"
    daemon = start_daemon("--stack-dump", "5", "--event-log", str(events))
    found = re.search(r"ELASTIC_TIMER_STACKS_DIR=(\S+) in their environment", daemon.log())
    assert found, daemon.log()
    assert os.path.isdir(found.group(1))
    env = {**clean_env(), "ELASTIC_TIMER_STACKS_DIR": found.group(1)}
    worker = start_worker(children, ELASTIC_WORKER, daemon.fifo, 0.5, env)
    assert worker.wait(10) == -signal.SIGKILL
    assert wait_for(lambda: events_of(events, "timer expired"))
    expired = events_of(events, "timer expired")
    assert [e["pid"] for e in expired] == [worker.pid]
    assert "hang_here" in expired[0]["stacks"]
    assert daemon.stop() == 0


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_a_worker_the_daemon_did_not_start_has_its_stacks_taken_with_nothing_set(
    start_daemon: Callable[..., Daemon], children: Children, tmp_path: Path
) -> None:
    """The worker is the daemon's sibling, not its child, and its environment names no
    stacks directory: its FileTimerClient learns it from the FIFO's sidecar when it connects.
    The daemon has no py-spy, so the stacks can only come from the worker's faulthandler."""
    events = tmp_path / "events.jsonl"
    daemon = start_daemon("--stack-dump", "10", "--event-log", str(events), cli=CLI_WITHOUT_PY_SPY)
    env = clean_env()
    assert not [k for k in env if k.startswith("ELASTIC_TIMER_")]
    worker = start_worker(children, ELASTIC_WORKER, daemon.fifo, 0.5, env)
    assert parent_of(worker.pid) == os.getpid() != daemon.process.pid
    assert worker.wait(15) == -signal.SIGKILL
    assert wait_for(lambda: events_of(events, "timer expired"))
    (expired,) = events_of(events, "timer expired")
    assert (expired["pid"], expired["outcome"]) == (worker.pid, "signalled")
    assert (expired["stacks_source"], expired["stacks_complete"]) == ("faulthandler", True)
    assert "in hang_here" in expired["stacks"], expired["stacks"]
    log = daemon.log()
    assert f"Stacks of expired worker pid={worker.pid}" in log
    assert "in hang_here" in log
    assert os.path.exists(daemon.fifo + ".stacks")
    assert daemon.stop() == 0
    assert not os.path.exists(daemon.fifo + ".stacks"), "the sidecar goes with the server"


def test_the_daemon_uses_the_stacks_directory_in_its_own_environment(
    start_daemon: Callable[..., Daemon], children: Children, tmp_path: Path
) -> None:
    """One job-wide ELASTIC_TIMER_STACKS_DIR: the daemon creates it and writes nothing
    elsewhere; a worker that has no such variable writes its stacks there."""
    stacks_dir = tmp_path / "job" / "stacks"
    events = tmp_path / "events.jsonl"
    daemon_env = {**clean_env(), "ELASTIC_TIMER_STACKS_DIR": str(stacks_dir)}
    daemon = start_daemon(
        "--stack-dump", "10", "--event-log", str(events), cli=CLI_WITHOUT_PY_SPY, env=daemon_env
    )
    assert stacks_dir.is_dir(), "created"
    assert Path(daemon.fifo + ".stacks").read_text() == f"{stacks_dir}\n"
    assert f"stack dumps on, in {stacks_dir}:" in daemon.log()
    worker = start_worker(children, ELASTIC_WORKER, daemon.fifo, 0.5, clean_env())
    assert worker.wait(15) == -signal.SIGKILL
    assert wait_for(lambda: events_of(events, "timer expired"))
    (stacks_file,) = stacks_dir.glob(f"{worker.pid}-*.stacks")
    assert "in hang_here" in stacks_file.read_text()
    assert "in hang_here" in events_of(events, "timer expired")[0]["stacks"]
    assert daemon.stop() == 0
    assert stacks_dir.is_dir(), "the job's directory is not the daemon's to remove"


def test_a_worker_that_cannot_write_the_stacks_directory_warns_once(
    start_daemon: Callable[..., Daemon], children: Children, tmp_path: Path
) -> None:
    """The directory is read-only for the worker (a read-only bind mount in a mount namespace
    of its own: root's permissions do not get past it). Every client it builds learns the
    directory; one warning says it cannot arm, and its timers work as before."""
    daemon = start_daemon("--stack-dump", "10", "--stacks-dir", str(tmp_path / "stacks"))
    script = """\
import sys
import elastic_timer
for _ in range(3):
    client = elastic_timer.FileTimerClient(sys.argv[1])
    elastic_timer.configure(client)
    for _ in range(2):
        with elastic_timer.expires(after=60):
            pass
print("done", flush=True)
"""
    read_only = 'mount --bind -o ro "$0" "$0" && exec "$@"'
    worker = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            read_only,
            str(tmp_path / "stacks"),
            sys.executable,
            "-c",
            script,
            daemon.fifo,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        check=False,
    )
    assert (worker.returncode, worker.stdout) == (0, "done\n"), worker.stderr
    warnings = [line for line in worker.stderr.splitlines() if "Cannot arm stack dumps" in line]
    assert len(warnings) == 1, worker.stderr
    assert f"Cannot arm stack dumps in {tmp_path / 'stacks'}, the timer server's" in warnings[0]
    assert "Read-only file system" in warnings[0]
    assert not list((tmp_path / "stacks").glob("*.stacks"))
    assert daemon.stop() == 0


# -- metrics.py -------------------------------------------------------------------------------


def test_the_metrics_server_bounds_its_connections_and_times_them_out() -> None:
    server = MetricsServer("127.0.0.1", 0, lambda: {"requests": 1}, max_connections=2, timeout=1)
    try:
        port = server.address[1]
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
        # The third closed the oldest; a fresh client closes the next oldest and is answered.
        assert idle[0].recv(1) == b""
        assert scrape(port)[0] == 200
        assert idle[1].recv(1) == b""
        # The last idle one is closed at its timeout.
        assert idle[2].recv(1) == b""
        for sock in idle:
            sock.close()
        # What is not a request gets an error, not a hang.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 405 ")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"x" * 8193)  # one past the bound: all read when it is refused
            assert sock.recv(100).startswith(b"HTTP/1.1 431 ")
    finally:
        server.close()


def test_prometheus_text_format() -> None:
    stats = {"live_timers": 2, "zeta": 7, "reaped": 1, "requests": 5, "events_dropped": 0}
    assert prometheus_text(stats) == (
        "# HELP elastic_timer_requests_total Timer requests received (acquires and releases).\n"
        "# TYPE elastic_timer_requests_total counter\n"
        "elastic_timer_requests_total 5\n"
        "# HELP elastic_timer_reaped_total Workers signalled because a timer of theirs expired.\n"
        "# TYPE elastic_timer_reaped_total counter\n"
        "elastic_timer_reaped_total 1\n"
        "# HELP elastic_timer_events_dropped_total "
        "Events dropped because the reporting thread fell behind.\n"
        "# TYPE elastic_timer_events_dropped_total counter\n"
        "elastic_timer_events_dropped_total 0\n"
        "# HELP elastic_timer_live_timers Timers currently registered.\n"
        "# TYPE elastic_timer_live_timers gauge\n"
        "elastic_timer_live_timers 2\n"
        "# HELP elastic_timer_zeta The timer server's stats() value 'zeta'.\n"
        "# TYPE elastic_timer_zeta gauge\n"
        "elastic_timer_zeta 7\n"
    )
    assert prometheus_text({}) == ""
    assert prometheus_text({"requests": 3}, prefix="job7") == (
        "# HELP job7_requests_total Timer requests received (acquires and releases).\n"
        "# TYPE job7_requests_total counter\n"
        "job7_requests_total 3\n"
    )


def test_serve_metrics_answers_get_metrics_only_and_closes() -> None:
    stats = {"requests": 0}
    server = serve_metrics("127.0.0.1", 0, lambda: stats)
    try:
        host, port = server.address
        assert host == "127.0.0.1" and port > 0
        stats["requests"] = 42  # read on each scrape
        status, content_type, body = scrape(port)
        assert (status, content_type) == (200, CONTENT_TYPE)
        assert body == prometheus_text({"requests": 42})
        assert scrape(port, "/metrics?x=1")[0] == 200
        assert scrape(port, "/other")[0] == 404
    finally:
        server.close()
    server.close()  # a second close does nothing
    with pytest.raises(OSError):
        scrape(port)
