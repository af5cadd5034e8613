"""What the Local and File servers share: the native server, and the thread that reports for it.

The native loop reads requests, keeps deadlines and signals workers without Python. What it
has to say comes back as events; a Python thread (the reporter) turns them into log records,
``log_event`` calls and, for subclasses that override ``_reap_worker``, calls to that override.
If Python is wedged the reporter waits, and the reaping goes on.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from . import _native
from .api import TimerRequest
from .diagnostics import Diagnostics, DiagnosticsOptions, EventSink

if TYPE_CHECKING:
    from typing_extensions import Unpack

logger = logging.getLogger(__name__)

R = TypeVar("R", bound=TimerRequest)

# (pid, scope_id, expiration_time, signal): how requests cross into Rust.
RequestTuple = tuple[int, str, float, int]
# (source, text, complete): the stacks taken before a reap.
Stacks = tuple[str, str, bool]
# (pid, expired requests in expiration order, chosen signal, outcome, detail, stacks)
Expiry = tuple[int, list[RequestTuple], int, str, "str | None", "Stacks | None"]

# How long stop() waits for the reporter to finish reporting what the loop already did.
_REPORTER_JOIN_TIMEOUT = 5.0

# The servers of this process whose loop runs, for _stop_at_exit.
_RUNNING: weakref.WeakSet[NativeServer[Any]] = weakref.WeakSet()


def _stop_at_exit() -> None:
    """Stops the loops still running when the interpreter exits (daemon servers that nobody
    stopped) and lets their reporters return. A reporter that woke during finalization would
    be ended by CPython with pthread_exit, whose forced unwind crosses the native frames it
    waits in: undefined behaviour, and a crash where the extension links its own unwinder (as
    zig-linked manylinux wheels do)."""
    for server in list(_RUNNING):
        if server._owner_pid == os.getpid():
            server._stop_native()


atexit.register(_stop_at_exit)


class NativeServer(Generic[R]):
    """Mixin holding a ``_native.Server`` and its reporter; subclasses say how to report."""

    _core: _native.Server
    _reporter: threading.Thread | None
    _daemon: bool
    _owner_pid: int
    _diagnostics: Diagnostics
    _events: EventSink

    def _native_options(
        self,
        max_interval: float,
        *,
        delegate_reaps: bool,
        descendants_only: bool,
        signal_self: bool = False,
        **diagnostics: Unpack[DiagnosticsOptions],
    ) -> dict[str, Any]:
        """Resolves the diagnostics and returns every option of the native server, in one
        dict (see ``Options`` in bindings.rs). Call before ``_init_native``."""
        self._diagnostics = Diagnostics.resolve(**diagnostics)
        return {
            "max_interval": max_interval,
            "signal_self": signal_self,
            "delegate_reaps": delegate_reaps,
            "descendants_only": descendants_only,
            **self._diagnostics.native_options(),
        }

    def _init_native(self, native: _native.Server, daemon: bool) -> None:
        self._core = native
        self._daemon = daemon
        self._reporter = None
        self._owner_pid = os.getpid()
        self._events = EventSink(None, None)

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

    def _reap_expired(
        self, pid: int, requests: list[R], signal: int, outcome: str, detail: str | None
    ) -> str:
        """Logs (and, for a delegated reap, performs) one expiry; returns its final outcome."""
        raise NotImplementedError

    # -- lifecycle --------------------------------------------------------------------------

    def _start_native(self, **fields: Any) -> None:
        """Starts the loop and its reporter; ``fields`` go in the "watchdog started" event."""
        if self._core.running:
            # Before the diagnostics are opened again: they belong to the running loop.
            raise FileExistsError("server already started")
        self._events = self._diagnostics.open()
        try:
            self._core.start()
        except BaseException:
            # Nothing started: leave no event log open and no stacks directory announced.
            self._diagnostics.close(self._events)
            self._events = EventSink(None, None)
            raise
        self._events.emit("watchdog started", **fields)
        self._reporter = threading.Thread(
            target=self._report_events, name="elastic-timer-reporter", daemon=self._daemon
        )
        self._reporter.start()
        _RUNNING.add(self)

    def _stop_native(self, *, run_once: bool = False) -> bool:
        """Stops the loop (after one last pass if ``run_once``); False if it was not running."""
        # Taken first: stop() may be called again meanwhile (another thread, a signal handler).
        reporter, self._reporter = self._reporter, None
        if reporter is None:
            return False
        _RUNNING.discard(self)
        if run_once:
            self._core.run_once()
        else:
            self._core.stop()
        if reporter is not threading.current_thread():
            reporter.join(_REPORTER_JOIN_TIMEOUT)
        return True

    def _close_native(self, **fields: Any) -> None:
        """After a stop: the "watchdog stopped" event, then the event log and stacks go."""
        self._events.emit("watchdog stopped", **fields)
        self._diagnostics.close(self._events)
        self._events = EventSink(None, None)

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
            self._events.emit("malformed", reason=event[1])
        elif kind == "refused":
            pid, scope, expiration, sig = event[1]
            logger.error(
                "Refusing timer request %s: %s; it will never be signalled "
                "(further refusals for this pid are only counted in stats())",
                self._request_from_tuple(event[1]),
                event[2],
            )
            self._events.emit(
                "refused", pid=pid, scope=scope, expiration=expiration, signal=sig, reason=event[2]
            )
        elif kind == "exited":
            logger.info("Worker pid=%s exited; dropped its %s timer(s)", event[1], event[2])
            self._events.emit("worker exited", pid=event[1], dropped=event[2])
        elif kind == "escalated":
            _, pid, sig, after = event
            logger.warning(
                "Worker pid=%s still ran %.2f s after signal %s: sent SIGKILL", pid, after, sig
            )
            self._events.emit("escalated", pid=pid, signal=sig, after=after)
        elif kind == "unreapable":
            _, pid, after, state = event
            logger.error(
                "Worker pid=%s still runs %.2f s after SIGKILL and cannot be reaped: %s "
                "(reported once)",
                pid,
                after,
                state,
            )
            self._events.emit("unreapable", pid=pid, after=after, state=state)
        else:
            logger.warning("%s", event[1])
            self._events.emit("warning", message=event[1])

    def _report_expired(self, expiries: list[Expiry]) -> list[str]:
        """Reports one pass's expiries (stacks first); returns their final outcomes."""
        outcomes = []
        for pid, timers, sig, outcome, detail, stacks in expiries:
            requests = [self._request_from_tuple(t) for t in timers]
            if stacks is not None:
                _log_stacks(pid, [r.scope_id for r in requests], *stacks)
            outcome = self._reap_expired(pid, requests, sig, outcome, detail)
            outcomes.append(outcome)
            source, text, complete = stacks if stacks is not None else (None, None, None)
            self._events.emit(
                "timer expired",
                pid=pid,
                scopes=[t[1] for t in timers],
                expirations=[t[2] for t in timers],
                signal=sig,
                outcome=outcome,
                detail=detail,
                stacks=text,
                stacks_source=source,
                stacks_complete=complete,
            )
        return outcomes

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
        """Counters: requests, malformed, refused, expired, reaped, escalated, unreapable,
        stack_dumps, events_dropped; and live_timers, the timers held now."""
        return self._core.stats()


def log_dry_run(pid: int, scopes: list[str], signal: int) -> None:
    logger.warning(
        "Dry run: worker pid=%s would be reaped with signal %s; expired timers: %s",
        pid,
        signal,
        scopes,
    )


def _log_stacks(pid: int, scopes: list[str], source: str, text: str, complete: bool) -> None:
    if not text.strip():
        logger.warning(
            "No stacks from expired worker pid=%s (timers %s): %s gave none in time",
            pid,
            scopes,
            source,
        )
        return
    logger.warning(
        "Stacks of expired worker pid=%s (timers %s; from %s%s):\n%s",
        pid,
        scopes,
        source,
        "" if complete else ", cut short by the grace period",
        text.rstrip(),
    )


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
