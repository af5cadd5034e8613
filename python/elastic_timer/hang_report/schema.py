"""The report's shape, a public event (``hang report`` in the event log): what a host
contributes through the store, and what the job's report holds. ``elastic-timer report``
and the agents read these keys; keep them stable."""

from __future__ import annotations

from typing import TypedDict

from .flight_recorder import Collectives

__all__ = ["Contribution", "Group", "LocalGroup", "Place", "Report", "Summarised"]


class LocalGroup(TypedDict):
    """A host's ranks at the same lines of the same code, with one stack for all of them."""

    fingerprint: str
    ranks: list[int]
    pids: list[int]
    scopes: list[str]
    stack: str
    # By rank (a string: JSON's keys): its Flight Recorder summary, or why it gave none.
    collectives: dict[str, Collectives]
    collectives_missing: dict[str, str]


class Contribution(TypedDict):
    """A host's share of the report: one line of the store's ``reports`` key."""

    host: str
    group_rank: int
    trigger: bool
    groups: list[LocalGroup]
    unanswered: list[int]


class Group(TypedDict):
    """The job's ranks at the same lines of the same code, over every host."""

    fingerprint: str
    ranks: list[int]
    # Beside ``ranks``, rank by rank: its pid, and its host (an index into ``hosts``).
    pids: list[int]
    rank_hosts: list[int]
    hosts: list[str]
    scopes: list[str]
    collective: str | None
    where: str
    stack: str
    collectives: dict[str, Collectives]
    collectives_missing: dict[str, str]
    # Ranks whose collectives (or why none) were left out of the two above (a bound).
    details_omitted: int
    suspect: bool


class Place(TypedDict):
    """Where some of the summarised groups are."""

    where: str
    groups: int
    ranks: int


class Summarised(TypedDict):
    """The groups past the report's bound, counted instead of listed."""

    groups: int
    ranks: list[int]
    suspects: int
    # Their places, most ranks first, a bounded few.
    places: list[Place]


class Report(TypedDict):
    """The job's report, as the event log gets it."""

    suspects: list[int]
    # The name of the source that named them (``sources.SOURCES``).
    suspects_from: str
    groups: list[Group]
    summarised: Summarised
    unanswered: list[int]
    hosts: int
    expected_hosts: int
    missing_hosts: list[int]
    store_gone: bool
    triggered_by: list[str]
