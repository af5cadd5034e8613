"""The report for a terminal: the suspects first, then each group with its ranks as ranges,
its hosts, its Flight Recorder sequence numbers and one stack, the frames where the groups
part marked with ``>`` (and in colour, when asked)."""

from __future__ import annotations

import datetime

from .model import GroupView, ReportView, ranges_at_most
from .source import LoggedReport

__all__ = ["header", "render", "summary"]

# Hosts named per group; a group on more gets a count of the rest.
SHOWN_HOSTS = 8

_RESET = "\033[0m"
_BOLD = "\033[1m"
_DIM = "\033[2m"
_RED = "\033[1;31m"
_YELLOW = "\033[1;33m"
_CYAN = "\033[36m"


class _Style:
    def __init__(self, color: bool) -> None:
        self.color = color

    def __call__(self, code: str, text: str) -> str:
        return f"{code}{text}{_RESET}" if self.color else text


def render(logged: LoggedReport, view: ReportView, index: int, count: int, color: bool) -> str:
    """``index``: the report's place among the ``count`` of its event log (0-based)."""
    style = _Style(color)
    lines = [
        style(_BOLD, _safe(header(logged, view, index, count))),
        summary(view),
    ]
    if view.suspects:
        suspects = style(_RED, f"Suspects: {view.suspects_text()}")
        lines.append(f"{suspects} ({view.suspects_how})")
    else:
        lines.append(f"Suspects: {view.suspects_text()}")
    lines += [f"  {note}" for note in view.notes()]
    for group in view.groups:
        lines.append("")
        lines += _group(group, style)
    if view.summarised is not None:
        more = view.summarised
        lines += [
            "",
            style(_BOLD, f"and {more.groups:,} more group(s), summarised")
            + f"  {len(more.ranks):,} rank(s), {more.suspects:,} suspect(s): "
            + style(_CYAN, ranges_at_most(more.ranks)),
        ]
        lines += [f"  {_safe(place)}" for place in more.places]
    return "\n".join(lines) + "\n"


def header(logged: LoggedReport, view: ReportView, index: int, count: int) -> str:
    """The report's title line: which of the event log's reports, when, whose expiry."""
    text = f"Hang report {index + 1} of {count}"
    if logged.time is not None:
        when = datetime.datetime.fromtimestamp(logged.time, datetime.timezone.utc)
        text += f", written {when:%Y-%m-%d %H:%M:%S} UTC"
    if view.report["triggered_by"]:
        text += " (first expiry on " + ", ".join(view.report["triggered_by"]) + ")"
    return text


def summary(view: ReportView) -> str:
    report = view.report
    return (
        f"{view.ranks:,} rank(s) from {report['hosts']:,} of {report['expected_hosts']:,} "
        f"host(s), in {view.group_count:,} group(s)"
    )


def _group(group: GroupView, style: _Style) -> list[str]:
    title = f"group {group.number}"
    if group.suspect:
        title = style(_RED, f"{title}  SUSPECT")
    else:
        title = style(_BOLD, title)
    count = len(group.ranks)
    ranks = style(_CYAN, group.rank_ranges)
    lines = [f"{title}  {count:,} rank(s): {ranks}", f"  {_safe(group.where)}"]
    hosts = ", ".join(_safe(h) for h in group.hosts[:SHOWN_HOSTS])
    if len(group.hosts) > SHOWN_HOSTS:
        hosts += f" and {len(group.hosts) - SHOWN_HOSTS:,} more"
    lines.append(f"  on {len(group.hosts):,} host(s): {hosts}")
    if group.scopes:
        lines.append("  scopes: " + ", ".join(_safe(s) for s in group.scopes))
    lines += [f"  Flight Recorder, {_safe(text)}" for text in group.collectives]
    for line in group.stack:
        text = _safe(line.text.rstrip())
        if not text:
            lines.append("")
        elif line.parting:
            lines.append("  > " + style(_YELLOW, text))
        else:
            lines.append("    " + style(_DIM, text))
    return lines


def _safe(text: str) -> str:
    """``text`` with what a terminal would act on (escapes, control characters) shown as
    escapes: a stack or a host name is the job's text, not ours."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
