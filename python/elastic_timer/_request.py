"""The timer request and the abstract client that sends it: what the clients and the native
servers build on, below ``api`` (whose ``configure`` builds a ``FileTimerClient``). Users import
them from ``api``, as from torch's.
"""

from __future__ import annotations

import abc
from typing import Any

__all__ = ["TimerClient", "TimerRequest"]


class TimerRequest:
    """
    A countdown timer acquisition or release, sent from a ``TimerClient`` to a ``TimerServer``.
    A negative ``expiration_time`` is a release.

    The type of ``worker_id`` is up to the client and server; the ones in this package use
    the worker's pid.
    """

    # torch's order, so pickles name the fields in the same order.
    __slots__ = ["worker_id", "scope_id", "expiration_time"]  # noqa: RUF023

    def __init__(self, worker_id: Any, scope_id: str, expiration_time: float) -> None:
        self.worker_id = worker_id
        self.scope_id = scope_id
        self.expiration_time = expiration_time

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TimerRequest):
            return (
                self.worker_id == other.worker_id
                and self.scope_id == other.scope_id
                and self.expiration_time == other.expiration_time
            )
        return False

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(worker_id={self.worker_id!r}, scope_id={self.scope_id!r}, "
            f"expiration_time={self.expiration_time!r})"
        )


class TimerClient(abc.ABC):
    """Acquires and releases countdown timers by talking to a ``TimerServer``."""

    @abc.abstractmethod
    def acquire(self, scope_id: str, expiration_time: float) -> None:
        """Acquires a timer for this worker and ``scope_id`` that expires at ``expiration_time``."""

    @abc.abstractmethod
    def release(self, scope_id: str) -> None:
        """Releases this worker's timer for ``scope_id``; it is no longer in effect."""


# Known as ``api``'s, as torch's are ``torch.distributed.elastic.timer.api``'s: pickles name a
# class by its module (the native server accepts ``elastic_timer.api.TimerRequest``).
TimerRequest.__module__ = TimerClient.__module__ = "elastic_timer.api"
