"""Make torch's elastic agent use elastic-timer's native ``FileTimerServer``.

torchrun's ``LocalElasticAgent`` starts its workers' watchdog with
``torch.distributed.elastic.timer.FileTimerServer(...)`` when
``TORCHELASTIC_ENABLE_FILE_TIMER=1``. After ``install()``, that name (and the one in
``file_based_local_timer``) resolves to ours, so the agent gets the native server with its
``log_event``, ``get_last_progress_time`` health check and ``stop()`` at shutdown unchanged.
"""

from __future__ import annotations

import importlib
from typing import Any

from .file_based_local_timer import FileTimerServer

__all__ = ["install", "installed", "uninstall"]

_TORCH_MODULES = (
    "torch.distributed.elastic.timer",
    "torch.distributed.elastic.timer.file_based_local_timer",
)
_originals: dict[str, Any] = {}


def _agent_server(signal_self: bool | None, descendants_only: bool) -> type[FileTimerServer]:
    """Our server, with these keywords defaulting as asked (the agent passes neither)."""

    class AgentFileTimerServer(FileTimerServer):
        def __init__(
            self,
            *args: Any,
            signal_self: bool | None = signal_self,
            descendants_only: bool = descendants_only,
            **kwargs: Any,
        ) -> None:
            super().__init__(
                *args, signal_self=signal_self, descendants_only=descendants_only, **kwargs
            )

    AgentFileTimerServer.__qualname__ = AgentFileTimerServer.__name__ = "FileTimerServer"
    AgentFileTimerServer.__module__ = FileTimerServer.__module__
    return AgentFileTimerServer


def install(*, signal_self: bool | None = None, descendants_only: bool = False) -> None:
    """
    Points torch's ``FileTimerServer`` at elastic-timer's (idempotent; ``uninstall`` undoes it).

    ``signal_self=None`` keeps the installed torch's behaviour: from torch 2.7 on, after
    reaping a worker, the server signals the agent too, which ends the job (torch 2.4 to 2.6
    do not). ``True`` always signals the agent. ``False`` leaves the agent alive to restart
    the worker group, as torchrun documents for ``--max-restarts``.
    ``descendants_only=True`` refuses timers of processes that the agent did not start
    (torchrun's workers are its children).
    """
    server = _agent_server(signal_self, descendants_only)
    for name in _TORCH_MODULES:
        module = importlib.import_module(name)
        _originals.setdefault(name, getattr(module, "FileTimerServer"))  # noqa: B009
        setattr(module, "FileTimerServer", server)  # noqa: B010


def uninstall() -> None:
    """Gives torch its own ``FileTimerServer`` back."""
    for name, original in _originals.items():
        setattr(importlib.import_module(name), "FileTimerServer", original)  # noqa: B010
    _originals.clear()


def installed() -> bool:
    """Whether torch's agent currently gets elastic-timer's server."""
    return bool(_originals)
