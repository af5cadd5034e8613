"""Type stubs of the native module (see rust/bindings.rs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, final

__all__ = [
    "PIPE_BUF",
    "STATS",
    "Closed",
    "Escalated",
    "Expired",
    "Expiry",
    "FifoClient",
    "Malformed",
    "Notice",
    "Outcome",
    "QueueWriter",
    "Refused",
    "Server",
    "Stacks",
    "Unreapable",
    "WorkerExited",
    "decode_json_line",
    "decode_pickle",
    "encode_json_line",
]

PIPE_BUF: int
# (name, "counter" | "gauge", help) of each key of Server.stats(), in order (server::Stats).
STATS: list[tuple[str, str, str]]

_RequestTuple = tuple[int, str, float, int]

# What an expiry came to (server::ReapOutcome); str() gives its name in the event log.
@final
class Outcome:
    NOT_SIGNALLED: Outcome
    SIGNALLED: Outcome
    GONE: Outcome
    FAILED: Outcome
    DELEGATED: Outcome
    DRY_RUN: Outcome
    def __int__(self) -> int: ...

# The events of Server.next_event (server::Event), one frozen class each.
@final
class Stacks:
    @property
    def source(self) -> str: ...
    @property
    def text(self) -> str: ...
    @property
    def complete(self) -> bool: ...

@final
class Expiry:
    @property
    def pid(self) -> int: ...
    @property
    def timers(self) -> list[_RequestTuple]: ...
    @property
    def signal(self) -> int: ...
    @property
    def outcome(self) -> Outcome: ...
    @property
    def detail(self) -> str | None: ...
    @property
    def stacks(self) -> Stacks | None: ...

@final
class Expired:
    @property
    def expiries(self) -> list[Expiry]: ...

@final
class Malformed:
    @property
    def reason(self) -> str: ...

@final
class Refused:
    @property
    def request(self) -> _RequestTuple: ...
    @property
    def reason(self) -> str: ...

@final
class WorkerExited:
    @property
    def pid(self) -> int: ...
    @property
    def dropped(self) -> int: ...

@final
class Notice:
    @property
    def message(self) -> str: ...

@final
class Escalated:
    @property
    def pid(self) -> int: ...
    @property
    def signal(self) -> int: ...
    @property
    def after(self) -> float: ...

@final
class Unreapable:
    @property
    def pid(self) -> int: ...
    @property
    def after(self) -> float: ...
    @property
    def state(self) -> str: ...

@final
class Closed: ...

Event = Expired | Malformed | Refused | WorkerExited | Notice | Escalated | Unreapable

@final
class Server:
    # ``options``: the dict ``elastic_timer._server.native_options`` builds.
    @staticmethod
    def fifo(path: str, options: dict[str, Any]) -> Server: ...
    @staticmethod
    def queue(
        queue: Any, fd: int, read_lock: int, items: int, options: dict[str, Any]
    ) -> Server: ...
    @staticmethod
    def direct(options: dict[str, Any]) -> Server: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def run_once(self) -> None: ...
    @property
    def running(self) -> bool: ...
    @property
    def forked_copy(self) -> bool: ...
    @property
    def owner(self) -> int: ...
    def register(self, requests: list[_RequestTuple]) -> None: ...
    def clear(self, pids: list[int]) -> None: ...
    def expired(self, deadline: float) -> list[tuple[int, list[_RequestTuple]]]: ...
    def timers(self) -> list[_RequestTuple]: ...
    def complete_reap(self, pid: int, reaped: bool) -> None: ...
    def reject(self, reason: str) -> None: ...
    def stats(self) -> dict[str, int]: ...
    def last_progress(self) -> float: ...
    def next_event(self, timeout: float) -> Event | Closed | None: ...
    def ack_expired(self) -> None: ...

@final
class FifoClient:
    def __new__(cls, path: str, connect_timeout: float, send_timeout: float) -> FifoClient: ...
    def send(self, pid: int, scope_id: str, expiration_time: float, signal: int) -> Path | None: ...
    def send_own(self, scope_id: str, expiration_time: float, signal: int) -> Path | None: ...

@final
class QueueWriter:
    def __new__(
        cls, queue: Any, fd: int, write_lock: int, items: int, timeout: float
    ) -> QueueWriter: ...
    def send(self, pid: int, scope_id: str, expiration_time: float) -> bool: ...

def encode_json_line(pid: int, scope_id: str, expiration_time: float, signal: int) -> bytes: ...
def decode_json_line(line: bytes) -> _RequestTuple: ...
def decode_pickle(payload: bytes) -> _RequestTuple: ...
