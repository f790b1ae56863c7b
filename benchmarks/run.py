"""The benchmark suite: monitor overhead against a no-callback baseline and against peers, peak memory, prepare() time.

One command, one process, writes ``benchmarks/RESULTS.md``::

    python benchmarks/run.py            # ~10 minutes on 2 cores
    python benchmarks/run.py --quick    # ~2 minutes, a smoke version

Training step time: per model, every configuration is a real ``Trainer.fit`` on CPU with 1 torch thread; only the
callbacks (and, for the wandb rows, the logger) differ. Configurations are interleaved within each repetition (so a
change in the machine's speed hits all of them alike), a run's step time is the frequency-weighted median of
``_timing.step_time``, and the table shows the median over repetitions as a ratio to the baseline of the same
repetition set, with the spread of the ratio. Peak memory: live tensor bytes from the CPU allocator's events
(``torch.profiler`` with ``profile_memory=True``) over a short fit that includes a logging step.
Targets (issue #20): <= 1.02x at ``every_n_steps=50``, <= 1.5x at 1, faster than every peer, memory within 1%.

``--overhead-only --models mlp cnn --threads 2`` measures just the baseline and our monitors (the overhead check);
``benchmarks/before_after.py`` runs that for two checkouts of the package, interleaved, and adds a before/after table.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import gc
import itertools
import json
import logging
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning
import lightning.pytorch as pl
import peers
import torch
from _timing import WARMUP_STEPS, StepTimer, step_time  # the script's directory is on sys.path
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import lightning_bn
from lightning_bn import ActivationMonitor, GradientMonitor, prepare

RESULTS = Path(__file__).with_name("RESULTS.md")
TARGET_50, TARGET_1, TARGET_MEMORY = 1.02, 1.5, 0.01
MEMORY_STEPS = 12


# ---------------------------------------------------------------------------------------------------------- models
class Task(pl.LightningModule):
    """Classification with cross-entropy and SGD; the network is the only thing that changes between models."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class MeanPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def mlp() -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(4):
        layers += [nn.Linear(64 if i == 0 else 512, 512), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(512, 10))


def cnn() -> nn.Module:
    layers: list[nn.Module] = []
    channels = 3
    for width in (16, 32, 64):
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
        channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))


def transformer() -> nn.Module:
    layer = nn.TransformerEncoderLayer(64, 4, dim_feedforward=256, dropout=0.0, activation=nn.GELU(), batch_first=True)
    return nn.Sequential(
        nn.Embedding(512, 64),
        nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False),
        MeanPool(),
        nn.Linear(64, 10),
    )


def digits(n: int) -> TensorDataset:
    """scikit-learn's bundled 8x8 digits, standardized and repeated (shuffled) to ``n`` samples."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    index = torch.randint(0, len(x), (n,), generator=torch.Generator().manual_seed(0))
    return TensorDataset(x[index], torch.tensor(y)[index])


def images(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))


def tokens(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randint(0, 512, (n, 32), generator=g), torch.randint(0, 10, (n,), generator=g))


@dataclass
class Model:
    name: str
    description: str
    build: Callable[[], nn.Module]
    data: Callable[[int], TensorDataset]
    batch_size: int


def resnet_cnn() -> nn.Module:
    """ResNet-18 (the layout of the prepare() timing below) with a 10-class head, for 32x32 images."""
    return resnet18(classes=10)


MODELS = [
    Model("MLP on digits", "64-512x4-10 ReLU MLP, scikit-learn digits, batch 128", mlp, digits, 128),
    Model("small CNN", "3 x (Conv3x3-BN-ReLU-MaxPool) 16/32/64 + linear, 3x32x32 synthetic, batch 32", cnn, images, 32),
    Model(
        "transformer encoder",
        "embedding 512x64 + 2 TransformerEncoderLayer (4 heads, FF 256, GELU) + mean pool + linear, "
        "32 tokens, batch 32",
        transformer,
        tokens,
        32,
    ),
    Model("ResNet-18-sized CNN", "ResNet-18 (11.2M parameters), 3x32x32 synthetic, batch 16", resnet_cnn, images, 16),
]


# --------------------------------------------------------------------------------------------------- configurations
@dataclass
class Config:
    name: str
    every_n: int | None  # logging period, None: nothing periodic
    callbacks: Callable[[], list[Callback]]
    baseline: str  # the configuration this one is compared with
    logger: Callable[[str], Logger] = lambda logdir: TensorBoardLogger(logdir, name="", version=0)
    phase: int | None = 0  # residue of the logging steps; None: detect (tools that count their own calls)
    peer: str | None = None  # peer name when this row is a peer's
    memory: bool = True


def ours(every_n: int) -> Callable[[], list[Callback]]:
    return lambda: [ActivationMonitor(every_n_steps=every_n), GradientMonitor(every_n_steps=every_n)]


BASELINE, WANDB_BASELINE = "baseline (TensorBoardLogger, no callback)", "wandb baseline (WandbLogger, no watch)"


def configurations(status: dict[str, str | None]) -> list[Config]:
    configs = [
        Config(BASELINE, None, list, BASELINE),
        Config("ours, every_n_steps=50", 50, ours(50), BASELINE),
        Config("ours, every_n_steps=10", 10, ours(10), BASELINE, memory=False),
        Config("ours, every_n_steps=1", 1, ours(1), BASELINE),
        Config("hand-written hooks, .item() every step", 1, lambda: [peers.HandWrittenStats()], BASELINE, peer="hooks"),
        Config(
            "Lightning grad_norm + log_dict, every step",
            1,
            lambda: [peers.LightningGradNorm()],
            BASELINE,
            peer="grad_norm",
        ),
    ]
    if status.get("lightning-bolts", "") is None:
        for n in (50, 1):
            configs.append(
                Config(
                    f"bolts ModuleDataMonitor(submodules=True), every {n}",
                    n,
                    lambda n=n: [peers.bolts_monitor(n)],
                    BASELINE,
                    phase=None,
                    peer="lightning-bolts",
                    memory=n == 1,
                )
            )
    if status.get("wandb", "") is None:
        wandb_logger = lambda logdir: peers.wandb_logger()  # noqa: E731
        configs.append(Config(WANDB_BASELINE, None, list, WANDB_BASELINE, logger=wandb_logger))
        for n in (50, 1):
            configs.append(
                Config(
                    f"wandb watch(log='all', log_freq={n})",
                    n,
                    lambda n=n: [peers.WandbWatch(n)],
                    WANDB_BASELINE,
                    logger=wandb_logger,
                    phase=None,
                    peer="wandb",
                    memory=n == 1,
                )
            )
    return configs


def fit(
    model: Model,
    config: Config,
    steps: int,
    timer: StepTimer | None = None,
    task: Task | None = None,
    data: TensorDataset | None = None,
) -> pl.Trainer:
    """One fit of ``steps`` steps; the data covers exactly one epoch, so no epoch-end work falls between steps."""
    torch.manual_seed(0)
    task = task or Task(model.build())
    data = data or model.data(model.batch_size * steps)
    callbacks = config.callbacks() if timer is None else [timer, *config.callbacks(), timer.stop]
    with tempfile.TemporaryDirectory() as logdir:
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=steps,
            logger=config.logger(logdir),
            log_every_n_steps=50,
            callbacks=callbacks,
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(task, DataLoader(data, batch_size=model.batch_size))
    return trainer


def timed_run(model: Model, config: Config, steps: int) -> float:
    timer = StepTimer()
    fit(model, config, WARMUP_STEPS + steps, timer)
    return step_time(timer.times[WARMUP_STEPS:], config.every_n, config.phase)


def peak_memory(model: Model, config: Config) -> int:
    """Peak bytes of live CPU tensors while training: the parameters plus the allocator's peak above the fit start.

    Model and data are built before the window; garbage left by earlier fits is collected first and the collector
    paused, so no free of an older tensor lands inside the window.
    """
    torch.manual_seed(0)
    task, data = Task(model.build()), model.data(model.batch_size * MEMORY_STEPS)
    gc.collect()
    gc.disable()
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            fit(model, config, MEMORY_STEPS, task=task, data=data)
    finally:
        gc.enable()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    peak = max(itertools.accumulate(nbytes for _, nbytes in events), default=0)
    return peak + sum(p.numel() * p.element_size() for p in task.parameters())


def where_time_goes(model: Model, config: Config, steps: int) -> list[tuple[str, float, int]]:
    """cProfile of a fit: the package's (and TensorBoard's) functions by cumulative ms per step."""
    profiler = cProfile.Profile()
    profiler.enable()
    fit(model, config, steps)
    profiler.disable()
    rows = []
    for (path, line, func), (_, calls, _, cumulative, _) in pstats.Stats(profiler).stats.items():
        if "lightning_bn" in path or "tensorboard" in path.lower():
            short = path.split("site-packages/")[-1].split("lightning_bn/")[-1]
            rows.append((f"{short}:{line} {func}", cumulative / steps * 1e3, calls))
    return sorted(rows, key=lambda r: -r[1])[:12]


# --------------------------------------------------------------------------------------------------------- prepare
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + self.down(x))


def resnet18(classes: int = 1000) -> nn.Module:
    """ResNet-18 (He et al. 2016): the torchvision layout, 11.7M parameters, without torchvision."""
    stages, cin = [], 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        stages += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    return nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
        *stages,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(512, classes),
    )


def time_prepare(reps: int) -> dict[str, float]:
    """Median seconds of one forward pass and of ``prepare(init=...)`` on a fresh copy of ResNet-18."""
    base = resnet18()
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {"one forward pass (reference)": [], "auto": [], "lsuv": []}
    with torch.no_grad():
        base(x)
    for _ in range(reps):
        with torch.no_grad():
            start = time.perf_counter()
            base(x)
            times["one forward pass (reference)"].append(time.perf_counter() - start)
        for init in ("auto", "lsuv"):
            net = copy.deepcopy(base)
            start = time.perf_counter()
            prepare(net, x, init=init, seed=0)
            times[init].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------------------------------------------------- report
@dataclass
class ModelResult:
    model: Model
    times: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)
    profile: list[tuple[str, float, int]] = field(default_factory=list)

    def ratios(self, config: Config) -> list[float]:
        """Per repetition: this configuration's step time over its baseline's in the same repetition."""
        return [t / b for t, b in zip(self.times[config.name], self.times[config.baseline])]

    def ratio(self, config: Config) -> float:
        return statistics.median(self.ratios(config))

    def row(self, config: Config) -> str:
        if config.name in self.errors:
            return f"| {config.name} | failed: {self.errors[config.name]} | | |"
        ratios = self.ratios(config)
        median_ms = statistics.median(self.times[config.name]) * 1e3
        return f"| {config.name} | {median_ms:.2f} | {self.ratio(config):.3f}x | {min(ratios):.3f}..{max(ratios):.3f} |"


def machine() -> list[str]:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return [
        f"- CPU: {cpu}, {os.cpu_count()} logical cores; torch threads: {torch.get_num_threads()}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__}, "
        f"{platform.system()} {platform.release()}",
    ]


def yes(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def targets(results: list[ModelResult], configs: dict[str, Config]) -> list[str]:
    lines = [
        f"| model | <= {TARGET_50}x at every_n=50 | <= {TARGET_1}x at every_n=1 | faster than every peer | "
        f"memory within {TARGET_MEMORY:.0%} |"
    ]
    lines.append("| --- | --- | --- | --- | --- |")
    for r in results:
        at50, at1 = r.ratio(configs["ours, every_n_steps=50"]), r.ratio(configs["ours, every_n_steps=1"])
        beaten = []
        for c in configs.values():
            if c.peer and c.name in r.times:
                mine = at50 if c.every_n == 50 else at1
                beaten.append((c.name, mine < r.ratio(c), r.ratio(c), mine))
        peer_text = "; ".join(f"{'yes' if ok else 'NO'} vs {name} ({theirs:.2f}x)" for name, ok, theirs, _ in beaten)
        peer_cell = f"{yes(all(ok for _, ok, _, _ in beaten))}: {peer_text}" if beaten else "not measured"
        names = ("ours, every_n_steps=50", "ours, every_n_steps=1")
        if all(n in r.memory for n in (*names, BASELINE)):
            memory = [r.memory[n] / r.memory[BASELINE] - 1 for n in names]
            memory_cell = f"{yes(max(memory) <= TARGET_MEMORY)} ({memory[0]:+.2%} / {memory[1]:+.2%} at 50 / 1)"
        else:
            memory_cell = "not measured"
        lines.append(
            f"| {r.model.name} | {yes(at50 <= TARGET_50)} ({at50:.3f}x) | {yes(at1 <= TARGET_1)} ({at1:.3f}x) | "
            f"{peer_cell} | {memory_cell} |"
        )
    return lines


def write_results(
    results: list[ModelResult],
    configs: list[Config],
    status: dict[str, str | None],
    prepare_times: dict[str, float],
    args: argparse.Namespace,
    load: tuple[tuple[float, ...], tuple[float, ...]],
    seconds: float,
) -> str:
    by_name = {c.name: c for c in configs}
    out = [
        "# Benchmarks",
        "",
        "Generated by `python benchmarks/run.py" + "".join(f" {a}" for a in args.argv)
        + f"` in {seconds / 60:.1f} min. Do not edit by hand; rerun it.",
        "",
        "## Machine",
        "",
        *machine(),
        f"- load average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in load[0])}, at end "
        f"{'/'.join(f'{x:.2f}' for x in load[1])}: other jobs shared the machine, so single runs are noisy; the "
        "medians and the spread columns say how much.",
        "",
        "## Method",
        "",
        f"- Each row is a real `Trainer.fit` on CPU: {WARMUP_STEPS} warm-up steps, then {args.steps} measured steps, "
        f"{args.reps} repetitions. In each repetition every configuration of a model runs once, in turn "
        "(interleaved), so a change in the machine's speed hits all of them alike.",
        "- A run's step time is the median of its logging steps and the median of its other steps, weighted 1/n and "
        "1 - 1/n (`benchmarks/_timing.py`); a step is timed from before the first callback's `on_train_batch_start` "
        "to after the last one's `on_train_batch_end`, so forward hooks, the optimizer step and logging all count.",
        "- *median step ms* is the median over repetitions; *ratio* is the median over repetitions of the step time "
        "over the baseline's in the same repetition; *spread* is the smallest and largest of those ratios. The order "
        "of the configurations rotates from one repetition to the next.",
        "- Only the callbacks differ from the baseline. Our rows and the hand-written hooks log to a "
        "`TensorBoardLogger` (our monitors with their defaults: activation histograms on, gradient histograms off); "
        "the wandb rows are compared with a `WandbLogger(offline=True)` run without `watch`, so only the watching "
        "differs. `log_every_n_steps=50` for Lightning's own logging everywhere.",
        "- Ours: `ActivationMonitor(every_n_steps=n)` + `GradientMonitor(every_n_steps=n)`. Hand-written: forward "
        "hooks on every Linear/Conv2d/ReLU/GELU calling `output.mean().item()` and `output.std().item()` each step, "
        "logged with `trainer.logger.log_metrics` once per step (`benchmarks/peers.py`).",
        f"- Peak memory: a fit of {MEMORY_STEPS} steps (step 0 logs in every configuration measured) under "
        "`torch.profiler.profile(profile_memory=True)`; the CPU allocator reports every tensor allocation and free, "
        "and the peak of their running sum since the fit started (model and data built before it, Python's garbage "
        "collector paused so no older tensor is freed inside the window), plus the parameters' bytes, is the figure. "
        "`ru_maxrss` was not used: it is monotonic over the process and dominated by imports and allocator caching. "
        "Memory outside torch tensors (NumPy arrays built for histograms, Python objects) is not counted. On CUDA the "
        "same figure is `torch.cuda.max_memory_allocated()` after `torch.cuda.reset_peak_memory_stats()`.",
        "",
        "## Training step time",
        "",
    ]
    for r in results:
        out += [f"### {r.model.name}", "", r.model.description, ""]
        out += ["| configuration | median step ms | ratio | spread |", "| --- | ---: | ---: | --- |"]
        out += [r.row(c) for c in configs if c.name in r.times or c.name in r.errors]
        out.append("")
    out += ["## Targets", "", *targets(results, by_name), ""]
    if args.overhead_only:
        return "\n".join(out)
    missed = [r for r in results if r.profile]
    if missed:
        out += [
            "## Where the time goes at every_n_steps=1",
            "",
            "cProfile of one fit with our monitors at `every_n_steps=1`, for models that miss the 1.25x target: "
            "functions of `lightning_bn` and of TensorBoard's writer by cumulative time per step (nested entries "
            "include each other; cProfile itself slows Python code, so compare rows, not totals).",
            "",
        ]
        for r in missed:
            out += [f"### {r.model.name}", "", "| function | cumulative ms/step | calls |", "| --- | ---: | ---: |"]
            out += [f"| `{name}` | {ms:.3f} | {calls} |" for name, ms, calls in r.profile]
            out.append("")
    out += [
        "## Peak memory",
        "",
        "Peak live tensor bytes during training (see Method). Our extra peak is transient, on logging steps only: "
        "the hooks' statistics (squares, comparisons, histogram bucketing) allocate temporaries the size of the "
        "activation while the forward's activations are alive, and `GradientMonitor` copies the parameters for "
        "`update_ratio`; all of it is freed within the step. The hand-written hooks only reduce (no activation-sized "
        "temporaries) and keep nothing; "
        "wandb builds its histograms in NumPy, which this figure does not count.",
        "",
    ]
    header = "| configuration | " + " | ".join(r.model.name for r in results) + " |"
    out += [header, "| --- |" + " ---: |" * len(results)]
    for c in configs:
        if c.memory and any(c.name in r.memory for r in results):
            cells = []
            for r in results:
                if c.name not in r.memory:
                    cells.append("n/a")
                    continue
                base = r.memory[c.baseline]
                cells.append(f"{r.memory[c.name] / 2**20:.2f} MiB ({r.memory[c.name] / base - 1:+.2%})")
            out.append(f"| {c.name} | " + " | ".join(cells) + " |")
    out += [
        "",
        "## prepare() on ResNet-18",
        "",
        "A ResNet-18 written out in `benchmarks/run.py` (BasicBlock, torchvision's layout, "
        f"{sum(p.numel() for p in resnet18().parameters()) / 1e6:.1f}M parameters), example input 8x3x64x64, "
        f"1 thread, median of {args.prepare_reps}, a fresh copy of the model each time.",
        "",
        "| call | median seconds | in forward passes |",
        "| --- | ---: | ---: |",
    ]
    forward = prepare_times["one forward pass (reference)"]
    for name, seconds_ in prepare_times.items():
        label = name if name.startswith("one") else f'`prepare(net, x, init="{name}")`'
        out.append(f"| {label} | {seconds_:.3f} | {seconds_ / forward:.1f} |")
    out += [
        "",
        "## Peers",
        "",
        "Optional, not dependencies of lightning-bn, never installed by CI; `run.py` skips a peer that does not "
        "import, with the reason. To measure them: `pip install --no-deps wandb` plus wandb's small pure-Python "
        "dependencies (`platformdirs xxhash opentelemetry-api opentelemetry-sdk opentelemetry-exporter-otlp-proto-http`"
        "), checking that `torch` stays at the pinned version.",
        "",
    ]
    for name, why in status.items():
        out.append(f"- **{name}**: " + ("measured." if why is None else f"not measured: {why}"))
    out += [
        "- **lightning-bolts** install notes: `pip install lightning-bolts` resolves to lightning-bolts 0.7.0, which "
        "requires `pytorch-lightning<2.0.0` and `torchvision`: pip would downgrade pytorch-lightning to 1.9.5 and "
        "replace the pinned torch 2.13.0 by 2.14.1 (checked with `pip install --dry-run`). Installed with `--no-deps`, "
        "it fails to import on pytorch-lightning 2.x because `pytorch_lightning.utilities.apply_func` was removed in "
        "2.0; bypassing that, its package `__init__` imports torchvision, and the only torchvision wheels available "
        "(0.28.0, 0.29.x) are CUDA builds that fail against torch 2.13.0+cpu (`RuntimeError: operator torchvision::nms "
        "does not exist`). `ModuleDataMonitor` is also a `pytorch_lightning.Callback` and checks for "
        "`pytorch_lightning` loggers, so it cannot join a `lightning.pytorch` Trainer anyway. Bolts is unmaintained "
        "(last release 2023).",
        "",
        "## GPU",
        "",
        "Not measured by this script (CPU only). `benchmarks/gpu_sync_check.py` counts host syncs with "
        "`torch.cuda.set_sync_debug_mode` and `benchmarks/profile_logging_step.py --accelerator gpu` times each phase "
        "of a logging step; the last GPU figures (an H200, before the fused pass) are in the README's Cost section.",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~2 minute smoke version (fewer reps and steps)")
    parser.add_argument("--reps", type=int, help="repetitions of each configuration (default 5, quick 2)")
    parser.add_argument("--steps", type=int, help="measured steps per run after warm-up (default 100, quick 41)")
    parser.add_argument("--prepare-reps", type=int, help="repetitions of each prepare() timing (default 3, quick 1)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where to write the Markdown report")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--models", nargs="+", help="only models whose name contains one of these (case-insensitive)")
    parser.add_argument(
        "--overhead-only",
        action="store_true",
        help="only the baseline and our monitors (no peers, memory, profiles or prepare timing): the overhead check",
    )
    parser.add_argument("--json", type=Path, help="also write each configuration's step times per repetition here")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.reps = args.reps or (2 if args.quick else 5)
    args.steps = args.steps or (41 if args.quick else 100)
    args.prepare_reps = args.prepare_reps or (1 if args.quick else 3)
    if args.steps + WARMUP_STEPS <= 50:
        parser.error("--steps must reach global step 50 (a logging step at every_n_steps=50): use at least 41")

    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")  # Lightning's "few workers" and wandb's "run already in progress" notes
    load_start = os.getloadavg()
    start = time.perf_counter()

    if args.overhead_only:
        status = {"hand-written hooks": "not run (--overhead-only)"}
    else:
        status = {"hand-written hooks": None, "wandb": peers.wandb_status(), "lightning-bolts": peers.bolts_status()}
    if status.get("wandb", "") is None:
        peers.start_wandb()
    configs = configurations(status)
    if args.overhead_only:
        configs = [c for c in configs if c.peer is None and c.name != "ours, every_n_steps=10"]
    models = [m for m in MODELS if not args.models or any(k.lower() in m.name.lower() for k in args.models)]
    results = [ModelResult(m, {c.name: [] for c in configs}) for m in models]
    for rep in range(args.reps):
        for result in results:
            for config in configs[rep % len(configs) :] + configs[: rep % len(configs)]:
                if config.name in result.errors:
                    continue
                try:
                    result.times[config.name].append(timed_run(result.model, config, args.steps))
                except Exception as err:  # a peer that imports but does not run is reported, not fatal
                    if config.peer is None:
                        raise
                    result.errors[config.name] = f"{type(err).__name__}: {err}"
                    del result.times[config.name]
        print(f"repetition {rep + 1}/{args.reps} done after {time.perf_counter() - start:.0f} s", flush=True)

    for result in [] if args.overhead_only else results:
        for config in configs:
            if config.memory and config.name in result.times:
                result.memory[config.name] = peak_memory(result.model, config)
        every_step = next(c for c in configs if c.name == "ours, every_n_steps=1")
        if result.ratio(every_step) > TARGET_1:
            result.profile = where_time_goes(result.model, every_step, 30 if args.quick else 60)
    print(f"memory and profiles done after {time.perf_counter() - start:.0f} s", flush=True)
    prepare_times = {} if args.overhead_only else time_prepare(args.prepare_reps)

    if status.get("wandb", "") is None:
        import wandb

        wandb.finish()
    report = write_results(
        results, configs, status, prepare_times, args, (load_start, os.getloadavg()), time.perf_counter() - start
    )
    args.output.write_text(report)
    if args.json is not None:
        args.json.write_text(json.dumps({
            "package": lightning_bn.__file__,
            "threads": torch.get_num_threads(),
            "times": {r.model.name: r.times for r in results},
        }))  # fmt: skip
    print(report)
    print(f"\nwritten to {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
