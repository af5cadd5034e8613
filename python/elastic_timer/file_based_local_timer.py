"""Timers over a named FIFO: ``FileTimerClient`` and ``FileTimerServer``.

One JSON line per request, byte for byte torch's format, so either side can be torch's.
"""

from __future__ import annotations

import json
import logging
import os
import signal as _signal
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from . import _native
from ._request import TimerClient, TimerRequest
from ._server import (
    NativeServer,
    Outcome,
    RequestTuple,
    kill_worker,
    request_tuple,
)
from ._torch_versions import torch_signals_self
from .debug_info_logging import log_debug_info_for_expired_timers
from .options import DiagnosticsOptions
from .stack_dump import arm_stack_dump

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["FileTimerClient", "FileTimerRequest", "FileTimerServer"]

logger = logging.getLogger(__name__)


class FileTimerRequest(TimerRequest):
    """
    A timer acquisition or release between ``FileTimerClient`` and ``FileTimerServer``.
    A negative ``expiration_time`` is a release; ``signal`` is what the server reaps the
    worker with (none if it is not positive).
    """

    __slots__ = ["version", "signal"]  # noqa: RUF023

    def __init__(
        self, worker_pid: int, scope_id: str, expiration_time: float, signal: int = 0
    ) -> None:
        super().__init__(worker_id=worker_pid, scope_id=scope_id, expiration_time=expiration_time)
        self.version = 1
        self.signal = signal

    @property
    def worker_pid(self) -> int:
        return int(self.worker_id)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FileTimerRequest):
            return (
                super().__eq__(other)
                and self.version == other.version
                and self.signal == other.signal
            )
        return False

    def __repr__(self) -> str:
        return (
            f"FileTimerRequest(worker_pid={self.worker_id!r}, scope_id={self.scope_id!r}, "
            f"expiration_time={self.expiration_time!r}, signal={self.signal!r})"
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": self.version,
                "pid": self.worker_pid,
                "scope_id": self.scope_id,
                "expiration_time": self.expiration_time,
                "signal": self.signal,
            },
        )


class FileTimerClient(TimerClient):
    """
    Client of ``FileTimerServer``, for workers on the server's host; identifies the worker by
    its pid and sends each request as one line to the server's FIFO.

    Args:
        file_path: the FIFO the ``FileTimerServer`` created.
        signal: what the server reaps this worker with; zero or negative: not at all.
        connect_timeout: how long to wait for a server that is not reading yet (starting, or
            restarting) before raising ``BrokenPipeError``.
        send_timeout: how long to wait for room when the FIFO is full (a server under load)
            before raising ``TimeoutError``; torch raises ``BlockingIOError`` at once.
    """

    def __init__(
        self,
        file_path: str,
        signal: int = _signal.SIGKILL,
        *,
        connect_timeout: float = 1.0,
        send_timeout: float = 30.0,
    ) -> None:
        super().__init__()
        self._file_path = file_path
        self.signal = signal
        self._connect_timeout = connect_timeout
        self._send_timeout = send_timeout
        self._fifo: _native.FifoClient | None = None
        arm_stack_dump()

    def __getstate__(self) -> dict[str, object]:
        # The open FIFO stays with this process; a copy opens its own.
        return {**self.__dict__, "_fifo": None}

    def _connect(self) -> _native.FifoClient:
        fifo = self._fifo = _native.FifoClient(
            self._file_path, self._connect_timeout, self._send_timeout
        )
        return fifo

    @staticmethod
    def _sent(announced: object) -> None:
        # Not None only when the request opened a connection to a server naming its stacks
        # directory beside its FIFO.
        if isinstance(announced, str):
            logger.warning("%s", announced)  # why its stacks sidecar was refused
        elif announced is not None:
            arm_stack_dump(str(announced))

    def _send(self, pid: int, scope_id: str, expiration_time: float, signal: int) -> None:
        self._sent((self._fifo or self._connect()).send(pid, scope_id, expiration_time, signal))

    def _send_request(self, request: FileTimerRequest) -> None:
        self._send(request.worker_pid, request.scope_id, request.expiration_time, request.signal)

    # This process's requests: the native client knows its pid without a system call.
    def acquire(self, scope_id: str, expiration_time: float) -> None:
        fifo = self._fifo or self._connect()
        self._sent(fifo.send_own(scope_id, expiration_time, self.signal))

    def release(self, scope_id: str) -> None:
        self._sent((self._fifo or self._connect()).send_own(scope_id, -1, 0))


class FileTimerServer(NativeServer[FileTimerRequest]):
    """
    Server of ``FileTimerClient``s: one per host, for the workers on that host. It creates
    the FIFO at ``file_path`` now (replacing what is there) and removes it on ``stop``.

    Args:
        file_path: where to create the FIFO.
        run_id: the job's run id, for the log. Optional (default ``""``, what torch's agent
            passes when ``TORCHELASTIC_RUN_ID`` is unset), since ft_launcher's agent passes none.
        max_interval: accepted for compatibility; deadlines fire when due, not on the next
            poll. It bounds how soon a failed reap is retried (at most 1 s).
        daemon: whether the reporting thread is a daemon (a non-daemon one keeps the
            interpreter alive until ``stop``).
        log_event: called as ``log_event(name, request)`` for "watchdog started",
            "watchdog stopped", "timer expired" and "kill worker process", as torch does.
        signal_self: after a pass that reaped a worker, signal this process with the same
            signal, as torch's server does from torch 2.7 on (under torchrun that ends the
            agent). The default, None, does what the installed torch's server does: True from
            torch 2.7 on and without torch, False with torch 2.4 to 2.6.
        descendants_only: refuse (log once per pid, and count) acquires from processes that
            do not descend from this one. Under torchrun every worker is the agent's child.
        error_files: before signalling a worker whose environment names a
            ``TORCHELASTIC_ERROR_FILE`` (torchrun's workers), write that file, unless the
            worker wrote it: the agent's failure summary then says which timer fired, its
            bound, and the stacks when taken. ``install()`` turns it on for the agent.
        fifo_mode: the FIFO's permission bits (e.g. ``0o600``: only this user's workers can
            reach the server). Default None: ``0o666`` less the umask, as torch's server.
        **diagnostics: the servers' opt-in options (``elastic_timer.options``, which says
            what each does). Where one is not given, its ``ELASTIC_TIMER_*`` environment
            variable is read; ``on_event`` is given each event as a dict.
    """

    def __init__(
        self,
        file_path: str,
        run_id: str = "",
        max_interval: float = 10,
        daemon: bool = True,
        log_event: Callable[[str, FileTimerRequest | None], None] | None = None,
        *,
        signal_self: bool | None = None,
        descendants_only: bool = False,
        error_files: bool = False,
        fifo_mode: int | None = None,
        **diagnostics: Unpack[DiagnosticsOptions],
    ) -> None:
        self._file_path = file_path
        self._run_id = run_id
        self._max_interval = max_interval
        self._signal_self = torch_signals_self() if signal_self is None else signal_self
        self._log_event: Callable[[str, FileTimerRequest | None], None] = (
            log_event if log_event is not None else lambda name, request: None
        )
        options = self._native_options(
            max_interval,
            descendants_only=descendants_only,
            signal_self=self._signal_self,
            error_files=error_files,
            fifo_mode=fifo_mode,
            **diagnostics,
        )
        self._init_native(_native.Server.fifo(file_path, options), daemon)

    def _request_from_tuple(self, request: RequestTuple) -> FileTimerRequest:
        return FileTimerRequest(request[0], request[1], request[2], request[3])

    def _tuple_from_request(self, request: FileTimerRequest) -> RequestTuple:
        return request_tuple(
            request.worker_id, request.scope_id, request.expiration_time, request.signal
        )

    def clear_timers(self, worker_pids: Iterable[int]) -> None:
        super().clear_timers(worker_pids)

    def start(self) -> None:
        logger.info(
            "Starting %s... max_interval=%s, daemon=%s, file_path=%s",
            type(self).__name__,
            self._max_interval,
            self._daemon,
            self._file_path,
        )
        if not self._start_native(_OWN_REAP_WORKER, fifo=self._file_path, run_id=self._run_id):
            return
        if self._hang_reporter is not None:
            self._hang_reporter.start()
        self._emit("watchdog started", None)

    def stop(self) -> None:
        if self._is_forked_copy("stop"):
            return
        logger.info("Stopping %s", type(self).__name__)
        if self._hang_reporter is not None:
            # Before the loop stops: a hang report under way still takes the workers' stacks.
            self._hang_reporter.close()
        if not self._stop_native():
            logger.info("No watchdog thread running, doing nothing")
        self._emit("watchdog stopped", None)
        self._close_native(fifo=self._file_path, run_id=self._run_id)

    def run_once(self) -> None:
        """Processes every request already sent, runs one pass, and stops (for tests)."""
        if self._is_forked_copy("run_once"):
            return
        if not self._stop_native(run_once=True):
            logger.info("No watchdog thread running, doing nothing")
        self._close_native(fifo=self._file_path, run_id=self._run_id)

    @staticmethod
    def is_process_running(pid: int) -> bool:
        """Whether a process ``pid`` exists and can be signalled."""
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False

    def get_last_progress_time(self) -> int:
        """When the watchdog last made progress (now, unless a pass is stuck)."""
        return int(self._core.last_progress())

    def _emit(self, name: str, request: FileTimerRequest | None) -> None:
        """Calls ``log_event``; one that raises is logged and never stops a reap."""
        try:
            self._log_event(name, request)
        except Exception:
            logger.exception("log_event(%r) raised", name)

    def _report_expired(self, expiries: list[_native.Expiry], signals_self: bool) -> list[Outcome]:
        # Looked up here at each call, as torch's server does (tests patch it by this path).
        log_debug_info_for_expired_timers(
            self._run_id,
            {e.pid: [self._request_from_tuple(t).to_json() for t in e.timers] for e in expiries},
        )
        outcomes = super()._report_expired(expiries, signals_self)
        signals = [e.signal for e, o in zip(expiries, outcomes) if o == Outcome.SIGNALLED]
        if signals_self:
            # The native loop signals this process once this report is done.
            logger.info(
                "Terminating the server process=[%s] because of expired timers", os.getpid()
            )
        elif signals and self._signal_self and self._delegating:
            # The loop handed these reaps to the override and cannot know which succeeded:
            # torch's rule (the signal of the pass's last reap) applies to the override's answers.
            logger.info(
                "Terminating the server process=[%s] because of expired timers", os.getpid()
            )
            self._reap_worker(os.getpid(), signals[-1])
        return outcomes

    _worker_label = "worker_pid"

    def _reap_delegated(self, pid: int, signal: int) -> bool:
        # As torch's FileTimerServer, where the exception ends the pass and the reap is tried
        # again: an override that raises has not reaped.
        try:
            return bool(self._reap_worker(pid, signal))
        except Exception:
            logger.exception("Error running _reap_worker for pid=%s", pid)
            return False

    def _timer_event(self, name: str, request: FileTimerRequest | None) -> None:
        self._emit(name, request)

    def _reap_worker(self, worker_pid: int, signal: int) -> bool:
        return kill_worker(worker_pid, signal)


# The class's own, kept before anything patches it: any other gets the reaps (see start()).
_OWN_REAP_WORKER = FileTimerServer._reap_worker
