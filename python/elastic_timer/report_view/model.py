"""What the terminal and the page show of a hang report: the groups (suspects first), each
with its ranks as ranges, its hosts, its Flight Recorder sequence numbers, and its stack with
the frames where the groups part marked."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..hang_report import threads
from ..hang_report.flight_recorder import describe
from ..hang_report.report import join_runs, ranges, runs

# A frame of a stack, as hang_report.threads reads it: file, line, function.
Frame = tuple[str, int, str]

__all__ = [
    "GroupView",
    "ReportView",
    "StackLine",
    "Summarised",
    "ranges_at_most",
    "view",
]

# Ranges of suspects (or of ranks without stacks, or of silent hosts) named before the rest
# are counted.
SHOWN_RANGES = 16


@dataclass(frozen=True)
class StackLine:
    text: str
    # A frame not in every group's stack: where this group parts from the others.
    parting: bool


@dataclass(frozen=True)
class GroupView:
    number: int  # 1-based, in the report's order (the agents' log numbers groups so too)
    ranks: list[int]
    # Beside ``ranks``: each rank's pid and host (empty for a report written before they were).
    pids: list[int]
    rank_hosts: list[str]
    hosts: list[str]
    scopes: list[str]
    where: str
    suspect: bool
    # The Flight Recorder sequence numbers, one line per set of ranks with the same ones.
    collectives: list[str]
    stack: list[StackLine]

    @property
    def rank_ranges(self) -> str:
        return ranges_at_most(self.ranks)


@dataclass(frozen=True)
class Summarised:
    """The groups a bounded report counts instead of listing."""

    groups: int
    ranks: list[int]
    suspects: int
    places: list[str]  # "12 rank(s) in 3 group(s) in f (t.py:4)", most ranks first


@dataclass(frozen=True)
class ReportView:
    report: dict[str, Any]
    groups: list[GroupView]  # suspects first, then the report's order (largest first)
    summarised: Summarised | None

    @property
    def ranks(self) -> int:
        listed = sum(len(g.ranks) for g in self.groups)
        return listed + (len(self.summarised.ranks) if self.summarised else 0)

    @property
    def group_count(self) -> int:
        return len(self.groups) + (self.summarised.groups if self.summarised else 0)

    @property
    def suspects(self) -> list[int]:
        return list(self.report["suspects"])

    def suspects_text(self) -> str:
        """``rank 3``, ``ranks 3, 8-9``; past a few ranges, the rest counted."""
        suspects = self.suspects
        if not suspects:
            return "none found"
        return f"{_rank_word(suspects)} {ranges_at_most(suspects)}"

    @property
    def suspects_how(self) -> str:
        """How the suspects were told apart from the others."""
        if self.report.get("suspects_from") == "flight recorder":
            return "behind the others in Flight Recorder's sequence numbers"
        return "not where the others wait"

    def notes(self) -> list[str]:
        """What the report says is missing from it."""
        report = self.report
        notes = []
        if report["store_gone"]:
            notes.append("the job's store is gone: only one host's ranks are reported")
        elif report["missing_hosts"]:
            notes.append(
                "hosts (group ranks) that did not answer: "
                + ranges_at_most(report["missing_hosts"])
            )
        if report["unanswered"]:
            notes.append("ranks that gave no stacks: " + ranges_at_most(report["unanswered"]))
        return notes


def ranges_at_most(numbers: Sequence[int], shown: int = SHOWN_RANGES) -> str:
    """``numbers`` as ranges (``0-2, 5``), the first ``shown`` of them and a count of the rest:
    a thousand scattered ranks are not a line to read."""
    found = runs(numbers)
    if len(found) <= shown:
        return join_runs(found)
    rest = sum(b - a + 1 for a, b in found[shown:])
    return f"{join_runs(found[:shown])} and {rest:,} more"


def view(report: dict[str, Any]) -> ReportView:
    groups = report["groups"]
    frames = [_frames(g["stack"]) for g in groups]
    everywhere = set.intersection(*frames) if frames else set()
    views = [
        GroupView(
            number=number,
            ranks=group["ranks"],
            pids=group.get("pids", []),
            rank_hosts=[group["hosts"][i] for i in group.get("rank_hosts", [])],
            hosts=group["hosts"],
            scopes=group["scopes"],
            where=group["where"],
            suspect=group["suspect"],
            collectives=_collectives(group),
            stack=_stack(group["stack"], everywhere if len(groups) > 1 else None),
        )
        for number, group in enumerate(groups, 1)
    ]
    views.sort(key=lambda g: not g.suspect)  # stable: the report's order otherwise
    return ReportView(report, views, _summarised(report.get("summarised")))


def _summarised(summary: dict[str, Any] | None) -> Summarised | None:
    if not summary or not summary["groups"]:
        return None
    places = [
        f"{p['ranks']:,} rank(s) in {p['groups']:,} group(s) {p['where']}"
        for p in summary["places"]
    ]
    return Summarised(summary["groups"], summary["ranks"], summary["suspects"], places)


def _frames(stack: str) -> set[Frame]:
    return {frame for thread in threads(stack) for frame in thread}


def _stack(stack: str, everywhere: set[Frame] | None) -> list[StackLine]:
    lines = []
    for text in stack.rstrip().splitlines():
        # A line is a frame if it parses as one (a thread of one frame).
        parsed = threads(text)
        parting = bool(parsed) and everywhere is not None and parsed[0][0] not in everywhere
        lines.append(StackLine(text, parting))
    return lines


def _collectives(group: dict[str, Any]) -> list[str]:
    """One line per distinct description, naming its ranks as ranges: thousands of ranks
    with the same sequence numbers are one line."""
    ranks_by_text: dict[str, list[int]] = {}
    for rank, summary in group["collectives"].items():
        ranks_by_text.setdefault(describe(summary), []).append(int(rank))
    missing = group.get("collectives_missing") or {}
    for rank, why in missing.items():
        ranks_by_text.setdefault(f"none, {why}", []).append(int(rank))
    lines = [
        f"{_rank_word(ranks)} {ranges(sorted(ranks))}: {text}"
        for text, ranks in sorted(ranks_by_text.items(), key=lambda item: min(item[1]))
    ]
    if group.get("details_omitted"):
        lines.append(f"{group['details_omitted']:,} more rank(s) left out of the report")
    return lines


def _rank_word(ranks: Sequence[int]) -> str:
    return "rank" if len(ranks) == 1 else "ranks"
