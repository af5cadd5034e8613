"""``elastic-timer-run``: torchrun, with elastic-timer's native server as the workers' watchdog.

Takes every torchrun argument unchanged. It enables the watchdog
(``TORCHELASTIC_ENABLE_FILE_TIMER=1`` unless already set) and makes the agent use
elastic-timer's ``FileTimerServer``. Workers call ``elastic_timer.configure()`` (no
argument: the FIFO comes from ``TORCHELASTIC_TIMER_FILE``) and wrap risky code in
``elastic_timer.expires(after=...)``.
"""

from __future__ import annotations

import logging
import os
import sys

from . import torch as torch_integration

HELP_PREAMBLE = """\
elastic-timer-run: torchrun with elastic-timer's native watchdog.

Every torchrun argument below works unchanged. On top of torchrun:
  * TORCHELASTIC_ENABLE_FILE_TIMER=1 is set unless you set it yourself, so the agent runs a
    timer server and tells the workers its FIFO in TORCHELASTIC_TIMER_FILE;
  * the timer server is elastic-timer's: it kills a hung worker at its deadline, even if the
    agent's interpreter is stuck, and never signals anything but a worker. It accepts timers
    only from processes the agent started (its workers and their children).
  * --max-restarts above 0: a hung worker is reaped and the worker group restarted, as
    torchrun documents. (From torch 2.7 on, torch's own server also signals the agent after
    a reap, which ends the job instead; elastic-timer-run turns that off.) With
    --max-restarts 0 (the default) the installed torch's behaviour is kept: from torch 2.7
    on the agent is signalled too and the job ends; with torch 2.4 to 2.6 the agent reports
    the failed worker and exits 1.

Opt-in diagnostics, set in the environment of this command:
  ELASTIC_TIMER_STACK_DUMP=SECONDS   log a hung worker's Python stacks before it is killed
                                     (waiting at most SECONDS for them)
  ELASTIC_TIMER_ESCALATE_AFTER=SECONDS
                                     SIGKILL a worker that outlives its signal that long
  ELASTIC_TIMER_DRY_RUN=1            report expiries, kill nothing
  ELASTIC_TIMER_EVENT_LOG=PATH       every event as one JSON object per line

"""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    from torch.distributed import run as torchrun

    if "-h" in argv or "--help" in argv:
        sys.stdout.write(HELP_PREAMBLE)
    args = torchrun.parse_args(argv)  # type: ignore[no-untyped-call]
    _log_like_torch()
    os.environ.setdefault("TORCHELASTIC_ENABLE_FILE_TIMER", "1")
    # Every worker is the agent's child here: nothing else may have a timer reap anything.
    # With restarts, the agent must outlive a reap; without, it does what torch's server does.
    signal_self = None if args.max_restarts == 0 else False
    torch_integration.install(signal_self=signal_self, descendants_only=True)
    torchrun.run(args)  # type: ignore[no-untyped-call]


def _log_like_torch() -> None:
    """Show our server's records (reaps above all) beside the agent's, at torch's LOGLEVEL."""
    logger = logging.getLogger("elastic_timer")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(levelname)s] %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("LOGLEVEL", "INFO"))


if __name__ == "__main__":
    main()
