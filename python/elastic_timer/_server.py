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
import signal
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from . import _native
from ._request import TimerRequest
from .events import EventSink
from .hang_report import HangReporter
from .options import Diagnostics, DiagnosticsOptions

if TYPE_CHECKING:
    from typing_extensions import Unpack

logger = logging.getLogger(__name__)

R = TypeVar("R", bound=TimerRequest)

# (pid, scope_id, expiration_time, signal): how requests cross into Rust.
RequestTuple = tuple[int, str, float, int]
Outcome = _native.Outcome

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
        if not server._core.forked_copy:
            server._stop_native()


atexit.register(_stop_at_exit)


# The events reported as one log record and one JSON event of their fields: level, message,
# the JSON event's name, its fields.
_PLAIN_EVENTS: dict[type, tuple[int, str, str, tuple[str, ...]]] = {
    _native.Malformed: (
        logging.WARNING,
        "Skipping malformed timer request: %(reason)s",
        "malformed",
        ("reason",),
    ),
    _native.WorkerExited: (
        logging.INFO,
        "Worker pid=%(pid)s exited; dropped its %(dropped)s timer(s)",
        "worker exited",
        ("pid", "dropped"),
    ),
    _native.Escalated: (
        logging.WARNING,
        "Worker pid=%(pid)s still ran %(after).2f s after signal %(signal)s: sent SIGKILL",
        "escalated",
        ("pid", "signal", "after"),
    ),
    _native.Unreapable: (
        logging.ERROR,
        "Worker pid=%(pid)s still runs %(after).2f s after SIGKILL and cannot be reaped: "
        "%(state)s (reported once)",
        "unreapable",
        ("pid", "after", "state"),
    ),
    _native.Notice: (logging.WARNING, "%(message)s", "warning", ("message",)),
}


class NativeServer(Generic[R]):
    """Mixin holding a ``_native.Server`` and its reporter; subclasses say how to report."""

    _core: _native.Server
    _reporter: threading.Thread | None
    _daemon: bool
    _diagnostics: Diagnostics
    _events: EventSink
    # The agent's part in the job's hang report (set by elastic_timer.torch for the agent).
    _hang_reporter: HangReporter | None = None
    # How long an expired worker is held at least for its stacks (within the stack grace):
    # the hang report's time to ask every worker for its stacks and collectives.
    _stack_hold: float = 0.0
    # Each transport's torch hook: what reaps an expired worker when overridden or patched.
    _reap_worker: Callable[..., bool]

    def _native_options(
        self,
        max_interval: float,
        *,
        descendants_only: bool,
        signal_self: bool = False,
        error_files: bool = False,
        fifo_mode: int | None = None,
        **diagnostics: Unpack[DiagnosticsOptions],
    ) -> dict[str, Any]:
        """Resolves the diagnostics and returns every option of the native server, in one
        dict (see ``Options`` in bindings.rs). Call before ``_init_native``."""
        self._diagnostics = Diagnostics.resolve(**diagnostics)
        return {
            "max_interval": max_interval,
            "signal_self": signal_self,
            "descendants_only": descendants_only,
            "error_files": error_files,
            "fifo_mode": fifo_mode,
            "stack_hold": self._stack_hold,
            **self._diagnostics.native_options(),
        }

    def _init_native(self, native: _native.Server, daemon: bool) -> None:
        self._core = native
        self._daemon = daemon
        self._reporter = None
        self._events = EventSink(None, None)
        self._delegating = False

    def _is_forked_copy(self, method: str) -> bool:
        """True (and logged) when called in a process forked from the server's (the native
        server's guard). The copy has no loop thread; stopping it must not stop or remove
        anything of the original's."""
        if not self._core.forked_copy:
            return False
        logger.warning(
            "%s.%s() ignored: this server belongs to process %s, and this process is a fork of it",
            type(self).__name__,
            method,
            self._core.owner,
        )
        return True

    # -- subclass hooks ---------------------------------------------------------------------

    def _request_from_tuple(self, request: RequestTuple) -> R:
        raise NotImplementedError

    def _tuple_from_request(self, request: R) -> RequestTuple:
        raise NotImplementedError

    # How torch's server of this transport names a worker in "Reaping worker_...=[pid]".
    _worker_label: str

    def _reap_delegated(self, pid: int, signal: int) -> bool:
        """Runs the overridden ``_reap_worker`` as torch's server of this transport does:
        True if the worker counts as reaped. The caller answers the loop."""
        raise NotImplementedError

    def _timer_event(self, name: str, request: R | None) -> None:
        """torch's ``log_event(name, request)`` for servers that have one."""

    # -- one expiry, as torch's servers log and handle it ------------------------------------

    def _reap_expired(
        self, pid: int, requests: list[R], signal: int, outcome: Outcome, detail: str | None
    ) -> Outcome:
        """Logs (and, for a delegated reap, performs) one expiry; returns its final outcome.

        ``requests`` are its expired timers in expiration order; torch reports those up to
        the first with a positive signal (the one that decided the signal) as expired.
        """
        scopes = [r.scope_id for r in requests]
        if outcome == Outcome.DRY_RUN:
            log_dry_run(pid, scopes, signal)
        elif outcome == Outcome.SPARED:
            logger.warning(
                "Sparing worker pid=%s: its timers expired (%s), and the job's hang report "
                "found it waits for another rank",
                pid,
                scopes,
            )
        else:
            logger.info("Reaping %s=[%s]. Expired timers: %s", self._worker_label, pid, scopes)
        deciding = None
        for request in requests:
            self._timer_event("timer expired", request)
            if request_signal(request) > 0:
                deciding = request
                break
        if outcome == Outcome.DELEGATED:
            reaped = False
            try:
                reaped = self._reap_delegated(pid, signal)
            finally:
                # Always answer, or the loop would wait for this worker for good.
                self._core.complete_reap(pid, reaped)
            outcome = Outcome.SIGNALLED if reaped else Outcome.FAILED
        if outcome == Outcome.NOT_SIGNALLED:
            logger.info("No signal specified with worker=[%s]. Do not reap it.", pid)
        elif outcome == Outcome.GONE:
            logger.info("Process with pid=%s does not exist. Skipping", pid)
        elif outcome == Outcome.SIGNALLED:
            logger.info("Successfully reaped worker=[%s] with signal=%s", pid, signal)
            self._timer_event("kill worker process", deciding)
        elif outcome == Outcome.FAILED:
            logger.error(
                "Error reaping worker=[%s]%s. Will retry on next watchdog.",
                pid,
                f" ({detail})" if detail else "",
            )
        return outcome

    # -- lifecycle --------------------------------------------------------------------------

    def _start_native(self, own_reap_worker: Callable[..., bool], **fields: Any) -> bool:
        """Starts the loop and its reporter; ``fields`` go in the "watchdog started" event.
        False, and nothing done, if it runs already (torch's ``start`` may be called twice).

        Reaps go to ``_reap_worker`` when it is not ``own_reap_worker``, the transport's own:
        a subclass's, or a patch on the class or the instance, whenever it was put there."""
        if self._core.running:
            # Before the diagnostics are opened again: they belong to the running loop.
            logger.info("%s already started; start() does nothing", type(self).__name__)
            return False
        method = self._reap_worker
        self._delegating = getattr(method, "__func__", method) is not own_reap_worker
        # A File server names its stacks directory beside its FIFO (the "fifo" field).
        self._events = self._diagnostics.open(fields.get("fifo"))
        try:
            self._core.start(self._delegating)
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
        return True

    def _stop_native(self, *, run_once: bool = False) -> bool:
        """Stops the loop (after one last pass if ``run_once``); False if it was not running.
        The native stop also removes a File server's FIFO, if it is still the server's, even
        when the loop never ran."""
        # Taken first: stop() may be called again meanwhile (another thread, a signal handler).
        reporter, self._reporter = self._reporter, None
        _RUNNING.discard(self)
        if run_once:
            self._core.run_once()
        else:
            self._core.stop()
        if reporter is None:
            return False
        # Not alive: it has returned, or not started yet (this is a signal handler that
        # interrupted start() in Thread.start); it then finds the loop closed and returns.
        if reporter is not threading.current_thread() and reporter.is_alive():
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
            if isinstance(event, _native.Closed):
                return
            try:
                self._report(event)
            except Exception:
                logger.exception("Error reporting timer server event %r", event)
            finally:
                if isinstance(event, _native.Expired):
                    self._core.ack_expired()

    def _report(self, event: _native.Event) -> None:
        if isinstance(event, _native.Expired):
            self._report_expired(event.expiries, event.signals_self)
        elif isinstance(event, _native.Refused):
            pid, scope, expiration, sig = event.request
            logger.error(
                "Refusing timer request %s: %s; it will never be signalled "
                "(further refusals for this pid are only counted in stats())",
                self._request_from_tuple(event.request),
                event.reason,
            )
            self._events.emit(
                "refused",
                pid=pid,
                scope=scope,
                expiration=expiration,
                signal=sig,
                reason=event.reason,
            )
        elif isinstance(event, _native.Dumping):
            # Its stacks are being taken: the moment for the other ranks' (an Expired follows).
            if self._hang_reporter is not None:
                self._hang_reporter.expiring(event.pid, event.scopes)
        elif type(event) in _PLAIN_EVENTS:
            level, message, name, fields = _PLAIN_EVENTS[type(event)]
            values = {field: getattr(event, field) for field in fields}
            logger.log(level, message, values)
            self._events.emit(name, **values)
        else:
            raise TypeError(f"unknown timer server event {event!r}")

    def _report_expired(self, expiries: list[_native.Expiry], signals_self: bool) -> list[Outcome]:
        """Reports one pass's expiries (stacks first); returns their final outcomes.
        ``signals_self``: the loop signals this process once this report is done."""
        outcomes = []
        for expiry in expiries:
            requests = [self._request_from_tuple(t) for t in expiry.timers]
            stacks, learned = expiry.stacks, expiry.learned
            if stacks is not None:
                _log_stacks(expiry.pid, [r.scope_id for r in requests], stacks)
            if learned is not None:
                _log_learned(expiry.pid, [r.scope_id for r in requests], learned)
            outcome = self._reap_expired(
                expiry.pid, requests, expiry.signal, expiry.outcome, expiry.detail
            )
            outcomes.append(outcome)
            if expiry.error_file is not None:
                logger.info(
                    "Wrote why worker pid=%s died to its torchrun error file %s",
                    expiry.pid,
                    expiry.error_file,
                )
            self._events.emit(
                "timer expired",
                pid=expiry.pid,
                scopes=[t[1] for t in expiry.timers],
                expirations=[t[2] for t in expiry.timers],
                signal=expiry.signal,
                outcome=str(outcome),
                detail=expiry.detail,
                stacks=None if stacks is None else stacks.text,
                stacks_source=None if stacks is None else stacks.source,
                stacks_complete=None if stacks is None else stacks.complete,
                learned_bound=None if learned is None else learned.bound,
                learned_samples=None if learned is None else learned.samples,
                learned_max=None if learned is None else learned.max,
                learned_after=None if learned is None else learned.after,
                error_file=expiry.error_file,
            )
        return outcomes

    # -- the timer map, shared by both transports --------------------------------------------

    def register_timers(self, timer_requests: Iterable[R]) -> None:
        """Registers every valid request of the batch, in order. A bad item (not a request,
        or fields of the wrong type) costs only itself: it is logged and counted as malformed,
        as on the native path, so a batch from ``_run_watchdog`` keeps its good requests."""
        requests = []
        for item in timer_requests:
            try:
                requests.append(self._tuple_from_request(item))
            except (AttributeError, TypeError) as err:
                self._core.reject(f"{item!r:.200} is not a timer request: {err}")
        self._core.register(requests)
        self._report_undelivered()

    def _report_undelivered(self) -> None:
        """Reports, on this thread, what the server said while no loop ran (a refusal or a
        malformed request before ``start``); a running loop's reporter has the rest."""
        for event in self._core.take_undelivered():
            try:
                self._report(event)
            except Exception:
                logger.exception("Error reporting timer server event %r", event)

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

    def timeouts(self) -> list[dict[str, Any]]:
        """Each learned scope's figures, in seconds (None: no value yet): scope, samples, p50,
        p99, max, after (the largest asked for) and suggested (the bound its acquires get,
        at most after). Empty unless the server is adaptive."""
        fields = ("scope", "samples", "p50", "p99", "max", "after", "suggested")
        return [{f: getattr(t, f) for f in fields} for t in self._core.timeouts()]

    def stats(self) -> dict[str, int]:
        """The server's counters by name; ``elastic_timer._native.STATS`` says what each
        one counts (``live_timers`` is the timers held now)."""
        return self._core.stats()


def log_dry_run(pid: int, scopes: list[str], signal: int) -> None:
    logger.warning(
        "Dry run: worker pid=%s would be reaped with signal %s; expired timers: %s",
        pid,
        signal,
        scopes,
    )


def _log_learned(pid: int, scopes: list[str], learned: _native.LearnedBound) -> None:
    logger.warning(
        "Learned timeout fired for worker pid=%s (timers %s) after %.3f s, the bound learned "
        "from %s samples (the longest %.3f s), before the after=%.3f s asked for",
        pid,
        scopes,
        learned.bound,
        learned.samples,
        learned.max,
        learned.after,
    )


def _log_stacks(pid: int, scopes: list[str], stacks: _native.Stacks) -> None:
    if not stacks.text.strip():
        logger.warning(
            "No stacks from expired worker pid=%s (timers %s): %s gave none in time",
            pid,
            scopes,
            stacks.source,
        )
        return
    logger.warning(
        "Stacks of expired worker pid=%s (timers %s; from %s%s):\n%s",
        pid,
        scopes,
        stacks.source,
        "" if stacks.complete else ", cut short by the grace period",
        stacks.text.rstrip(),
    )


def request_signal(request: TimerRequest) -> int:
    """The signal a request asks for: its own (File), else SIGKILL (the Local transport's)."""
    return int(getattr(request, "signal", signal.SIGKILL))


def worker_pid(worker_id: Any) -> int:
    """The pid a request names; the native servers identify workers by pid only."""
    if isinstance(worker_id, bool) or not isinstance(worker_id, int):
        raise TypeError(f"worker_id must be a pid (int), got {worker_id!r}")
    return worker_id


def request_tuple(worker_id: Any, scope_id: Any, expiration_time: Any, sig: Any) -> RequestTuple:
    """A request as it crosses into Rust; TypeError names the first field that cannot."""
    pid = worker_pid(worker_id)
    if not -(2**63) <= pid < 2**63:
        raise TypeError(f"worker_id {pid} is out of range")
    if not isinstance(scope_id, str):
        raise TypeError(f"scope_id must be a str, got {scope_id!r:.100}")
    if isinstance(expiration_time, bool) or not isinstance(expiration_time, (int, float)):
        raise TypeError(f"expiration_time must be a number, got {expiration_time!r:.100}")
    if isinstance(sig, bool) or not isinstance(sig, int) or not -(2**31) <= sig < 2**31:
        raise TypeError(f"signal must be a signal number, got {sig!r:.100}")
    try:
        return (pid, scope_id, float(expiration_time), sig)
    except OverflowError as err:
        raise TypeError(f"expiration_time {expiration_time} is out of range") from err


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
