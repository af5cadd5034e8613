"""``elastic-timer-run``: torchrun (or ft_launcher), with elastic-timer's native server as the
workers' watchdog.

``elastic-timer-run [--launcher {torchrun,ft_launcher}] [launcher's arguments] script.py``.
Every argument of the launcher works unchanged. It enables the watchdog
(``TORCHELASTIC_ENABLE_FILE_TIMER=1`` unless already set) and makes the agent use
elastic-timer's ``FileTimerServer``. Workers call ``elastic_timer.configure()`` (no
argument: the FIFO comes from ``TORCHELASTIC_TIMER_FILE``) and wrap risky code in
``elastic_timer.expires(after=...)``; with ``--watch`` they need not (``elastic_timer.watch``).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

from . import torch as torch_integration
from .options import env, option
from .watch import WATCH_ENV

_FACTOR = option("adaptive_factor").shown_default()
_FLOOR = option("adaptive_floor").shown_default()

HELP_PREAMBLE = """\
elastic-timer-run: torchrun, or ft_launcher, with elastic-timer's native watchdog.

usage: elastic-timer-run [--launcher {torchrun,ft_launcher}] [--adaptive] [--watch]
                         [launcher's arguments] script.py ...

  --launcher torchrun     torch's torchrun (the default, also without --launcher)
  --launcher ft_launcher  nvidia-resiliency-ext's ft_launcher (pip install nvidia-resiliency-ext)
  --adaptive              learn each scope's durations and fire at the learned bound (the same
                          as ELASTIC_TIMER_ADAPTIVE=1, below)
  --watch                 watch an unmodified script (ELASTIC_TIMER_WATCH=1 does the same): no
                          call to elastic_timer needed. Each worker's progress (optimizer
                          steps, outermost forward passes, DataLoader batches, torch.save and
                          torch.load, torch.distributed.checkpoint, collectives) is timed; a
                          worker that makes no progress for longer than this job has shown
                          normal at that place is a hang. Turns on learned timeouts, stack
                          dumps (ELASTIC_TIMER_STACK_DUMP=5 unless set) and the job's hang
                          report; a rank that only waits for a stuck one is not killed.
                          ELASTIC_TIMER_WATCH_BOUND=SECONDS: the bound of a place not learned
                          yet (default 1800; in a collective, the process group's timeout)

--launcher, --adaptive and --watch, when given, come first. Every argument of the launcher works
unchanged: they are listed below (`elastic-timer-run --launcher ft_launcher --help` lists
ft_launcher's). On top of the launcher:
  * TORCHELASTIC_ENABLE_FILE_TIMER=1 is set unless you set it yourself, so the agent runs a
    timer server and tells the workers its FIFO in TORCHELASTIC_TIMER_FILE;
  * the timer server is elastic-timer's: it kills a hung worker at its deadline, even if the
    agent's interpreter is stuck, and never signals anything but a worker. It accepts timers
    only from processes the agent started (its workers and their children).
  * the agent is never killed by its own timer server. (From torch 2.7 on, torch's server
    signals the agent after a reap, so the agent dies before it prints anything.) With
    --max-restarts above 0 a hung worker is reaped and the worker group restarted, as
    torchrun documents; when no restart is left (--max-restarts 0, the default) the agent
    ends the job the way it ends any failed job: its failure summary, exit code 1;
  * the failure summary's Root Cause block says why a reaped worker died: the scope(s) of
    its expired timers, the bound that ran out and, with ELASTIC_TIMER_STACK_DUMP, its
    stacks (written to the worker's TORCHELASTIC_ERROR_FILE before the kill, unless the
    worker recorded an error there itself).

Opt-in diagnostics, set in the environment of this command:
  ELASTIC_TIMER_STACK_DUMP=SECONDS   log a hung worker's Python stacks before it is killed
                                     (waiting at most SECONDS for them), put them in the
                                     failure summary, and write one hang report for the
                                     job: every rank's stacks, grouped, and the suspects
  ELASTIC_TIMER_ESCALATE_AFTER=SECONDS
                                     SIGKILL a worker that outlives its signal that long
  ELASTIC_TIMER_DRY_RUN=1            report expiries, kill nothing
  ELASTIC_TIMER_EVENT_LOG=PATH       every event as one JSON object per line
  ELASTIC_TIMER_ADAPTIVE=1           learn each scope's durations; fire at
                                     min(after, max(floor, factor x the longest block)),
                                     kept across restarts of the worker group
""" + (
    f"""\
  ELASTIC_TIMER_ADAPTIVE_FACTOR=N, ELASTIC_TIMER_ADAPTIVE_FLOOR=SECONDS
                                     that factor (default {_FACTOR}) and floor (default {_FLOOR})
  ELASTIC_TIMER_STATE_FILE=PATH      where the learned durations are kept (default: one file
                                     per run id in the temporary directory)

"""
)


@dataclass(frozen=True)
class Launcher:
    """A launcher whose module has torchrun's ``parse_args(argv)`` and ``main(argv)``."""

    module: str
    distribution: str  # what to pip install when the module is missing


LAUNCHERS = {
    "torchrun": Launcher("torch.distributed.run", "torch"),
    "ft_launcher": Launcher(
        "nvidia_resiliency_ext.fault_tolerance.launcher", "nvidia-resiliency-ext"
    ),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    name, argv = _split_launcher(argv)
    while argv[:1] in (["--adaptive"], ["--watch"]):
        # The agent's server reads them, as any ELASTIC_TIMER_* variable.
        os.environ[env("adaptive") if argv[0] == "--adaptive" else WATCH_ENV] = "1"
        argv = argv[1:]
    launcher = _import_launcher(name)
    if "-h" in argv or "--help" in argv:
        sys.stdout.write(HELP_PREAMBLE)
    # The launcher's own parsing first: --help and bad arguments end here, as with it alone.
    launcher.parse_args(argv)
    _log_like_torch()
    os.environ.setdefault("TORCHELASTIC_ENABLE_FILE_TIMER", "1")
    # Every worker is the agent's child here: nothing else may have a timer reap anything.
    # The agent stays alive after a reap, to restart the group or to report the failure.
    torch_integration.install(signal_self=False, descendants_only=True)
    # The launcher's own entry point, so that its exit codes and error files are unchanged.
    launcher.main(argv)


def _split_launcher(argv: list[str]) -> tuple[str, list[str]]:
    """The leading ``--launcher NAME`` (or ``--launcher=NAME``), and the launcher's arguments.

    Only a leading one counts: anything after the script is the script's."""
    if argv and argv[0] == "--launcher":
        if len(argv) < 2:
            _usage_error("--launcher needs a name")
        name, rest = argv[1], argv[2:]
    elif argv and argv[0].startswith("--launcher="):
        name, rest = argv[0].partition("=")[2], argv[1:]
    else:
        return "torchrun", argv
    if name not in LAUNCHERS:
        _usage_error(f"unknown launcher {name!r} (choose from {', '.join(LAUNCHERS)})")
    return name, rest


def _import_launcher(name: str) -> Any:
    launcher = LAUNCHERS[name]
    try:
        return importlib.import_module(launcher.module)
    except ModuleNotFoundError as error:
        if error.name is None or not f"{launcher.module}.".startswith(f"{error.name}."):
            raise
        _usage_error(
            f"--launcher {name} needs {launcher.distribution} ({error}): "
            f"pip install {launcher.distribution}"
        )


def _usage_error(message: str) -> NoReturn:
    sys.stderr.write(f"elastic-timer-run: {message}\n")
    raise SystemExit(2)


def _log_like_torch() -> None:
    """Show our server's records (reaps above all) beside the agent's, at torch's LOGLEVEL.

    A launcher that set up the root logger (ft_launcher does) shows them in its own format."""
    logger = logging.getLogger("elastic_timer")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(levelname)s] %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("LOGLEVEL", "INFO"))


if __name__ == "__main__":
    main()
