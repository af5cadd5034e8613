"""Timers over a ``multiprocessing.Queue``: ``LocalTimerClient`` and ``LocalTimerServer``.

The client puts pickled ``TimerRequest``s on the queue, exactly as torch's does. The server
reads the queue's pipe natively (honouring the queue's read lock and item semaphore, so
``qsize()`` stays right) and decodes the pickles without running them.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from queue import Empty
from typing import TYPE_CHECKING, Any

from . import _native
from ._request import TimerClient, TimerRequest
from ._server import (
    NativeServer,
    RequestTuple,
    kill_worker,
    request_tuple,
    worker_pid,
)
from .api import RequestQueue, TimerServer
from .options import DiagnosticsOptions
from .stack_dump import arm_stack_dump

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["LocalTimerClient", "LocalTimerServer", "MultiprocessingRequestQueue"]

logger = logging.getLogger(__name__)


class LocalTimerClient(TimerClient):
    """
    Client of ``LocalTimerServer``, for workers on the server's host (typically its
    subprocesses); identifies the worker by its pid.

    Requests go on the queue as pickled ``TimerRequest``s, as with torch's client, but are
    written to the queue's pipe at once instead of by ``put``'s feeder thread. ``send_timeout``
    bounds the wait when the queue is full (bounded queue, or a server that stopped reading).
    To our ``LocalTimerServer`` (which marks the queues it reads), after a few requests they
    go in a shared-memory ring instead, with no system call (as with ``FileTimerClient``).
    """

    def __init__(self, mp_queue: Any, *, send_timeout: float = 30.0) -> None:
        super().__init__()
        self._mp_queue = mp_queue
        self._send_timeout = send_timeout
        self._writer: _native.QueueWriter | None = None
        arm_stack_dump()

    def __getstate__(self) -> dict[str, object]:
        # The writer holds this process's handles; a copy makes its own.
        return {**self.__dict__, "_writer": None}

    def _put(self, scope_id: str, expiration_time: float) -> None:
        writer = self._writer
        if writer is None:
            writer = self._writer = _queue_writer(self._mp_queue, self._send_timeout)
        if writer is None or not writer.send_own(scope_id, expiration_time):
            self._mp_queue.put(TimerRequest(os.getpid(), scope_id, expiration_time))

    def acquire(self, scope_id: str, expiration_time: float) -> None:
        self._put(scope_id, expiration_time)

    def release(self, scope_id: str) -> None:
        self._put(scope_id, -1)


def _queue_writer(mp_queue: Any, timeout: float) -> _native.QueueWriter | None:
    """A native writer to the queue's pipe, or None for queues that have none (a proxy)."""
    try:
        fd = mp_queue._writer.fileno()
        write_lock = mp_queue._wlock._semlock.handle
        items = mp_queue._sem._semlock.handle
    except AttributeError:
        return None
    return _native.QueueWriter(mp_queue, fd, write_lock, items, timeout)


class MultiprocessingRequestQueue(RequestQueue):
    """A ``RequestQueue`` backed by a ``multiprocessing.Queue``."""

    def __init__(self, mp_queue: Any) -> None:
        super().__init__()
        self._mp_queue = mp_queue

    def size(self) -> int:
        return int(self._mp_queue.qsize())

    def get(self, size: int, timeout: float) -> list[TimerRequest]:
        requests = []
        wait = timeout
        for _ in range(size):
            start = time.time()
            try:
                request = self._mp_queue.get(block=True, timeout=wait)
            except Empty:
                break
            requests.append(request)
            wait = wait - (time.time() - start)
            if wait <= 0:
                break
        return requests


def _native_queue_server(mp_queue: Any, options: dict[str, Any]) -> tuple[_native.Server, bool]:
    """A native server reading the queue's pipe, or (False) one fed from Python."""
    try:
        fd = mp_queue._reader.fileno()
        read_lock = mp_queue._rlock._semlock.handle
        items = mp_queue._sem._semlock.handle
    except AttributeError:
        # Not a plain multiprocessing.Queue (a manager proxy, say): read it from Python.
        return _native.Server.direct(options), False
    return _native.Server.queue(mp_queue, fd, read_lock, items, options), True


class LocalTimerServer(NativeServer[TimerRequest], TimerServer):
    """
    Server of ``LocalTimerClient``s: one per host, for the workers on that host. Expired
    workers are killed with SIGKILL at their deadline by a native thread that needs no GIL.

    ``max_interval`` is accepted for compatibility: deadlines fire when due, not on the next
    poll; it bounds how soon a failed reap is retried (at most 1 s). ``descendants_only``
    refuses (logs once per pid, and counts) acquires from processes that do not descend from
    this one. The other keywords are the servers' opt-in options (``elastic_timer.options``,
    which says what each does): where one is not given, its ``ELASTIC_TIMER_*`` environment
    variable is read; ``on_event`` is given each event as a dict.
    """

    def __init__(
        self,
        mp_queue: Any,
        max_interval: float = 60,
        daemon: bool = True,
        *,
        descendants_only: bool = False,
        **diagnostics: Unpack[DiagnosticsOptions],
    ) -> None:
        TimerServer.__init__(self, MultiprocessingRequestQueue(mp_queue), max_interval, daemon)
        options = self._native_options(
            max_interval,
            descendants_only=descendants_only,
            **diagnostics,
        )
        native, reads_queue = _native_queue_server(mp_queue, options)
        self._init_native(native, daemon)
        self._needs_pump = not reads_queue
        self._pump: threading.Thread | None = None
        self._pump_stop = threading.Event()

    def _request_from_tuple(self, request: RequestTuple) -> TimerRequest:
        return TimerRequest(request[0], request[1], request[2])

    def _tuple_from_request(self, request: TimerRequest) -> RequestTuple:
        return request_tuple(
            request.worker_id, request.scope_id, request.expiration_time, signal.SIGKILL
        )

    def start(self) -> None:
        logger.info(
            "Starting %s... max_interval=%s, daemon=%s",
            type(self).__name__,
            self._max_interval,
            self._daemon,
        )
        self._stop_signaled = False
        if not self._start_native(_OWN_REAP_WORKER):
            return
        if self._needs_pump:
            self._pump_stop.clear()
            self._pump = threading.Thread(target=self._pump_requests, daemon=self._daemon)
            self._pump.start()

    def stop(self) -> None:
        if self._is_forked_copy("stop"):
            return
        logger.info("Stopping %s", type(self).__name__)
        self._stop_signaled = True
        self._pump_stop.set()
        if self._pump is not None:
            self._pump.join()
            self._pump = None
        if not self._stop_native():
            logger.info("No watchdog thread running, doing nothing")
        self._close_native()

    def _pump_requests(self) -> None:
        """Feeds the native server from a queue it cannot read itself (a manager proxy)."""
        while not self._pump_stop.is_set():
            try:
                batch = max(1, self._request_queue.size())
                items: list[Any] = self._request_queue.get(batch, timeout=0.1)
            except Exception:
                # A dead manager fails at once, every time: do not spin.
                logger.exception("Error reading timer requests; retrying in 1 s")
                self._pump_stop.wait(1.0)
                continue
            self.register_timers(items)

    _worker_label = "worker_id"

    def _reap_delegated(self, pid: int, signal: int) -> bool:
        # As torch's LocalTimerServer: an override that raises counts as having reaped.
        return self._reap_worker_no_throw(pid)

    def _reap_worker(self, worker_id: int) -> bool:
        return kill_worker(worker_pid(worker_id), signal.SIGKILL)


# The class's own, kept before anything patches it: any other gets the reaps (see start()).
_OWN_REAP_WORKER = LocalTimerServer._reap_worker
