"""Paths another user could have prepared: a FIFO with our mark and its stacks sidecar, the
event log, the learned-timeouts state file (issue 18, items 2, 4 and 5).

The suite runs as root; the other user is uid 65534 (files chown-ed to it). Every worker is a
child of the test, and every server passes ``signal_self=False``.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import CLI, run_cli, wait_for

from elastic_timer import FileTimerServer, expires
from elastic_timer.file_based_local_timer import FileTimerClient

CTX = mp.get_context("fork")
LOGGER = "elastic_timer"
OTHER = 65534  # nobody
SECRET = "TOP-SECRET-LINE only root may read"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to chown to uid 65534")

# A worker driven line by line on stdin, its warnings on stderr:
#   "pairs N": N acquire/release pairs, then prints "done";
#   "hang AFTER": acquires a timer of AFTER seconds, prints "armed" and sleeps 60 s.
WORKER = """\
import logging, sys, time
import elastic_timer

logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
client = elastic_timer.FileTimerClient(sys.argv[1], connect_timeout=30)
for line in sys.stdin:
    command, argument = line.split()
    if command == "pairs":
        for i in range(int(argument)):
            client.acquire(f"pair-{i}", time.time() + 60)
            client.release(f"pair-{i}")
        print("done", flush=True)
    elif command == "hang":
        with elastic_timer.expires(after=float(argument), client=client):
            print("armed", flush=True)
            time.sleep(60)
"""


def clean_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ELASTIC_TIMER_") and k != "TORCHELASTIC_TIMER_FILE"
    }


class Worker:
    def __init__(self, fifo: str, tmp_path: Path, children: list[Any]) -> None:
        self.stderr_path = tmp_path / f"worker-{len(children)}.err"
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-c", WORKER, fifo],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=clean_env(),
            )
        children.append(self.process)

    def ask(self, command: str, answer: str) -> None:
        """Sends ``command`` and waits (at most 60 s) for its ``answer``."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{command}\n".encode())
        self.process.stdin.flush()
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            assert selector.select(60), f"no answer to {command!r}:\n{self.stderr()}"
        line = self.process.stdout.readline().decode()
        assert line == f"{answer}\n", f"{line!r} to {command!r}:\n{self.stderr()}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def rings(self) -> int:
        """How many request rings the worker holds."""
        count = 0
        for fd in os.listdir(f"/proc/{self.process.pid}/fd"):
            try:
                count += "elastic-timer-ring" in os.readlink(f"/proc/{self.process.pid}/fd/{fd}")
            except OSError:
                pass
        return count


@pytest.fixture
def secret(tmp_path: Path) -> Iterator[Path]:
    """A file only root may read."""
    path = tmp_path / "secret"
    path.write_text(f"{SECRET}\n")
    path.chmod(0o600)
    yield path
    assert path.read_text() == f"{SECRET}\n", "the secret was not written to"


def drain(fd: int) -> tuple[list[str], bool]:
    """The lines waiting in the FIFO read end ``fd`` (non-blocking), and whether no writer
    holds the FIFO open (end of file)."""
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return data.decode().splitlines(), False
        if not chunk:
            return data.decode().splitlines(), True
        data += chunk


def their_fifo(path: str) -> int:
    """A FIFO with our server's mark (the sticky bit) that uid 65534 owns, and its read end."""
    os.mkfifo(path, 0o666)
    os.chmod(path, 0o1666)
    os.chown(path, OTHER, OTHER)
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK)


# -- item 2: a FIFO someone else made -----------------------------------------------------------


def test_another_users_marked_fifo_is_not_kept_nor_its_sidecar_read_and_the_real_server_reaps(
    tmp_path: Path, children: list[Any], servers: list[Any], secret: Path
) -> None:
    fifo = str(tmp_path / "timer.fifo")
    # While the server restarts, the other user puts its FIFO there, and a sidecar naming a
    # stacks directory whose signal file links to a secret.
    reader = their_fifo(fifo)
    stacks = tmp_path / "their-stacks"
    stacks.mkdir()
    (stacks / "signal").symlink_to(secret)
    sidecar = Path(f"{fifo}.stacks")
    sidecar.write_text(f"{stacks}\n")
    for path in (stacks, stacks / "signal", sidecar):
        os.chown(path, OTHER, OTHER, follow_symlinks=False)
    try:
        worker = Worker(fifo, tmp_path, children)
        worker.ask("pairs 5", "done")
        lines, eof = drain(reader)
        assert len(lines) == 10, lines
        assert not any("elastic_timer_ring" in line for line in lines), "a ring was offered"
        assert eof, "the worker keeps their FIFO open"
        assert worker.rings() == 0
        assert os.listdir(stacks) == ["signal"], "it armed stack dumps where they said"

        # The real server comes back: it replaces the FIFO, and the hung worker is reaped.
        server = FileTimerServer(fifo, "real", 0.1, signal_self=False)
        servers.append(server)
        server.start()
        worker.ask("hang 1", "armed")
        assert worker.process.wait(30) == -signal.SIGKILL
        assert drain(reader) == ([], True), "a request went to their FIFO"
    finally:
        os.close(reader)
    assert SECRET not in worker.stderr()
    assert "sidecar" not in worker.stderr(), "their sidecar is not even looked at"


def test_a_kept_fifo_is_left_once_the_real_server_replaces_it(
    tmp_path: Path, children: list[Any], servers: list[Any]
) -> None:
    """A marked FIFO of root's that is not the real server's (an impostor, still reading it):
    the worker keeps it open, as any of our servers' FIFOs. Once the real server replaces it,
    the worker's requests go to the real one (the client looks at the path every 50 ms)."""
    fifo = str(tmp_path / "timer.fifo")
    os.mkfifo(fifo, 0o666)
    os.chmod(fifo, 0o1666)
    impostor = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        worker = Worker(fifo, tmp_path, children)
        worker.ask("pairs 1", "done")
        lines, eof = drain(impostor)
        assert len(lines) == 2 and not eof, "a trusted FIFO is kept open"
        server = FileTimerServer(fifo, "real", 0.1, signal_self=False)
        servers.append(server)
        server.start()
        deadline = time.monotonic() + 20
        while server.stats()["requests"] == 0:
            assert time.monotonic() < deadline, "the worker never reached the real server"
            worker.ask("pairs 1", "done")
            drain(impostor)  # it reads what it gets, as a server would
        drain(impostor)
        worker.ask("hang 1", "armed")
        assert worker.process.wait(30) == -signal.SIGKILL
        assert drain(impostor) == ([], True), "the worker still wrote to the impostor"
    finally:
        os.close(impostor)


def test_a_ring_is_left_once_the_fifo_path_leads_elsewhere(
    tmp_path: Path, children: list[Any], servers: list[Any]
) -> None:
    """The worker sends by a ring the server took; another FIFO is renamed over the server's
    path (atomically: the server, taken over, keeps reading its own FIFO and the ring). The
    worker leaves the ring and sends to what is at the path now."""
    fifo = str(tmp_path / "timer.fifo")
    server = FileTimerServer(fifo, "first", 0.1, signal_self=False)
    servers.append(server)
    server.start()
    worker = Worker(fifo, tmp_path, children)
    worker.ask("pairs 5", "done")
    assert worker.rings() == 1, "the server took no ring"
    other = str(tmp_path / "other.fifo")
    os.mkfifo(other, 0o666)
    os.chmod(other, 0o1666)
    reader = os.open(other, os.O_RDONLY | os.O_NONBLOCK)
    try:
        os.rename(other, fifo)
        # The client looks at the path at most every 50 ms (no condition to poll for: the
        # interval is the protocol). The server renews its ring's lease for 1 s after a
        # request, so a worker that kept the ring would send these by it, without a wake.
        time.sleep(0.2)
        worker.ask("pairs 1", "done")
        lines, _ = drain(reader)
        assert len(lines) == 2, "the worker still sends by the ring"
    finally:
        os.close(reader)
    assert wait_for(lambda: worker.rings() == 0)


@pytest.mark.parametrize("link", ["sidecar", "signal file"])
def test_a_sidecar_leading_to_a_secret_is_refused_and_the_secret_never_shown(
    tmp_path: Path, children: list[Any], servers: list[Any], secret: Path, link: str
) -> None:
    """Our own server's FIFO (root's), beside it a sidecar that is a link to a root-only file,
    or that names a directory whose signal file is one."""
    fifo = str(tmp_path / "timer.fifo")
    server = FileTimerServer(fifo, "ours", 0.1, signal_self=False)
    servers.append(server)
    server.start()
    sidecar = Path(f"{fifo}.stacks")
    if link == "sidecar":
        sidecar.symlink_to(secret)
        warning = f"the stacks sidecar {sidecar} is refused: it is a symbolic link"
    else:
        stacks = tmp_path / "stacks"
        stacks.mkdir(mode=0o1777)
        (stacks / "signal").symlink_to(secret)
        sidecar.write_text(f"{stacks}\n")
        warning = f"{stacks / 'signal'} is refused: it is a symbolic link"
    worker = Worker(fifo, tmp_path, children)
    worker.ask("pairs 1", "done")
    assert wait_for(lambda: warning in worker.stderr()), worker.stderr()
    worker.ask("hang 1", "armed")
    assert worker.process.wait(30) == -signal.SIGKILL, "it still reaches the server"
    assert SECRET not in worker.stderr()


# -- item 4: the event log ----------------------------------------------------------------------


def hostile_event_log(kind: str, tmp_path: Path) -> tuple[Path, str, Path | None]:
    """An event log path someone prepared; the refusal it gets; the file it must not touch."""
    path = tmp_path / "events.jsonl"
    precious = tmp_path / "precious"
    precious.write_text("precious\n")
    if kind == "symlink":
        path.symlink_to(precious)
        return path, "it is a symbolic link", precious
    if kind == "dangling symlink":
        path.symlink_to(tmp_path / "created-by-root")
        return path, "it is a symbolic link", tmp_path / "created-by-root"
    if kind == "fifo":
        os.mkfifo(path, 0o666)
        return path, "it is not a regular file", None
    if kind == "other user's":
        path.write_text("theirs\n")
        os.chown(path, OTHER, OTHER)
        return path, f"it belongs to uid {OTHER}, not to uid 0", path
    assert kind == "hard link"
    os.link(precious, path)
    return path, "it has 2 hard links (a link to another file)", precious


EVENT_LOG_KINDS = ["symlink", "dangling symlink", "fifo", "other user's", "hard link"]


def untouched(path: Path | None, kind: str) -> bool:
    if path is None:
        return True
    if kind == "dangling symlink":
        return not path.exists()
    return path.read_text() in ("precious\n", "theirs\n")


@pytest.mark.parametrize("kind", EVENT_LOG_KINDS)
def test_serve_refuses_a_hostile_event_log_at_once(tmp_path: Path, kind: str) -> None:
    path, reason, target = hostile_event_log(kind, tmp_path)
    fifo = tmp_path / "t.fifo"
    started = time.monotonic()
    result = run_cli("serve", "--fifo", str(fifo), "--event-log", str(path))
    assert time.monotonic() - started < 20, "serve waited on it"
    assert result.returncode == 2, result.stderr
    last = result.stderr.splitlines()[-1]
    assert last == f"elastic-timer serve: error: --event-log: cannot append to {path}: {reason}"
    assert not fifo.exists()
    assert untouched(target, kind)


def test_serve_refuses_a_hostile_event_log_from_the_environment(tmp_path: Path) -> None:
    path, reason, target = hostile_event_log("symlink", tmp_path)
    env = {**clean_env(), "ELASTIC_TIMER_EVENT_LOG": str(path)}
    result = run_cli("serve", "--fifo", str(tmp_path / "t.fifo"), env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1].endswith(
        f"error: ELASTIC_TIMER_EVENT_LOG: cannot append to {path}: {reason}"
    )
    assert untouched(target, "symlink")


@pytest.mark.parametrize("kind", [*EVENT_LOG_KINDS, "fifo with a reader"])
def test_an_in_process_server_warns_and_runs_without_a_hostile_event_log(
    tmp_path: Path,
    children: list[Any],
    servers: list[Any],
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    path, reason, target = hostile_event_log(kind.removesuffix(" with a reader"), tmp_path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK) if kind == "fifo with a reader" else None
    fifo = str(tmp_path / "timer.fifo")
    server = FileTimerServer(fifo, "log", 0.1, signal_self=False, event_log=str(path))
    servers.append(server)
    # On a thread: a blocking open of a FIFO would never return.
    starting = threading.Thread(target=server.start, daemon=True)
    starting.start()
    starting.join(20)
    assert not starting.is_alive(), "start() waits on the event log"
    warning = f"The event log {path} is refused, so there is none: {reason}"
    assert [r.getMessage() for r in caplog.records if "event log" in r.getMessage()] == [warning]
    worker = Worker(fifo, tmp_path, children)
    worker.ask("hang 0.5", "armed")
    assert worker.process.wait(30) == -signal.SIGKILL
    if reader is not None:
        assert drain(reader) == ([], True)
        os.close(reader)
    assert untouched(target, kind)


def test_the_event_log_is_created_private(tmp_path: Path, servers: list[Any]) -> None:
    path = tmp_path / "events.jsonl"
    server = FileTimerServer(
        str(tmp_path / "timer.fifo"), "log", 0.1, signal_self=False, event_log=str(path)
    )
    servers.append(server)
    server.start()
    assert path.stat().st_mode & 0o777 == 0o600
    assert wait_for(lambda: "watchdog started" in path.read_text())


# -- item 5: the learned-timeouts state file ----------------------------------------------------

FLOOR = 0.5


def tiny_bound_state(path: Path) -> None:
    """A state file saying that scope "step" always took 10 ms: learned, it bounds a block of
    that scope at the floor (0.5 s here), whatever its ``after``."""
    record = {"scope": "step", "samples": 20, "max": 0.01, "after": 60.0, "p50": None}
    record |= {"p99": None, "suggested": None, "histogram": []}
    state = {"format": "elastic-timer learned timeouts", "version": 1, "scopes": [record]}
    path.write_text(json.dumps(state))
    path.chmod(0o600)


def hang_in_step(fifo: str, hung_at: Any) -> None:
    client = FileTimerClient(fifo)
    hung_at.value = time.time()
    with expires(after=60, scope="step", client=client):
        time.sleep(60)


def adaptive_server(tmp_path: Path, servers: list[Any], state: Path) -> tuple[Any, str]:
    fifo = str(tmp_path / "timer.fifo")
    server = FileTimerServer(
        fifo, "adaptive", 0.1, signal_self=False, adaptive=True, adaptive_floor=FLOOR,
        state_file=str(state),
    )  # fmt: skip
    servers.append(server)
    server.start()
    return server, fifo


def state_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "state file" in r.getMessage()]


@pytest.mark.parametrize("owner", [OTHER, 0])
def test_another_users_state_file_does_not_shorten_a_block(
    tmp_path: Path,
    children: list[Any],
    servers: list[Any],
    caplog: pytest.LogCaptureFixture,
    owner: int,
) -> None:
    """Root's own file (the control) bounds the block at the floor; the other user's does not."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    state = tmp_path / "learned.json"
    tiny_bound_state(state)
    os.chown(state, owner, owner)
    _server, fifo = adaptive_server(tmp_path, servers, state)
    hung_at = CTX.Value("d", 0.0)
    worker = CTX.Process(target=hang_in_step, args=(fifo, hung_at))
    worker.start()
    children.append(worker)
    if owner == 0:
        worker.join(30)
        assert worker.exitcode == -signal.SIGKILL, "the control's bound never fired"
        assert state_warnings(caplog) == []
        return
    assert wait_for(lambda: state_warnings(caplog)), "no warning"
    assert state_warnings(caplog) == [
        f"cannot read the state file {state}: it belongs to uid {OTHER}, not to uid 0; "
        "learning from scratch"
    ]
    assert wait_for(lambda: hung_at.value > 0)
    # Well past the bound the file claims, under any load.
    worker.join(FLOOR + 4)
    assert worker.is_alive(), "killed at a bound another user wrote"


def test_a_group_or_world_writable_state_file_is_refused_with_one_warning(
    tmp_path: Path, servers: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    state = tmp_path / "learned.json"
    tiny_bound_state(state)
    state.chmod(0o666)
    server, _fifo = adaptive_server(tmp_path, servers, state)
    assert wait_for(lambda: state_warnings(caplog))
    assert server.timeouts() == [], "a fresh start"
    reason = "group or others may write it (mode 0666)"
    refusal = f"cannot read the state file {state}: {reason}"
    # `elastic-timer timeouts` reads it with the server's reader, and so by the same rule.
    result = run_cli("timeouts", str(state))
    assert result.returncode == 1
    assert result.stderr == f"elastic-timer timeouts: error: {refusal}\n"
    server.stop()  # every event reported: one warning in all
    assert state_warnings(caplog) == [f"{refusal}; learning from scratch"]


def test_a_fifo_at_the_state_file_path_does_not_hang_serve(
    tmp_path: Path, children: list[Any]
) -> None:
    state = tmp_path / "learned.json"
    os.mkfifo(state, 0o600)
    fifo = tmp_path / "t.fifo"
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen(
            [*CLI, "serve", "--fifo", str(fifo), "--adaptive", "--state-file", str(state)],
            stdin=subprocess.DEVNULL,
            stderr=log,
            env=clean_env(),
        )
    children.append(daemon)
    assert wait_for(lambda: "listening on FIFO" in log_path.read_text(), timeout=30), (
        log_path.read_text()
    )
    worker = Worker(str(fifo), tmp_path, children)
    worker.ask("hang 0.5", "armed")
    assert worker.process.wait(30) == -signal.SIGKILL
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(10) == 0
    text = log_path.read_text()
    assert text.count("state file") == 1, text
    assert f"cannot read the state file {state}: it is not a regular file" in text
