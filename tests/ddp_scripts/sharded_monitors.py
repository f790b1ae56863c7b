"""Train with ActivationMonitor + GradientMonitor on 1 process (batch 32) or 2 processes under ModelParallelStrategy
(FSDP2 ``fully_shard`` over a data-parallel mesh, batch 16 each, gloo) or DDP, logging every step.

Usage: python sharded_monitors.py OUT_DIR {single,fsdp2,fsdp2_uneven,ddp} [STEPS]. Rank zero writes
OUT_DIR/metrics.csv (CSVLogger).
"""

import sys
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

from lightning_bn import ActivationMonitor, GradientMonitor


def build() -> nn.Sequential:
    torch.manual_seed(0)
    # 31 rows: FSDP2 shards it unevenly (16 + 15)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 31), nn.Tanh(), nn.Linear(31, 4))
    nn.init.constant_(net[0].bias, -1.5)  # some units dead on half a batch but alive on the whole
    return net


class Net(pl.LightningModule):
    def __init__(self, batch_size: int, sharded: bool, uneven: bool = False) -> None:
        super().__init__()
        self.sharded, self.uneven = sharded, uneven
        self.net = build() if not sharded else None
        self.batch_size = batch_size
        g = torch.Generator().manual_seed(1)
        self.data = TensorDataset(torch.randn(128, 8, generator=g), torch.randint(0, 4, (128,), generator=g))

    def configure_model(self) -> None:
        if not self.sharded or self.net is not None:
            return
        from torch.distributed.fsdp import fully_shard

        self.net = build()
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        if self.uneven:  # rank 0: 52 samples, rank 1: 50: the fourth batches hold 4 and 2 samples
            rank = self.trainer.global_rank
            return DataLoader(Subset(self.data, range(0, 52) if rank == 0 else range(52, 102)), batch_size=16)
        # rank r takes samples r, r + 2, ...: the two first batches together are the single run's first batch
        sampler = DistributedSampler(self.data, shuffle=False) if self.trainer.world_size > 1 else None
        return DataLoader(self.data, batch_size=self.batch_size, sampler=sampler)


def main(out_dir: str, mode: str, steps: str = "3") -> None:
    strategy = {
        "single": "auto",
        "ddp": "ddp",
        "fsdp2": ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        "fsdp2_uneven": ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
    }[mode]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1 if mode == "single" else 2,
        strategy=strategy,
        max_steps=int(steps),
        logger=CSVLogger(out_dir, name="", version=""),
        callbacks=[
            ActivationMonitor(every_n_steps=1, histograms=False, heatmap=False),
            GradientMonitor(every_n_steps=1, update_ratio="all"),
        ],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    started = time.perf_counter()
    trainer.fit(
        Net(batch_size=32 if mode == "single" else 16, sharded=mode.startswith("fsdp2"), uneven="uneven" in mode)
    )
    if trainer.is_global_zero:
        print(f"fit seconds: {time.perf_counter() - started:.2f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
