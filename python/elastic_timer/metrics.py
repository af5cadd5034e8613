"""Prometheus metrics for a timer server: its ``stats()`` counters, as text and over HTTP.

``prometheus_text`` renders the counters in the Prometheus text exposition format (0.0.4).
``serve_metrics`` serves them at ``http://HOST:PORT/metrics`` from a daemon thread; the thread
sleeps until a request or ``close()`` arrives (no polling). Used by ``elastic-timer serve
--metrics HOST:PORT``.
"""

from __future__ import annotations

import logging
import math
import os
import re
import selectors
import socket
import socketserver
import threading
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


class MetricsServer:
    """An HTTP server answering ``GET /metrics`` with ``prometheus_text(stats())``.

    It serves from a daemon thread that sleeps until a connection or ``close()``; each request
    is answered on a thread of its own. ``address`` is the bound ``(host, port)`` (the port
    chosen by the system when 0 was asked for).
    """

    def __init__(
        self,
        host: str,
        port: int,
        stats: Callable[[], Mapping[str, int]],
        timeouts: Callable[[], Timeouts] = tuple,
    ) -> None:
        family = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0][0]
        self._httpd = _HTTPServer((host, port), family, stats, timeouts)
        self._wake_r, self._wake_w = os.pipe()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="elastic-timer-metrics")
        self._thread.daemon = True
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return (str(host), int(port))

    def close(self) -> None:
        """Stops serving and closes the socket; requests being answered finish on their own."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        os.write(self._wake_w, b"x")
        if self._thread is not threading.current_thread():
            self._thread.join(5.0)
        self._httpd.server_close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._httpd.fileno(), selectors.EVENT_READ, "accept")
            selector.register(self._wake_r, selectors.EVENT_READ, "close")
            while True:
                for key, _ in selector.select():
                    if key.data == "close":
                        return
                    self._httpd.handle_request()


def serve_metrics(
    host: str,
    port: int,
    stats: Callable[[], Mapping[str, int]],
    timeouts: Callable[[], Timeouts] = tuple,
) -> MetricsServer:
    """Serves ``prometheus_text(stats(), timeouts())`` at ``http://host:port/metrics`` until
    ``close()``.

    Port 0 picks a free port (see ``MetricsServer.address``). Raises ``OSError`` when the
    address cannot be resolved or bound.
    """
    return MetricsServer(host, port, stats, timeouts)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        family: socket.AddressFamily,
        stats: Callable[[], Mapping[str, int]],
        timeouts: Callable[[], Timeouts],
    ) -> None:
        self.address_family = family
        self.stats = stats
        self.timeouts = timeouts
        super().__init__(address, _MetricsHandler)
        self.timeout = None

    def server_bind(self) -> None:
        # HTTPServer.server_bind also looks up the host's FQDN, which can wait on DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("Error answering a metrics request from %s", client_address, exc_info=True)


class _MetricsHandler(BaseHTTPRequestHandler):
    server_version = "elastic-timer"

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, *, body: bool) -> None:
        if urlsplit(self.path).path != "/metrics":
            self._send(404, "text/plain; charset=utf-8", b"Not found: try /metrics\n", body)
            return
        assert isinstance(self.server, _HTTPServer)
        try:
            text = prometheus_text(self.server.stats(), self.server.timeouts())
        except Exception:
            logger.exception("Error collecting timer server stats for /metrics")
            self._send(500, "text/plain; charset=utf-8", b"Error collecting stats\n", body)
            return
        self._send(200, CONTENT_TYPE, text.encode(), body)

    def _send(self, status: int, content_type: str, payload: bytes, body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s - %s", self.address_string(), format % args)
