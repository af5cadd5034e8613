"""One hang report for a whole torchrun job, gathered through the rendezvous store.

When a collective hangs, every rank but the culprit(s) waits in it, and every host's timers
fire at about the same moment. Each agent's server then takes the stacks of all its local
ranks (not only the expiring ones) and contributes them, grouped, to the store that torchrun's
rendezvous already runs; one agent (the first whose timer fired) writes the report: ranks
grouped by the code they are in, and the **suspects**, the ranks that are not where the others
wait.

It scales with the number of distinct stacks, not of ranks: a host contributes one line,
its local groups (a fingerprint per distinct stack, the ranks in it, one stack per group),
appended to one key, and counts itself on one counter. The gathering host polls that counter
until every host has counted or its deadline passes, then reads the one key. No host waits on
another one by one, and a host whose store is gone, or a rank that gives no stacks, is
reported as such.

A rank that serves torch's worker control plane (``worker_main()``) with Flight Recorder on
also gives its last collectives; then the ranks behind the others in sequence numbers are the
suspects. A rank that means to serve it (``TORCH_WORKER_SERVER_SOCKET`` in its environment)
but gives none has the reason in the report: no socket there, a path too long for a Unix
socket, no answer in time.

Store keys, under ``elastic-timer/hang/<generation>/`` of the worker group's store (one set
per rendezvous round, and per report within it: ``elastic-timer/hang/generation`` counts the
reports written): ``trigger`` (the first host to see an expiry, by ``compare_set``),
``reports`` (one JSON line per host), ``count`` (hosts that contributed), ``report`` (the
report, for the other agents to log) and ``wake/<group rank>`` (what each host waits on while
the job is healthy: set for every host by the claiming one, in one request).

One module per idea: ``stacks`` (reading dumps), ``flight_recorder`` (torch's control
plane), ``schema`` (the report's shape), ``sources`` (where suspects come from, one table),
``report`` (assembly and text), ``store`` (the protocol) and ``reporter`` (an agent's part).
"""

from __future__ import annotations

from .flight_recorder import (
    Collectives,
    CollectivesMissing,
    behind,
    fetch_trace,
    listening_sockets,
    rank_collectives,
    summarize_trace,
)
from .report import (
    MAX_DETAILS,
    MAX_GROUPS,
    MAX_PLACES,
    MAX_STACK,
    RankStacks,
    build_report,
    contribution,
    format_report,
)
from .reporter import HangReporter
from .schema import Contribution, Group, LocalGroup, Place, Report, Summarised
from .sources import SOURCES, Source, choose_suspects
from .stacks import BACKWARD, COLLECTIVES, collective, fingerprint, threads, where
from .store import GENERATION, Keys, Store, claim, gather, publish, wake_all

__all__ = [
    "BACKWARD",
    "COLLECTIVES",
    "GENERATION",
    "MAX_DETAILS",
    "MAX_GROUPS",
    "MAX_PLACES",
    "MAX_STACK",
    "SOURCES",
    "Collectives",
    "CollectivesMissing",
    "Contribution",
    "Group",
    "HangReporter",
    "Keys",
    "LocalGroup",
    "Place",
    "RankStacks",
    "Report",
    "Source",
    "Store",
    "Summarised",
    "behind",
    "build_report",
    "choose_suspects",
    "claim",
    "collective",
    "contribution",
    "fetch_trace",
    "fingerprint",
    "format_report",
    "gather",
    "listening_sockets",
    "publish",
    "rank_collectives",
    "summarize_trace",
    "threads",
    "wake_all",
    "where",
]
