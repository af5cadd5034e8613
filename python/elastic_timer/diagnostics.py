"""What a server can do beyond torch's, all opt-in: stacks before the kill, escalation to
SIGKILL, a dry run, and every event as one JSON object.

The servers take these as keyword arguments. Where one is not given, the environment gives it,
so that a torchrun user (who does not construct the agent's server) can turn it on:

``ELASTIC_TIMER_STACK_DUMP=<seconds>``
    ask an expired worker for its Python stacks and wait at most this long before signalling.
``ELASTIC_TIMER_STACK_SIGNAL=<name or number>``
    the signal workers arm ``faulthandler`` on (default SIGUSR2).
``ELASTIC_TIMER_ESCALATE_AFTER=<seconds>``
    SIGKILL a signalled worker still running this long after; report one that outlives the
    SIGKILL too.
``ELASTIC_TIMER_DRY_RUN=1``
    report every expiry, signal nothing.
``ELASTIC_TIMER_EVENT_LOG=<path>``
    append every event to this file, one JSON object per line.

A server taking stacks sets ``ELASTIC_TIMER_STACKS_DIR`` in its own environment, so workers it
starts inherit it; elastic-timer's clients then arm ``faulthandler`` to write their stacks to
a file of their own there. Workers whose client is torch's are dumped with ``py-spy`` instead,
when it is installed.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import shutil
import signal as _signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Diagnostics", "DiagnosticsOptions", "EventSink", "arm_stack_dump"]

logger = logging.getLogger(__name__)

STACK_DUMP_ENV = "ELASTIC_TIMER_STACK_DUMP"
STACK_SIGNAL_ENV = "ELASTIC_TIMER_STACK_SIGNAL"
ESCALATE_AFTER_ENV = "ELASTIC_TIMER_ESCALATE_AFTER"
DRY_RUN_ENV = "ELASTIC_TIMER_DRY_RUN"
EVENT_LOG_ENV = "ELASTIC_TIMER_EVENT_LOG"
STACKS_DIR_ENV = "ELASTIC_TIMER_STACKS_DIR"

DEFAULT_STACK_SIGNAL = _signal.SIGUSR2
# In the stacks directory: the signal number workers arm faulthandler on.
_SIGNAL_FILE = "signal"

# The server's callback for events: one dict per event.
EventCallback = Callable[[dict[str, Any]], None]


def parse_signal(value: str | int) -> int:
    """A signal given as a number or a name (``USR2``, ``SIGUSR2``); ValueError if unknown."""
    if isinstance(value, int):
        number = value
    elif value.strip().lstrip("-").isdigit():
        number = int(value)
    else:
        name = value.strip().upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        try:
            number = int(_signal.Signals[name])
        except KeyError:
            raise ValueError(f"unknown signal {value!r}") from None
    if not 1 <= number < _signal.NSIG:
        raise ValueError(f"signal {value!r} is not a valid signal number")
    return number


def parse_stack_signal(value: str | int) -> int:
    """A signal workers can arm ``faulthandler`` on: one they can catch."""
    number = parse_signal(value)
    if number in (_signal.SIGKILL, _signal.SIGSTOP):
        name = _signal.Signals(number).name
        raise ValueError(f"{name} cannot be caught, so workers cannot dump their stacks on it")
    return number


def _seconds(value: float, name: str) -> float:
    seconds = float(value)
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return seconds


def _from_env(name: str, parse: Callable[[str], Any]) -> Any:
    """The parsed value of an environment variable; a bad one is logged and ignored, so a
    typo in a job's environment does not stop its agent from starting."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return parse(raw)
    except ValueError as err:
        logger.warning("Ignoring %s=%r: %s", name, raw, err)
        return None


def _flag(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1 or 0")


def _find_py_spy() -> str | None:
    """``py-spy`` on PATH, or beside this interpreter (pip installs it there)."""
    found = shutil.which("py-spy")
    if found is None:
        found = shutil.which("py-spy", path=os.path.dirname(sys.executable))
    return found


class DiagnosticsOptions(TypedDict, total=False):
    """The diagnostics keywords both servers take (see the module's docstring)."""

    stack_dump: float | None
    stack_signal: int | str | None
    stacks_dir: str | None
    escalate_after: float | None
    dry_run: bool | None
    event_log: str | None
    on_event: EventCallback | None


@dataclass(frozen=True)
class Diagnostics:
    """A server's opt-in diagnostics, resolved from its keywords and the environment."""

    stack_dump: float | None = None
    stack_signal: int = DEFAULT_STACK_SIGNAL
    stacks_dir: str | None = None
    escalate_after: float | None = None
    dry_run: bool = False
    event_log: str | None = None
    on_event: EventCallback | None = None
    # Whether the server made the stacks directory (and so removes it).
    owns_stacks_dir: bool = False

    @classmethod
    def resolve(cls, **options: Unpack[DiagnosticsOptions]) -> Diagnostics:
        """Keywords win; the environment fills what they leave out. A bad keyword raises
        ValueError (an unknown one TypeError); a bad environment variable is logged and
        ignored."""
        unknown = sorted(options.keys() - DiagnosticsOptions.__annotations__.keys())
        if unknown:
            raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")
        stack_dump = options.get("stack_dump")
        stack_signal = options.get("stack_signal")
        stacks_dir = options.get("stacks_dir")
        escalate_after = options.get("escalate_after")
        dry_run = options.get("dry_run")
        event_log = options.get("event_log")
        if stack_dump is None:
            stack_dump = _from_env(STACK_DUMP_ENV, lambda s: _seconds(float(s), STACK_DUMP_ENV))
        else:
            stack_dump = _seconds(stack_dump, "stack_dump")
        if stack_signal is None:
            stack_signal = _from_env(STACK_SIGNAL_ENV, parse_stack_signal) or DEFAULT_STACK_SIGNAL
        if escalate_after is None:
            escalate_after = _from_env(
                ESCALATE_AFTER_ENV, lambda s: _seconds(float(s), ESCALATE_AFTER_ENV)
            )
        else:
            escalate_after = _seconds(escalate_after, "escalate_after")
        if dry_run is None:
            dry_run = bool(_from_env(DRY_RUN_ENV, _flag))
        if event_log is None:
            event_log = os.environ.get(EVENT_LOG_ENV) or None
        owns_stacks_dir = stack_dump is not None and stacks_dir is None
        if owns_stacks_dir:
            stacks_dir = tempfile.mkdtemp(prefix="elastic-timer-stacks-")
        return cls(
            stack_dump=stack_dump,
            stack_signal=parse_stack_signal(stack_signal),
            stacks_dir=stacks_dir,
            escalate_after=escalate_after,
            dry_run=bool(dry_run),
            event_log=event_log,
            on_event=options.get("on_event"),
            owns_stacks_dir=owns_stacks_dir,
        )

    def native_options(self) -> dict[str, Any]:
        """The native server's share of its options."""
        return {
            "dry_run": self.dry_run,
            "escalate_after": self.escalate_after,
            "stack_dump": self.stack_dump,
            "stack_signal": self.stack_signal,
            "stacks_dir": self.stacks_dir,
            "py_spy": _find_py_spy() if self.stack_dump is not None else None,
        }

    def open(self) -> EventSink:
        """Prepares the stacks directory for workers started from now on, and opens the
        event log. Called when the server starts; raises OSError, having announced nothing,
        if either cannot be set up."""
        # The log first: a log that cannot be opened must not leave the variable set.
        sink = EventSink(self.event_log, self.on_event)
        if self.stack_dump is not None and self.stacks_dir is not None:
            try:
                os.makedirs(self.stacks_dir, exist_ok=True)
                with open(os.path.join(self.stacks_dir, _SIGNAL_FILE), "w") as f:
                    f.write(f"{self.stack_signal}\n")
            except OSError:
                sink.close()
                raise
            os.environ[STACKS_DIR_ENV] = self.stacks_dir
        return sink

    def close(self, sink: EventSink) -> None:
        """Undoes ``open`` (the stacks directory goes if this server made it)."""
        sink.close()
        if self.stacks_dir is None:
            return
        if os.environ.get(STACKS_DIR_ENV) == self.stacks_dir:
            del os.environ[STACKS_DIR_ENV]
        if self.owns_stacks_dir:
            shutil.rmtree(self.stacks_dir, ignore_errors=True)


class EventSink:
    """Writes each event as one JSON line to a file and/or hands it to a callback. Neither
    ever stops the server: a failing write or callback is logged (a write failure once)."""

    def __init__(self, path: str | None, callback: EventCallback | None) -> None:
        self._file: IO[str] | None = None
        if path is not None:
            self._file = open(path, "a", encoding="utf-8", buffering=1)
        self._callback = callback
        self._lock = threading.Lock()
        self._write_failed = False

    @property
    def enabled(self) -> bool:
        return self._file is not None or self._callback is not None

    def emit(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        record = {"time": time.time(), "event": event, "server_pid": os.getpid(), **fields}
        with self._lock:
            if self._file is not None:
                try:
                    self._file.write(json.dumps(record) + "\n")
                except (OSError, ValueError) as err:
                    if not self._write_failed:
                        self._write_failed = True
                        logger.error("Cannot write to the event log (reported once): %s", err)
        if self._callback is not None:
            try:
                self._callback(record)
            except Exception:
                logger.exception("The on_event callback raised for %r", event)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


# -- the worker's side: faulthandler, armed once per process ----------------------------------

_armed: tuple[int, IO[str]] | None = None


def _start_time() -> int:
    """This process's start time (``/proc/self/stat`` field 22), as the server reads it."""
    with open("/proc/self/stat") as f:
        stat = f.read()
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def arm_stack_dump() -> bool:
    """
    Lets a server taking stacks get this process's: if ``ELASTIC_TIMER_STACKS_DIR`` is set,
    arms ``faulthandler`` on the server's signal, to write every thread's stack to a file of
    this process's there. Done once per process (and again in a forked child, which gets a
    file of its own); elastic-timer's clients call it. Returns whether it is armed.
    """
    global _armed
    pid = os.getpid()
    if _armed is not None and _armed[0] == pid:
        return True
    directory = os.environ.get(STACKS_DIR_ENV)
    if not directory:
        return False
    try:
        with open(os.path.join(directory, _SIGNAL_FILE)) as f:
            signum = parse_signal(f.read().strip())
        path = os.path.join(directory, f"{pid}-{_start_time()}.stacks")
        file = open(path, "w", encoding="utf-8")  # faulthandler keeps it open
        faulthandler.register(signum, file=file, all_threads=True, chain=False)
    except (OSError, ValueError, RuntimeError) as err:
        logger.warning("Cannot arm stack dumps in %s: %s", directory, err)
        return False
    _armed = (pid, file)
    return True


def _rearm_in_child() -> None:
    # The parent's registration writes to the parent's file: give the child its own.
    if _armed is not None:
        arm_stack_dump()


os.register_at_fork(after_in_child=_rearm_in_child)
