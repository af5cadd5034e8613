"""The report assembled: a host's contribution (its local groups, one stack each), the job's
report merged from every host's, the suspects from the first source that names them, and
the text the agents log.

The report stays bounded whatever the job does: at most ``MAX_GROUPS`` groups listed in full
(the largest, then those with suspects), the rest counted by place; a stack cut at
``MAX_STACK`` bytes; at most ``MAX_DETAILS`` ranks' collectives per group. What grows with
the job is one integer per rank (the groups' ranks) and one name per host.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .flight_recorder import Collectives
from .schema import Contribution, Group, LocalGroup, Place, Report, Summarised
from .sources import SOURCES
from .stacks import collective, fingerprint, threads, where

__all__ = [
    "MAX_DETAILS",
    "MAX_GROUPS",
    "MAX_PLACES",
    "MAX_STACK",
    "RankStacks",
    "build_report",
    "contribution",
    "format_report",
    "join_runs",
    "ranges",
    "runs",
]

# Groups listed in full; the others are summarised.
MAX_GROUPS = 32
# Bytes of one group's stack kept (faulthandler writes at most 100 frames a thread, but a
# process may have hundreds of threads).
MAX_STACK = 16 << 10
# Ranks of a group whose collectives (or why none) are kept, suspects first.
MAX_DETAILS = 16
# Places of the summarised groups named.
MAX_PLACES = 10
# Suspects named in the text's first line.
_NAMED_SUSPECTS = 32


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
                stack=_cut(entry.stacks),
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
    members: dict[str, list[tuple[int, int, str]]] = {}  # (rank, pid, host) by fingerprint
    for share in contributions:
        for local in share["groups"]:
            into = merged.get(local["fingerprint"])
            if into is None:
                into = merged[local["fingerprint"]] = Group(
                    fingerprint=local["fingerprint"],
                    ranks=[],
                    pids=[],
                    rank_hosts=[],
                    hosts=[],
                    scopes=[],
                    collective=collective(local["stack"]),
                    where=where(local["stack"]),
                    stack=local["stack"],
                    collectives={},
                    collectives_missing={},
                    details_omitted=0,
                    suspect=False,
                )
            into["collectives"].update(local.get("collectives", {}))
            into["collectives_missing"].update(local.get("collectives_missing", {}))
            members.setdefault(local["fingerprint"], []).extend(
                (rank, pid, share["host"]) for rank, pid in zip(local["ranks"], local["pids"])
            )
            if share["host"] not in into["hosts"]:
                into["hosts"].append(share["host"])
            into["scopes"].extend(s for s in local["scopes"] if s not in into["scopes"])
    for key, group in merged.items():
        host_index = {host: i for i, host in enumerate(group["hosts"])}
        for rank, pid, host in sorted(members[key]):
            group["ranks"].append(rank)
            group["pids"].append(pid)
            group["rank_hosts"].append(host_index[host])
    groups = sorted(merged.values(), key=lambda g: (-len(g["ranks"]), min(g["ranks"])))
    for source in SOURCES:
        suspects = source.suspects(groups)
        if suspects:
            break
    marked = set(suspects)
    for group in groups:
        group["suspect"] = not marked.isdisjoint(group["ranks"])
        _trim_details(group, marked)
    listed, rest = _listed(groups)
    answered = {share["group_rank"] for share in contributions}
    return Report(
        suspects=suspects,
        suspects_from=source.name,
        groups=listed,
        summarised=_summarise(rest, marked),
        unanswered=sorted(r for share in contributions for r in share["unanswered"]),
        hosts=len(answered),
        expected_hosts=expected_hosts,
        missing_hosts=sorted(set(range(expected_hosts)) - answered),
        store_gone=store_gone,
        triggered_by=sorted(s["host"] for s in contributions if s["trigger"]),
    )


def _cut(stack: str) -> str:
    """A stack of at most ``MAX_STACK`` bytes (whole lines), saying what was cut."""
    if len(stack) <= MAX_STACK:
        return stack
    kept = stack[: stack.rfind("\n", 0, MAX_STACK) + 1]
    return f"{kept}... {len(stack) - len(kept)} more bytes of stacks cut\n"


def _trim_details(group: Group, suspects: set[int]) -> None:
    """Keeps the collectives (or why none) of at most ``MAX_DETAILS`` ranks, suspects first."""
    ranks = sorted(
        {int(r) for r in group["collectives"]} | {int(r) for r in group["collectives_missing"]},
        key=lambda rank: (rank not in suspects, rank),
    )
    kept = {str(rank) for rank in ranks[:MAX_DETAILS]}
    group["collectives"] = {r: c for r, c in group["collectives"].items() if r in kept}
    missing = group["collectives_missing"]
    group["collectives_missing"] = {r: why for r, why in missing.items() if r in kept}
    group["details_omitted"] = len(ranks) - len(kept)


def _listed(groups: list[Group]) -> tuple[list[Group], list[Group]]:
    """The groups listed in full (the largest, then those with suspects, then by size, at most
    ``MAX_GROUPS``, in their order) and the others."""
    first = sorted(range(len(groups)), key=lambda i: (i > 0, not groups[i]["suspect"], i))
    listed = set(first[:MAX_GROUPS])
    return (
        [g for i, g in enumerate(groups) if i in listed],
        [g for i, g in enumerate(groups) if i not in listed],
    )


def _summarise(groups: list[Group], suspects: set[int]) -> Summarised:
    """Groups past the bound, counted: their ranks, and their places, most ranks first."""
    places: dict[str, Place] = {}
    for group in groups:
        place = places.setdefault(group["where"], Place(where=group["where"], groups=0, ranks=0))
        place["groups"] += 1
        place["ranks"] += len(group["ranks"])
    ranks = sorted(r for g in groups for r in g["ranks"])
    return Summarised(
        groups=len(groups),
        ranks=ranks,
        suspects=sum(r in suspects for r in ranks),
        places=sorted(places.values(), key=lambda p: (-p["ranks"], p["where"]))[:MAX_PLACES],
    )


def format_report(report: Report) -> str:
    """The report as the agents log it."""
    # A report from an agent of an earlier version has none.
    summarised: Summarised | None = report.get("summarised")
    more = summarised["groups"] if summarised else 0
    ranks = sum(len(g["ranks"]) for g in report["groups"])
    ranks += len(summarised["ranks"]) if summarised else 0
    suspects = report["suspects"]
    named = ", ".join(f"rank {r}" for r in suspects[:_NAMED_SUSPECTS])
    if len(suspects) > _NAMED_SUSPECTS:
        named += f" and {len(suspects) - _NAMED_SUSPECTS} more"
    lines = [
        f"Hang report: {ranks} rank(s) from {report['hosts']} of {report['expected_hosts']} "
        f"host(s), in {len(report['groups']) + more} group(s); suspects: " + (named or "none found")
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
            f"  group {number}: rank(s) {ranges(group['ranks'])} on {', '.join(group['hosts'])}"
            f", {group['where']}{mark}"
        )
        for source in SOURCES:
            lines.extend(f"    {line}" for line in source.lines(group))
        if group.get("details_omitted"):
            lines.append(f"    (collectives of {group['details_omitted']} more rank(s) left out)")
    if summarised and more:
        places = "; ".join(
            f"{p['ranks']} rank(s) in {p['groups']} group(s) {p['where']}"
            for p in summarised["places"]
        )
        lines.append(
            f"  and {more} more group(s) of {len(summarised['ranks'])} rank(s) "
            f"({summarised['suspects']} suspect(s)), summarised: {places}"
        )
    return "\n".join(lines)


def runs(numbers: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted ``numbers`` as runs of consecutive ones: ``[0, 1, 2, 5]`` as ``[(0, 2), (5, 5)]``."""
    found: list[tuple[int, int]] = []
    for number in numbers:
        if found and found[-1][1] == number - 1:
            found[-1] = (found[-1][0], number)
        else:
            found.append((number, number))
    return found


def join_runs(found: Sequence[tuple[int, int]]) -> str:
    """Runs as text: ``0-2, 5``."""
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in found)


def ranges(numbers: Sequence[int]) -> str:
    """Sorted ``numbers`` as ranges: ``[0, 1, 2, 5]`` as ``0-2, 5``."""
    return join_runs(runs(numbers))
