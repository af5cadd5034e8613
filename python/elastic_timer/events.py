"""The event sink: every event of a server as one JSON object, appended to its event log
(``event_log``) and/or handed to its ``on_event`` callback."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from . import _native

__all__ = ["EventCallback", "EventSink", "open_event_log"]

logger = logging.getLogger(__name__)

# The server's callback for events: one dict per event.
EventCallback = Callable[[dict[str, Any]], None]


def open_event_log(path: str) -> IO[str]:
    """The event log at ``path``, opened to append, created (mode 0600) if missing. The server
    may be root, in a directory others can write: the file must be a regular file of this
    process's user, reached without a link, with no other hard link, and a FIFO there is
    refused at once. ``UnsafeFile`` (an ``OSError``) says which it is not."""
    return os.fdopen(_native.open_append(path), "a", encoding="utf-8", buffering=1)


class EventSink:
    """Writes each event as one JSON line to a file and/or hands it to a callback. Neither
    ever stops the server: a failing write or callback is logged (a write failure once)."""

    def __init__(self, path: str | None, callback: EventCallback | None) -> None:
        self._file: IO[str] | None = None
        if path is not None:
            try:
                self._file = open_event_log(path)
            except _native.UnsafeFile as e:
                logger.warning("The event log %s is refused, so there is none: %s", path, e)
        self._callback = callback
        self._lock = threading.Lock()
        self._write_failed = False

    @property
    def enabled(self) -> bool:
        return self._file is not None or self._callback is not None

    def emit(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        record = {"time": time.time(), "event": event, "server_pid": os.getpid(), **fields}
        with self._lock:
            if self._file is not None:
                try:
                    self._file.write(json.dumps(record) + "\n")
                except (OSError, ValueError) as err:
                    if not self._write_failed:
                        self._write_failed = True
                        logger.error("Cannot write to the event log (reported once): %s", err)
        if self._callback is not None:
            try:
                self._callback(record)
            except Exception:
                logger.exception("The on_event callback raised for %r", event)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
