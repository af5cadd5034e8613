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

import importlib
import importlib.util
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any

from .diagnostics import STATE_FILE_ENV
from .file_based_local_timer import FileTimerServer

__all__ = ["install", "installed", "uninstall"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _TimerCopy:
    """A timer package whose ``FileTimerServer`` an agent looks up."""

    package: str
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
        signals_agent=None,
        positional=("file_path", "run_id", "max_interval", "daemon", "log_event"),
        required=True,
    ),
    _TimerCopy(
        "nvidia_resiliency_ext.fault_tolerance._torch_elastic_compat.timer",
        signals_agent=False,
        positional=("file_path", "max_interval", "daemon", "log_event"),
        required=False,
    ),
)
_originals: dict[str, Any] = {}


def _agent_server(
    copy: _TimerCopy, signal_self: bool | None, descendants_only: bool
) -> type[FileTimerServer]:
    """Our server, called as ``copy``'s is, with these keywords defaulting as asked (the agent
    passes neither)."""
    positional = copy.positional

    class AgentFileTimerServer(FileTimerServer):
        def __init__(
            self,
            *args: Any,
            signal_self: bool | None = signal_self,
            descendants_only: bool = descendants_only,
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
            if not kwargs.get("state_file") and not os.environ.get(STATE_FILE_ENV):
                # The agent builds a new server for every restart of the worker group: one
                # file per run keeps what the last one learned (used only when adaptive).
                kwargs["state_file"] = run_state_file(kwargs.get("run_id", ""))
            super().__init__(signal_self=signal_self, descendants_only=descendants_only, **kwargs)

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


def install(*, signal_self: bool | None = None, descendants_only: bool = False) -> None:
    """
    Points torch's ``FileTimerServer`` at elastic-timer's (idempotent; ``uninstall`` undoes it),
    and ft_launcher's copy of it when nvidia-resiliency-ext is importable.

    ``signal_self=None`` keeps each launcher's behaviour: after reaping a worker, the server
    signals the agent too under torch from torch 2.7 on (which ends the job; torch 2.4 to 2.6
    do not), and never under ft_launcher, whose own server does not. ``True`` or ``False``
    sets it for both; ``False`` leaves the agent alive to restart the worker group, as
    torchrun documents for ``--max-restarts``.
    ``descendants_only=True`` refuses timers of processes that the agent did not start
    (torchrun's and ft_launcher's workers are its children).
    """
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


def uninstall() -> None:
    """Gives torch (and ft_launcher's copy) its own ``FileTimerServer`` back."""
    for name, original in _originals.items():
        setattr(importlib.import_module(name), "FileTimerServer", original)  # noqa: B010
    _originals.clear()


def installed() -> bool:
    """Whether torch's agent currently gets elastic-timer's server."""
    return bool(_originals)
