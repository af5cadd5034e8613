"""The report's shape, a public event (``hang report`` in the event log): what a host
contributes through the store, and what the job's report holds. ``elastic-timer report``
and the agents read these keys; keep them stable."""

from __future__ import annotations

from typing import TypedDict

from .flight_recorder import Collectives

__all__ = ["Contribution", "Group", "LocalGroup", "Report"]


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
    hosts: list[str]
    scopes: list[str]
    collective: str | None
    where: str
    stack: str
    collectives: dict[str, Collectives]
    collectives_missing: dict[str, str]
    suspect: bool


class Report(TypedDict):
    """The job's report, as the event log gets it."""

    suspects: list[int]
    # The name of the source that named them (``sources.SOURCES``).
    suspects_from: str
    groups: list[Group]
    unanswered: list[int]
    hosts: int
    expected_hosts: int
    missing_hosts: list[int]
    store_gone: bool
    triggered_by: list[str]
