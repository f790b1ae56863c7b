"""AutoInit on a model built in ``configure_model``: 1 process, 2 processes under ModelParallelStrategy (FSDP2
``fully_shard`` per Linear and on the root over the data-parallel mesh, gloo, CPU) or 2 processes under DDP.

Usage: python autoinit_sharded.py OUT_DIR {single,fsdp2,ddp}. At ``on_train_start`` (after AutoInit, before any step)
every rank writes OUT_DIR/<mode>_rank<r>.pt: ``local`` (this rank's own tensors: its shards under FSDP2, as
``to_local()`` gives them, with their global offsets) and, from rank zero, ``full`` (every parameter gathered with
``full_tensor()``); under FSDP2 also ``norm_error``: what ``prepare(..., norm="batch")`` raised. The single run also
writes OUT_DIR/unprepared.pt (the weights the model is built with).
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn import prepare
from lightning_bn.callbacks.auto_init import AutoInit

SEED = 1234


def build() -> nn.Sequential:
    """GELU and SiLU layers are rescaled from measured stds; 30 and 5 rows shard unevenly over 2 ranks."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 30), nn.Tanh(), nn.Linear(30, 5), nn.SiLU(), nn.Linear(5, 4)
    )


class LazyNet(pl.LightningModule):
    """Its layers exist only after ``configure_model`` (the FSDP2 pattern)."""

    def __init__(self, shard: bool) -> None:
        super().__init__()
        self.shard = shard
        self.net: nn.Module | None = None
        g = torch.Generator().manual_seed(1)
        self.data = TensorDataset(torch.randn(64, 8, generator=g), torch.randint(0, 4, (64,), generator=g))
        self.example_input_array = self.data.tensors[0][:32]  # the same on every rank

    def configure_model(self) -> None:
        if self.net is not None:
            return
        self.net = build()
        if self.shard:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=16)


class DivergeRng(Callback):
    """Give each rank its own global RNG state before AutoInit runs, as unseeded processes would have."""

    def setup(self, trainer, pl_module, stage):
        torch.manual_seed(100 + trainer.global_rank)


class SaveWeights(Callback):
    def __init__(self, out_dir: str, mode: str) -> None:
        self.out_dir, self.mode = Path(out_dir), mode

    def on_train_start(self, trainer, pl_module):
        local, offsets, full = {}, {}, {}
        for name, param in pl_module.named_parameters():
            if hasattr(param, "to_local"):
                from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

                _, offsets[name] = compute_local_shape_and_global_offset(
                    param.shape, param.device_mesh, param.placements
                )
                local[name] = param.to_local().detach().clone()
                full[name] = param.full_tensor().detach().clone()  # a collective: every rank gathers
            else:
                local[name] = full[name] = param.detach().clone()
        saved = {"local": local, "offsets": offsets, "full": full if trainer.is_global_zero else None}
        if self.mode == "fsdp2":
            try:  # raises on every rank before any collective
                prepare(pl_module, pl_module.example_input_array, norm="batch", seed=SEED)
            except ValueError as err:
                saved["norm_error"] = str(err)
        torch.save(saved, self.out_dir / f"{self.mode}_rank{trainer.global_rank}.pt")


def main(out_dir: str, mode: str) -> None:
    strategy = {
        "single": "auto",
        "ddp": "ddp",
        "fsdp2": ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
    }[mode]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1 if mode == "single" else 2,
        strategy=strategy,
        max_steps=1,
        logger=False,
        callbacks=[DivergeRng(), AutoInit(seed=SEED), SaveWeights(out_dir, mode)],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    if mode == "single":
        torch.save({f"net.{k}": v for k, v in build().state_dict().items()}, Path(out_dir, "unprepared.pt"))
    trainer.fit(LazyNet(shard=mode == "fsdp2"))


if __name__ == "__main__":
    main(*sys.argv[1:])
