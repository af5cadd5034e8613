"""``elastic-timer``: command-line tools. ``elastic-timer serve`` runs a standalone timer server.

``serve`` runs a ``FileTimerServer`` in the foreground until SIGTERM or SIGINT, for launchers
other than torchrun (SLURM, a Kubernetes sidecar, a shell script). Workers on the same host
reach it through its FIFO, as they would reach torchrun's. ``timeouts`` prints what a server
learned about its scopes' durations, from the state file it saved. ``report`` shows a job's
hang report from an event log (``report_view``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import textwrap
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import _native, report_view
from .events import open_event_log
from .file_based_local_timer import FileTimerServer
from .learned import ScopeFigures, StateFileError, read_state
from .metrics import CONNECTION_TIMEOUT, MAX_CONNECTIONS, MetricsServer, serve_metrics
from .options import OPTIONS, Diagnostics, env, seconds

__all__ = ["main"]

PROG = "elastic-timer"
LOG_FORMAT = "%(asctime)s [%(levelname)s] %(name)s: %(message)s"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Named, not __name__: run with `python -m`, this module is __main__.
logger = logging.getLogger("elastic_timer.cli")

SERVE_DESCRIPTION = """\
Runs a timer server in the foreground until SIGTERM or SIGINT, for launchers other than
torchrun (SLURM, a Kubernetes sidecar, a shell script). It creates a FIFO at --fifo and kills
a worker whose timer expires (with the signal the worker's client asked for, SIGKILL by
default). Stopping it removes the FIFO; it exits 0.

Workers on the same host reach it through the FIFO, in either of two ways:
  * elastic_timer.FileTimerClient(PATH), or torch's
    torch.distributed.elastic.timer.FileTimerClient(PATH), passed to expires(client=...)
    or to configure();
  * TORCHELASTIC_TIMER_FILE=PATH in the worker's environment, and elastic_timer.configure()
    with no argument.
Then wrap code that may hang in `with elastic_timer.expires(after=SECONDS): ...`.
"""

SERVE_EPILOG = (
    textwrap.fill(
        "The options from --stack-dump to --max-timers not given are read from the server's "
        "environment, as under torchrun: "
        + ", ".join(option.env for option in OPTIONS[:-1])
        + f" and {OPTIONS[-1].env}.",
        92,
    )
    + """

exit status: 0 after SIGTERM or SIGINT; 2 for bad arguments (an event log that is a link, a
FIFO, a hard link or another user's file among them); 1 when the FIFO or the metrics address
cannot be set up (for example permission denied, or the port is taken).

example:
  elastic-timer serve --fifo /run/job-42/timer.fifo --escalate-after 30 \\
      --metrics 127.0.0.1:9464
"""
)

TIMEOUTS_DESCRIPTION = """\
Prints what a timer server learned about the durations of its scopes, from the state file
it saves (state_file=PATH, or ELASTIC_TIMER_STATE_FILE): one row per scope, with the blocks
it counted (samples), their median, 99th percentile and longest durations (p50, p99, max),
the largest `after` its clients asked for, and the timeout the server would enforce
(suggested; "-" while the scope has too few samples). Durations are in seconds.
"""

TIMEOUTS_EPILOG = """\
exit status: 0; 1 when STATE_FILE cannot be read or is not a state file; 2 for bad arguments.
"""

TIMEOUT_COLUMNS = ("scope", "samples", "p50", "p99", "max", "after", "suggested")


# -- argument types -----------------------------------------------------------------------------


def argument_type(parse: Callable[[Any, str], Any]) -> Callable[[str], Any]:
    """An option parser of ``elastic_timer.options`` as an argparse type (argparse names
    the flag)."""

    def convert(text: str) -> Any:
        try:
            return parse(text, "")
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = parse.__name__
    return convert


def host_port(text: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets: [::1]:9464). An empty host is loopback
    (127.0.0.1): every interface takes an explicit 0.0.0.0 or [::]."""
    host, colon, port_text = text.rpartition(":")
    if not colon or not port_text.isdigit() or int(port_text) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT with a port 0-65535, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        host = "127.0.0.1"
    return host, int(port_text)


def octal_mode(text: str) -> int:
    """Permission bits in octal (0600, 660, 0o640)."""
    try:
        mode = int(text.removeprefix("0o"), 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r}") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"expected permission bits 0000-0777, got {text!r}")
    return mode


def log_level(text: str) -> str:
    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"unknown log level {text!r} (choose from {', '.join(LOG_LEVELS)})"
        )
    return level


# -- the parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="elastic-timer: expiration timers that kill hung workers.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Any, summary: str, description: str, epilog: str) -> Any:
        sub = commands.add_parser(
            name,
            help=summary,
            description=description,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(handler=handler, parser=sub)
        return sub

    serve = command(
        "serve",
        _serve,
        "run a standalone timer server (a FIFO workers send their timers to)",
        SERVE_DESCRIPTION,
        SERVE_EPILOG,
    )
    serve.add_argument(
        "--fifo",
        required=True,
        metavar="PATH",
        help="Where to create the FIFO that workers send their timers to; anything already "
        "at PATH is replaced, and the FIFO is removed when the server stops.",
    )
    serve.add_argument(
        "--fifo-mode",
        type=octal_mode,
        metavar="MODE",
        help="The FIFO's permissions, in octal, whatever the umask (0600: only this user's "
        "processes can send timers to the server). Default: 0666 less the umask.",
    )
    serve.add_argument(
        "--max-interval",
        type=argument_type(seconds),
        default=1.0,
        metavar="SECONDS",
        help="How soon a reap that failed is retried (timers fire at their deadline "
        "regardless). Default: %(default)s.",
    )
    serve.add_argument(
        "--run-id",
        default="elastic-timer-serve",
        metavar="ID",
        help="The job's run id, shown in the log of expired timers. Default: %(default)s.",
    )
    serve.add_argument(
        "--descendants-only",
        action="store_true",
        help="Refuse (log once per pid, and count) the timers of processes that do not "
        "descend from the server's process, so that whoever can write the FIFO cannot have "
        "other processes signalled. For a server exec'd by the script that started the job "
        "(`job & exec elastic-timer serve ...`: the job's processes are then its "
        "descendants); a sidecar has none. Default: off, and then any process above pid 1 "
        "in the server's PID namespace can be named.",
    )
    for option in OPTIONS:
        help = f"{option.help} Default: {option.shown_default()}. Variable: {option.env}."
        if option.metavar is None:
            serve.add_argument(
                option.flag, dest=option.name, action="store_const", const=True, help=help
            )
        else:
            serve.add_argument(
                option.flag,
                dest=option.name,
                type=argument_type(option.parse),
                metavar=option.metavar,
                help=help,
            )
    serve.add_argument(
        "--metrics",
        type=host_port,
        metavar="HOST:PORT",
        help="Serve Prometheus metrics (the server's counters) at http://HOST:PORT/metrics; "
        "port 0 picks a free port, and the address is logged. :PORT alone binds 127.0.0.1; "
        "0.0.0.0:PORT or [::]:PORT binds every interface (with a warning). At most "
        f"{MAX_CONNECTIONS} connections are open at once (a new one closes the oldest), each "
        f"for at most {CONNECTION_TIMEOUT:g} s. Default: off.",
    )
    serve.add_argument(
        "--log-level",
        type=log_level,
        default="INFO",
        metavar="LEVEL",
        help=f"The least severe log records shown on stderr ({', '.join(LOG_LEVELS)}). "
        "Default: %(default)s.",
    )
    timeouts = command(
        "timeouts",
        _timeouts,
        "print the scopes' durations and timeouts a server learned (its state file)",
        TIMEOUTS_DESCRIPTION,
        TIMEOUTS_EPILOG,
    )
    timeouts.add_argument("state_file", metavar="STATE_FILE", help="The server's state file.")
    report_view.add_arguments(
        command(
            "report",
            report_view.run,
            report_view.SUMMARY,
            report_view.DESCRIPTION,
            report_view.EPILOG,
        )
    )
    return parser


# -- serve --------------------------------------------------------------------------------------


def _check_serve_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Rejects what the types alone cannot (paths, combinations) with ``parser.error``."""
    fifo = os.path.abspath(args.fifo)
    directory = os.path.dirname(fifo)
    if not os.path.isdir(directory):
        parser.error(f"--fifo: directory {directory} does not exist")
    if os.path.isdir(fifo):
        parser.error(f"--fifo: {fifo} is a directory")
    if args.event_log is not None:
        directory = os.path.dirname(os.path.abspath(args.event_log))
        if not os.path.isdir(directory):
            parser.error(f"--event-log: directory {directory} does not exist")
    # Refused now, rather than as the server starts (a warning, and no event log).
    event_log = args.event_log or os.environ.get(env("event_log"))
    if event_log:
        option = "--event-log" if args.event_log else env("event_log")
        try:
            open_event_log(event_log).close()
        except OSError as e:
            parser.error(f"{option}: cannot append to {event_log}: {e.strerror or e}")
    if args.state_file is not None:
        directory = os.path.dirname(os.path.abspath(args.state_file))
        if not os.path.isdir(directory):
            parser.error(f"--state-file: directory {directory} does not exist")
    if args.stack_dump is None:
        for option, given in (
            ("--stack-signal", args.stack_signal is not None),
            ("--stacks-dir", args.stacks_dir is not None),
        ):
            if given:
                parser.error(f"{option} only applies with --stack-dump")
    elif args.stacks_dir is not None and os.path.exists(args.stacks_dir):
        if not os.path.isdir(args.stacks_dir):
            parser.error(f"--stacks-dir: {args.stacks_dir} is not a directory")


def _server_options(args: argparse.Namespace) -> dict[str, Any]:
    """The server's keywords the user gave (those not given come from the environment)."""
    options = {o.name: getattr(args, o.name) for o in OPTIONS if getattr(args, o.name) is not None}
    if args.descendants_only:
        options["descendants_only"] = True
    return options


def _configure_logging(level: str) -> None:
    package_logger = logging.getLogger("elastic_timer")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    package_logger.addHandler(handler)
    package_logger.setLevel(level)


class _StopSignals:
    """Sets ``event`` on the first SIGTERM or SIGINT.

    The Python handlers do nothing: the interpreter writes each signal's number to a pipe
    (``signal.set_wakeup_fd``), and a thread blocked on that pipe sets the event. Setting it
    from the handler itself could deadlock, since the handler runs on the main thread, which
    may be inside ``event.wait()`` holding the event's lock.
    """

    def __init__(self, signals: Sequence[signal.Signals]) -> None:
        self.event = threading.Event()
        self.received: signal.Signals | None = None
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._read_fd = read_fd
        self._signals = frozenset(int(sig) for sig in signals)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for sig in signals:
            signal.signal(sig, self._handler)
        thread = threading.Thread(target=self._watch, name="elastic-timer-signals", daemon=True)
        thread.start()

    @staticmethod
    def _handler(signum: int, frame: object) -> None:
        """Nothing to do here: the wakeup fd carries the signal to ``_watch``."""

    def _watch(self) -> None:
        # Any signal with a Python handler is written to the wakeup fd; only ours stop.
        while True:
            data = os.read(self._read_fd, 1)
            if not data:
                return
            if data[0] in self._signals:
                self.received = signal.Signals(data[0])
                self.event.set()
                return


class _SetupError(Exception):
    """A one-line reason the server cannot run (exit status 1)."""


def _serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    _check_serve_args(parser, args)
    options = _server_options(args)
    _configure_logging(args.log_level)
    # Before anything is created: a SIGTERM from now on stops the server cleanly.
    stop = _StopSignals([signal.SIGTERM, signal.SIGINT])
    try:
        _run(parser, args, options, stop)
    except _SetupError as e:
        # Written after the cleanup's log records, so that it is the last line.
        sys.stderr.write(f"{PROG} serve: error: {e}\n")
        return 1
    return 0


def _run(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    options: dict[str, Any],
    stop: _StopSignals,
) -> None:
    """Serves until ``stop``; whatever was set up is torn down on the way out."""
    fifo = os.path.abspath(args.fifo)
    server: FileTimerServer | None = None
    metrics: MetricsServer | None = None

    def stats() -> Mapping[str, int]:
        return server.stats() if server is not None else {}

    def timeouts() -> list[dict[str, Any]]:
        return server.timeouts() if server is not None else []

    try:
        if args.metrics is not None:
            # Bound first: a taken port then leaves no FIFO behind, not even for a moment.
            host, port = args.metrics
            try:
                metrics = serve_metrics(host, port, stats, timeouts)
            except OSError as e:
                raise _SetupError(f"cannot serve metrics on {host}:{port}: {e}") from None
        try:
            server = FileTimerServer(
                fifo,
                args.run_id,
                args.max_interval,
                daemon=True,
                signal_self=False,
                fifo_mode=args.fifo_mode,
                **options,
            )
        except ValueError as e:
            parser.error(str(e))
        except OSError as e:
            raise _SetupError(f"cannot create the FIFO at {fifo}: {e}") from None
        try:
            server.start()
        except OSError as e:
            raise _SetupError(f"cannot start the timer server: {e}") from None
        _log_started(args, fifo, server._diagnostics, metrics)
        stop.event.wait()
        logger.info(
            "elastic-timer serve: %s received, stopping",
            stop.received.name if stop.received is not None else "a signal",
        )
    finally:
        if server is not None:
            server.stop()
        if metrics is not None:
            metrics.close()


def _log_started(
    args: argparse.Namespace,
    fifo: str,
    diagnostics: Diagnostics,
    metrics: MetricsServer | None,
) -> None:
    if diagnostics.stack_dump is not None:
        # The server made a temporary directory when none was given.
        logger.info(
            "stack dumps on, in %s: elastic-timer's FileTimerClient learns it from %s; "
            "workers with another client need %s=%s in their environment (an expired "
            "worker is asked for its stacks with %s, and signalled once they are written "
            "or after %s s)",
            diagnostics.stacks_dir,
            os.fspath(_native.stacks_sidecar(fifo)),
            env("stacks_dir"),
            diagnostics.stacks_dir,
            _signal_name(diagnostics.stack_signal),
            diagnostics.stack_dump,
        )
    if diagnostics.dry_run:
        logger.info("dry run: expired timers are logged and reported, nothing is signalled")
    if metrics is not None:
        host, port = metrics.address
        shown = f"[{host}]" if ":" in host else host
        logger.info("metrics on http://%s:%s/metrics", shown, port)
    # Last: the line that says the daemon is ready comes after all it has to say first.
    logger.info(
        "elastic-timer serve: listening on FIFO %s (run_id=%s); workers use "
        "FileTimerClient(%r), or TORCHELASTIC_TIMER_FILE=%s and elastic_timer.configure()",
        fifo,
        args.run_id,
        fifo,
        fifo,
    )


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


# -- timeouts -----------------------------------------------------------------------------------


def _timeouts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        scopes = read_state(args.state_file)
    except StateFileError as e:
        sys.stderr.write(f"{PROG} timeouts: error: {e}\n")
        return 1
    sys.stdout.write(timeouts_table(scopes))
    return 0


def timeouts_table(scopes: Sequence[ScopeFigures]) -> str:
    """One row per scope (sorted by scope), the header first; seconds to the millisecond."""
    rows = [TIMEOUT_COLUMNS] + [
        (
            scope.scope if scope.scope.isprintable() else ascii(scope.scope),
            str(scope.samples),
            *(_seconds(v) for v in (scope.p50, scope.p99, scope.max, scope.after, scope.suggested)),
        )
        for scope in sorted(scopes, key=lambda scope: scope.scope)
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TIMEOUT_COLUMNS))]
    return "".join(
        "  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])])
        + "\n"
        for row in rows
    )


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result: int = args.handler(args.parser, args)
    return result


if __name__ == "__main__":
    sys.exit(main())
