"""Where the suspects come from: one table of sources, tried in order; the first that names
suspects names them (the report's ``suspects_from``). A new source is one subclass and one
entry (as watchfiles' filters are classes, and pydantic-core's validators one list)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from .flight_recorder import behind, describe
from .schema import Group

__all__ = ["SOURCES", "FlightRecorder", "Source", "Stacks", "choose_suspects"]


class Source:
    """A source of suspects, and the lines it adds under a group in the report's text."""

    # The report's ``suspects_from`` when this source names them.
    name: ClassVar[str]
    # What the text's first line adds after the suspects this source named.
    why: ClassVar[str] = ""

    def suspects(self, groups: Sequence[Group]) -> list[int]:
        """The suspect ranks, or none when this source cannot tell."""
        raise NotImplementedError

    def lines(self, group: Group) -> list[str]:
        """What this source says about a group, in the report's text."""
        return []


class FlightRecorder(Source):
    """The ranks behind the others in Flight Recorder's sequence numbers."""

    name = "flight recorder"
    why = " (behind the others in Flight Recorder's sequence numbers)"

    def suspects(self, groups: Sequence[Group]) -> list[int]:
        return behind({int(r): c for g in groups for r, c in g["collectives"].items()})

    def lines(self, group: Group) -> list[str]:
        lines = [
            f"rank {rank} collectives: {describe(summary)}"
            for rank, summary in sorted(group["collectives"].items(), key=lambda i: int(i[0]))
        ]
        missing = sorted(group["collectives_missing"].items(), key=lambda i: int(i[0]))
        return lines + [f"rank {rank} collectives: none, {why}" for rank, why in missing]


class Stacks(Source):
    """The ranks not where the others wait, from the stacks."""

    name = "stacks"

    def suspects(self, groups: Sequence[Group]) -> list[int]:
        return choose_suspects(groups)

    def lines(self, group: Group) -> list[str]:
        return group["stack"].rstrip().splitlines()


# In order of trust: sequence numbers say who is behind; stacks only where each rank is.
SOURCES: tuple[Source, ...] = (FlightRecorder(), Stacks())


def choose_suspects(groups: Sequence[Group]) -> list[int]:
    """The ranks that are not where the others wait.

    The majority is the largest group waiting in a collective; every rank not in that same
    collective (elsewhere in the code, or in another collective) is a suspect. With no rank
    in a collective, the ranks outside a strictly largest group are; with no such group,
    nobody is.
    """
    waiting = [g for g in groups if g["collective"] is not None]
    if waiting:
        majority = max(waiting, key=lambda g: len(g["ranks"]))["collective"]
        outside = [g for g in groups if g["collective"] != majority]
    else:
        by_size = sorted(groups, key=lambda g: len(g["ranks"]), reverse=True)
        if len(by_size) < 2 or len(by_size[0]["ranks"]) == len(by_size[1]["ranks"]):
            return []
        outside = by_size[1:]
    return sorted(r for g in outside for r in g["ranks"])
