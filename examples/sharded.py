"""Sharded training with the monitors: ModelParallelStrategy (FSDP2) on 2 CPU processes logs the same figures as one
process over the same global batch.

An MLP on scikit-learn's digits is built in ``configure_model`` — initialized there with ``lightning_bn.prepare``
(same seed on every rank) before ``fully_shard`` splits each Linear across the two processes — and trained with
``ActivationMonitor``, ``GradientMonitor`` and ``HealthCheck``. The same model is trained once more on one process,
each batch being the two ranks' batches together; the script compares every logged figure of the two runs, plots the
total gradient norm and one layer's activation std of both, and writes ``sharded.png`` and ``sharded.json``::

    python examples/sharded.py [--fast] [--out DIR]
    lightning-bn report DIR/logs/fsdp2
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch
from common import digits, parse_args, plt, quiet, read_scalars, trainer  # the script's directory is on sys.path
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

import lightning_bn
from lightning_bn import ActivationMonitor, GradientMonitor, HealthCheck

BATCH = 64  # global: 32 per rank under FSDP2


class DigitsMLP(LightningModule):
    def __init__(self, sharded: bool, seed: int) -> None:
        super().__init__()
        self.sharded, self.seed = sharded, seed
        self.train_data, _ = digits(seed=seed)
        self.example_input_array = self.train_data.tensors[0][:BATCH]
        self.net: nn.Module | None = None

    def configure_model(self) -> None:
        if self.net is not None:
            return
        net = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 96), nn.GELU(), nn.Linear(96, 10))
        # every rank: the same seed, the same example input -> the same weights, before any sharding
        lightning_bn.prepare(net, self.example_input_array, seed=self.seed)
        if self.sharded:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(net, mesh=mesh)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        # unshuffled; under FSDP2 rank r takes samples r, r + 2, ...: both ranks' batches make the single run's batch
        if self.sharded:
            sampler = DistributedSampler(self.train_data, shuffle=False)
            return DataLoader(self.train_data, batch_size=BATCH // 2, sampler=sampler, drop_last=True)
        return DataLoader(self.train_data, batch_size=BATCH, drop_last=True)


def fit(part: str, out: Path, steps: int, seed: int) -> None:
    """One run: ``single`` (1 process) or ``fsdp2`` (ModelParallelStrategy, 2 processes, gloo)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    quiet()
    sharded = part == "fsdp2"
    every = 5
    monitors = [ActivationMonitor(every_n_steps=every), GradientMonitor(every_n_steps=every, update_ratio="all")]
    t = trainer(
        out,
        part,
        steps,
        [*monitors, HealthCheck(summary=not sharded or part == "fsdp2")],
        devices=2 if sharded else 1,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if sharded else "auto",
        use_distributed_sampler=False,
    )
    t.fit(DigitsMLP(sharded, seed))


def main() -> None:
    args = parse_args(__doc__)
    steps = 20 if args.fast else 150
    for part in ("single", "fsdp2"):
        proc = subprocess.run(
            [sys.executable, __file__, "--part", part, "--out", str(args.out), "--steps", str(steps),
             "--seed", str(args.seed)],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if proc.returncode != 0:
            raise SystemExit(f"the {part} run failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        if part == "fsdp2":
            print(proc.stdout.strip())
    single = read_scalars(args.out / "logs" / "single")
    sharded = read_scalars(args.out / "logs" / "fsdp2")
    # every figure of the global batch; not the training loss GradientMonitor logs for `stalled` (rank zero's own)
    tags = sorted(t for t in single if "/" in t and not t.startswith(("train", "epoch", "lightning_bn/")))
    worst, where = 0.0, ""
    for tag in tags:
        for (step, a), (step_b, b) in zip(single[tag], sharded.get(tag, [])):
            if step != step_b or not (math.isfinite(a) and math.isfinite(b)):
                continue
            rel = abs(a - b) / max(abs(a), 1e-12)
            if rel > worst:
                worst, where = rel, f"{tag} at step {step}"
    missing = [t for t in tags if t not in sharded]
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, tag in zip(axes, ["grad_norm/total", "act_std/net.3"]):
        for name, run, style in (("1 process", single, "-"), ("FSDP2, 2 processes", sharded, "--")):
            steps_, values = zip(*run[tag])
            ax.plot(steps_, values, style, label=name, linewidth=2 if style == "-" else 1.5)
        ax.set_title(tag)
        ax.set_xlabel("step")
        ax.legend()
    figure.suptitle("The monitors' figures under sharding equal one process's (same global batch)")
    figure.tight_layout()
    figure.savefig(args.out / "sharded.png", dpi=120)
    summary = {"figures_compared": len(tags), "missing_in_sharded": missing, "max_relative_difference": worst,
               "where": where, "steps": steps}  # fmt: skip
    (args.out / "sharded.json").write_text(json.dumps(summary, indent=2))
    print(f"{len(tags)} figures compared over {steps} steps; largest relative difference {worst:.2e} ({where})")
    print(f"plot: {args.out / 'sharded.png'}; report: lightning-bn report {args.out / 'logs' / 'fsdp2'}")


if __name__ == "__main__":
    if "--part" in sys.argv:
        import argparse

        parser = argparse.ArgumentParser()
        parser.add_argument("--part", choices=("single", "fsdp2"))
        parser.add_argument("--out", type=Path)
        parser.add_argument("--steps", type=int)
        parser.add_argument("--seed", type=int, default=0)
        a = parser.parse_args()
        fit(a.part, a.out, a.steps, a.seed)
    else:
        main()
