"""Flight Recorder, through torch's worker control plane: a rank's last collectives, read from
the Unix socket its ``worker_main()`` serves, summarised for the report; the ranks behind the
others in sequence numbers."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
from typing import Any, TypedDict

from .. import _native

__all__ = [
    "CONTROL_PLANE_TIMEOUT",
    "SOCKET_ENV",
    "SUN_PATH",
    "Collectives",
    "CollectivesMissing",
    "behind",
    "describe",
    "fetch_trace",
    "listening_sockets",
    "rank_collectives",
    "summarize_trace",
]

# How long one rank's worker server gets to answer, unless told (the hang report gives it the
# stack grace: a busy host answers late, and the rank lives until then).
CONTROL_PLANE_TIMEOUT = 1.0
# Where torch's worker_main() serves the control plane (a rank's own environment).
SOCKET_ENV = "TORCH_WORKER_SERVER_SOCKET"
# The bytes of a Unix socket's path (sun_path). torch binds a path that fills it (without a
# NUL); Python connects by a path only if it is shorter.
SUN_PATH = 108
# Bytes of a Flight Recorder trace read at most.
_MAX_TRACE = 16 << 20
# /proc/net/unix: the flag of a listening socket.
_SO_ACCEPTCON = 0x10000


class ProcessGroupStatus(TypedDict):
    """A process group's last sequence numbers (-1: none yet)."""

    enqueued: int
    started: int
    completed: int


class Entry(TypedDict):
    """One collective of the trace."""

    pg: Any
    seq: Any
    op: Any
    state: Any


class Collectives(TypedDict):
    """What the report keeps of a rank's trace."""

    pg_status: dict[str, ProcessGroupStatus]
    last: list[Entry]


class CollectivesMissing(Exception):
    """Why a rank that means to serve torch's control plane gave no collectives."""


def listening_sockets(pid: int) -> list[str]:
    """The paths of the Unix sockets process ``pid`` listens on (torch's worker server, which
    ``worker_main()`` starts at ``TORCH_WORKER_SERVER_SOCKET``, is one)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[len("socket:[") : -1])
        with open(f"/proc/{pid}/net/unix") as table:
            rows = table.read().splitlines()[1:]
    except OSError:
        return []
    paths = []
    for row in rows:
        # Num RefCount Protocol Flags Type St Inode Path
        fields = row.split()
        if len(fields) >= 8 and fields[6] in inodes and int(fields[3], 16) & _SO_ACCEPTCON:
            paths.append(fields[7])
    return [path for path in paths if path.startswith("/")]


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        if len(os.fsencode(self._path)) < SUN_PATH:
            self.sock.connect(self._path)
            return
        # A path that fills sun_path, which torch binds and Python's connect() refuses: the
        # same socket by a short path, through its directory's fd.
        directory = os.open(os.path.dirname(self._path), os.O_PATH | os.O_DIRECTORY)
        try:
            self.sock.connect(f"/proc/self/fd/{directory}/{os.path.basename(self._path)}")
        finally:
            os.close(directory)


def fetch_trace(path: str, timeout: float = CONTROL_PLANE_TIMEOUT) -> dict[str, Any]:
    """The Flight Recorder trace (``fr_trace_json``) of the worker server at ``path``;
    ``CollectivesMissing`` says why there is none."""
    connection = _UnixConnection(path, timeout)
    try:
        connection.request("POST", "/handler/fr_trace_json")
        response = connection.getresponse()
        body = response.read(_MAX_TRACE)
        if response.status != 200:
            raise CollectivesMissing(f"{path} answered HTTP {response.status}")
        trace = json.loads(body)
    except socket.timeout:  # TimeoutError from Python 3.10 on
        raise CollectivesMissing(f"no answer from {path} within {timeout:.1f} s") from None
    except (OSError, http.client.HTTPException) as err:
        raise CollectivesMissing(f"no answer from {path}: {err}") from None
    except ValueError:
        raise CollectivesMissing(f"{path} answered no JSON trace") from None
    finally:
        connection.close()
    if not isinstance(trace, dict):
        raise CollectivesMissing(f"{path} answered no JSON trace")
    return trace


def summarize_trace(trace: dict[str, Any], last: int = 3) -> Collectives:
    """What the report keeps of a trace: each process group's last enqueued, started and
    completed sequence numbers, and the last few collectives."""
    status = {
        str(pg): ProcessGroupStatus(
            enqueued=int(values.get("last_enqueued_collective", -1)),
            started=int(values.get("last_started_collective", -1)),
            completed=int(values.get("last_completed_collective", -1)),
        )
        for pg, values in trace.get("pg_status", {}).items()
    }
    entries = [
        Entry(
            pg=entry.get("pg_id"),
            seq=entry.get("collective_seq_id"),
            op=entry.get("profiling_name"),
            state=entry.get("state"),
        )
        for entry in trace.get("entries", [])[-last:]
    ]
    return Collectives(pg_status=status, last=entries)


def rank_collectives(pid: int, timeout: float = CONTROL_PLANE_TIMEOUT) -> Collectives | None:
    """Worker ``pid``'s last collectives, from the control-plane socket it listens on; None
    if it neither listens on one nor names one in ``TORCH_WORKER_SERVER_SOCKET``.
    ``CollectivesMissing`` says why a worker that does gave none."""
    why = []
    for path in listening_sockets(pid):
        try:
            return summarize_trace(fetch_trace(path, timeout))
        except CollectivesMissing as err:
            why.append(str(err))
    if why:
        raise CollectivesMissing("; ".join(why))
    setting = _native.environ_value(pid, SOCKET_ENV)
    if setting is None:
        return None
    length = len(os.fsencode(setting))
    if length > SUN_PATH:
        raise CollectivesMissing(
            f"its {SOCKET_ENV} is {length} bytes long, past the {SUN_PATH} of a Unix socket "
            f"path, so worker_main() cannot listen there: {setting}"
        )
    raise CollectivesMissing(f"no socket found listening at its {SOCKET_ENV}, {setting}")


def behind(collectives: dict[int, Collectives]) -> list[int]:
    """The ranks whose last enqueued collective, in a process group, is behind the others'
    in it: they never reached the collective the others wait in."""
    late: set[int] = set()
    groups = {pg for summary in collectives.values() for pg in summary["pg_status"]}
    for pg in groups:
        enqueued = {
            rank: summary["pg_status"][pg]["enqueued"]
            for rank, summary in collectives.items()
            if pg in summary["pg_status"]
        }
        if len(enqueued) >= 2:
            ahead = max(enqueued.values())
            late |= {rank for rank, seq in enqueued.items() if seq < ahead}
    return sorted(late)


def describe(summary: Collectives) -> str:
    """A rank's Flight Recorder summary in words: each process group's last enqueued and
    completed sequence numbers, then the last collectives."""
    status = ", ".join(
        f"pg {pg} last enqueued #{s['enqueued']}, completed #{s['completed']}"
        for pg, s in sorted(summary["pg_status"].items())
    )
    last = "; ".join(f"{e['op']} #{e['seq']} {e['state']}" for e in summary["last"])
    return f"{status} (last: {last})" if last else status
