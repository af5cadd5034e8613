"""The report assembled: a host's contribution (its local groups, one stack each), the job's
report merged from every host's, the suspects from the first source that names them, and
the text the agents log."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .flight_recorder import Collectives
from .schema import Contribution, Group, LocalGroup, Report
from .sources import SOURCES
from .stacks import collective, fingerprint, threads, where

__all__ = ["RankStacks", "build_report", "contribution", "format_report"]


@dataclass(frozen=True)
class RankStacks:
    """One local rank at the moment of the hang; ``stacks`` None: it gave none."""

    rank: int
    pid: int
    scopes: tuple[str, ...]
    stacks: str | None
    # Its Flight Recorder summary (``summarize_trace``), when it serves torch's control plane.
    collectives: Collectives | None = None
    # Why it gave none although it means to serve the control plane.
    collectives_missing: str | None = None


def contribution(
    host: str, group_rank: int, ranks: Iterable[RankStacks], *, trigger: bool
) -> Contribution:
    """A host's share of the report: its local groups, one stack each."""
    groups: dict[str, LocalGroup] = {}
    unanswered = []
    for entry in sorted(ranks, key=lambda r: r.rank):
        if entry.stacks is None or not threads(entry.stacks):
            unanswered.append(entry.rank)
            continue
        key = fingerprint(entry.stacks)
        group = groups.setdefault(
            key,
            LocalGroup(
                fingerprint=key,
                ranks=[],
                pids=[],
                scopes=[],
                stack=entry.stacks,
                collectives={},
                collectives_missing={},
            ),
        )
        if entry.collectives is not None:
            group["collectives"][str(entry.rank)] = entry.collectives
        if entry.collectives_missing is not None:
            group["collectives_missing"][str(entry.rank)] = entry.collectives_missing
        group["ranks"].append(entry.rank)
        group["pids"].append(entry.pid)
        group["scopes"].extend(s for s in entry.scopes if s not in group["scopes"])
    return Contribution(
        host=host,
        group_rank=group_rank,
        trigger=trigger,
        groups=list(groups.values()),
        unanswered=unanswered,
    )


def build_report(
    contributions: Sequence[Contribution],
    *,
    expected_hosts: int,
    store_gone: bool = False,
) -> Report:
    """The job's report from every host's contribution (what the event log gets)."""
    merged: dict[str, Group] = {}
    for share in contributions:
        for local in share["groups"]:
            into = merged.get(local["fingerprint"])
            if into is None:
                into = merged[local["fingerprint"]] = Group(
                    fingerprint=local["fingerprint"],
                    ranks=[],
                    hosts=[],
                    scopes=[],
                    collective=collective(local["stack"]),
                    where=where(local["stack"]),
                    stack=local["stack"],
                    collectives={},
                    collectives_missing={},
                    suspect=False,
                )
            into["collectives"].update(local.get("collectives", {}))
            into["collectives_missing"].update(local.get("collectives_missing", {}))
            into["ranks"].extend(local["ranks"])
            if share["host"] not in into["hosts"]:
                into["hosts"].append(share["host"])
            into["scopes"].extend(s for s in local["scopes"] if s not in into["scopes"])
    groups = sorted(merged.values(), key=lambda g: (-len(g["ranks"]), min(g["ranks"])))
    for group in groups:
        group["ranks"].sort()
    for source in SOURCES:
        suspects = source.suspects(groups)
        if suspects:
            break
    marked = set(suspects)
    for group in groups:
        group["suspect"] = not marked.isdisjoint(group["ranks"])
    answered = {share["group_rank"] for share in contributions}
    return Report(
        suspects=suspects,
        suspects_from=source.name,
        groups=groups,
        unanswered=sorted(r for share in contributions for r in share["unanswered"]),
        hosts=len(answered),
        expected_hosts=expected_hosts,
        missing_hosts=sorted(set(range(expected_hosts)) - answered),
        store_gone=store_gone,
        triggered_by=sorted(s["host"] for s in contributions if s["trigger"]),
    )


def format_report(report: Report) -> str:
    """The report as the agents log it."""
    ranks = sum(len(g["ranks"]) for g in report["groups"])
    suspects = report["suspects"]
    lines = [
        f"Hang report: {ranks} rank(s) from {report['hosts']} of {report['expected_hosts']} "
        f"host(s), in {len(report['groups'])} group(s); suspects: "
        + (", ".join(f"rank {r}" for r in suspects) if suspects else "none found")
    ]
    if suspects:
        lines[0] += next((s.why for s in SOURCES if s.name == report["suspects_from"]), "")
    if report["store_gone"]:
        lines.append("  the job's store is gone: only this host's ranks are reported")
    elif report["missing_hosts"]:
        missing = ", ".join(map(str, report["missing_hosts"]))
        lines.append(f"  hosts (group ranks) that did not answer: {missing}")
    if report["unanswered"]:
        lines.append(f"  ranks that gave no stacks: {', '.join(map(str, report['unanswered']))}")
    for number, group in enumerate(report["groups"], 1):
        mark = "  <- suspect" if group["suspect"] else ""
        lines.append(
            f"  group {number}: rank(s) {_ranges(group['ranks'])} on {', '.join(group['hosts'])}"
            f", {group['where']}{mark}"
        )
        for source in SOURCES:
            lines.extend(f"    {line}" for line in source.lines(group))
    return "\n".join(lines)


def _ranges(ranks: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` as ``0-2, 5``."""
    parts: list[str] = []
    for rank in ranks:
        if parts and parts[-1].split("-")[-1] == str(rank - 1):
            parts[-1] = f"{parts[-1].split('-')[0]}-{rank}"
        else:
            parts.append(str(rank))
    return ", ".join(parts)
