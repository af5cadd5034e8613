"""An agent's part in the job's hang report, on a thread of its own.

While the job is healthy an agent costs the store nothing but one waiting request: a
listener thread waits on its own wake key over a connection of its own (a waiting request
holds its connection, which the agent's rendezvous must keep using), re-armed every
``LISTEN`` seconds. A claiming host sets every host's wake key in one request, and the store
answers each waiting request at once. To stop, an agent sets its own wake key itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from .flight_recorder import Collectives, CollectivesMissing, rank_collectives
from .report import RankStacks, build_report, contribution, format_report
from .schema import Contribution, Report
from .store import (
    GENERATION,
    STOP,
    Keys,
    Store,
    await_wake,
    claim,
    gather,
    publish,
    wake_all,
)

__all__ = ["HangReporter"]

# The package's name: what the agents' logs have always shown.
logger = logging.getLogger(__package__)

# How long one waiting request lasts before it is re-armed: the store's whole cost of a
# healthy job, per host (torch's client logs a warning for each one that times out).
LISTEN = 3600.0
# How long a stopping reporter waits for its listener to see its own wake key.
_LISTENER_STOPS = 1.0


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
        listen: how long one waiting request for another host's claim lasts (re-armed).
        poll: how often to look for a claim instead, over a store that gives no connection
            of its own (``clone()``) to wait on.
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
        emit: Callable[[Report], None],
        grace: float,
        patience: float = 2.0,
        listen: float = LISTEN,
        poll: float = 0.25,
        collectives: Callable[[int, float], Collectives | None] = rank_collectives,
        on_report: Callable[[Report], None] | None = None,
    ) -> None:
        self._store = store
        self._group_rank = group_rank
        self._hosts = group_world_size
        self._workers = workers
        self._peek = peek
        self._emit = emit
        self._grace = grace
        self._timeout = grace + patience
        self._listen_for = listen
        self._poll = poll
        self._collectives = collectives
        self._on_report = on_report
        self.host = f"{socket.gethostname()}[{group_rank}]"
        self._expiring: dict[int, tuple[str, ...]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        # Another host claimed the hang (seen by the listener).
        self._claimed = threading.Event()
        self._listener: threading.Thread | None = None
        # The listener's connection of its own, once it has one.
        self._own: Store | None = None
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
        if keys is not None:
            self._listener = threading.Thread(
                target=self._listen, args=(keys,), name="elastic-timer-hang-listen", daemon=True
            )
            self._listener.start()
        self._wake.wait()  # a local expiry, another host's claim, or close()
        with self._lock:
            local = bool(self._expiring)
        remote = self._claimed.is_set()
        if not (local or remote) and keys is not None:
            remote = self._stop_listening(keys)
        if local or remote:
            self._take_part(keys, trigger=local)
        if self._listener is not None:
            self._listener.join(_LISTENER_STOPS)

    def _listen(self, keys: Keys) -> None:
        """Waits for another host's claim on this host's wake key; ends on a claim, on this
        host's own stop, or when the store fails."""
        key = keys.wake(self._group_rank)
        try:
            store: Store = self._store.clone()
            waits = True
            self._own = store
        except (RuntimeError, AttributeError) as err:  # a store that cannot lend a connection
            logger.debug("hang report: polling the store, which gives no connection: %s", err)
            store, waits = self._store, False
        try:
            while True:
                if waits:
                    arrived = await_wake(store, key, self._listen_for)
                else:
                    time.sleep(self._poll)
                    arrived = bool(store.check([key]))
                if not arrived:
                    continue
                if bytes(store.get(key)).decode() != STOP:
                    self._claimed.set()
                    self._wake.set()
                    return
                # This host's own stop, or one a reporter before it left in this generation.
                store.delete_key(key)
                if self._closing:
                    return
        except (RuntimeError, OSError) as err:  # the store is gone: nobody can claim
            logger.debug("hang report: the store cannot be read: %s", err)

    def _stop_listening(self, keys: Keys) -> bool:
        """Wakes this host's listener to stop, unless a claim came first (then True)."""
        try:
            value = self._store.compare_set(keys.wake(self._group_rank), "", STOP)
        except (RuntimeError, OSError) as err:
            logger.debug("hang report: the store cannot be read: %s", err)
            return False
        return bytes(value).decode() != STOP

    def _take_part(self, keys: Keys | None, *, trigger: bool) -> None:
        share = None
        try:
            if keys is None:
                raise ConnectionError("it could not be read when this worker group started")
            # First, so that the other hosts take their stacks while their ranks still run.
            first = trigger and claim(self._store, self.host, keys)
            if first:
                wake_all(self._store, self._hosts, self.host, keys)
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

    def _share(self, trigger: bool) -> Contribution:
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

    def _ask_collectives(self, pid: int) -> tuple[Collectives | None, str | None]:
        """A worker's collectives, or why it gave none (None, None: it serves none)."""
        try:
            return self._collectives(pid, self._grace), None
        except CollectivesMissing as err:
            return None, str(err)

    def _write(self, report: Report) -> None:
        logger.warning("%s", format_report(report))
        self._emit(report)
        self._reached(report)

    def _reached(self, report: Report) -> None:
        if self._on_report is not None:
            try:
                self._on_report(report)
            except Exception:
                logger.exception("hang report: on_report raised")

    def _log_theirs(self, keys: Keys) -> None:
        """Logs the report another host wrote, once it is there (bounded): one waiting request
        over the listener's connection, once the listener is done with it (every host asking
        again and again would be thousands of requests a second on a large job)."""
        deadline = time.monotonic() + self._timeout
        if self._listener is not None:
            self._listener.join(self._timeout)
        own = self._own if self._listener is None or not self._listener.is_alive() else None
        if own is not None:
            there = await_wake(own, keys.report, max(deadline - time.monotonic(), 0.1))
        else:
            while not (there := bool(self._store.check([keys.report]))):
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.05)
        if not there:
            logger.warning("hang report: none was written within %.1f s", self._timeout)
            return
        with contextlib.suppress(ValueError):
            report = json.loads((own or self._store).get(keys.report))
            logger.warning("%s", format_report(report))
            self._reached(report)
