"""A tiny training job for the torchrun end-to-end tests.

Each worker runs STEPS steps (3 by default) inside ``expires(after=STEP_TIMEOUT)``. The rank
named by HANG_RANK hangs on the attempts listed in HANG_ATTEMPTS (torchrun's
TORCHELASTIC_RESTART_COUNT), in its second step, or in the step HANG_STEPS names for that
attempt (a comma-separated list, one step per attempt); every other step takes STEP_SECONDS
(50 ms by default). Each
worker appends a line to $JOB_LOG when it finishes, so the test can see which attempt
completed.

With HANG_SIGNAL=TERM the workers' timers reap with SIGTERM, which a worker turns into an
exception; with RECORD=1 the entry point is decorated with torch's ``@record``, which writes
an uncaught exception to the worker's TORCHELASTIC_ERROR_FILE.
"""

from __future__ import annotations

import os
import signal
import time
from types import FrameType

import elastic_timer as timer

STEP_TIMEOUT = float(os.environ.get("STEP_TIMEOUT", "1"))
STEP_SECONDS = float(os.environ.get("STEP_SECONDS", "0.05"))
STEPS = int(os.environ.get("STEPS", "3"))


def main() -> None:
    rank = int(os.environ["RANK"])
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    hang_rank = int(os.environ.get("HANG_RANK", "-1"))
    hang_attempts = {int(a) for a in os.environ.get("HANG_ATTEMPTS", "").split(",") if a}
    hang_steps = [int(s) for s in os.environ.get("HANG_STEPS", "").split(",") if s]
    hang_step = hang_steps[attempt] if attempt < len(hang_steps) else 1
    if os.environ.get("HANG_SIGNAL") == "TERM":
        signal.signal(signal.SIGTERM, told_to_stop)
        fifo = os.environ["TORCHELASTIC_TIMER_FILE"]
        timer.configure(timer.FileTimerClient(fifo, signal=signal.SIGTERM))
    else:
        timer.configure()
    for step in range(STEPS):
        with timer.expires(after=STEP_TIMEOUT):
            if rank == hang_rank and attempt in hang_attempts and step == hang_step:
                time.sleep(3600)
            time.sleep(STEP_SECONDS)
    with open(os.environ["JOB_LOG"], "a") as log:
        log.write(f"rank {rank} attempt {attempt} pid {os.getpid()} done\n")


def told_to_stop(signum: int, frame: FrameType | None) -> None:
    raise RuntimeError(f"rank {os.environ['RANK']} was told to stop (signal {signum})")


if __name__ == "__main__":
    if os.environ.get("RECORD") == "1":
        from torch.distributed.elastic.multiprocessing.errors import record

        record(main)()
    else:
        main()
