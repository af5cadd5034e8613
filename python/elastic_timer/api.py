"""The timer API: requests, abstract clients, queues and servers, ``configure`` and ``expires``.

Same names, signatures and behaviour as ``torch.distributed.elastic.timer.api``, so custom
clients and servers written against torch's abstract classes work unchanged. One intended
difference: the default scope of ``expires`` names the caller's ``with`` line (torch's names a
line inside contextlib, so all its default scopes are one and the same timer).
"""

from __future__ import annotations

import abc
import logging
import os
import sys
import threading
import time
from contextlib import ContextDecorator
from typing import Any

from ._request import TimerClient, TimerRequest
from .file_based_local_timer import FileTimerClient
from .stack_dump import arm_stack_dump

__all__ = [
    "RequestQueue",
    "TimerClient",
    "TimerRequest",
    "TimerServer",
    "configure",
    "expires",
]

logger = logging.getLogger(__name__)


class RequestQueue(abc.ABC):
    """Consumer queue holding timer acquisition and release requests."""

    @abc.abstractmethod
    def size(self) -> int:
        """
        The size of the queue now. It may grow before ``get`` is called but must not shrink
        until then: ``size = q.size(); assert size == len(q.get(size, timeout=0))``.
        """

    @abc.abstractmethod
    def get(self, size: int, timeout: float) -> list[TimerRequest]:
        """Gets up to ``size`` requests, waiting no more than ``timeout`` seconds."""


class TimerServer(abc.ABC):
    """
    Monitors active timers and reaps the workers whose timers expire.

    This base class runs torch's watchdog loop in a Python thread, so servers written
    against torch's ``TimerServer`` behave as they did. The concrete servers of this package
    replace that loop with a native one.
    """

    def __init__(
        self, request_queue: RequestQueue, max_interval: float, daemon: bool = True
    ) -> None:
        """
        :param request_queue: Consumer ``RequestQueue``
        :param max_interval: max time (in seconds) to wait for an item in the request_queue
        :param daemon: whether to run the watchdog thread as a daemon
        """
        super().__init__()
        self._request_queue = request_queue
        self._max_interval = max_interval
        self._daemon = daemon
        self._watchdog_thread: threading.Thread | None = None
        self._stop_signaled = False

    @abc.abstractmethod
    def register_timers(self, timer_requests: list[TimerRequest]) -> None:
        """Registers acquire requests and applies release (negative expiration) requests."""

    @abc.abstractmethod
    def clear_timers(self, worker_ids: set[Any]) -> None:
        """Clears all timers of the given workers."""

    @abc.abstractmethod
    def get_expired_timers(self, deadline: float) -> dict[Any, list[TimerRequest]]:
        """Every timer whose expiration_time is at or before ``deadline``, by worker."""

    @abc.abstractmethod
    def _reap_worker(self, worker_id: Any) -> bool:
        """
        Reaps the worker; returns whether it was reaped. An uncaught exception counts as
        reaped: the worker's timers are removed.
        """

    def _reap_worker_no_throw(self, worker_id: Any) -> bool:
        """``_reap_worker``, counting an uncaught exception as reaped."""
        try:
            return self._reap_worker(worker_id)
        except Exception:
            logger.exception(
                "Uncaught exception thrown from _reap_worker(), "
                "check that the implementation correctly catches exceptions",
            )
            return True

    def _watchdog_loop(self) -> None:
        while not self._stop_signaled:
            try:
                self._run_watchdog()
            except Exception:
                logger.exception("Error running watchdog")

    def _run_watchdog(self) -> None:
        batch_size = max(1, self._request_queue.size())
        timer_requests = self._request_queue.get(batch_size, self._max_interval)
        self.register_timers(timer_requests)
        now = time.time()
        reaped_worker_ids = set()
        for worker_id, expired_timers in self.get_expired_timers(now).items():
            logger.info(
                "Reaping worker_id=[%s]. Expired timers: %s",
                worker_id,
                self._get_scopes(expired_timers),
            )
            if self._reap_worker_no_throw(worker_id):
                logger.info("Successfully reaped worker=[%s]", worker_id)
                reaped_worker_ids.add(worker_id)
            else:
                logger.error("Error reaping worker=[%s]. Will retry on next watchdog.", worker_id)
        self.clear_timers(reaped_worker_ids)

    def _get_scopes(self, timer_requests: list[TimerRequest]) -> list[str]:
        return [r.scope_id for r in timer_requests]

    def start(self) -> None:
        logger.info(
            "Starting %s... max_interval=%s, daemon=%s",
            type(self).__name__,
            self._max_interval,
            self._daemon,
        )
        self._stop_signaled = False
        self._watchdog_thread = threading.Thread(target=self._watchdog_loop, daemon=self._daemon)
        logger.info("Starting watchdog thread...")
        self._watchdog_thread.start()

    def stop(self) -> None:
        logger.info("Stopping %s", type(self).__name__)
        self._stop_signaled = True
        if self._watchdog_thread:
            logger.info("Stopping watchdog thread...")
            self._watchdog_thread.join(self._max_interval)
            self._watchdog_thread = None
        else:
            logger.info("No watchdog thread running, doing nothing")


_timer_client: TimerClient | None = None

# The variable torchrun's agent sets for its workers to the FIFO of its FileTimerServer.
TIMER_FILE_ENV = "TORCHELASTIC_TIMER_FILE"


class _FromEnvironment:
    """``configure()``'s default: build a FileTimerClient for torchrun's FIFO."""


_FROM_ENVIRONMENT = _FromEnvironment()


def client_from_environment(caller: str) -> FileTimerClient:
    """A ``FileTimerClient`` on the FIFO ``TORCHELASTIC_TIMER_FILE`` names; ``RuntimeError``
    (naming ``caller``) when it names none."""
    path = os.environ.get(TIMER_FILE_ENV)
    if not path:
        raise RuntimeError(
            f"{caller} needs a timer client, or {TIMER_FILE_ENV} naming the timer "
            "server's FIFO (torchrun sets it when TORCHELASTIC_ENABLE_FILE_TIMER=1; "
            "elastic-timer-run enables it)"
        )
    return FileTimerClient(path)


def configure(timer_client: TimerClient | _FromEnvironment | None = _FROM_ENVIRONMENT) -> None:
    """
    Configures the timer client ``expires`` uses by default. Call it before ``expires``.

    Without an argument, in a worker started by torchrun (or ``elastic-timer-run``) with the
    watchdog enabled, it uses a ``FileTimerClient`` on the FIFO named by
    ``TORCHELASTIC_TIMER_FILE``. ``configure(None)`` unsets the client, as in torch.
    """
    global _timer_client
    if isinstance(timer_client, _FromEnvironment):
        timer_client = client_from_environment("configure()")
    if timer_client is not None:
        # A server taking stacks can then get them from this worker (torch's clients too).
        arm_stack_dump()
    _timer_client = timer_client
    logger.info("Timer client configured to: %s", type(_timer_client).__name__)


class _Expiration(ContextDecorator):
    """The context manager (and decorator) ``expires`` returns."""

    def __init__(self, after: float, scope: str, client: TimerClient | None) -> None:
        self._after = after
        self._scope = scope
        self._client = client
        # A decorated recursive function enters the same object again before leaving it.
        self._entered: list[TimerClient] = []

    def __enter__(self) -> None:
        client = self._client if self._client is not None else _timer_client
        if client is None:
            raise RuntimeError("Configure timer client before using countdown timers.")
        client.acquire(self._scope, time.time() + self._after)
        self._entered.append(client)

    def __exit__(self, *exc_info: object) -> None:
        self._entered.pop().release(self._scope)


def expires(
    after: float, scope: str | None = None, client: TimerClient | None = None
) -> _Expiration:
    """
    Acquires a countdown timer that expires in ``after`` seconds, unless the block it wraps
    finishes first; once it expires the worker may be reaped (for the servers here: signalled,
    at the deadline). Usable as ``with expires(after=10): ...`` and as a decorator.

    The default scope is ``"<file>#<line>"`` of the caller's ``with`` (or decorator) line,
    so separate blocks get separate timers and re-entering one block re-acquires its timer.

    Usage::

        elastic_timer.configure(elastic_timer.LocalTimerClient(mp_queue))
        with elastic_timer.expires(after=10):
            torch.distributed.all_reduce(...)
    """
    if scope is None:
        caller = sys._getframe(1)
        scope = f"{caller.f_code.co_filename}#{caller.f_lineno}"
    return _Expiration(after, scope, client)
