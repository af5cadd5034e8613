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
``ELASTIC_TIMER_ADAPTIVE=1``
    learn each scope's durations and fire at ``min(after, max(floor, factor x the longest
    seen))`` once a scope has enough samples (``adaptive=True``).
``ELASTIC_TIMER_ADAPTIVE_FACTOR=<number>``, ``ELASTIC_TIMER_ADAPTIVE_FLOOR=<seconds>``
    that factor (default 5) and floor (default 5 s).
``ELASTIC_TIMER_STATE_FILE=<path>``
    where the learned statistics are loaded from at start and saved to.
``ELASTIC_TIMER_MAX_WORKER_TIMERS=<n>``, ``ELASTIC_TIMER_MAX_TIMERS=<n>``
    the most live timers a worker may hold, and all workers together (on by default:
    10,000 and 100,000); past either, an acquire is refused, counted and warned of.

A server taking stacks makes a stacks directory (``ELASTIC_TIMER_STACKS_DIR`` from its own
environment when set, created if missing; else a temporary one) and names it to workers in two
ways: in ``ELASTIC_TIMER_STACKS_DIR`` in its own environment, which the workers it starts
inherit, and, for the File server, in the file ``<fifo>.stacks`` beside its FIFO, which
elastic-timer's ``FileTimerClient`` reads when it connects (so workers started by anything
else learn it too). elastic-timer's clients then arm ``faulthandler`` to write their stacks to
a file of their own there. Workers whose client is torch's are dumped with ``py-spy`` instead,
when it is installed.
"""

from __future__ import annotations

import contextlib
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
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, TypedDict

from . import _native

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
ADAPTIVE_ENV = "ELASTIC_TIMER_ADAPTIVE"
ADAPTIVE_FACTOR_ENV = "ELASTIC_TIMER_ADAPTIVE_FACTOR"
ADAPTIVE_FLOOR_ENV = "ELASTIC_TIMER_ADAPTIVE_FLOOR"
STATE_FILE_ENV = "ELASTIC_TIMER_STATE_FILE"
MAX_TIMERS_ENV = "ELASTIC_TIMER_MAX_TIMERS"
MAX_WORKER_TIMERS_ENV = "ELASTIC_TIMER_MAX_WORKER_TIMERS"
DEFAULT_ADAPTIVE_FACTOR = 5.0
DEFAULT_ADAPTIVE_FLOOR = 5.0
# A worker holds one timer per open `expires` block (a handful): 10,000 is far beyond any
# honest use, and bounds a worker flooding distinct scopes to about 40 MiB (4 KiB scopes, the
# most a FIFO line carries; a Local queue's items may be up to 64 KiB). Together: 10 such
# workers, or 100 workers with 1,000 timers each; the server then holds at most about 400 MiB
# (FIFO), 30 MiB with scopes of ordinary length (measured: 435 and 30 MiB per 100,000 timers
# of 4,000- and 40-byte scopes).
DEFAULT_MAX_WORKER_TIMERS = 10_000
DEFAULT_MAX_TIMERS = 100_000

DEFAULT_STACK_SIGNAL = _signal.SIGUSR2
# In the stacks directory: the signal number workers arm faulthandler on.
_SIGNAL_FILE = "signal"
_MAX_SIGNAL_BYTES = 16
# Beside a File server's FIFO: the path of its stacks directory (read by FileTimerClient).
STACKS_SIDECAR_SUFFIX = ".stacks"

# The stacks directories this process's running servers put in STACKS_DIR_ENV, and how many
# servers use each: a server resolving its options later must not take one of them for the
# user's, and the variable goes when the last of them stops.
_announced_dirs: Counter[str] = Counter()

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


def _factor(value: float | str) -> float:
    factor = float(value)
    if not 1 <= factor < float("inf"):
        raise ValueError(f"adaptive_factor must be a number of at least 1, got {value!r}")
    return factor


def parse_count(value: int | str, name: str) -> int:
    """A positive whole number (a cap on timers); ValueError names `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{name} must be a positive whole number, got {value!r}")
    try:
        count = int(value)
    except ValueError:
        raise ValueError(f"{name} must be a positive whole number, got {value!r}") from None
    if count < 1:
        raise ValueError(f"{name} must be a positive whole number, got {value!r}")
    return count


def _cap(value: int | None, name: str, env: str, default: int) -> int:
    """A cap on timers: the keyword, else the variable ``env``, else the default."""
    if value is not None:
        return parse_count(value, name)
    from_env: int | None = _from_env(env, lambda raw: parse_count(raw, env))
    return default if from_env is None else from_env


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
    adaptive: bool | None
    adaptive_factor: float | None
    adaptive_floor: float | None
    state_file: str | None
    max_timers: int | None
    max_worker_timers: int | None


def _create_new(path: str, mode: int) -> int:
    """A new file at ``path`` opened for writing, never through a link someone left there. A
    file already there (a leftover of an earlier process) is replaced, where this process may
    remove it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags, mode)
    except FileExistsError:
        os.unlink(path)
        return os.open(path, flags, mode)


# A file as it was written: device, inode and change time (an inode number freed by its
# removal is soon given to a new file; the change time tells them apart).
FileIdentity = tuple[int, int, int]


def _identity(stat: os.stat_result) -> FileIdentity:
    return stat.st_dev, stat.st_ino, stat.st_ctime_ns


def _replace_file(path: str, text: str) -> FileIdentity:
    """Writes ``path`` anew: a file beside it, renamed over it, so that a reader never sees it
    half written and a link at ``path`` is replaced, not followed. Returns its identity."""
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with os.fdopen(_create_new(temporary, 0o644), "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.replace(temporary, path)
            # After the rename, which changes the change time.
            stat = os.fstat(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return _identity(stat)


@dataclass
class _Announcement:
    """What ``Diagnostics.open`` did to name the stacks directory, for ``close`` to undo."""

    # The directory this server put in STACKS_DIR_ENV (None: the variable was the user's).
    environment: str | None
    # The sidecar beside the FIFO and its identity, removed only if still the same file.
    sidecar: tuple[str, FileIdentity] | None


@dataclass
class Diagnostics:
    """A server's opt-in diagnostics, resolved from its keywords and the environment."""

    stack_dump: float | None = None
    stack_signal: int = DEFAULT_STACK_SIGNAL
    stacks_dir: str | None = None
    escalate_after: float | None = None
    dry_run: bool = False
    event_log: str | None = None
    on_event: EventCallback | None = None
    adaptive: bool = False
    adaptive_factor: float = DEFAULT_ADAPTIVE_FACTOR
    adaptive_floor: float = DEFAULT_ADAPTIVE_FLOOR
    state_file: str | None = None
    max_timers: int = DEFAULT_MAX_TIMERS
    max_worker_timers: int = DEFAULT_MAX_WORKER_TIMERS
    # Whether the server made the stacks directory (and so removes it).
    owns_stacks_dir: bool = False
    # Whether the stacks directory is the user's ELASTIC_TIMER_STACKS_DIR (left set at stop).
    stacks_dir_from_env: bool = False
    _announcement: _Announcement | None = field(default=None, init=False, repr=False, compare=False)

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
        stacks_dir_from_env = False
        if stack_dump is not None and stacks_dir is None:
            # One job-wide variable serves both sides, unless a server of this process set it.
            from_env = os.environ.get(STACKS_DIR_ENV, "")
            if from_env and from_env not in _announced_dirs:
                stacks_dir, stacks_dir_from_env = from_env, True
        owns_stacks_dir = stack_dump is not None and stacks_dir is None
        if owns_stacks_dir:
            stacks_dir = tempfile.mkdtemp(prefix="elastic-timer-stacks-")
        if stacks_dir is not None:
            # Named to workers whose working directory is not the server's.
            stacks_dir = os.path.abspath(stacks_dir)
        adaptive = options.get("adaptive")
        if adaptive is None:
            adaptive = bool(_from_env(ADAPTIVE_ENV, _flag))
        factor = options.get("adaptive_factor")
        if factor is None:
            factor = _from_env(ADAPTIVE_FACTOR_ENV, _factor) or DEFAULT_ADAPTIVE_FACTOR
        floor = options.get("adaptive_floor")
        if floor is None:
            floor = (
                _from_env(ADAPTIVE_FLOOR_ENV, lambda s: _seconds(float(s), ADAPTIVE_FLOOR_ENV))
                or DEFAULT_ADAPTIVE_FLOOR
            )
        state_file = options.get("state_file") or os.environ.get(STATE_FILE_ENV) or None
        return cls(
            max_timers=_cap(
                options.get("max_timers"), "max_timers", MAX_TIMERS_ENV, DEFAULT_MAX_TIMERS
            ),
            max_worker_timers=_cap(
                options.get("max_worker_timers"),
                "max_worker_timers",
                MAX_WORKER_TIMERS_ENV,
                DEFAULT_MAX_WORKER_TIMERS,
            ),
            adaptive=bool(adaptive),
            adaptive_factor=_factor(factor),
            adaptive_floor=_seconds(floor, "adaptive_floor"),
            state_file=None if state_file is None else os.path.abspath(state_file),
            stack_dump=stack_dump,
            stack_signal=parse_stack_signal(stack_signal),
            stacks_dir=stacks_dir,
            escalate_after=escalate_after,
            dry_run=bool(dry_run),
            event_log=event_log,
            on_event=options.get("on_event"),
            owns_stacks_dir=owns_stacks_dir,
            stacks_dir_from_env=stacks_dir_from_env,
        )

    def native_options(self) -> dict[str, Any]:
        """The native server's share of its options."""
        return {
            "adaptive": self.adaptive,
            "adaptive_factor": self.adaptive_factor,
            "adaptive_floor": self.adaptive_floor,
            "state_file": self.state_file,
            "dry_run": self.dry_run,
            "escalate_after": self.escalate_after,
            "stack_dump": self.stack_dump,
            "stack_signal": self.stack_signal,
            "stacks_dir": self.stacks_dir,
            "py_spy": _find_py_spy() if self.stack_dump is not None else None,
            "max_timers": self.max_timers,
            "max_worker_timers": self.max_worker_timers,
        }

    def open(self, fifo: str | None = None) -> EventSink:
        """Prepares the stacks directory and names it to workers (in this process's
        environment, and beside ``fifo``, a File server's FIFO), and opens the event log.
        Called when the server starts, before it reads requests; raises OSError, having
        announced nothing, if either cannot be set up."""
        # The log first: a log that cannot be opened must not leave the variable set.
        sink = EventSink(self.event_log, self.on_event)
        if self.stack_dump is not None and self.stacks_dir is not None:
            try:
                os.makedirs(self.stacks_dir, exist_ok=True)
                _replace_file(os.path.join(self.stacks_dir, _SIGNAL_FILE), f"{self.stack_signal}\n")
                sidecar = None
                if fifo is not None:
                    path = fifo + STACKS_SIDECAR_SUFFIX
                    sidecar = (path, _replace_file(path, f"{self.stacks_dir}\n"))
            except OSError:
                sink.close()
                raise
            environment = None if self.stacks_dir_from_env else self.stacks_dir
            self._announcement = _Announcement(environment, sidecar)
            if environment is not None:
                _announced_dirs[environment] += 1
                os.environ[STACKS_DIR_ENV] = environment
        elif fifo is not None:
            # One left by a server that died with the FIFO this server replaced: its clients
            # would arm for stacks that nobody takes.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(fifo + STACKS_SIDECAR_SUFFIX)
        return sink

    def close(self, sink: EventSink) -> None:
        """Undoes ``open`` (the stacks directory goes if this server made it)."""
        sink.close()
        announcement, self._announcement = self._announcement, None
        if announcement is not None:
            if announcement.sidecar is not None:
                path, identity = announcement.sidecar
                with contextlib.suppress(OSError):
                    if _identity(os.lstat(path)) == identity:  # not another server's since
                        os.unlink(path)
            directory = announcement.environment
            if directory is not None:
                _announced_dirs[directory] -= 1
                if _announced_dirs[directory] <= 0:
                    # The last server of this process that named it.
                    del _announced_dirs[directory]
                    if os.environ.get(STACKS_DIR_ENV) == directory:
                        del os.environ[STACKS_DIR_ENV]
        if self.owns_stacks_dir and self.stacks_dir is not None:
            shutil.rmtree(self.stacks_dir, ignore_errors=True)


def open_event_log(path: str) -> IO[str]:
    """The event log at ``path``, opened to append, created (mode 0600) if missing. The server
    may be root, in a directory others can write: the file must be a regular file of this
    process's user, reached without a link, with no other hard link, and a FIFO there is
    refused at once. ``UnsafeFile`` (an ``OSError``) says which it is not."""
    return os.fdopen(_native.open_append(path), "a", encoding="utf-8", buffering=1)


class EventSink:
    """Writes each event as one JSON line to a file and/or hands it to a callback. Neither
    ever stops the server: a failing write or callback is logged (a write failure once)."""

    def __init__(self, path: str | None, callback: EventCallback | None) -> None:
        self._file: IO[str] | None = None
        if path is not None:
            try:
                self._file = open_event_log(path)
            except _native.UnsafeFile as e:
                logger.warning("The event log %s is refused, so there is none: %s", path, e)
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

# This process's arming: (pid, stacks directory, signal, the file faulthandler writes to).
_armed: tuple[int, str, int, IO[str]] | None = None
# The directory this process last failed to arm in, as (pid, directory): warned about once.
_failed: tuple[int, str] | None = None


def _start_time() -> int:
    """This process's start time (``/proc/self/stat`` field 22), as the server reads it."""
    with open("/proc/self/stat") as f:
        stat = f.read()
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def arm_stack_dump(directory: str | None = None) -> bool:
    """
    Lets a server taking stacks get this process's: arms ``faulthandler`` on the server's
    signal, to write every thread's stack to a file of this process's in the server's stacks
    directory: ``directory`` (the one a server named when this process's ``FileTimerClient``
    connected to it), else ``ELASTIC_TIMER_STACKS_DIR``. Done once per process and directory
    (and again in a forked child, which gets a file of its own); elastic-timer's clients call
    it. A directory it cannot arm in is a warning, once. Returns whether it is armed.
    """
    global _armed, _failed
    pid = os.getpid()
    if _armed is not None and _armed[0] == pid and directory in (None, _armed[1]):
        return True
    if directory is None:
        directory = os.environ.get(STACKS_DIR_ENV)
        if not directory:
            return False
    if _failed == (pid, directory):
        return False
    try:
        signum = _read_stack_signal(directory)
        path = os.path.join(directory, f"{pid}-{_start_time()}.stacks")
        file = os.fdopen(_create_new(path, 0o666), "w", encoding="utf-8")
        # faulthandler keeps the file open.
        faulthandler.register(signum, file=file, all_threads=True, chain=False)
    except (OSError, ValueError, RuntimeError) as err:
        _failed = (pid, directory)
        logger.warning(
            "Cannot arm stack dumps in %s, the timer server's stacks directory, so this "
            "process's stacks will not be logged if its timer expires: %s",
            directory,
            err,
        )
        return False
    previous, _armed = _armed, (pid, directory, signum, file)
    if previous is not None:
        # Armed before (by the parent of this fork, or for an earlier server): let go of it.
        if previous[2] != signum:
            faulthandler.unregister(previous[2])
        previous[3].close()
    return True


def _read_stack_signal(directory: str) -> int:
    """The signal a server named in its stacks directory. The directory may be writable by
    others: the file must be private to this process's user or root, and what it holds is
    never shown (it could be a link to a secret)."""
    path = os.path.join(directory, _SIGNAL_FILE)
    try:
        data = _native.read_private_file(path, _MAX_SIGNAL_BYTES)
    except _native.UnsafeFile as e:
        raise OSError(f"{path} is refused: {e}") from None
    try:
        return parse_signal(data.decode("ascii"))
    except ValueError:  # UnicodeDecodeError is one
        raise ValueError(f"{path} does not hold a signal number") from None


def _rearm_in_child() -> None:
    # The parent's registration writes to the parent's file: give the child its own.
    if _armed is not None:
        arm_stack_dump(_armed[1])


os.register_at_fork(after_in_child=_rearm_in_child)
