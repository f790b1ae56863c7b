"""2-process DDP (CPU, gloo): recalibration with a different number of batches on each rank, run by tests/test_ddp.py.

Usage: ``python recalibrate_uneven_ddp.py OUT_DIR``. Lightning re-launches this script for rank 1. Each rank writes
``OUT_DIR/rank<r>.json``: per scenario, the running statistics after it, every value each BatchNorm saw during its
recalibration pass (so the test can pool them itself), the error it raised, and how long it took.

- ``callback``: ``BatchNormRecalibration(num_batches=100)`` at the end of a DDP fit whose training loader (no
  ``DistributedSampler``) has 5 batches on rank 0 and 3 on rank 1: each rank uses all of its own batches.
- ``empty``: :func:`recalibrate` with no batches at all on rank 1 (rank 0 has 5); rank 1 still joins the pooling.
- ``lockstep``: a SyncBatchNorm model (a CPU stand-in that, like SyncBatchNorm, runs a collective in every forward)
  with 5 batches on rank 0 and 3 on rank 1: both ranks run 3.
- ``failure``: rank 1's third batch has one sample (BatchNorm raises); rank 0's batches are fine. Both ranks raise
  at once (rank 0 naming rank 1) and leave their models as they were.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn.callbacks.recalibrate import BatchNormRecalibration
from lightning_bn.recalibration import recalibrate

BATCH = 8
BATCHES = {0: 5, 1: 3}  # recalibration batches per rank; num_batches=100 asks for more than either has


def features(rank: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(rank)
    return torch.randn(n, 16, generator=g) * (1 + rank) + 3 * rank  # the ranks' data differ


def loader(rank: int, batches: int, last: int = BATCH) -> DataLoader:
    """``batches`` batches of 8 samples of rank ``rank``'s data, the last of them with ``last`` samples."""
    x = features(rank, BATCH * (batches - 1) + last) if batches else torch.empty(0, 16)
    return DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=BATCH)


def net(norm: type[nn.Module] = nn.BatchNorm1d) -> nn.Sequential:
    torch.manual_seed(0)  # the same weights on both ranks
    return nn.Sequential(nn.Linear(16, 8), norm(8), nn.ReLU(), nn.Linear(8, 8), norm(8), nn.Linear(8, 2))


class CpuSyncBatchNorm(nn.SyncBatchNorm):
    """SyncBatchNorm as it behaves on GPUs, on CPU: in training mode every forward all-reduces the batch statistics
    and normalizes with those of the global batch (torch's own SyncBatchNorm refuses CPU tensors)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        sums = torch.cat([x.sum(0), x.square().sum(0), x.new_tensor([x.shape[0]])]).double()
        dist.all_reduce(sums)
        c = self.num_features
        mean = sums[:c] / sums[-1]
        var = sums[c : 2 * c] / sums[-1] - mean.square()
        return ((x - mean.float()) / (var.float() + self.eps).sqrt()) * self.weight + self.bias


class Recorder:
    """Keeps every value each BatchNorm sees while :meth:`forward` runs (and nothing during training)."""

    def __init__(self, model: nn.Module) -> None:
        self.recording = False
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.hooks = [
            module.register_forward_pre_hook(self._hook(name.removeprefix("net.")))
            for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
        ]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if self.recording:
                self.inputs.setdefault(name, []).append(args[0].detach().clone())

        return hook

    def forward(self, model: nn.Module, batch) -> torch.Tensor:
        self.recording = True
        try:
            return model(batch[0])
        finally:
            self.recording = False

    def values(self) -> dict[str, list[list[float]]]:
        return {name: torch.cat(chunks).tolist() for name, chunks in self.inputs.items()}


def stats(model: nn.Module) -> dict[str, list[list[float]]]:
    return {
        name.removeprefix("net."): [m.running_mean.tolist(), m.running_var.tolist()]
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }


def run(model: nn.Module, batches, num_batches: int = 100) -> dict:
    """One :func:`recalibrate` call: what it did to ``model``, what it raised, what the BatchNorms saw."""
    recorder = Recorder(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start = time.perf_counter()
    error = None
    try:
        recalibrate(model, batches, num_batches, forward=recorder.forward)
    except Exception as err:  # noqa: BLE001 - the test judges it
        error = {"type": type(err).__name__, "message": str(err)}
    after = model.state_dict()
    return {
        "seconds": time.perf_counter() - start,
        "error": error,
        "unchanged": all(torch.equal(before[k], after[k]) for k in before),
        "hooks_left": sum(len(m._forward_pre_hooks) for m in model.modules()) - len(recorder.hooks),
        "stats": stats(model),
        "inputs": recorder.values(),
    }


class Model(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        return loader(self.global_rank, BATCHES[self.global_rank])


class Scenarios(pl.Callback):
    """After the callback's recalibration, plain :func:`recalibrate` calls on fresh models, still under DDP."""

    def __init__(self) -> None:
        self.results: dict[str, dict] = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank = trainer.global_rank
        self.results["empty"] = run(net(), loader(0, 5) if rank == 0 else [])
        self.results["lockstep"] = run(net(CpuSyncBatchNorm), loader(rank, BATCHES[rank]))
        self.results["failure"] = run(net(), loader(rank, 5) if rank == 0 else loader(1, 3, last=1))


def main(out_dir: Path) -> None:
    model = Model()
    recorder = Recorder(model)
    recalibration = BatchNormRecalibration(num_batches=100, forward=recorder.forward)
    scenarios = Scenarios()
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_steps=2,  # both ranks have at least 2 training batches
        use_distributed_sampler=False,  # each rank keeps its own loader: 5 and 3 batches
        callbacks=[recalibration, scenarios],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out_dir,
    )
    trainer.fit(model)
    results = {
        "callback": {
            "stats": stats(model),
            "inputs": recorder.values(),
            "shifts": recalibration.shifts,
            "tracked": int(model.net[1].num_batches_tracked),
        },
        **scenarios.results,
    }
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
