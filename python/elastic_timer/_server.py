"""What the Local and File servers share: the native server, and the thread that reports for it.

The native loop reads requests, keeps deadlines and signals workers without Python. What it
has to say comes back as events; a Python thread (the reporter) turns them into log records,
``log_event`` calls and, for subclasses that override ``_reap_worker``, calls to that override.
If Python is wedged the reporter waits, and the reaping goes on.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from typing import Any, Generic, TypeVar

from . import _native
from .api import TimerRequest

logger = logging.getLogger(__name__)

R = TypeVar("R", bound=TimerRequest)

# (pid, scope_id, expiration_time, signal): how requests cross into Rust.
RequestTuple = tuple[int, str, float, int]
# (pid, expired requests in expiration order, chosen signal, outcome, detail)
Expiry = tuple[int, list[RequestTuple], int, str, "str | None"]

# How long stop() waits for the reporter to finish reporting what the loop already did.
_REPORTER_JOIN_TIMEOUT = 5.0


class NativeServer(Generic[R]):
    """Mixin holding a ``_native.Server`` and its reporter; subclasses say how to report."""

    _core: _native.Server
    _reporter: threading.Thread | None
    _daemon: bool
    _owner_pid: int

    def _init_native(self, native: _native.Server, daemon: bool) -> None:
        self._core = native
        self._daemon = daemon
        self._reporter = None
        self._owner_pid = os.getpid()

    def _is_forked_copy(self, method: str) -> bool:
        """True (and logged) when called in a process forked from the server's. The copy has
        no loop thread; stopping it must not stop or remove anything of the original's."""
        if os.getpid() == self._owner_pid:
            return False
        logger.warning(
            "%s.%s() ignored: this server belongs to process %s, and this process is a fork of it",
            type(self).__name__,
            method,
            self._owner_pid,
        )
        return True

    # -- subclass hooks ---------------------------------------------------------------------

    def _request_from_tuple(self, request: RequestTuple) -> R:
        raise NotImplementedError

    def _tuple_from_request(self, request: R) -> RequestTuple:
        raise NotImplementedError

    def _report_expired(self, expiries: list[Expiry]) -> None:
        """Logs (and, for delegated reaps, performs) one pass's reaps."""
        raise NotImplementedError

    # -- lifecycle --------------------------------------------------------------------------

    def _start_native(self) -> None:
        self._core.start()
        self._reporter = threading.Thread(
            target=self._report_events, name="elastic-timer-reporter", daemon=self._daemon
        )
        self._reporter.start()

    def _stop_native(self, *, run_once: bool = False) -> bool:
        """Stops the loop (after one last pass if ``run_once``); False if it was not running."""
        # Taken first: stop() may be called again meanwhile (another thread, a signal handler).
        reporter, self._reporter = self._reporter, None
        if reporter is None:
            return False
        if run_once:
            self._core.run_once()
        else:
            self._core.stop()
        if reporter is not threading.current_thread():
            reporter.join(_REPORTER_JOIN_TIMEOUT)
        return True

    def _report_events(self) -> None:
        while True:
            event = self._core.next_event(3600.0)
            if event is None:
                continue
            if event[0] == "closed":
                return
            try:
                self._report(event)
            except Exception:
                logger.exception("Error reporting timer server event %r", event[0])
            finally:
                if event[0] == "expired":
                    self._core.ack_expired()

    def _report(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "expired":
            self._report_expired(event[1])
        elif kind == "malformed":
            logger.warning("Skipping malformed timer request: %s", event[1])
        elif kind == "refused":
            logger.error(
                "Refusing timer request %s: %s; it will never be signalled "
                "(further refusals for this pid are only counted in stats())",
                self._request_from_tuple(event[1]),
                event[2],
            )
        elif kind == "exited":
            logger.info("Worker pid=%s exited; dropped its %s timer(s)", event[1], event[2])
        else:
            logger.warning("%s", event[1])

    # -- the timer map, shared by both transports --------------------------------------------

    def register_timers(self, timer_requests: Iterable[R]) -> None:
        self._core.register([self._tuple_from_request(r) for r in timer_requests])

    def clear_timers(self, worker_ids: Iterable[int]) -> None:
        self._core.clear(list(worker_ids))

    def get_expired_timers(self, deadline: float) -> dict[int, list[R]]:
        return {
            pid: [self._request_from_tuple(r) for r in requests]
            for pid, requests in self._core.expired(deadline)
        }

    @property
    def _timers(self) -> dict[tuple[int, str], R]:
        """A snapshot of the live timers, keyed by ``(pid, scope_id)`` as torch's."""
        return {(r[0], r[1]): self._request_from_tuple(r) for r in self._core.timers()}

    @property
    def _request_count(self) -> int:
        """Requests received (acquires and releases), as torch's File server counts them."""
        return int(self._core.stats()["requests"])

    def stats(self) -> dict[str, int]:
        """Counters: requests, malformed, refused, reaped, live_timers, events_dropped."""
        return self._core.stats()


def worker_pid(worker_id: Any) -> int:
    """The pid a request names; the native servers identify workers by pid only."""
    if isinstance(worker_id, bool) or not isinstance(worker_id, int):
        raise TypeError(f"worker_id must be a pid (int), got {worker_id!r}")
    return worker_id


def kill_worker(pid: int, sig: int) -> bool:
    """The servers' default ``_reap_worker``: torch's, but never signals a pid <= 1."""
    if pid <= 1:
        logger.error("Refusing to signal pid=%s: not a single worker process", pid)
        return True
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        logger.info("Process with pid=%s does not exist. Skipping", pid)
        return True
    except Exception:
        logger.exception("Error terminating pid=%s", pid)
    return False


def overrides(instance: object, base: type, name: str) -> bool:
    """Whether ``instance``'s class replaces ``base``'s method ``name``."""
    return getattr(type(instance), name) is not getattr(base, name)
