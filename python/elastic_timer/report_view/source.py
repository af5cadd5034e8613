"""The hang reports of an event log, as the server wrote them (one JSON object per line).

The event log may sit where others can write (a shared job directory), so it is read as the
server reads its own files: a regular file of this user or root that nobody else can write,
not a link, with no other hard link (``_native.read_private_file``). A line that is not a
JSON object, or a hang report of an unexpected shape, is skipped with a warning: one torn
line must not hide the report after it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from .. import _native

__all__ = ["MAX_EVENT_LOG_BYTES", "LoggedReport", "ReportError", "hang_reports", "pick"]

# The page draws a cell for every rank up to the largest: a rank past this (or of more than
# 7 digits) is not a job's.
MAX_RANKS = 1 << 22
# An event log this large is read whole; one larger is refused rather than read in part.
MAX_EVENT_LOG_BYTES = 1 << 30

HANG_REPORT_EVENT = "hang report"


class ReportError(Exception):
    """Why there is no report to show (one line, for the command's error)."""


@dataclass(frozen=True)
class LoggedReport:
    """A hang report and where it is in the event log."""

    report: dict[str, Any]
    line: int  # 1-based
    time: float | None  # when the server wrote it (seconds since the epoch)


def hang_reports(path: str, warn: Callable[[str], None]) -> list[LoggedReport]:
    """Every hang report in the event log at ``path``, oldest first; ``warn`` is told of each
    line skipped."""
    try:
        data = _native.read_private_file(path, MAX_EVENT_LOG_BYTES)
    except FileNotFoundError:
        raise ReportError(f"no such file: {path}") from None
    except OSError as e:  # UnsafeFile is one: a link, another user's file, a FIFO...
        raise ReportError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > MAX_EVENT_LOG_BYTES:
        raise ReportError(f"{path} is larger than {MAX_EVENT_LOG_BYTES} bytes")
    found = []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:  # UnicodeDecodeError is one
            warn(f"{path}:{number}: not a JSON line, skipped")
            continue
        if not isinstance(record, dict):
            warn(f"{path}:{number}: not a JSON object, skipped")
            continue
        if record.get("event") != HANG_REPORT_EVENT:
            continue
        problem = _shape_problem(record)
        if problem is not None:
            warn(f"{path}:{number}: a hang report with {problem}, skipped")
            continue
        when = record.get("time")
        found.append(LoggedReport(record, number, when if _is_time(when) else None))
    return found


def pick(path: str, reports: list[LoggedReport], index: int) -> LoggedReport:
    """Report ``index`` (0 the oldest, -1 the latest, as a Python index)."""
    if not reports:
        raise ReportError(f"no hang report in {path}")
    if not -len(reports) <= index < len(reports):
        raise ReportError(
            f"--index {index} is out of range: {path} has {len(reports)} hang report(s), "
            f"0 to {len(reports) - 1} (or -{len(reports)} to -1 from the latest)"
        )
    return reports[index]


def _is_time(value: object) -> bool:
    """Seconds since the epoch that a date can be made of (up to the year 2200)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return 0 <= value < 7.26e9


def _is_ints(value: object) -> bool:
    return isinstance(value, list) and all(type(v) is int for v in value)


def _is_ranks(value: object) -> bool:
    return isinstance(value, list) and all(type(v) is int and 0 <= v < MAX_RANKS for v in value)


def _is_strs(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# What the view reads of a report, and of each of its groups.
_REPORT_KEYS: dict[str, Callable[[object], bool]] = {
    "suspects": _is_ranks,
    "groups": lambda v: isinstance(v, list) and all(isinstance(g, dict) for g in v),
    "unanswered": _is_ranks,
    "hosts": lambda v: type(v) is int,
    "expected_hosts": lambda v: type(v) is int,
    "missing_hosts": _is_ints,
    "store_gone": lambda v: isinstance(v, bool),
    "triggered_by": _is_strs,
    # The groups past the report's bound, counted (absent from reports of older versions).
    "summarised": lambda v: v is None or _is_summarised(v),
}
_GROUP_KEYS: dict[str, Callable[[object], bool]] = {
    "ranks": lambda v: _is_ranks(v) and bool(v),
    "hosts": _is_strs,
    "scopes": _is_strs,
    "where": lambda v: isinstance(v, str),
    "stack": lambda v: isinstance(v, str),
    "suspect": lambda v: isinstance(v, bool),
    "collectives": lambda v: isinstance(v, dict) and all(_is_summary(s) for s in v.values()),
    # Absent from the reports of older versions.
    "collectives_missing": lambda v: v is None or (isinstance(v, dict) and _is_strs([*v.values()])),
    # Ranks whose collectives the report left out (absent from reports of older versions).
    "details_omitted": lambda v: v is None or type(v) is int,
}


def _is_summarised(value: object) -> bool:
    if not isinstance(value, dict):
        return False
    places = value.get("places")
    return (
        type(value.get("groups")) is int
        and type(value.get("suspects")) is int
        and _is_ranks(value.get("ranks"))
        and isinstance(places, list)
        and all(
            isinstance(p, dict)
            and isinstance(p.get("where"), str)
            and type(p.get("groups")) is int
            and type(p.get("ranks")) is int
            for p in places
        )
    )


def _is_summary(summary: object) -> bool:
    """A Flight Recorder summary as ``hang_report.summarize_trace`` makes it."""
    if not isinstance(summary, dict):
        return False
    status, last = summary.get("pg_status"), summary.get("last")
    return (
        isinstance(status, dict)
        and all(
            isinstance(s, dict) and all(type(s.get(k)) is int for k in ("enqueued", "completed"))
            for s in status.values()
        )
        and isinstance(last, list)
        and all(isinstance(e, dict) and {"op", "seq", "state"} <= e.keys() for e in last)
    )


def _shape_problem(record: dict[str, Any]) -> str | None:
    """What the view could not read in ``record``, if anything."""
    for key, valid in _REPORT_KEYS.items():
        if not valid(record.get(key)):
            return f"no valid {key!r}"
    for number, group in enumerate(record["groups"], 1):
        for key, valid in _GROUP_KEYS.items():
            if not valid(group.get(key)):
                return f"no valid {key!r} in group {number}"
        named = [*group["collectives"], *(group.get("collectives_missing") or ())]
        if not all(rank.isascii() and rank.isdigit() and len(rank) < 8 for rank in named):
            return f"collectives of something that is not a rank in group {number}"
    return None
