"""A gloo job for the multi-host hang report tests.

Each rank runs STEPS steps of ``all_reduce``, each inside ``expires(after=STEP_TIMEOUT)``. At
step HANG_STEP the rank HANG_RANK (-1: none) calls ``load_batch``, which sleeps, instead of
joining the collective: the others then wait in ``all_reduce`` until their timers fire.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

import elastic_timer as timer

STEPS = int(os.environ.get("STEPS", "4"))
STEP_TIMEOUT = float(os.environ.get("STEP_TIMEOUT", "3"))
HANG_STEP = int(os.environ.get("HANG_STEP", "2"))


def load_batch() -> None:
    time.sleep(3600)  # a data loader that never returns


def main() -> None:
    rank = int(os.environ["RANK"])
    hang_rank = int(os.environ.get("HANG_RANK", "-1"))
    dist.init_process_group("gloo")
    timer.configure()
    tensor = torch.ones(4)
    for step in range(STEPS):
        with timer.expires(after=STEP_TIMEOUT):
            if rank == hang_rank and step == HANG_STEP:
                load_batch()
            dist.all_reduce(tensor)
    dist.destroy_process_group()
    with open(os.environ["JOB_LOG"], "a") as log:
        log.write(f"rank {rank} done\n")


if __name__ == "__main__":
    main()
