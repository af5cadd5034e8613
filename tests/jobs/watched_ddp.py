"""An unmodified DDP training script (it never imports elastic_timer), for ``--watch``.

Gloo, a tiny model. Its rhythm is a real job's: the first step takes FIRST_STEP_SECONDS (a
compile); each batch takes 40-80 ms in the Dataset; every EVAL_EVERY steps an evaluation of
EVAL_FORWARDS forwards under ``torch.no_grad()``, EVAL_FORWARD_SECONDS each; every CKPT_EVERY
steps rank 0 calls ``torch.save`` and then spends CKPT_SECONDS more in its own code while the
others wait in ``dist.barrier()``.

On the attempts (``TORCHELASTIC_RESTART_COUNT``) listed in HANG_ATTEMPTS, rank HANG_RANK
sleeps for good inside ``Dataset.__getitem__`` at step HANG_STEP, after writing the moment it
stopped to JOB_LOG. Each rank that finishes writes ``rank R attempt A done S`` there.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import PrefixStore, TCPStore  # type: ignore[attr-defined]
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

STEPS = int(os.environ.get("STEPS", "130"))
FIRST_STEP_SECONDS = float(os.environ.get("FIRST_STEP_SECONDS", "6"))
EVAL_EVERY = int(os.environ.get("EVAL_EVERY", "25"))
EVAL_FORWARDS = int(os.environ.get("EVAL_FORWARDS", "40"))
EVAL_FORWARD_SECONDS = float(os.environ.get("EVAL_FORWARD_SECONDS", "0.2"))
CKPT_EVERY = int(os.environ.get("CKPT_EVERY", "50"))
CKPT_SECONDS = float(os.environ.get("CKPT_SECONDS", "8"))
HANG_STEP = int(os.environ.get("HANG_STEP", "110"))
RANK = int(os.environ["RANK"])
ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
HANGS = RANK == int(os.environ.get("HANG_RANK", "-1")) and str(ATTEMPT) in os.environ.get(
    "HANG_ATTEMPTS", ""
).split(",")


def log(line: str) -> None:
    with open(os.environ["JOB_LOG"], "a") as f:
        f.write(line + "\n")


class Batches(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """One batch per index, read slowly (a network filesystem)."""

    def __len__(self) -> int:
        return STEPS

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if HANGS and index == HANG_STEP - 1:  # the batch of step HANG_STEP
            log(f"rank {RANK} attempt {ATTEMPT} stopped {time.time()}")
            time.sleep(3600)
        time.sleep(random.uniform(0.04, 0.08))
        return torch.randn(16, 32), torch.randn(16, 1)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
        self.compiled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.compiled:
            time.sleep(FIRST_STEP_SECONDS)  # the first step's compile
            self.compiled = True
        if not self.training:
            time.sleep(EVAL_FORWARD_SECONDS)  # a big evaluation model
        out: torch.Tensor = self.body(x)
        return out


def evaluate(model: nn.Module) -> None:
    model.eval()
    with torch.no_grad():
        for _ in range(EVAL_FORWARDS):
            model(torch.randn(16, 32))
    model.train()


def checkpoint(model: nn.Module, step: int) -> None:
    if RANK == 0:
        path = os.path.join(tempfile.gettempdir(), f"watched-ddp-{os.getpid()}.pt")
        torch.save(model.state_dict(), path)
        os.unlink(path)
        time.sleep(CKPT_SECONDS)  # uploading it, in the script's own code
    dist.barrier()


def init_process_group() -> None:
    """gloo; over torchrun's agent store, with a prefix per attempt. torch 2.15 gives the
    workers of every attempt the agent's one store without a prefix, so a restarted worker
    reads the addresses of the last attempt's and gloo fails to connect (with plain torchrun
    too)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":  # ft_launcher
        dist.init_process_group("gloo")
        return
    rank, world_size = RANK, int(os.environ["WORLD_SIZE"])
    agent_store = TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False
    )
    store = PrefixStore(f"attempt_{ATTEMPT}", agent_store)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)


def main() -> None:
    init_process_group()
    model = DistributedDataParallel(Model())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.MSELoss()
    step = 0
    for step, (x, y) in enumerate(DataLoader(Batches(), batch_size=None), 1):
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        if step % EVAL_EVERY == 0:
            evaluate(model)
        if step % CKPT_EVERY == 0:
            checkpoint(model, step)
    # As torch's DDP tutorial ends: no rank tears its gloo pairs down while a peer may still
    # be finishing the last allreduce on them.
    dist.barrier()
    dist.destroy_process_group()
    log(f"rank {RANK} attempt {ATTEMPT} done {step}")


if __name__ == "__main__":
    main()
    # Done: skip the interpreter's teardown, as many training scripts do. CI once saw a rank
    # that had finished its last collective abort at its very end (std::terminate in torch's
    # C++, SIGABRT; torch's gloo is known to, when a worker thread lets go of a collective's
    # tensors while the interpreter exits). Not reproduced here; the watch runs no C++ and
    # starts no thread in a worker.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
