"""An unmodified Lightning script (it never imports elastic_timer): a small regression, DDP
over gloo on CPU, one epoch. The rank named by HANG_RANK sleeps for good in its Dataset at its
HANG_AFTER-th item, after writing the moment it stopped to JOB_LOG."""

from __future__ import annotations

import os
import time

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

HANGS = os.environ.get("HANG_RANK") == os.environ["RANK"]
HANG_AFTER = int(os.environ.get("HANG_AFTER", "120"))


class Slow(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    items = 0

    def __len__(self) -> int:
        return 400

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        Slow.items += 1
        if HANGS and Slow.items == HANG_AFTER:
            with open(os.environ["JOB_LOG"], "a") as log:
                log.write(f"rank {os.environ['RANK']} stopped {time.time()}\n")
            time.sleep(3600)
        time.sleep(0.01)
        return torch.randn(8), torch.randn(1)


class Model(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


if __name__ == "__main__":
    trainer = L.Trainer(
        accelerator="cpu",
        devices=int(os.environ["LOCAL_WORLD_SIZE"]),
        strategy="ddp",
        max_epochs=1,
        enable_progress_bar=False,
        enable_checkpointing=False,
        logger=False,
    )
    trainer.fit(Model(), DataLoader(Slow(), batch_size=4))
    with open(os.environ["JOB_LOG"], "a") as log:
        log.write(f"rank {os.environ['RANK']} done\n")
