"""The shared-memory request ring between our FileTimerClient and our FileTimerServer: every
request counts, in order; a worker stuck with the GIL held is reaped; fork, exec, exit, a
server restart and a scribbled-on ring are handled."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import wait_for

import elastic_timer as timer

RING = "memfd:elastic-timer-ring"
# A worker: a client on the FIFO in argv[1], two blocks to connect (the ring is offered after
# the third request), then the test's code.
PRELUDE = """
import ctypes, mmap, os, struct, sys, time
import elastic_timer as t
fifo = sys.argv[1]
client = t.FileTimerClient(fifo)
t.configure(client)
for _ in range(2):
    with t.expires(after=60, scope="connect"):
        pass

def ring_fds():
    fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    return [fd for fd in fds
            if os.path.exists(f"/proc/self/fd/{fd}")
            and "elastic-timer-ring" in os.readlink(f"/proc/self/fd/{fd}")]

def rings():
    return len(ring_fds())

def say(*words):
    # One write: a forked child says its line beside its parent, and with PYTHONUNBUFFERED
    # print writes word by word, so two lines could interleave.
    os.write(1, (" ".join(map(str, words)) + "\\n").encode())
"""


def worker(
    children: list[subprocess.Popen[bytes]], fifo: str, code: str
) -> subprocess.Popen[bytes]:
    source = PRELUDE + textwrap.dedent(code)
    process = subprocess.Popen(
        [sys.executable, "-c", source, fifo],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
    )
    children.append(process)
    return process


def line(process: subprocess.Popen[bytes]) -> list[str]:
    assert process.stdout is not None
    return process.stdout.readline().decode().split()


def tell(process: subprocess.Popen[bytes], command: str) -> None:
    assert process.stdin is not None
    process.stdin.write(command.encode() + b"\n")
    process.stdin.flush()


def maps_ring() -> int:
    """How many rings this process (the server's) has mapped."""
    with open("/proc/self/maps") as maps:
        return sum(RING in entry for entry in maps)


@pytest.fixture
def server(fifo: str, servers: list[timer.FileTimerServer]) -> timer.FileTimerServer:
    started = timer.FileTimerServer(fifo, "ring", max_interval=0.1, signal_self=False)
    servers.append(started)
    started.start()
    return started


def scopes(server: timer.FileTimerServer, pid: int) -> set[str]:
    return {scope for (worker_pid, scope) in server._timers if worker_pid == pid}


def test_blocks_go_through_the_ring_every_request_counts_in_order(
    server: timer.FileTimerServer, fifo: str, children: list[subprocess.Popen[bytes]]
) -> None:
    """20,000 blocks over 7 scopes: the server counts every acquire and release, and none is
    left live (a release taken before its acquire would leave one)."""
    process = worker(
        children,
        fifo,
        """
        for i in range(20_000):
            with t.expires(after=60, scope=f"s{i % 7}"):
                pass
        with t.expires(after=60, scope="last"):
            say(rings())
            sys.stdin.readline()
        """,
    )
    assert line(process) == ["1"]
    assert maps_ring() == 1
    assert wait_for(lambda: scopes(server, process.pid) == {"last"})
    assert server._request_count == 4 + 2 * 20_000 + 1
    assert server.stats()["malformed"] == 0
    tell(process, "go")
    assert process.wait(30) == 0
    assert wait_for(lambda: server._request_count == 4 + 2 * 20_000 + 2)
    assert wait_for(lambda: maps_ring() == 0)


def test_a_worker_holding_the_gil_is_reaped_at_its_deadline(
    server: timer.FileTimerServer, fifo: str, children: list[subprocess.Popen[bytes]]
) -> None:
    """The acquire is in the ring; the worker then sleeps in C with the GIL held (nothing in
    it runs again): the server still sees the acquire and kills it at the deadline."""
    process = worker(
        children,
        fifo,
        """
        say(rings())
        with t.expires(after=1.0, scope="stuck"):
            ctypes.PyDLL(None).sleep(60)
        """,
    )
    assert line(process) == ["1"]
    assert process.wait(30) == -signal.SIGKILL
    assert server.stats()["reaped"] == 1


def test_a_forked_child_gets_its_own_ring_and_keeps_its_own_pid(
    server: timer.FileTimerServer, fifo: str, children: list[subprocess.Popen[bytes]]
) -> None:
    process = worker(
        children,
        fifo,
        """
        child = os.fork()
        if child == 0:
            with t.expires(after=60, scope="child"):
                with t.expires(after=60, scope="child-2"):
                    say("child", os.getpid(), rings())
                    time.sleep(60)
        with t.expires(after=60, scope="parent"):
            say("parent", os.getpid(), rings())
            sys.stdin.readline()
            os.kill(child, 9)
            os.waitpid(child, 0)
        """,
    )
    said = {words[0]: words[1:] for words in (line(process), line(process))}
    child = int(said["child"][0])
    assert said["parent"] == [str(process.pid), "1"]
    assert said["child"][1] == "1"  # the parent's ring was let go, and one of its own made
    assert wait_for(lambda: scopes(server, child) == {"child", "child-2"})
    assert wait_for(lambda: scopes(server, process.pid) == {"parent"})
    assert wait_for(lambda: maps_ring() == 2)
    tell(process, "go")
    assert process.wait(30) == 0
    assert wait_for(lambda: not scopes(server, child))


def test_exec_and_exit_lose_nothing(
    server: timer.FileTimerServer, fifo: str, children: list[subprocess.Popen[bytes]]
) -> None:
    """A timer acquired in the ring just before exec stays; the new program's ring takes
    over; one acquired just before the process exits is counted, then dropped with it."""
    after_exec = PRELUDE + textwrap.dedent(
        """
        with t.expires(after=60, scope="after-exec"):
            say(rings())
            sys.stdin.readline()
        client.acquire("at-exit", time.time() + 60)
        os._exit(0)
        """
    )
    process = worker(
        children,
        fifo,
        f"""
        client.acquire("before-exec", time.time() + 60)
        os.execv(sys.executable, [sys.executable, "-c", {after_exec!r}, fifo])
        """,
    )
    assert line(process) == ["1"]
    assert wait_for(lambda: scopes(server, process.pid) == {"before-exec", "after-exec"})
    tell(process, "go")
    assert process.wait(30) == 0
    # connect (4) + before-exec, then connect (4) + after-exec (2) + at-exit.
    assert wait_for(lambda: server._request_count == 12)
    assert wait_for(lambda: not scopes(server, process.pid))
    assert wait_for(lambda: maps_ring() == 0)


def test_a_client_used_for_one_block_makes_no_ring(
    server: timer.FileTimerServer, fifo: str, children: list[subprocess.Popen[bytes]]
) -> None:
    """A client per block (acquire and release by FIFO) never offers a ring: had one done so,
    the server would have replaced (and closed) the configured client's ring, of the same
    process, and that client would have none left."""
    process = worker(
        children,
        fifo,
        """
        for i in range(3):
            with t.expires(after=60, scope="once", client=t.FileTimerClient(fifo)):
                pass
        with t.expires(after=60, scope="configured"):
            pass
        say(rings())
        """,
    )
    assert line(process) == ["1"]
    assert process.wait(30) == 0
    assert wait_for(lambda: server._request_count == 4 + 6 + 2)
    assert server.stats()["malformed"] == 0


def test_a_restarted_server_gets_the_requests_after_its_restart(
    server: timer.FileTimerServer,
    fifo: str,
    children: list[subprocess.Popen[bytes]],
    servers: list[timer.FileTimerServer],
) -> None:
    process = worker(
        children,
        fifo,
        """
        for command in sys.stdin:
            with t.expires(after=60, scope=command.strip()):
                pass
            say(rings())
        """,
    )
    tell(process, "one")
    assert line(process) == ["1"]
    assert wait_for(lambda: server._request_count == 6)
    server.stop()
    second = timer.FileTimerServer(fifo, "ring", max_interval=0.1, signal_self=False)
    servers.append(second)
    second.start()
    tell(process, "two")
    assert line(process) == ["0"]  # the old ring is closed; by FIFO to the new server...
    tell(process, "three")
    assert line(process) == ["1"]  # ...until its third request, which offers a ring
    assert wait_for(lambda: second._request_count == 4)
    assert server._request_count == 6
    assert maps_ring() == 1


def test_a_scribbled_ring_is_reported_and_the_worker_carries_on_by_fifo(
    server: timer.FileTimerServer, fifo: str, children: list[subprocess.Popen[bytes]]
) -> None:
    """The worker writes an impossible entry into its own ring: the server counts it as
    malformed, lets the ring go, and the worker's next requests arrive by FIFO."""
    process = worker(
        children,
        fifo,
        """
        [fd] = ring_fds()
        ring = mmap.mmap(fd, 256 * 1024)
        (written,) = struct.unpack_from("<Q", ring, 64)
        struct.pack_into("<I", ring, 256 + written % (256 * 1024 - 256), 60_000)
        struct.pack_into("<Q", ring, 64, written + 16)
        ring.close()  # and the fd it holds
        wake = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.write(wake, b"\\n")
        say("scribbled")
        sys.stdin.readline()
        with t.expires(after=60, scope="after"):
            say(rings())
            sys.stdin.readline()
        """,
    )
    assert line(process) == ["scribbled"]
    assert wait_for(lambda: server.stats()["malformed"] == 1)
    assert wait_for(lambda: maps_ring() == 0)
    tell(process, "go")
    assert line(process) == ["0"]
    assert wait_for(lambda: scopes(server, process.pid) == {"after"})
    tell(process, "go")
    assert process.wait(30) == 0
    assert wait_for(lambda: server._request_count == 6)
