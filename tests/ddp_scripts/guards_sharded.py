"""2 processes (CPU, gloo) under ModelParallelStrategy: BatchNormGuard and BatchNormRecalibration on a BatchNorm MLP
built in ``configure_model``, run by tests/test_sharded_guards.py.

Usage: ``python guards_sharded.py OUT_DIR``. Lightning re-launches this script for rank 1; every scenario runs in the
same two processes, one Trainer each. Each rank writes ``OUT_DIR/rank<r>.json``; rank 0 also writes what the test
needs to redo each recalibration in one process (``OUT_DIR/<scenario>.pt``: the whole trained weights and every
rank's batches, in rank order).

- ``guard_bad``: FSDP2 (``fully_shard`` per Linear and on the root, data-parallel mesh of 2); a hidden Linear drawn
  N(0, 10²), 4 samples per device, ``validation_step`` puts the model back in training mode. Expected warnings:
  init mismatch (with the ratio of the whole weight, as one process computes it), tiny batch (hint fit for
  ModelParallelStrategy), ``Trainer(sync_batchnorm=True)`` ignored by ModelParallelStrategy, training mode during
  validation, running statistics leaked.
- ``guard_uncalibrated``: ``Trainer.validate`` of a fresh FSDP2 model: uncalibrated running statistics.
- ``guard_good``: FSDP2, a sound init, 16 samples per device, a proper ``validation_step``: no warning at all.
- ``recal_fsdp2``: FSDP2 training, then ``BatchNormRecalibration(num_batches=4)`` at fit end (8 batches per rank in
  the loader, 4 used per rank).
- ``uneven_fsdp2``: :func:`recalibrate` on that sharded model with 5 batches on rank 0 and 3 on rank 1 (every
  forward all-gathers the weights: both ranks must run 3).
- ``recal_tp``: tensor parallelism (``data_parallel_size=1, tensor_parallel_size=2``; both ranks see the same
  batches), the guard and ``BatchNormRecalibration(num_batches=4)``: pooled over the data-parallel group only.
- ``refuse_tp_bn``: the same with the first BatchNorm distributed too (``distribute_module``: DTensor running
  statistics): ``BatchNormRecalibration`` refuses at fit start, naming the strategy.
- ``fsdp1``: plain FSDP1 (``FullyShardedDataParallel``, CPU; Lightning's FSDPStrategy needs a GPU) around the same
  MLP: the init check on the wrapper, and :func:`recalibrate` with uneven batches through the wrapper's forward, as
  ``BatchNormRecalibration`` does under FSDPStrategy.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_bn import guards
from lightning_bn.callbacks.norm_guard import BatchNormGuard
from lightning_bn.callbacks.recalibrate import BatchNormRecalibration, _through
from lightning_bn.recalibration import default_forward, recalibrate

FEATURES, SAMPLES = 8, 128
TIMEOUT = timedelta(seconds=60)  # a mismatched collective fails here instead of hanging the test


def build(bad_init: bool = False) -> nn.Sequential:
    torch.manual_seed(0)  # the same weights on every rank
    net = nn.Sequential(
        nn.Linear(FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, 4),
    )  # fmt: skip
    if bad_init:
        nn.init.normal_(net[3].weight, std=10.0)
    return net


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, FEATURES, generator=g) * 2 + 1
    x[1::2] += 3  # rank 1 (odd samples) sees other statistics than rank 0
    return TensorDataset(x, torch.randint(0, 4, (SAMPLES,), generator=g))


class Net(pl.LightningModule):
    def __init__(self, mode: str = "fsdp2", batch_size: int = 16, bad_init: bool = False, train_in_val: bool = False):
        super().__init__()
        self.mode, self.batch_size, self.bad_init, self.train_in_val = mode, batch_size, bad_init, train_in_val
        self.net: nn.Module | None = None
        self.data = dataset()
        self.example_input_array = self.data.tensors[0][:16]

    def configure_model(self) -> None:
        if self.net is not None:
            return
        self.net = build(self.bad_init)
        if self.mode == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)
        else:  # tensor parallel ("tp", "tp_bn"): the BatchNorms see whole (replicated) activations
            from torch.distributed.tensor import Replicate
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            plan = {
                "0": ColwiseParallel(output_layouts=Replicate()),
                "3": RowwiseParallel(input_layouts=Replicate()),
                "6": ColwiseParallel(output_layouts=Replicate()),
            }
            parallelize_module(self.net, self.device_mesh["tensor_parallel"], plan)
            if self.mode == "tp_bn":  # the BatchNorm itself distributed: its buffers become DTensors
                from torch.distributed.tensor import distribute_module

                distribute_module(self.net[1], self.device_mesh["tensor_parallel"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        if self.train_in_val:
            self.train()  # the classic bug: BatchNorm normalizes with this batch and updates its running stats
        self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def _loader(self) -> DataLoader:
        mesh = self.device_mesh["data_parallel"]
        sampler = DistributedSampler(self.data, mesh.size(), mesh.get_local_rank(), shuffle=False)
        return DataLoader(self.data, batch_size=self.batch_size, sampler=sampler)

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()


def trainer(dp: int = 2, tp: int = 1, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=dp, tensor_parallel_size=tp, timeout=TIMEOUT),
        max_steps=2,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def caught_messages(run) -> list[str]:
    """Run ``run()``; the BatchNormWarnings it raised on this rank (``rank_zero_warn``: rank 0 only)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [str(w.message) for w in caught if issubclass(w.category, guards.BatchNormWarning)]


def stats(model: nn.Module) -> dict[str, list[list[float]]]:
    return {
        guards.clean_name(name): [m.running_mean.tolist(), m.running_var.tolist()]
        for name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm1d)
    }


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state of ``model`` (every rank calls it: DTensors are gathered)."""
    from torch.distributed.tensor import DTensor

    return {
        guards.clean_name(k): (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in model.state_dict().items()
    }


def gather_batches(mine: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every rank's batches, in rank order (the order a single process recalibrates over them)."""
    everyone: list[list[torch.Tensor] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    return [b for batches in everyone for b in batches]


def uneven(rank: int, batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(8 * batches, FEATURES, generator=g) * (1 + rank) + 2 * rank
    return [(x[i : i + 8], torch.zeros(8, dtype=torch.long)) for i in range(0, len(x), 8)]


def main(out_dir: Path) -> None:
    results: dict[str, dict] = {}
    saved: dict[str, dict] = {}

    # ---- the guard under FSDP2 ----------------------------------------------------------------------------------
    bad = Net(batch_size=4, bad_init=True, train_in_val=True)
    t = trainer(callbacks=[BatchNormGuard()], val_check_interval=2, sync_batchnorm=True)  # ignored by the strategy
    results["guard_bad"] = {"warnings": caught_messages(lambda: t.fit(bad))}
    rank = t.global_rank
    if rank == 0:  # the init check in one process, on the same unsharded model
        plain = Holder(build(bad_init=True))
        results["guard_bad"]["reference_init"] = guards.init_messages(
            guards.init_mismatches(plain, bad.example_input_array)
        )

    fresh = Net()
    t = trainer(callbacks=[BatchNormGuard(check_init=False)])
    results["guard_uncalibrated"] = {"warnings": caught_messages(lambda: t.validate(fresh, verbose=False))}

    good = Net(batch_size=16)
    t = trainer(callbacks=[BatchNormGuard()], val_check_interval=2)
    results["guard_good"] = {"warnings": caught_messages(lambda: t.fit(good))}

    # ---- recalibration under FSDP2 ------------------------------------------------------------------------------
    model = Net(batch_size=8)
    recalibration = BatchNormRecalibration(num_batches=4)
    t = trainer(callbacks=[recalibration])
    t.fit(model)
    mine = [b[0] for b, _ in zip(model.train_dataloader(), range(4))]
    weights = full_weights(model)
    results["recal_fsdp2"] = {"stats": stats(model), "shifts": recalibration.shifts}
    saved["recal_fsdp2"] = {"weights": weights, "batches": gather_batches(mine)}

    batches = uneven(rank, 5 if rank == 0 else 3)
    start = time.perf_counter()
    shifts = recalibrate(model, batches, num_batches=100)
    results["uneven_fsdp2"] = {"stats": stats(model), "shifts": shifts, "seconds": time.perf_counter() - start}
    saved["uneven_fsdp2"] = {"weights": weights, "batches": gather_batches([x for x, _ in batches[:3]])}

    # ---- tensor parallelism -------------------------------------------------------------------------------------
    model = Net(mode="tp", batch_size=8)
    recalibration = BatchNormRecalibration(num_batches=4)
    t = trainer(dp=1, tp=2, callbacks=[BatchNormGuard(), recalibration])
    warned = caught_messages(lambda: t.fit(model))
    mine = [b[0] for b, _ in zip(model.train_dataloader(), range(4))]
    results["recal_tp"] = {"stats": stats(model), "shifts": recalibration.shifts, "warnings": warned}
    saved["recal_tp"] = {"weights": full_weights(model), "batches": mine}  # both ranks' batches are these

    model = Net(mode="tp_bn", batch_size=8)
    t = trainer(dp=1, tp=2, callbacks=[BatchNormRecalibration(num_batches=4)])
    try:
        t.fit(model)
        results["refuse_tp_bn"] = {"error": None}
    except MisconfigurationException as err:
        results["refuse_tp_bn"] = {"error": str(err), "trained": t.global_step}

    # ---- FSDP1, without Lightning (its FSDPStrategy refuses CPUs) -----------------------------------------------
    results["fsdp1"] = fsdp1(rank, saved)

    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))
    if rank == 0:
        for name, content in saved.items():
            torch.save(content, out_dir / f"{name}.pt")


class Holder(nn.Module):
    """Stands for a LightningModule that FSDPStrategy wrapped whole."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def fsdp1(rank: int, saved: dict[str, dict]) -> dict:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    cpu = torch.device("cpu")
    holder = Holder(build(bad_init=True))
    holder.net[3] = FSDP(holder.net[3], device_id=cpu)  # a nested unit, as an auto-wrap policy makes
    wrapper = FSDP(holder, device_id=cpu)
    example = dataset().tensors[0][:16]
    findings = guards.init_mismatches(wrapper, example)
    reference = guards.init_mismatches(Holder(build(bad_init=True)), example) if rank == 0 else []
    batches = uneven(rank, 5 if rank == 0 else 3)
    forward = _through(wrapper, holder, lambda module, batch: module(batch[0]))
    shifts = recalibrate(wrapper, batches, num_batches=100, forward=forward)
    result = {"stats": stats(holder), "shifts": shifts}
    # the weights never change here: the test rebuilds them with build(bad_init=True)
    saved["fsdp1"] = {"batches": gather_batches([x for x, _ in batches[:3]])}
    # and with the default forward, straight through the wrapper
    default = recalibrate(wrapper, batches, num_batches=2, forward=default_forward)
    return {
        **result,
        "findings": [[f.name, f.problem, f.value] for f in findings],
        "reference": [[f.name, f.problem, f.value] for f in reference],
        "default_shifts": default,
    }


if __name__ == "__main__":
    main(Path(sys.argv[1]))
