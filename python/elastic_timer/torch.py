"""Make torch's elastic agent (and ft_launcher's) use elastic-timer's native ``FileTimerServer``.

torchrun's ``LocalElasticAgent`` starts its workers' watchdog with
``torch.distributed.elastic.timer.FileTimerServer(...)`` when
``TORCHELASTIC_ENABLE_FILE_TIMER=1``. After ``install()``, that name (and the one in
``file_based_local_timer``) resolves to ours, so the agent gets the native server with its
``log_event``, ``get_last_progress_time`` health check and ``stop()`` at shutdown unchanged.

nvidia-resiliency-ext's ``ft_launcher`` does not look up torch's timer module: its agent
builds ``FileTimerServer`` from a copy of it (``_torch_elastic_compat.timer``, without
``run_id``). When that package is importable, ``install()`` points its names at ours too.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

from . import options
from . import watch as watching
from .file_based_local_timer import FileTimerServer
from .hang_report import HangReporter

__all__ = ["install", "installed", "uninstall"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _TimerCopy:
    """A timer package whose ``FileTimerServer`` an agent looks up."""

    package: str
    # The module of the agent (a LocalElasticAgent) that builds it.
    agent: str
    # What that package's own server does after a reap: signal the agent or not (None: what
    # the installed torch's does, which changed in torch 2.7).
    signals_agent: bool | None
    # Its FileTimerServer's positional parameters, in order (ft_launcher's copy has no run_id).
    positional: tuple[str, ...]
    # Whether install() needs it (torch's), or patches it only when it is importable.
    required: bool

    @property
    def modules(self) -> tuple[str, str]:
        return self.package, f"{self.package}.file_based_local_timer"


_TIMER_COPIES = (
    _TimerCopy(
        "torch.distributed.elastic.timer",
        "torch.distributed.elastic.agent.server.local_elastic_agent",
        signals_agent=None,
        positional=("file_path", "run_id", "max_interval", "daemon", "log_event"),
        required=True,
    ),
    _TimerCopy(
        "nvidia_resiliency_ext.fault_tolerance._torch_elastic_compat.timer",
        "nvidia_resiliency_ext.fault_tolerance.launcher",
        signals_agent=False,
        positional=("file_path", "max_interval", "daemon", "log_event"),
        required=False,
    ),
)
_originals: dict[str, Any] = {}
# The agents' own _start_workers and _monitor_workers, by agent class.
_agent_originals: dict[type, tuple[Any, Any]] = {}
# How long an agent's server holds an expired worker at least (within its stack grace), so that
# the job's hang report reaches every worker, on every host, before any is killed.
HANG_REPORT_HOLD = 1.0
# Under --watch, how long at least: the report's verdict (who is a suspect) comes back to every
# agent before it kills anything, since a rank waiting for a stuck one passes its bound too.
VERDICT_HOLD = 3.0
# How long an agent whose workers were spared waits for them to end once another agent has
# restarted: they fail (the stuck rank they waited for was killed), and torchrun must count
# that as a failure, not as a membership change (which keeps the restart count, so the two
# agents' workers would meet under different store prefixes).
SPARED_EXIT_WAIT = 15.0
# The worker group whose workers an agent is starting (and so whose server it is building).
_starting = threading.local()


def _agent_server(
    copy: _TimerCopy, signal_self: bool | None, descendants_only: bool
) -> type[FileTimerServer]:
    """Our server, called as ``copy``'s is, with these keywords defaulting as asked (the agent
    passes none of them). It writes the error file of each worker it reaps, for the agent's
    failure summary."""
    positional = copy.positional

    class AgentFileTimerServer(FileTimerServer):
        def __init__(
            self,
            *args: Any,
            signal_self: bool | None = signal_self,
            descendants_only: bool = descendants_only,
            error_files: bool = True,
            **kwargs: Any,
        ) -> None:
            if len(args) > len(positional):
                raise TypeError(
                    f"FileTimerServer takes at most {len(positional)} positional arguments "
                    f"({', '.join(positional)}), {len(args)} given"
                )
            for name in positional[: len(args)]:
                if name in kwargs:
                    raise TypeError(f"FileTimerServer got multiple values for argument {name!r}")
            kwargs.update(zip(positional, args))
            if not kwargs.get("state_file") and not os.environ.get(options.env("state_file")):
                # The agent builds a new server for every restart of the worker group: one
                # file per run keeps what the last one learned (used only when adaptive).
                kwargs["state_file"] = run_state_file(kwargs.get("run_id", ""))
            group = getattr(_starting, "group", None)
            watching_group = group is not None and watching.requested()
            if group is not None:
                # With stacks on, the hang report's time to reach every worker before the kill
                # (watched: and to come back with its verdict, which spares who only waits).
                self._stack_hold = VERDICT_HOLD if watching_group else HANG_REPORT_HOLD
            super().__init__(
                signal_self=signal_self,
                descendants_only=descendants_only,
                error_files=error_files,
                **kwargs,
            )
            # The workers spared by the hang report's verdict (pids).
            self.spared: set[int] = set()
            if group is not None and self._diagnostics.stack_dump is not None:
                self._hang_reporter = _hang_reporter(
                    self, group, self._diagnostics.stack_dump, spare=watching_group
                )

        def start(self) -> None:
            super().start()
            if watching.requested() and self._diagnostics.adaptive:
                learned = [t["scope"] for t in self.timeouts() if t["suggested"] is not None]
                logger.info(
                    "Watching the workers' progress; %d place(s) learned already%s",
                    len(learned),
                    f" (from {self._diagnostics.state_file})" if learned else "",
                )

    AgentFileTimerServer.__qualname__ = AgentFileTimerServer.__name__ = "FileTimerServer"
    AgentFileTimerServer.__module__ = FileTimerServer.__module__
    return AgentFileTimerServer


def run_state_file(run_id: str) -> str | None:
    """Where an agent's servers keep their learned timeouts across restarts of the worker
    group: one file per run id (and user) in the temporary directory; None without a run id
    (two jobs would share it)."""
    if not run_id:
        return None
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
    return os.path.join(tempfile.gettempdir(), f"elastic-timer-learned-{os.getuid()}-{safe}.json")


def _hang_reporter(
    server: FileTimerServer, group: Any, grace: float, *, spare: bool = False
) -> HangReporter | None:
    """The agent's part in the job's hang report, over its worker group's store. ``spare``:
    once the report names suspects, the local workers that are not among them are spared."""
    if group.store is None:
        return None

    def workers() -> dict[int, int]:
        return {w.id: w.global_rank for w in group.workers if isinstance(w.id, int)}

    def peek(pids: list[int]) -> list[tuple[int, str | None]]:
        return [(p, None if s is None else s.text) for p, s in server._core.peek_stacks(pids)]

    return HangReporter(
        store=group.store,
        group_rank=group.group_rank,
        group_world_size=group.group_world_size,
        workers=workers,
        peek=peek,
        emit=lambda report: server._events.emit("hang report", **report),
        grace=grace,
        on_report=(lambda report: _spare_the_waiting(server, workers(), report)) if spare else None,
    )


def _spare_the_waiting(server: FileTimerServer, workers: dict[int, int], report: Any) -> None:
    """Spares the next reap of each local worker the job's report does not suspect, when it
    suspects some: such a worker waits for a stuck one (in a collective, or in a backward
    pass whose all-reduce the stuck one never joins), and the stuck one's kill ends the wait.
    Without suspects nobody is spared: every expired worker is killed."""
    suspects = set(report.get("suspects") or ())
    if not suspects:
        return
    for pid, rank in sorted(workers.items(), key=lambda item: item[1]):
        if rank not in suspects:
            server._core.spare(pid)
            spared: set[int] = getattr(server, "spared", set())
            spared.add(pid)
            logger.warning(
                "Sparing rank %s (pid %s) if its timer expires: the job's hang report suspects "
                "rank(s) %s, and it waits for them",
                rank,
                pid,
                ", ".join(map(str, sorted(suspects))),
            )


def _recording_group(start_workers: Any) -> Any:
    """The agent's ``_start_workers``, telling the server it builds which group it serves."""

    @functools.wraps(start_workers)
    def wrapper(agent: Any, worker_group: Any, *args: Any, **kwargs: Any) -> Any:
        _starting.group = worker_group
        try:
            return start_workers(agent, worker_group, *args, **kwargs)
        finally:
            _starting.group = None

    return wrapper


def _waiting_for_the_spared(monitor_workers: Any) -> Any:
    """The agent's ``_monitor_workers``: while workers this agent's server spared are still
    running and another agent waits in a new rendezvous round, waits (bounded) for them to
    end, so that the agent sees its group fail rather than a membership change."""

    @functools.wraps(monitor_workers)
    def wrapper(agent: Any, worker_group: Any, *args: Any, **kwargs: Any) -> Any:
        result = monitor_workers(agent, worker_group, *args, **kwargs)
        if not getattr(getattr(agent, "_worker_watchdog", None), "spared", None):
            return result
        deadline = time.monotonic() + SPARED_EXIT_WAIT
        while (
            result.state.name == "HEALTHY"
            and time.monotonic() < deadline
            and agent._rdzv_handler.num_nodes_waiting() > 0
        ):
            time.sleep(0.1)
            result = monitor_workers(agent, worker_group, *args, **kwargs)
        return result

    return wrapper


def _patch_agent(copy: _TimerCopy) -> None:
    module = sys.modules.get(copy.agent)
    if module is None and copy.required:
        module = importlib.import_module(copy.agent)
    agent = getattr(module, "LocalElasticAgent", None)
    if agent is None or agent in _agent_originals:
        return
    _agent_originals[agent] = (agent._start_workers, agent._monitor_workers)
    setattr(agent, "_start_workers", _recording_group(agent._start_workers))  # noqa: B010
    setattr(agent, "_monitor_workers", _waiting_for_the_spared(agent._monitor_workers))  # noqa: B010


def _importable(copy: _TimerCopy) -> bool:
    """Whether ``copy`` can be patched; an optional one that is absent or broken is skipped."""
    if copy.required:
        return True
    top = copy.package.split(".")[0]
    if importlib.util.find_spec(top) is None:
        return False
    try:
        for name in copy.modules:
            importlib.import_module(name)
    except ImportError as error:
        logger.warning(
            "%s is installed but cannot be imported (%s): its FileTimerServer is not patched",
            top,
            error,
        )
        return False
    return True


def install(
    *, signal_self: bool | None = None, descendants_only: bool = False, watch: bool | None = None
) -> None:
    """
    Points torch's ``FileTimerServer`` at elastic-timer's (idempotent; ``uninstall`` undoes it),
    and ft_launcher's copy of it when nvidia-resiliency-ext is importable.

    ``signal_self=None`` keeps each launcher's behaviour: after reaping a worker, the server
    signals the agent too under torch from torch 2.7 on (which kills the agent before it says
    anything; torch 2.4 to 2.6 do not), and never under ft_launcher, whose own server does
    not. ``True`` or ``False`` sets it for both: ``True`` is torch's exact behaviour from 2.7
    on; ``False`` (what ``elastic-timer-run`` uses) leaves the agent alive, to restart the
    worker group as torchrun documents for ``--max-restarts``, or to end the job the way
    torchrun ends a failed one (its failure summary, exit code 1).
    ``descendants_only=True`` refuses timers of processes that the agent did not start
    (torchrun's and ft_launcher's workers are its children).
    ``watch=True`` (None: ``ELASTIC_TIMER_WATCH=1`` in the environment) watches the workers'
    progress with no change to their script (see ``elastic_timer.watch``): call it before
    the agent starts them.
    """
    if watch or (watch is None and watching.requested()):
        watching.prepare_agent()
    for copy in _TIMER_COPIES:
        if not _importable(copy):
            continue
        server = _agent_server(
            copy, copy.signals_agent if signal_self is None else signal_self, descendants_only
        )
        for name in copy.modules:
            module = importlib.import_module(name)
            _originals.setdefault(name, getattr(module, "FileTimerServer"))  # noqa: B009
            setattr(module, "FileTimerServer", server)  # noqa: B010
        _patch_agent(copy)


def uninstall() -> None:
    """Gives torch (and ft_launcher's copy) its own ``FileTimerServer`` back."""
    for name, original in _originals.items():
        setattr(importlib.import_module(name), "FileTimerServer", original)  # noqa: B010
    _originals.clear()
    for agent, (start_workers, monitor_workers) in _agent_originals.items():
        setattr(agent, "_start_workers", start_workers)  # noqa: B010
        setattr(agent, "_monitor_workers", monitor_workers)  # noqa: B010
    _agent_originals.clear()


def installed() -> bool:
    """Whether torch's agent currently gets elastic-timer's server."""
    return bool(_originals)
