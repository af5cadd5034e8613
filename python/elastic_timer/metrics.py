"""Prometheus metrics for a timer server: its ``stats()`` counters, as text and over HTTP.

``prometheus_text`` renders the counters in the Prometheus text exposition format (0.0.4).
``serve_metrics`` serves them at ``http://HOST:PORT/metrics`` from one daemon thread, which
sleeps until a connection, data or ``close()`` arrives (no polling), with a bound on the
connections open at once and a timeout on each (no thread per client). Used by ``elastic-timer serve
--metrics HOST:PORT``.
"""

from __future__ import annotations

import logging
import math
import os
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from . import _native

__all__ = ["CONTENT_TYPE", "MetricsServer", "prometheus_text", "serve_metrics"]

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# What ``stats()`` returns, as the native core declares it, in the order it is exposed.
COUNTERS: dict[str, str] = {name: help for name, kind, help in _native.STATS if kind == "counter"}
GAUGES: dict[str, str] = {name: help for name, kind, help in _native.STATS if kind == "gauge"}

_INVALID_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_:]")


# Per-scope series exposed at most (the scopes with the most samples): bounded cardinality.
MAX_SCOPE_SERIES = 100

Timeouts = Sequence[Mapping[str, Any]]


def prometheus_text(
    stats: Mapping[str, int], timeouts: Timeouts = (), *, prefix: str = "elastic_timer"
) -> str:
    """``stats`` in the Prometheus text format 0.0.4: HELP, TYPE and sample for each key;
    then, from a learning server's ``timeouts()``, each scope's durations as a summary
    (p50, p99, count) and its learned timeout, for the ``MAX_SCOPE_SERIES`` scopes with the
    most samples.

    Known counters become ``<prefix>_<key>_total`` (counter), ``live_timers`` becomes
    ``<prefix>_live_timers`` (gauge), and any other key a gauge with a generic HELP. Known
    keys that ``stats`` lacks are skipped. Known keys come first, in a fixed order; others
    follow, sorted.
    """
    lines: list[str] = []

    def emit(key: str, kind: str, help_text: str) -> None:
        name = _metric_name(f"{prefix}_{key}")
        if kind == "counter" and not name.endswith("_total"):
            name += "_total"
        lines.append(f"# HELP {name} {_escape_help(help_text)}")
        lines.append(f"# TYPE {name} {kind}")
        lines.append(f"{name} {_format_value(stats[key])}")

    for key, help_text in COUNTERS.items():
        if key in stats:
            emit(key, "counter", help_text)
    for key, help_text in GAUGES.items():
        if key in stats:
            emit(key, "gauge", help_text)
    for key in sorted(k for k in stats if k not in COUNTERS and k not in GAUGES):
        emit(key, "gauge", f"The timer server's stats() value {key!r}.")
    scopes = sorted(timeouts, key=lambda t: -int(t["samples"]))[:MAX_SCOPE_SERIES]
    if scopes:
        durations, timeout = f"{prefix}_scope_duration_seconds", f"{prefix}_scope_timeout_seconds"
        lines.append(f"# HELP {durations} How long each scope's blocks take (learned).")
        lines.append(f"# TYPE {durations} summary")
        for scope in scopes:
            label = f'scope="{_escape_label(str(scope["scope"]))}"'
            for quantile in ("p50", "p99"):
                if scope[quantile] is not None:
                    q = "0.5" if quantile == "p50" else "0.99"
                    value = _format_value(scope[quantile])
                    lines.append(f'{durations}{{{label},quantile="{q}"}} {value}')
            lines.append(f"{durations}_count{{{label}}} {int(scope['samples'])}")
        lines.append(f"# HELP {timeout} The timeout each scope's acquires get (learned).")
        lines.append(f"# TYPE {timeout} gauge")
        for scope in scopes:
            if scope["suggested"] is not None:
                label = f'scope="{_escape_label(str(scope["scope"]))}"'
                lines.append(f"{timeout}{{{label}}} {_format_value(scope['suggested'])}")
    return "".join(line + "\n" for line in lines)


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _metric_name(name: str) -> str:
    name = _INVALID_NAME_CHARS.sub("_", name)
    return f"_{name}" if name[:1].isdigit() else name


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _format_value(value: float) -> str:
    if isinstance(value, int):
        return str(int(value))  # bool included
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


# Connections open at once; past it, the oldest is closed when another is accepted (a flood
# of idle connections then keeps no fresh client out). Each holds an fd of the timer server's
# process, which also needs fds to reap: the bound keeps a flood from exhausting them.
MAX_CONNECTIONS = 64
# How long a connection may take to send its request and read the answer before it is closed.
CONNECTION_TIMEOUT = 5.0
# A request's head (request line and headers) longer than this is refused (431).
MAX_REQUEST_BYTES = 8192
# How long accepting pauses when the process is out of fds (EMFILE): the listening socket stays
# readable, and retrying at once would spin.
_ACCEPT_BACKOFF = 0.1
# Hosts that bind every interface.
WILDCARD_HOSTS = ("", "0.0.0.0", "::")

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
_REASONS.update({431: "Request Header Fields Too Large", 500: "Internal Server Error"})


class _Connection:
    """One client: the request bytes read so far, then the answer left to send."""

    __slots__ = ("answer", "deadline", "received", "sock")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.received = b""
        self.answer: bytes | None = None


class MetricsServer:
    """An HTTP server answering ``GET /metrics`` with ``prometheus_text(stats())``.

    One daemon thread serves every connection, non-blocking, from one selector: it sleeps
    until a connection, data, a connection's deadline or ``close()``. At most
    ``max_connections`` are open at once (past it, accepting one closes the oldest), each for
    at most ``timeout`` seconds, and each gets one answer and is closed. ``address`` is the bound
    ``(host, port)`` (the port chosen by the system when 0 was asked for).
    """

    def __init__(
        self,
        host: str,
        port: int,
        stats: Callable[[], Mapping[str, int]],
        timeouts: Callable[[], Timeouts] = tuple,
        *,
        max_connections: int = MAX_CONNECTIONS,
        timeout: float = CONNECTION_TIMEOUT,
    ) -> None:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        self._listener = socket.socket(family, kind, proto)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind(address)
            self._listener.listen(128)
            self._listener.setblocking(False)
        except OSError:
            self._listener.close()
            raise
        self._stats = stats
        self._timeouts = timeouts
        self._max_connections = max_connections
        self._timeout = timeout
        self._connections: dict[socket.socket, _Connection] = {}
        self._accepting_from = 0.0
        self._accept_failed = False
        if host in WILDCARD_HOSTS:
            logger.warning(
                "Metrics are served on every interface (%s:%s): anyone who can reach this "
                "host can read them and open connections to the timer server; bind 127.0.0.1 "
                "unless that is meant",
                *self.address,
            )
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="elastic-timer-metrics")
        self._thread.daemon = True
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return (str(host), int(port))

    def close(self) -> None:
        """Stops serving; closes the socket and every connection."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        os.write(self._wake_w, b"x")
        if self._thread is not threading.current_thread():
            self._thread.join(5.0)
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- the serving thread ----------------------------------------------------------------

    def _serve(self) -> None:
        try:
            while True:
                for key, events in self._selector.select(self._next_timeout()):
                    if key.fileobj is self._wake_r:
                        return
                    if key.fileobj is self._listener:
                        self._accept()
                    else:
                        self._step(key.data, events)
                self._expire()
        finally:
            for connection in list(self._connections.values()):
                self._drop(connection)
            self._selector.close()

    def _next_timeout(self) -> float | None:
        deadlines = [c.deadline for c in self._connections.values()]
        if self._accepting_from:
            deadlines.append(self._accepting_from)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as err:
                # Out of fds or memory: pause (the listening socket stays readable).
                if not self._accept_failed:
                    self._accept_failed = True
                    logger.warning("Cannot accept metrics connections (paused): %s", err)
                self._selector.unregister(self._listener)
                self._accepting_from = time.monotonic() + _ACCEPT_BACKOFF
                return
            if len(self._connections) >= self._max_connections:
                self._drop(next(iter(self._connections.values())))
            sock.setblocking(False)
            connection = _Connection(sock, time.monotonic() + self._timeout)
            self._connections[sock] = connection
            self._selector.register(sock, selectors.EVENT_READ, connection)

    def _expire(self) -> None:
        now = time.monotonic()
        if self._accepting_from and now >= self._accepting_from:
            self._accepting_from = 0.0
            self._selector.register(self._listener, selectors.EVENT_READ)
        for connection in [c for c in self._connections.values() if c.deadline <= now]:
            self._drop(connection)

    def _drop(self, connection: _Connection) -> None:
        del self._connections[connection.sock]
        self._selector.unregister(connection.sock)
        connection.sock.close()

    def _step(self, connection: _Connection, events: int) -> None:
        if self._connections.get(connection.sock) is not connection:
            return  # closed earlier in the same round (the oldest, when one was accepted)
        try:
            if connection.answer is None:
                data = connection.sock.recv(4096)
                if not data:
                    self._drop(connection)
                    return
                connection.received += data
                head, end, _ = connection.received.partition(b"\r\n\r\n")
                if end:
                    connection.answer = self._answer(head)
                elif len(connection.received) > MAX_REQUEST_BYTES:
                    connection.answer = _response(431, b"Request too large\n", body=True)
                else:
                    return
                self._selector.modify(connection.sock, selectors.EVENT_WRITE, connection)
            sent = connection.sock.send(connection.answer)
            connection.answer = connection.answer[sent:]
        except BlockingIOError:
            return
        except OSError:
            self._drop(connection)
            return
        if not connection.answer:
            self._drop(connection)

    def _answer(self, head: bytes) -> bytes:
        """The whole response to a request whose head (without its blank line) is ``head``."""
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _response(400, b"Bad request\n", body=True)
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            return _response(405, b"Only GET and HEAD\n", body=True, allow=True)
        body = method == "GET"
        if urlsplit(target).path != "/metrics":
            return _response(404, b"Not found: try /metrics\n", body=body)
        try:
            text = prometheus_text(self._stats(), self._timeouts())
        except Exception:
            logger.exception("Error collecting timer server stats for /metrics")
            return _response(500, b"Error collecting stats\n", body=body)
        return _response(200, text.encode(), body=body, content_type=CONTENT_TYPE)


def _response(
    status: int,
    payload: bytes,
    *,
    body: bool,
    content_type: str = "text/plain; charset=utf-8",
    allow: bool = False,
) -> bytes:
    head = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        "Server: elastic-timer",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(payload)}",
        "Connection: close",
    ]
    if allow:
        head.append("Allow: GET, HEAD")
    return "\r\n".join(head).encode() + b"\r\n\r\n" + (payload if body else b"")


def serve_metrics(
    host: str,
    port: int,
    stats: Callable[[], Mapping[str, int]],
    timeouts: Callable[[], Timeouts] = tuple,
) -> MetricsServer:
    """Serves ``prometheus_text(stats(), timeouts())`` at ``http://host:port/metrics`` until
    ``close()``.

    Port 0 picks a free port (see ``MetricsServer.address``). A wildcard host (``0.0.0.0``,
    ``::``) binds every interface, and says so in a warning. Raises ``OSError`` when the
    address cannot be resolved or bound.
    """
    return MetricsServer(host, port, stats, timeouts)
