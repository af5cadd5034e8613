"""One hang report for a whole torchrun job, gathered through the rendezvous store.

When a collective hangs, every rank but the culprit(s) waits in it, and every host's timers
fire at about the same moment. Each agent's server then takes the stacks of all its local
ranks (not only the expiring ones) and contributes them, grouped, to the store that torchrun's
rendezvous already runs; one agent (the first whose timer fired) writes the report: ranks
grouped by the code they are in, and the **suspects**, the ranks that are not where the others
wait.

It scales with the number of distinct stacks, not of ranks: a host contributes one line,
its local groups (a fingerprint per distinct stack, the ranks in it, one stack per group),
appended to one key, and counts itself on one counter. The gathering host polls that counter
until every host has counted or its deadline passes, then reads the one key. No host waits on
another one by one, and a host whose store is gone, or a rank that gives no stacks, is
reported as such.

A rank that serves torch's worker control plane (``worker_main()``) with Flight Recorder on
also gives its last collectives; then the ranks behind the others in sequence numbers are the
suspects. A rank that means to serve it (``TORCH_WORKER_SERVER_SOCKET`` in its environment)
but gives none has the reason in the report: no socket there, a path too long for a Unix
socket, no answer in time.

Store keys, under ``elastic-timer/hang/<generation>/`` of the worker group's store (one set
per rendezvous round, and per report within it: ``elastic-timer/hang/generation`` counts the
reports written): ``trigger`` (the first host to see an expiry, by ``compare_set``),
``reports`` (one JSON line per host), ``count`` (hosts that contributed) and ``report`` (the
report, for the other agents to log).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from . import _native

__all__ = [
    "BACKWARD",
    "COLLECTIVES",
    "CollectivesMissing",
    "HangReporter",
    "Keys",
    "RankStacks",
    "Store",
    "build_report",
    "choose_suspects",
    "contribution",
    "fingerprint",
    "format_report",
    "gather",
]

logger = logging.getLogger(__name__)

PREFIX = "elastic-timer/hang/"
# Reports written in this store so far: a store that outlives a restart of the worker group
# (static rendezvous) gets a new set of keys for the next hang.
GENERATION = PREFIX + "generation"


@dataclass(frozen=True)
class Keys:
    """The store keys of one hang (one generation)."""

    generation: int = 0

    def _key(self, name: str) -> str:
        return f"{PREFIX}{self.generation}/{name}"

    @property
    def trigger(self) -> str:
        return self._key("trigger")

    @property
    def reports(self) -> str:
        return self._key("reports")

    @property
    def count(self) -> str:
        return self._key("count")

    @property
    def report(self) -> str:
        return self._key("report")


# torch.distributed's blocking calls (functions of torch/distributed/): a rank whose stack is
# in one of them waits for others.
COLLECTIVES = frozenset(
    {
        "all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "all_gather_object",
        "all_to_all",
        "all_to_all_single",
        "barrier",
        "monitored_barrier",
        "broadcast",
        "broadcast_object_list",
        "reduce",
        "reduce_scatter",
        "reduce_scatter_tensor",
        "gather",
        "gather_object",
        "scatter",
        "scatter_object_list",
        "send",
        "recv",
        "isend",
        "irecv",
        "batch_isend_irecv",
    }
)

# A frame as faulthandler writes it, and as py-spy dump does.
_FAULTHANDLER_FRAME = re.compile(r'^\s*File "(?P<file>.*)", line (?P<line>\d+) in (?P<func>.+)$')
_PY_SPY_FRAME = re.compile(r"^\s+(?P<func>\S.*) \((?P<file>.+):(?P<line>\d+)\)$")
_THREAD = re.compile(r"^(Current thread|Thread) (0x[0-9a-f]+|\d+)")


# A torch.distributed Store (TCPStore, PrefixStore): add, append, check, compare_set, get and
# set are what the report uses. torch's stubs lack some of them, hence Any.
Store = Any


Frame = tuple[str, int, str]  # file, line, function


def threads(stacks: str) -> list[list[Frame]]:
    """The frames of each thread of a faulthandler or py-spy dump, innermost first."""
    found: list[list[Frame]] = []
    current: list[Frame] | None = None
    for line in stacks.splitlines():
        if _THREAD.match(line.strip()):
            current = []
            found.append(current)
            continue
        match = _FAULTHANDLER_FRAME.match(line) or _PY_SPY_FRAME.match(line)
        if match is None:
            continue
        if current is None:
            current = []
            found.append(current)
        current.append((match["file"], int(match["line"]), match["func"].strip()))
    return [frames for frames in found if frames]


def fingerprint(stacks: str) -> str:
    """Equal for two dumps whose threads are at the same lines of the same code, whatever
    the thread ids, the order the threads were listed in, and how often (a worker asked for
    its stacks twice, by its own expiry and by another host's report, appends two dumps)."""
    normalised = sorted({repr(frames) for frames in threads(stacks)})
    return hashlib.sha1("\n".join(normalised).encode()).hexdigest()[:16]


# Where a backward pass runs: a rank of a DistributedDataParallel model that is there when the
# others hang waits for their gradients' all-reduce, which DDP runs inside it.
BACKWARD = "backward"


def collective(stacks: str) -> str | None:
    """The torch.distributed call a dump waits in (the innermost), if any; else ``backward``
    when a thread is in autograd's backward pass."""
    for frames in threads(stacks):
        for path, _, func in frames:
            if func in COLLECTIVES and "torch/distributed/" in path:
                return func
    for frames in threads(stacks):
        if any(f == "_engine_run_backward" and "torch/autograd/" in p for p, _, f in frames):
            return BACKWARD
    return None


def where(stacks: str) -> str:
    """A one-line answer: the collective, or the innermost frame of the first thread."""
    call = collective(stacks)
    if call is not None:
        return f"in {call}"
    found = threads(stacks)
    if not found:
        return "no Python frames"
    path, line, func = found[0][0]
    return f"in {func} ({path.rsplit('/', 1)[-1]}:{line})"


@dataclass(frozen=True)
class RankStacks:
    """One local rank at the moment of the hang; ``stacks`` None: it gave none."""

    rank: int
    pid: int
    scopes: tuple[str, ...]
    stacks: str | None
    # Its Flight Recorder summary (``summarize_trace``), when it serves torch's control plane.
    collectives: dict[str, Any] | None = None
    # Why it gave none although it means to serve the control plane.
    collectives_missing: str | None = None


def contribution(
    host: str, group_rank: int, ranks: Iterable[RankStacks], *, trigger: bool
) -> dict[str, Any]:
    """A host's share of the report: its local groups, one stack each."""
    groups: dict[str, dict[str, Any]] = {}
    unanswered = []
    for entry in sorted(ranks, key=lambda r: r.rank):
        if entry.stacks is None or not threads(entry.stacks):
            unanswered.append(entry.rank)
            continue
        key = fingerprint(entry.stacks)
        group = groups.setdefault(
            key,
            {
                "fingerprint": key,
                "ranks": [],
                "pids": [],
                "scopes": [],
                "stack": entry.stacks,
                "collectives": {},
                "collectives_missing": {},
            },
        )
        if entry.collectives is not None:
            group["collectives"][str(entry.rank)] = entry.collectives
        if entry.collectives_missing is not None:
            group["collectives_missing"][str(entry.rank)] = entry.collectives_missing
        group["ranks"].append(entry.rank)
        group["pids"].append(entry.pid)
        group["scopes"].extend(s for s in entry.scopes if s not in group["scopes"])
    return {
        "host": host,
        "group_rank": group_rank,
        "trigger": trigger,
        "groups": list(groups.values()),
        "unanswered": unanswered,
    }


def choose_suspects(groups: Sequence[dict[str, Any]]) -> list[int]:
    """The ranks that are not where the others wait.

    The majority is the largest group waiting in a collective; every rank not in that same
    collective (elsewhere in the code, or in another collective) is a suspect. With no rank
    in a collective, the ranks outside a strictly largest group are; with no such group,
    nobody is.
    """
    waiting = [g for g in groups if g["collective"] is not None]
    if waiting:
        majority = max(waiting, key=lambda g: len(g["ranks"]))["collective"]
        outside = [g for g in groups if g["collective"] != majority]
    else:
        by_size = sorted(groups, key=lambda g: len(g["ranks"]), reverse=True)
        if len(by_size) < 2 or len(by_size[0]["ranks"]) == len(by_size[1]["ranks"]):
            return []
        outside = by_size[1:]
    return sorted(r for g in outside for r in g["ranks"])


def build_report(
    contributions: Sequence[dict[str, Any]],
    *,
    expected_hosts: int,
    store_gone: bool = False,
) -> dict[str, Any]:
    """The job's report from every host's contribution (what the event log gets)."""
    merged: dict[str, dict[str, Any]] = {}
    for share in contributions:
        for group in share["groups"]:
            into = merged.setdefault(
                group["fingerprint"],
                {
                    "fingerprint": group["fingerprint"],
                    "ranks": [],
                    "hosts": [],
                    "scopes": [],
                    "collective": collective(group["stack"]),
                    "where": where(group["stack"]),
                    "stack": group["stack"],
                    "collectives": {},
                    "collectives_missing": {},
                },
            )
            into["collectives"].update(group.get("collectives", {}))
            into["collectives_missing"].update(group.get("collectives_missing", {}))
            into["ranks"].extend(group["ranks"])
            if share["host"] not in into["hosts"]:
                into["hosts"].append(share["host"])
            into["scopes"].extend(s for s in group["scopes"] if s not in into["scopes"])
    groups = sorted(merged.values(), key=lambda g: (-len(g["ranks"]), min(g["ranks"])))
    for group in groups:
        group["ranks"].sort()
    flight = {int(r): c for g in groups for r, c in g["collectives"].items()}
    suspects, suspects_from = behind(flight), "flight recorder"
    if not suspects:
        suspects, suspects_from = choose_suspects(groups), "stacks"
    for group in groups:
        group["suspect"] = bool(set(group["ranks"]) & set(suspects))
    answered = {share["group_rank"] for share in contributions}
    return {
        "suspects": suspects,
        "suspects_from": suspects_from,
        "groups": groups,
        "unanswered": sorted(r for share in contributions for r in share["unanswered"]),
        "hosts": len(answered),
        "expected_hosts": expected_hosts,
        "missing_hosts": sorted(set(range(expected_hosts)) - answered),
        "store_gone": store_gone,
        "triggered_by": sorted(s["host"] for s in contributions if s["trigger"]),
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as the agents log it."""
    ranks = sum(len(g["ranks"]) for g in report["groups"])
    suspects = report["suspects"]
    lines = [
        f"Hang report: {ranks} rank(s) from {report['hosts']} of {report['expected_hosts']} "
        f"host(s), in {len(report['groups'])} group(s); suspects: "
        + (", ".join(f"rank {r}" for r in suspects) if suspects else "none found")
    ]
    if suspects and report.get("suspects_from") == "flight recorder":
        lines[0] += " (behind the others in Flight Recorder's sequence numbers)"
    if report["store_gone"]:
        lines.append("  the job's store is gone: only this host's ranks are reported")
    elif report["missing_hosts"]:
        missing = ", ".join(map(str, report["missing_hosts"]))
        lines.append(f"  hosts (group ranks) that did not answer: {missing}")
    if report["unanswered"]:
        lines.append(f"  ranks that gave no stacks: {', '.join(map(str, report['unanswered']))}")
    for number, group in enumerate(report["groups"], 1):
        mark = "  <- suspect" if group["suspect"] else ""
        lines.append(
            f"  group {number}: rank(s) {_ranges(group['ranks'])} on {', '.join(group['hosts'])}"
            f", {group['where']}{mark}"
        )
        for rank, summary in sorted(group["collectives"].items(), key=lambda i: int(i[0])):
            lines.append(f"    rank {rank} collectives: {_describe_collectives(summary)}")
        missing = group.get("collectives_missing", {})
        for rank, why in sorted(missing.items(), key=lambda i: int(i[0])):
            lines.append(f"    rank {rank} collectives: none, {why}")
        lines.extend(f"    {line}" for line in group["stack"].rstrip().splitlines())
    return "\n".join(lines)


def _describe_collectives(summary: dict[str, Any]) -> str:
    status = ", ".join(
        f"pg {pg} last enqueued #{s['enqueued']}, completed #{s['completed']}"
        for pg, s in sorted(summary["pg_status"].items())
    )
    last = "; ".join(f"{e['op']} #{e['seq']} {e['state']}" for e in summary["last"])
    return f"{status} (last: {last})" if last else status


def _ranges(ranks: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` as ``0-2, 5``."""
    parts: list[str] = []
    for rank in ranks:
        if parts and parts[-1].split("-")[-1] == str(rank - 1):
            parts[-1] = f"{parts[-1].split('-')[0]}-{rank}"
        else:
            parts.append(str(rank))
    return ", ".join(parts)


# -- Flight Recorder, through torch's worker control plane ------------------------------------

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


def summarize_trace(trace: dict[str, Any], last: int = 3) -> dict[str, Any]:
    """What the report keeps of a trace: each process group's last enqueued, started and
    completed sequence numbers, and the last few collectives."""
    status = {
        str(pg): {
            key: int(values.get(f"last_{key}_collective", -1))
            for key in ("enqueued", "started", "completed")
        }
        for pg, values in trace.get("pg_status", {}).items()
    }
    entries = [
        {
            "pg": entry.get("pg_id"),
            "seq": entry.get("collective_seq_id"),
            "op": entry.get("profiling_name"),
            "state": entry.get("state"),
        }
        for entry in trace.get("entries", [])[-last:]
    ]
    return {"pg_status": status, "last": entries}


def rank_collectives(pid: int, timeout: float = CONTROL_PLANE_TIMEOUT) -> dict[str, Any] | None:
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


def behind(collectives: dict[int, dict[str, Any]]) -> list[int]:
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


def publish(store: Store, share: dict[str, Any], keys: Keys = Keys()) -> int:
    """Adds a host's contribution (one append, one add); returns the hosts counted so far."""
    store.append(keys.reports, json.dumps(share, separators=(",", ":")) + "\n")
    return int(store.add(keys.count, 1))


def gather(
    store: Store, expected_hosts: int, timeout: float, keys: Keys = Keys(), poll: float = 0.05
) -> list[dict[str, Any]]:
    """Every contribution there is once all ``expected_hosts`` counted, or ``timeout`` passed:
    one counter polled, one key read."""
    deadline = time.monotonic() + timeout
    while store.add(keys.count, 0) < expected_hosts and time.monotonic() < deadline:
        time.sleep(poll)
    raw = store.get(keys.reports) if store.check([keys.reports]) else b""
    return [json.loads(line) for line in raw.decode().splitlines() if line]


def claim(store: Store, me: str, keys: Keys = Keys()) -> bool:
    """Whether this host is the first to report a hang (and so writes the report)."""
    return bytes(store.compare_set(keys.trigger, "", me)).decode() == me


class HangReporter:
    """An agent's part in the job's hang report; its work runs on a thread of its own, so it
    never delays a reap.

    Args:
        store: the worker group's store (torch's rendezvous store).
        group_rank, group_world_size: this host's place among the job's hosts.
        workers: the local workers now, as ``{pid: global rank}``.
        peek: takes the stacks of these pids now (the native server's ``peek_stacks``).
        emit: writes the report to the event log.
        grace: the stack grace (how long a peek may take); the report waits that and
            ``patience`` more for the other hosts. A rank's control plane may take as long.
        poll: how often to look for another host's claim.
        collectives: a worker's last collectives, by pid and with a timeout
            (``rank_collectives``), if any; ``CollectivesMissing`` says why none.
        on_report: called with the job's report once this host has it (written or read).
    """

    def __init__(
        self,
        *,
        store: Store,
        group_rank: int,
        group_world_size: int,
        workers: Callable[[], dict[int, int]],
        peek: Callable[[list[int]], list[tuple[int, str | None]]],
        emit: Callable[[dict[str, Any]], None],
        grace: float,
        patience: float = 2.0,
        poll: float = 0.25,
        collectives: Callable[[int, float], dict[str, Any] | None] = rank_collectives,
        on_report: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self._store = store
        self._group_rank = group_rank
        self._hosts = group_world_size
        self._workers = workers
        self._peek = peek
        self._emit = emit
        self._grace = grace
        self._timeout = grace + patience
        self._poll = poll
        self._collectives = collectives
        self._on_report = on_report
        self.host = f"{socket.gethostname()}[{group_rank}]"
        self._expiring: dict[int, tuple[str, ...]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="elastic-timer-hang", daemon=True)
        self._thread.start()

    def expiring(self, pid: int, scopes: Iterable[str]) -> None:
        """A local worker's timers expired (its stacks are being taken): report the hang."""
        with self._lock:
            self._expiring[pid] = tuple(scopes)
        self._wake.set()

    def close(self) -> None:
        """Stops watching. If a hang was reported, first lets this host finish its part
        (bounded): the agent's workers, and the store it may host, live until then."""
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self._timeout + 5.0)
            self._thread = None

    def _run(self) -> None:
        try:
            # The generation now, before this worker group can hang: a trigger left by the
            # last one (under another generation) is not this hang's.
            keys: Keys | None = Keys(int(self._store.add(GENERATION, 0)))
        except (RuntimeError, OSError) as err:  # a store that is gone, a broken connection
            logger.debug("hang report: the store cannot be read: %s", err)
            keys = None
        while True:
            self._wake.wait(self._poll)
            self._wake.clear()
            with self._lock:
                local = bool(self._expiring)
            try:
                remote = not local and keys is not None and self._store.check([keys.trigger])
            except (RuntimeError, OSError) as err:
                logger.debug("hang report: the store cannot be read: %s", err)
                remote = False
            if local or remote:
                self._take_part(keys, trigger=local)
                return
            if self._closing:
                return

    def _take_part(self, keys: Keys | None, *, trigger: bool) -> None:
        share = None
        try:
            if keys is None:
                raise ConnectionError("it could not be read when this worker group started")
            # First, so that the other hosts take their stacks while their ranks still run.
            first = trigger and claim(self._store, self.host, keys)
            share = self._share(trigger)
            publish(self._store, share, keys)
            if first:
                contributions = gather(self._store, self._hosts, self._timeout, keys)
                report = build_report(contributions, expected_hosts=self._hosts)
                self._store.set(keys.report, json.dumps(report))
                self._store.add(GENERATION, 1)
                self._write(report)
            else:
                self._log_theirs(keys)
        except (RuntimeError, OSError) as err:  # torch's DistError: the store's host is gone
            logger.warning("hang report: the job's store is gone (%s); reporting this host", err)
            share = share or self._share(trigger)
            self._write(build_report([share], expected_hosts=self._hosts, store_gone=True))

    def _share(self, trigger: bool) -> dict[str, Any]:
        """This host's contribution: the stacks of all its ranks, taken now."""
        workers = self._workers()
        with ThreadPoolExecutor(max(1, len(workers))) as pool:
            # The collectives while the stacks are taken: both before the kill.
            asked = {pid: pool.submit(self._ask_collectives, pid) for pid in workers}
            taken = dict(self._peek(sorted(workers)))
            collectives = {pid: future.result() for pid, future in asked.items()}
        with self._lock:
            expiring = dict(self._expiring)
        ranks = [
            RankStacks(rank, pid, expiring.get(pid, ()), taken.get(pid), *collectives[pid])
            for pid, rank in workers.items()
        ]
        return contribution(self.host, self._group_rank, ranks, trigger=trigger)

    def _ask_collectives(self, pid: int) -> tuple[dict[str, Any] | None, str | None]:
        """A worker's collectives, or why it gave none (None, None: it serves none)."""
        try:
            return self._collectives(pid, self._grace), None
        except CollectivesMissing as err:
            return None, str(err)

    def _write(self, report: dict[str, Any]) -> None:
        logger.warning("%s", format_report(report))
        self._emit(report)
        self._reached(report)

    def _reached(self, report: dict[str, Any]) -> None:
        if self._on_report is not None:
            try:
                self._on_report(report)
            except Exception:
                logger.exception("hang report: on_report raised")

    def _log_theirs(self, keys: Keys) -> None:
        """Logs the report another host wrote, once it is there (bounded)."""
        deadline = time.monotonic() + self._timeout
        while not self._store.check([keys.report]):
            if time.monotonic() >= deadline:
                logger.warning("hang report: none was written within %.1f s", self._timeout)
                return
            time.sleep(0.05)
        with contextlib.suppress(ValueError):
            report = json.loads(self._store.get(keys.report))
            logger.warning("%s", format_report(report))
            self._reached(report)
