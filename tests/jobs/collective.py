"""A gloo job for the multi-host hang report tests.

Each rank runs STEPS steps of ``all_reduce``, each inside ``expires(after=STEP_TIMEOUT)``. At
step HANG_STEP the rank HANG_RANK (-1: none) calls ``load_batch``, which sleeps, instead of
joining the collective: the others then wait in ``all_reduce`` until their timers fire.

With CONTROL_PLANE_DIR set, each rank serves torch's worker control plane there
(``worker_main()`` at ``TORCH_WORKER_SERVER_SOCKET``, one socket per rank), so that, with
``TORCH_FR_BUFFER_SIZE`` set, its Flight Recorder trace can be asked for.
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
    control_plane = os.environ.get("CONTROL_PLANE_DIR")
    if control_plane:
        from torch.distributed.elastic.control_plane import worker_main

        os.environ["TORCH_WORKER_SERVER_SOCKET"] = f"{control_plane}/rank{os.environ['RANK']}.sock"
        serving = worker_main()
        assert serving is not None  # torch's @record types it as optional
        with serving:
            main()
    else:
        main()
