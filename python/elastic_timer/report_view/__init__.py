"""``elastic-timer report EVENT_LOG``: a job's hang report, from the event log its agent
wrote it to, for a terminal or (``--html OUT``) as one self-contained web page.

``source`` reads the event log's hang reports, ``model`` makes what both show of one (groups
with suspects first, ranges, the frames where the groups part), ``terminal`` and ``page``
render it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from . import page, terminal
from .model import view
from .source import ReportError, hang_reports, pick

__all__ = ["DESCRIPTION", "EPILOG", "SUMMARY", "add_arguments", "run"]

SUMMARY = "show a job's hang report from an event log (in the terminal, or as a web page)"

DESCRIPTION = """\
Shows the latest hang report of an event log (ELASTIC_TIMER_EVENT_LOG, or serve's
--event-log), or the one --index picks: the suspects first, then each group of ranks in the
same place, with its ranks as ranges, its hosts, its Flight Recorder sequence numbers when
the ranks gave them, and one stack, the frames where the groups part marked with '>'.

--html OUT writes the same as one self-contained web page (it loads nothing): every rank a
cell of a grid coloured by group, the suspects in red, hover or click a cell for its group,
hosts and stack, and the groups' stacks side by side.
"""

EPILOG = """\
exit status: 0; 1 when the event log cannot be read, holds no hang report, or has none at
--index; 2 for bad arguments. A line of the event log that cannot be read is skipped, with
a warning on stderr.

examples:
  elastic-timer report /var/log/job-42/events.jsonl
  elastic-timer report events.jsonl --index 0 --html hang.html
"""

PROG = "elastic-timer report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("event_log", metavar="EVENT_LOG", help="The event log (JSON lines).")
    parser.add_argument(
        "--index",
        type=int,
        default=-1,
        metavar="N",
        help="Which hang report of the event log: 0 the first, 1 the second, -1 the latest, "
        "-2 the one before. Default: %(default)s.",
    )
    parser.add_argument(
        "--html",
        metavar="OUT",
        help="Write the report as a web page to OUT (replaced if there) instead of printing it.",
    )
    parser.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="Colour the terminal output: auto, when stdout is a terminal and NO_COLOR is "
        "unset. Default: %(default)s.",
    )


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    def warn(message: str) -> None:
        sys.stderr.write(f"{PROG}: warning: {message}\n")

    try:
        reports = hang_reports(args.event_log, warn)
        logged = pick(args.event_log, reports, args.index)
    except ReportError as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return 1
    index = args.index % len(reports)
    shown = view(logged.report)
    if args.html is None:
        color = args.color == "always" or (
            args.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        )
        sys.stdout.write(terminal.render(logged, shown, index, len(reports), color))
        return 0
    try:
        _write(args.html, page.render(logged, shown, index, len(reports)))
    except OSError as e:
        sys.stderr.write(f"{PROG}: error: cannot write {args.html}: {e.strerror or e}\n")
        return 1
    sys.stderr.write(f"{PROG}: wrote hang report {index + 1} of {len(reports)} to {args.html}\n")
    return 0


def _write(path: str, text: str) -> None:
    """Writes ``path`` whole (mode 0600: stacks may say more than their owner would show), by
    a rename: never through a link another user left there."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".elastic-timer-report-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
