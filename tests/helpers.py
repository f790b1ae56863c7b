"""Tiny LightningModules, the model builders shared by test files, and data for the tests (BoringModel-style)."""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def mlp(
    depth: int, width: int, act: Callable[[], nn.Module] | None = nn.ReLU, in_features: int = 64, out_features: int = 10
) -> nn.Sequential:
    """``depth`` hidden Linear layers of ``width`` units, each followed by ``act()``, then a logits layer."""
    layers: list[nn.Module] = []
    features = in_features
    for _ in range(depth):
        layers.append(nn.Linear(features, width))
        if act is not None:
            layers.append(act())
        features = width
    layers.append(nn.Linear(features, out_features))
    return nn.Sequential(*layers)


def bn_mlp(width: int = 32, momentum: float = 0.1) -> nn.Sequential:
    """64 -> ``width`` Linear, BatchNorm1d, ReLU, then a 10-way logits layer."""
    return nn.Sequential(
        nn.Linear(64, width), nn.BatchNorm1d(width, momentum=momentum), nn.ReLU(), nn.Linear(width, 10)
    )


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: conv-bn-relu-conv-bn, plus identity or 1x1 projection shortcut, then relu."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                stages.append(BasicBlock(cin, width, 2 if i > 0 and j == 0 else 1))
                cin = width
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.avgpool(self.layers(x))
        return self.fc(torch.flatten(x, 1))


def resnet18() -> ResNet:
    """ResNet-18 (11.7 M parameters), as in torchvision."""
    return ResNet()


def tiny_resnet() -> ResNet:
    """Two BasicBlocks (8 and 16 channels; the second with a projection shortcut), 10 classes."""
    return ResNet(widths=(8, 16), blocks=(1, 1), classes=10)


def random_data(n: int = 256, features: int = 64, classes: int = 10, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g))


def digits_data() -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's bundled digits (no download), standardized, split 1437 / 360."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    train, val = perm[:1437], perm[1437:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


class BoringClassifier(pl.LightningModule):
    """Wraps any ``nn.Module`` classifier; logs train loss and val accuracy."""

    def __init__(
        self,
        net: nn.Module,
        lr: float = 0.1,
        batch_size: int = 32,
        data: TensorDataset | None = None,
        val_data: TensorDataset | None = None,
        optimizer: str = "sgd",
    ) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.batch_size = batch_size
        self.data = data if data is not None else random_data()
        self.val_data = val_data if val_data is not None else self.data
        self.optimizer_name = optimizer
        self.example_input_array = self.data.tensors[0][:batch_size]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        acc = (self(x).argmax(-1) == y).float().mean()
        self.log("val_acc", acc)

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_data, batch_size=self.batch_size)


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    """A CPU Trainer with test-friendly defaults; any keyword overrides them."""
    defaults = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_steps=5,
        limit_val_batches=0,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def read_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``logdir``: tag -> [(step, value)], the cells of the monitors'
    compact records (their default with a TensorBoard logger) read as the scalars they stand for."""
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for directory in sorted({p.parent for p in Path(logdir).rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(directory), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
        for tag, series in _compact_cells(directory, acc).items():
            out.setdefault(tag, []).extend(series)
    return out


def event_tags(logdir) -> dict[str, list[str]]:
    """The tags of every kind in the event files under ``logdir``; ``"scalars"`` includes the figures of the monitors'
    compact records (their default with a TensorBoard logger), as the scalar tags they stand for."""
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: dict[str, list[str]] = {}
    for directory in sorted({p.parent for p in Path(logdir).rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(directory), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
        acc.Reload()
        for kind, names in acc.Tags().items():
            if isinstance(names, list):
                tags.setdefault(kind, []).extend(names)
        tags.setdefault("scalars", []).extend(_compact_cells(directory, acc))
    return tags


def _compact_cells(directory, acc) -> dict[str, list[tuple[int, float]]]:
    """The cells of the monitors' compact records in one run directory (their default with a TensorBoard logger), as
    the scalars they stand for: what :func:`lightning_bn.report.reading.read_scalars` reads beyond the real scalars
    ``acc`` (an ``EventAccumulator`` of the directory) holds."""
    from lightning_bn.report.reading import read_scalars as read_figures

    real = set(acc.Tags()["scalars"])
    return {tag: series for tag, series in read_figures(directory).items() if tag not in real}


def run_ddp_script(name: str, *args: str, timeout: int = 600) -> None:
    """Run ``tests/ddp_scripts/<name>`` as its own program: Lightning's ``strategy="ddp"`` re-launches that script
    for rank 1, which is why DDP tests cannot run inside the pytest process itself."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    script = root / "tests" / "ddp_scripts" / name
    proc = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def state_of(checkpoint: dict, callback: str) -> dict:
    """The state a checkpoint holds for the one callback of class ``callback`` (keyed by its ``state_key``)."""
    found = [state for key, state in checkpoint["callbacks"].items() if key.split("{")[0] == callback]
    assert len(found) == 1, list(checkpoint["callbacks"])
    return found[0]
