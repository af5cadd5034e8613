"""The servers' options, all opt-in, in one table: each one's keyword (both servers take it),
``ELASTIC_TIMER_*`` variable (read where the keyword is not given, so that a torchrun user, who
does not construct the agent's server, can set it), ``elastic-timer serve`` flag, parser,
default and meaning. The servers, ``serve``'s arguments and the documentation
(``docs/options.md``, written by ``scripts/options_page.py``) all read it. A default the
native core owns is the core's, read from ``_native.DEFAULTS``.

A bad keyword is a ValueError (an unknown one a TypeError); a bad variable is logged and
ignored, so that a typo in a job's environment does not stop its agent from starting; a bad
flag is ``serve``'s usage error.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal as _signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

from . import _native, _stacks_dir
from .events import EventCallback, EventSink

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "OPTIONS",
    "Diagnostics",
    "DiagnosticsOptions",
    "Option",
    "env",
    "markdown_table",
    "option",
]

logger = logging.getLogger(__name__)

# -- parsers: a keyword's value or a variable's or flag's text, and the name to blame ----------


def _must_be(name: str, what: str, value: Any) -> ValueError:
    # No name for a flag: argparse puts the flag before the message.
    return ValueError(f"{name} must be {what}, got {value!r}".lstrip())


def seconds(value: Any, name: str = "") -> float:
    """A positive, finite number of seconds."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _must_be(name, "a positive number of seconds", value) from None
    if not 0 < number < float("inf"):
        raise _must_be(name, "a positive number of seconds", value)
    return number


def factor(value: Any, name: str = "") -> float:
    """A finite number of at least 1."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _must_be(name, "a number of at least 1", value) from None
    if not 1 <= number < float("inf"):
        raise _must_be(name, "a number of at least 1", value)
    return number


def count(value: Any, name: str = "") -> int:
    """A positive whole number (a cap on timers)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _must_be(name, "a positive whole number", value)
    try:
        number = int(value)
    except ValueError:
        raise _must_be(name, "a positive whole number", value) from None
    if number < 1:
        raise _must_be(name, "a positive whole number", value)
    return number


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


def stack_signal(value: str | int, name: str = "") -> int:
    """A signal workers can arm ``faulthandler`` on: one they can catch."""
    number = parse_signal(value)
    if number in (_signal.SIGKILL, _signal.SIGSTOP):
        signal_name = _signal.Signals(number).name
        raise ValueError(
            f"{signal_name} cannot be caught, so workers cannot dump their stacks on it"
        )
    return number


def switch(value: Any, name: str = "") -> bool:
    """On or off: a keyword's truth, or a variable's 1/true/yes/on or 0/false/no/off."""
    if not isinstance(value, str):
        return bool(value)
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise _must_be(name, "1 or 0 (true or false, yes or no, on or off)", value)


def path(value: str | os.PathLike[str], name: str = "") -> str:
    """A path."""
    return os.fspath(value)


def absolute_path(value: str | os.PathLike[str], name: str = "") -> str:
    """A path, made absolute: workers, and the server later, may be in another directory."""
    return os.path.abspath(os.fspath(value))


# -- the table ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One server option (see the module's docstring)."""

    # The servers' keyword.
    name: str
    # The environment variable read when the keyword is not given.
    env: str
    # ``elastic-timer serve``'s flag.
    flag: str
    # A keyword's value, or a variable's or flag's text, and the name to blame in a
    # ValueError: the value the server uses.
    parse: Callable[[Any, str], Any]
    # What the server uses when neither keyword nor variable gives a value (None: off).
    default: Any
    help: str
    # The flag's value, as ``--help`` shows it (None: a switch, given alone).
    metavar: str | None = None
    # The default as the documentation says it, where the value alone does not.
    default_text: str | None = None
    # Whether the native server takes it (``Options`` in bindings.rs); the rest are Python's.
    native: bool = True

    def shown_default(self) -> str:
        if self.default_text is not None:
            return self.default_text
        if self.default is None or self.default is False:
            return "off"
        if self.parse is stack_signal:
            return _signal.Signals(self.default).name
        if self.parse is seconds:
            return f"{self.default:g} s"
        return f"{self.default:g}" if isinstance(self.default, float) else f"{self.default:,}"


_DEFAULTS = _native.DEFAULTS

OPTIONS: tuple[Option, ...] = (
    Option(
        "stack_dump",
        "ELASTIC_TIMER_STACK_DUMP",
        "--stack-dump",
        seconds,
        None,
        "Before signalling an expired worker, ask it for its Python stacks and wait at most "
        "this long for them.",
        "SECONDS",
    ),
    Option(
        "stack_signal",
        "ELASTIC_TIMER_STACK_SIGNAL",
        "--stack-signal",
        stack_signal,
        _DEFAULTS["stack_signal"],
        "The signal that asks a worker for its stacks (the one its faulthandler is armed on), "
        "by name (USR2, SIGUSR2) or number. With stack_dump.",
        "SIGNAL",
    ),
    Option(
        "stacks_dir",
        "ELASTIC_TIMER_STACKS_DIR",
        "--stacks-dir",
        absolute_path,
        None,
        "Where workers write their stacks (created if missing). elastic-timer's "
        "FileTimerClient learns it when it connects (from FIFO.stacks, beside the FIFO); "
        "other workers need this variable in their environment, which the server sets in its "
        "own (its children inherit it). With stack_dump.",
        "DIR",
        "the variable from the server's environment, else a temporary directory the server "
        "makes and removes",
    ),
    Option(
        "escalate_after",
        "ELASTIC_TIMER_ESCALATE_AFTER",
        "--escalate-after",
        seconds,
        None,
        "Send SIGKILL to a worker still alive this long after its signal; a worker that "
        "survives SIGKILL too is reported once as unreapable.",
        "SECONDS",
    ),
    Option(
        "dry_run",
        "ELASTIC_TIMER_DRY_RUN",
        "--dry-run",
        switch,
        False,
        "Log and report every expired timer, but signal nothing.",
    ),
    Option(
        "event_log",
        "ELASTIC_TIMER_EVENT_LOG",
        "--event-log",
        path,
        None,
        "Append every event (a timer expired, a worker signalled...) to this file as one JSON "
        "object per line.",
        "PATH",
        native=False,
    ),
    Option(
        "adaptive",
        "ELASTIC_TIMER_ADAPTIVE",
        "--adaptive",
        switch,
        False,
        "Learn each scope's durations from its acquires and releases, and fire at "
        "min(after, max(floor, factor x the longest seen)) once a scope has enough samples.",
    ),
    Option(
        "adaptive_factor",
        "ELASTIC_TIMER_ADAPTIVE_FACTOR",
        "--adaptive-factor",
        factor,
        _DEFAULTS["adaptive_factor"],
        "The factor of adaptive (at least 1).",
        "N",
    ),
    Option(
        "adaptive_floor",
        "ELASTIC_TIMER_ADAPTIVE_FLOOR",
        "--adaptive-floor",
        seconds,
        _DEFAULTS["adaptive_floor"],
        "The floor of adaptive, in seconds: no learned timeout is shorter.",
        "SECONDS",
    ),
    Option(
        "state_file",
        "ELASTIC_TIMER_STATE_FILE",
        "--state-file",
        absolute_path,
        None,
        "Load the learned durations from this file at start, and save them there "
        "(atomically) at stop and now and then; `elastic-timer timeouts PATH` prints them.",
        "PATH",
        "none (under elastic-timer-run: one file per run id in the temporary directory)",
    ),
    Option(
        "max_worker_timers",
        "ELASTIC_TIMER_MAX_WORKER_TIMERS",
        "--max-worker-timers",
        count,
        _DEFAULTS["max_worker_timers"],
        "The most live timers one worker may hold; its acquires past it are refused "
        "(counted in the over_cap counter, warned of once per worker).",
        "N",
    ),
    Option(
        "max_timers",
        "ELASTIC_TIMER_MAX_TIMERS",
        "--max-timers",
        count,
        _DEFAULTS["max_timers"],
        "The most live timers all workers together may hold; acquires past it are refused, "
        "as past max_worker_timers.",
        "N",
    ),
)

_BY_NAME = {option.name: option for option in OPTIONS}


def option(name: str) -> Option:
    """The option whose keyword is ``name``."""
    return _BY_NAME[name]


def env(name: str) -> str:
    """The environment variable of the option ``name`` (``env("adaptive")``)."""
    return _BY_NAME[name].env


def from_environment(option: Option) -> Any:
    """The option's value from its variable; None if unset, or bad (logged)."""
    raw = os.environ.get(option.env, "").strip()
    if not raw:
        return None
    try:
        return option.parse(raw, option.env)
    except ValueError as err:
        logger.warning("Ignoring %s=%r: %s", option.env, raw, err)
        return None


def _resolve(option: Option, keywords: dict[str, Any]) -> Any:
    """The keyword, else the variable, else the default."""
    value = keywords.get(option.name)
    if value is not None and value != "":
        return option.parse(value, option.name)
    value = from_environment(option)
    return option.default if value is None else value


# -- the table in the documentation ---------------------------------------------------------------


def markdown_table() -> str:
    """The table as Markdown: one row per option."""
    rows = ["| Keyword | Variable | `serve` flag | Default | Meaning |", "|---|---|---|---|---|"]
    for option in OPTIONS:
        flag = option.flag if option.metavar is None else f"{option.flag} {option.metavar}"
        cells = (f"`{option.name}`", f"`{option.env}`", f"`{flag}`")
        rows.append(f"| {' | '.join(cells)} | {option.shown_default()} | {option.help} |")
    return "\n".join(rows) + "\n"


def markdown_page() -> str:
    """``docs/options.md``."""
    return (
        "# Server options\n\n"
        "Both servers take each option as a keyword; where it is not given they read its "
        "variable from their environment (so that it reaches the server torchrun's agent "
        "makes), and `elastic-timer serve` takes it as a flag.\n\n" + markdown_table()
    )


# -- a server's options, resolved ------------------------------------------------------------------


class DiagnosticsOptions(TypedDict, total=False):
    """The keywords both servers take: the table's, and ``on_event`` (a callback given each
    event as a dict)."""

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


def _find_py_spy() -> str | None:
    """``py-spy`` on PATH, or beside this interpreter (pip installs it there)."""
    found = shutil.which("py-spy")
    if found is None:
        found = shutil.which("py-spy", path=os.path.dirname(sys.executable))
    return found


@dataclass
class Diagnostics:
    """A server's options, resolved from its keywords, the environment and the defaults."""

    stack_dump: float | None
    stack_signal: int
    stacks_dir: str | None
    escalate_after: float | None
    dry_run: bool
    event_log: str | None
    adaptive: bool
    adaptive_factor: float
    adaptive_floor: float
    state_file: str | None
    max_worker_timers: int
    max_timers: int
    on_event: EventCallback | None = None
    # Whether the server made the stacks directory (and so removes it).
    owns_stacks_dir: bool = False
    # Whether the stacks directory is the user's ELASTIC_TIMER_STACKS_DIR (left set at stop).
    stacks_dir_from_env: bool = False
    _announcement: _stacks_dir.Announcement | None = field(
        default=None, init=False, repr=False, compare=False
    )

    @classmethod
    def resolve(cls, **keywords: Unpack[DiagnosticsOptions]) -> Diagnostics:
        """Keywords win; the environment fills what they leave out, then the defaults. A bad
        keyword raises ValueError (an unknown one TypeError); a bad variable is logged and
        ignored."""
        unknown = sorted(keywords.keys() - DiagnosticsOptions.__annotations__.keys())
        if unknown:
            raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")
        given: dict[str, Any] = dict(keywords)
        # The stacks directory: a keyword, else the job-wide variable, else a temporary one.
        stacks_dir = given.pop("stacks_dir", None)
        values = {
            option.name: _resolve(option, given)
            for option in OPTIONS
            if option.name != "stacks_dir"
        }
        stacks_dir_from_env = owns_stacks_dir = False
        if values["stack_dump"] is not None:
            if stacks_dir is None:
                stacks_dir = _stacks_dir.from_environment(env("stacks_dir"))
                stacks_dir_from_env = stacks_dir is not None
            if stacks_dir is None:
                stacks_dir, owns_stacks_dir = tempfile.mkdtemp(prefix="elastic-timer-stacks-"), True
        return cls(
            **values,
            stacks_dir=None if stacks_dir is None else absolute_path(stacks_dir),
            on_event=keywords.get("on_event"),
            owns_stacks_dir=owns_stacks_dir,
            stacks_dir_from_env=stacks_dir_from_env,
        )

    def native_options(self) -> dict[str, Any]:
        """The native server's share of its options."""
        options = {option.name: getattr(self, option.name) for option in OPTIONS if option.native}
        options["py_spy"] = _find_py_spy() if self.stack_dump is not None else None
        return options

    def open(self, fifo: str | None = None) -> EventSink:
        """Opens the event log, and prepares the stacks directory and names it to workers
        (``_stacks_dir.announce``). Called when the server starts, before it reads requests;
        raises OSError, having announced nothing, if either cannot be set up."""
        # The log first: a log that cannot be opened must not leave the variable set.
        sink = EventSink(self.event_log, self.on_event)
        if self.stack_dump is not None and self.stacks_dir is not None:
            try:
                self._announcement = _stacks_dir.announce(
                    self.stacks_dir,
                    self.stack_signal,
                    fifo,
                    env("stacks_dir"),
                    user_set=self.stacks_dir_from_env,
                )
            except OSError:
                sink.close()
                raise
        elif fifo is not None:
            _stacks_dir.remove_stale_sidecar(fifo)
        return sink

    def close(self, sink: EventSink) -> None:
        """Undoes ``open`` (the stacks directory goes if this server made it)."""
        sink.close()
        announcement, self._announcement = self._announcement, None
        if announcement is not None:
            _stacks_dir.withdraw(announcement)
        if self.owns_stacks_dir and self.stacks_dir is not None:
            shutil.rmtree(self.stacks_dir, ignore_errors=True)
