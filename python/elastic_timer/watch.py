"""Watching an unmodified training script: its progress, from hooks torch already offers.

``elastic-timer-run --watch`` (or ``ELASTIC_TIMER_WATCH=1`` for ``install()``) puts the
bootstrap directory ``_watch_boot`` first on the workers' ``PYTHONPATH``; its
``sitecustomize`` calls :func:`bootstrap`, which waits for the script to import torch and then
calls :func:`install`. From then on each progress event of the worker (an optimizer step, the
outermost forward pass, a ``DataLoader`` batch, ``torch.save``/``torch.load``, a
``torch.distributed.checkpoint`` save or load, a collective) ends the worker's current *block*
and begins the next: a release of the last place's scope and an acquire of the new place's,
``"watch: after optimizer.step of SGD"``, ``"watch: inside all_reduce"``, ... on the agent's
timer server, through the worker's shared-memory ring (no system call while the server
holds its lease). The server's learned timeouts learn each place's gaps from the job's own
traffic and tighten the generous bound once a place is learned.

Places before the worker's first optimizer step are their own (``... (first step)``): a
compile, a warm-up or a restart's first step is seen once per process, so it is never learned
and keeps the generous bound.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from types import ModuleType
from typing import Any

from . import hang_report
from ._request import TimerClient
from .api import TIMER_FILE_ENV, client_from_environment
from .options import env

__all__ = [
    "BOOT_DIR",
    "PREFIX",
    "Watch",
    "bootstrap",
    "install",
    "prepare_agent",
    "requested",
    "uninstall",
    "watched",
]

logger = logging.getLogger(__name__)

WATCH_ENV = "ELASTIC_TIMER_WATCH"
# The generous bound of a place not learned yet, in seconds (default 30 minutes).
BOUND_ENV = "ELASTIC_TIMER_WATCH_BOUND"
DEFAULT_BOUND = 1800.0
# Set in a watched worker to its pid: a process it starts (spawn) is not watched again.
WATCHED_PID_ENV = "ELASTIC_TIMER_WATCHED_PID"
# Every watch scope starts so (the error file and the hang report say "no progress").
PREFIX = "watch: "
FIRST_STEP = " (first step)"
# The directory put first on the workers' PYTHONPATH.
BOOT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_watch_boot")
# The stack grace --watch sets unless ELASTIC_TIMER_STACK_DUMP is set.
STACK_DUMP = 5
# Beyond the process group's own timeout, so that torch's error comes first.
COLLECTIVE_MARGIN = 60.0

# torch.distributed's calls a worker is timed inside: the blocking collectives the hang report
# knows (less the asynchronous point-to-point ones, which return at once), and the process
# group's set-up and tear-down.
COLLECTIVES = sorted(
    (hang_report.COLLECTIVES - {"isend", "irecv", "batch_isend_irecv"})
    | {"init_process_group", "new_group", "destroy_process_group"}
)


class Watch:
    """One worker's progress: each event releases the last place's scope and acquires the
    new one's. Only the thread that installed it reports (a training loop's)."""

    def __init__(self, client: TimerClient, bound: float) -> None:
        self._client = client
        self._bound = bound
        self._collective_bound = bound
        self._scope: str | None = None
        self._first_step = True
        self._thread = threading.get_ident()
        self._depth = 0  # forward passes under way (only the outermost reports)
        self._handles: list[Any] = []
        self._restore: list[tuple[Any, str, Any]] = []

    def forked(self) -> None:
        """In a forked child (a DataLoader worker): not the training loop."""
        self._thread = -1

    def progress(self, place: str, bound: float | None = None) -> None:
        """The worker reached ``place``: it has ``bound`` seconds (the generous one by
        default) until its next progress, unless the server learned a tighter bound."""
        if threading.get_ident() != self._thread:
            return
        scope = PREFIX + place + (FIRST_STEP if self._first_step else "")
        try:
            if self._scope is not None:
                self._client.release(self._scope)
            self._client.acquire(scope, time.time() + (bound or self._bound))
        except Exception as err:  # never break the script: it runs unwatched from here
            logger.warning("elastic-timer watch: stopped watching this worker: %s", err)
            self._thread = -1
            return
        self._scope = scope

    def stop(self) -> None:
        """Releases the last place's timer and removes every hook."""
        for handle in self._handles:
            handle.remove()
        for owner, name, original in reversed(self._restore):
            setattr(owner, name, original)
        self._handles.clear()
        self._restore.clear()
        if self._scope is not None and threading.get_ident() == self._thread:
            self._client.release(self._scope)
        self._scope = None
        self._thread = -1

    # -- the hooks --------------------------------------------------------------------------

    def hook_optimizer(self, optimizer_module: ModuleType) -> None:
        def pre(optimizer: Any, args: Any, kwargs: Any) -> None:
            self.progress(f"inside optimizer.step of {type(optimizer).__name__}")

        def post(optimizer: Any, args: Any, kwargs: Any) -> None:
            self._first_step = False
            self.progress(f"after optimizer.step of {type(optimizer).__name__}")

        self._handles.append(optimizer_module.register_optimizer_step_pre_hook(pre))
        self._handles.append(optimizer_module.register_optimizer_step_post_hook(post))

    def hook_forward(self, module_module: ModuleType, grad_enabled: Callable[[], bool]) -> None:
        """The outermost forward pass of any module: a counter per module call, and a
        progress event only at depth 0."""

        def pre(module: Any, args: Any) -> None:
            self._depth += 1
            if self._depth == 1:
                self.progress(f"inside forward{_mode(grad_enabled())} of {type(module).__name__}")

        def post(module: Any, args: Any, output: Any) -> None:
            self._depth -= 1
            if self._depth <= 0:
                self._depth = 0
                self.progress(f"after forward{_mode(grad_enabled())} of {type(module).__name__}")

        self._handles.append(module_module.register_module_forward_pre_hook(pre))
        # always_call: an exception in a forward must not leave the depth above 0.
        self._handles.append(module_module.register_module_forward_hook(post, always_call=True))

    def wrap(
        self,
        owner: Any,
        name: str,
        place: str,
        bound: Callable[[], float] | None = None,
        before: Callable[[tuple[Any, ...], dict[str, Any]], None] | None = None,
    ) -> None:
        """``owner.name``, reporting ``inside <place>`` before and ``after <place>`` after;
        ``bound()`` is the bound inside, ``before(args, kwargs)`` sees each call first."""
        original = getattr(owner, name, None)
        if original is None or getattr(original, "__elastic_timer_watch__", False):
            return

        @functools.wraps(original)
        def watched_call(*args: Any, **kwargs: Any) -> Any:
            if before is not None:
                before(args, kwargs)
            self.progress(f"inside {place}", None if bound is None else bound())
            try:
                return original(*args, **kwargs)
            finally:
                self.progress(f"after {place}")

        watched_call.__elastic_timer_watch__ = True  # type: ignore[attr-defined]
        setattr(owner, name, watched_call)
        self._restore.append((owner, name, original))

    def hook_collectives(self, dist: ModuleType) -> None:
        """torch.distributed's collectives, bounded by the process group's timeout (the one
        ``init_process_group`` was given, else torch's default) and a margin."""
        default = getattr(getattr(dist, "constants", None), "default_pg_timeout", None)
        if isinstance(default, timedelta):
            self._collective_bound = max(self._bound, default.total_seconds() + COLLECTIVE_MARGIN)

        def init_process_group(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            timeout = kwargs.get("timeout")
            if isinstance(timeout, timedelta):
                self._collective_bound = max(
                    self._bound, timeout.total_seconds() + COLLECTIVE_MARGIN
                )

        for name in COLLECTIVES:
            before = init_process_group if name == "init_process_group" else None
            self.wrap(dist, name, name, lambda: self._collective_bound, before)


def _mode(grad_enabled: bool) -> str:
    return "" if grad_enabled else " (no_grad)"


_watch: Watch | None = None


def watched() -> Watch | None:
    """This process's watch, if it is watched."""
    return _watch


def install(client: TimerClient | None = None, bound: float | None = None) -> Watch:
    """Watches this process (torch must be importable): every hook at once, and those of
    ``torch.distributed.checkpoint`` when it is imported. Idempotent."""
    global _watch
    if _watch is not None:
        return _watch
    import torch
    import torch.distributed as dist
    import torch.nn.modules.module as module_module
    import torch.optim.optimizer as optimizer_module
    from torch.utils.data import dataloader

    if client is None:
        client = client_from_environment("elastic_timer.watch.install()")
    watch = Watch(client, bound if bound is not None else _bound_from_env())
    watch.hook_optimizer(optimizer_module)
    watch.hook_forward(module_module, torch.is_grad_enabled)
    watch.wrap(dataloader._BaseDataLoaderIter, "__next__", "DataLoader next")
    watch.wrap(torch, "save", "torch.save")
    watch.wrap(torch, "load", "torch.load")
    if dist.is_available():
        watch.hook_collectives(dist)
    after_import("torch.distributed.checkpoint", _hook_checkpoint)
    _watch = watch
    os.environ[WATCHED_PID_ENV] = str(os.getpid())
    logger.debug("elastic-timer watch: watching pid %s", os.getpid())
    return watch


def uninstall() -> None:
    """Stops watching this process (its last timer released, every hook removed)."""
    global _watch
    if _watch is not None:
        _watch.stop()
        _watch = None


def _forked_child() -> None:
    if _watch is not None:
        _watch.forked()


os.register_at_fork(after_in_child=_forked_child)


def _hook_checkpoint(dcp: ModuleType) -> None:
    if _watch is not None:
        for name in ("save", "load", "async_save", "save_state_dict", "load_state_dict"):
            _watch.wrap(dcp, name, f"torch.distributed.checkpoint.{name}")


def _bound_from_env() -> float:
    raw = os.environ.get(BOUND_ENV, "").strip()
    if raw:
        try:
            bound = float(raw)
            if bound > 0 and bound != float("inf"):
                return bound
        except ValueError:
            pass
        logger.warning("Ignoring %s=%r: not a positive number of seconds", BOUND_ENV, raw)
    return DEFAULT_BOUND


# -- running code once a module is imported ----------------------------------------------------


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls back once a named module has been imported (its code run), whoever imports it."""

    def __init__(self) -> None:
        self.pending: dict[str, list[Callable[[ModuleType], None]]] = {}

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module
        callbacks = self.pending.pop(fullname)

        def exec_then_call_back(module: ModuleType) -> None:
            exec_module(module)
            _call_back(callbacks, module)

        # This spec's loader only (an instance attribute): other modules load as before.
        try:
            loader.exec_module = exec_then_call_back  # type: ignore[method-assign]
        except AttributeError:
            self.pending[fullname] = callbacks
        return spec


_after_import = _AfterImport()


def _call_back(callbacks: list[Callable[[ModuleType], None]], module: ModuleType) -> None:
    for callback in callbacks:
        try:
            callback(module)
        except Exception:
            logger.exception("elastic-timer watch: a hook could not be installed")


def after_import(name: str, callback: Callable[[ModuleType], None]) -> None:
    """``callback(module)`` now if ``name`` is imported, else once it is."""
    module = sys.modules.get(name)
    if module is not None:
        _call_back([callback], module)
        return
    _after_import.pending.setdefault(name, []).append(callback)
    if _after_import not in sys.meta_path:
        sys.meta_path.insert(0, _after_import)


def requested() -> bool:
    """Whether ``ELASTIC_TIMER_WATCH`` asks for watching."""
    return os.environ.get(WATCH_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def prepare_agent() -> None:
    """In the agent, before it starts workers: they (its children, not the agent itself,
    which started already) get the bootstrap directory first on their ``PYTHONPATH``, and the
    agent's server learned timeouts, stack dumps (``ELASTIC_TIMER_STACK_DUMP=5``) and so the
    job's hang report, unless set otherwise."""
    os.environ[WATCH_ENV] = "1"
    os.environ.setdefault(env("adaptive"), "1")
    os.environ.setdefault(env("stack_dump"), str(STACK_DUMP))
    entries = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join([BOOT_DIR, *(p for p in entries if p != BOOT_DIR)])


def bootstrap() -> None:
    """Called by the bootstrap ``sitecustomize`` of every process started with it on its
    path: in a worker of a watched job (it has the timer server's FIFO, and is not a process
    started by a watched worker), watches it once torch is imported. Nothing otherwise."""
    if not requested():
        return
    if not os.environ.get(TIMER_FILE_ENV):
        return  # not a torchelastic worker with a timer server (the agent, a tool)
    if os.environ.get(WATCHED_PID_ENV, str(os.getpid())) != str(os.getpid()):
        return  # started by a watched worker (a spawned DataLoader worker, say)

    def watch_torch(torch: ModuleType) -> None:
        install()

    after_import("torch", watch_torch)
