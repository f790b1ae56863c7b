"""The cost of both monitors logging every step under ModelParallelStrategy (FSDP2) against DDP, same model and data,
2 CPU processes over gloo::

    python benchmarks/sharded_overhead.py            # runs the four fits, writes benchmarks/SHARDED.md

One fit per (strategy, callbacks) as its own program (Lightning relaunches it for rank 1); rank zero times each
training step from ``on_train_batch_start`` to ``on_train_batch_end`` after 5 warm-up steps and prints the median.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

WIDTH, DEPTH, BATCH, STEPS, WARMUP = 512, 6, 64, 30, 5


def build() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    features = 64
    for _ in range(DEPTH):
        layers += [nn.Linear(features, WIDTH), nn.ReLU()]
        features = WIDTH
    return nn.Sequential(*layers, nn.Linear(features, 10))


class Task(pl.LightningModule):
    def __init__(self, sharded: bool) -> None:
        super().__init__()
        self.sharded = sharded
        self.net = None if sharded else build()
        g = torch.Generator().manual_seed(1)
        n = 2 * BATCH * (STEPS + 1)
        self.data = TensorDataset(torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g))

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
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=BATCH, sampler=DistributedSampler(self.data, shuffle=False))


class StepTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._start)


def fit(strategy: str, monitored: bool) -> None:
    from lightning_bn import ActivationMonitor, GradientMonitor

    torch.set_num_threads(1)
    timer = StepTimer()
    # the timer first and last: on_train_batch_start runs before, on_train_batch_end after, the monitors' hooks
    callbacks: list[Callback] = [timer]
    if monitored:
        callbacks += [ActivationMonitor(every_n_steps=1, histograms=False, heatmap=False), GradientMonitor(1)]
    end = _End(timer)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if strategy == "fsdp2" else "ddp",
        max_steps=STEPS,
        logger=pl.loggers.CSVLogger(os.environ.get("SHARDED_BENCH_DIR", "/tmp/sharded_bench"), name=strategy),
        callbacks=[*callbacks, end],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        log_every_n_steps=50,
    )
    trainer.fit(Task(sharded=strategy == "fsdp2"))
    if trainer.is_global_zero:
        print(f"median step ms: {1e3 * statistics.median(end.times[WARMUP:]):.3f}")


class _End(Callback):
    """Stops the clock after every other callback's on_train_batch_end."""

    def __init__(self, timer: StepTimer) -> None:
        self.timer, self.times = timer, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self.timer._start)


def main() -> None:
    rows = []
    started = time.perf_counter()
    for strategy in ("ddp", "fsdp2"):
        figures = {}
        for monitored in (False, True):
            proc = subprocess.run(
                [sys.executable, __file__, "--fit", strategy, str(int(monitored))],
                capture_output=True,
                text=True,
                timeout=300,
            )
            line = [x for x in proc.stdout.splitlines() if x.startswith("median step ms:")]
            if proc.returncode != 0 or not line:
                raise SystemExit(proc.stdout[-2000:] + proc.stderr[-3000:])
            figures[monitored] = float(line[0].split(":")[1])
        rows.append((strategy, figures[False], figures[True], figures[True] / figures[False]))
        print(rows[-1], flush=True)
    load = os.getloadavg()
    text = [
        "# Both monitors every step: ModelParallelStrategy (FSDP2) against DDP",
        "",
        f"Generated by `python benchmarks/sharded_overhead.py` in {time.perf_counter() - started:.0f} s. "
        "Do not edit by hand; rerun it.",
        "",
        f"- {os.cpu_count()} logical cores, torch threads 1 per process, 2 processes (gloo); Python "
        f"{platform.python_version()}, torch {torch.__version__}, lightning {pl.__version__}; load average at the end "
        f"{load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}.",
        f"- Model: {DEPTH} x Linear({WIDTH}) + ReLU MLP, batch {BATCH} per process, SGD; {STEPS} steps, the median "
        f"step after {WARMUP} warm-up steps (on_train_batch_start to after the monitors' on_train_batch_end, rank "
        "zero). FSDP2: `fully_shard` per Linear and on the root over the data-parallel mesh. Monitors: "
        "`ActivationMonitor(every_n_steps=1, histograms=False, heatmap=False)` + `GradientMonitor(every_n_steps=1)`, "
        "CSVLogger.",
        "",
        "| strategy | step ms, no callback | step ms, both monitors every step | ratio |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {s} | {a:.2f} | {b:.2f} | {r:.2f}x |" for s, a, b, r in rows],
        "",
        "Under FSDP2 every rank measures its parameter shards and one extra all-reduce combines them (DDP: rank zero "
        "alone, no collective); the activation rows take two all-reduces under both.",
    ]
    (Path(__file__).parent / "SHARDED.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--fit":
        fit(sys.argv[2], sys.argv[3] == "1")
    else:
        main()
