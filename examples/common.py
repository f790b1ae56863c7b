"""Shared helpers of the example scripts: data, models, a Lightning classifier, reading the monitors' figures back.

Each example imports this module as ``common`` (it sits next to them), so every script stays about its result:

- :func:`parse_args` gives every example ``--fast`` (a few steps, for the tests), ``--out`` and ``--seed``;
- :func:`digits` loads scikit-learn's bundled 8x8 digits (no download), :func:`mlp` builds a plain MLP;
- :class:`Classifier` wraps any ``nn.Module`` in a LightningModule, :func:`trainer` makes a CPU Trainer that logs
  to TensorBoard under ``<out>/logs/<run>``;
- :func:`read_scalars` / :func:`layer_series` read what ``ActivationMonitor`` / ``GradientMonitor`` logged;
- :func:`save_figure`, :func:`write_summary` and :func:`print_table` write the PNG, the JSON summary the tests
  parse, and the table on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import matplotlib
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

matplotlib.use("Agg")

from matplotlib import pyplot as plt  # noqa: E402  (after choosing the headless backend)

DEFAULT_OUT = Path(__file__).resolve().parent / "out"


def parse_args(doc: str | None, argv: list[str] | None = None) -> argparse.Namespace:
    """``--fast`` (a few steps, for the tests), ``--out DIR`` (PNG, JSON summary, logs) and ``--seed``."""
    parser = argparse.ArgumentParser(
        description=(doc or "").strip().splitlines()[0] if doc else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--fast", action="store_true", help="a few steps only (for the tests)")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"where the PNG and JSON go (default {DEFAULT_OUT})"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def quiet() -> None:
    """One intra-op thread (tiny ops on few cores run faster), and no Lightning banners: only the tables print."""
    import logging
    import warnings

    torch.set_num_threads(1)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")


def digits(scale: str = "standard", seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's bundled digits (1797 8x8 images, no download), split 80 / 20 with a fixed permutation.

    Args:
        scale: ``"standard"``: each pixel to zero mean, unit variance; ``"unit"``: pixels in [0, 1] (as the
            inputs of Glorot & Bengio 2010).
        seed: seed of the split.
    """
    from sklearn.datasets import load_digits

    if scale not in ("standard", "unit"):
        raise ValueError(f"Expected `scale` to be 'standard' or 'unit' but got {scale!r}")
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = x / 16.0 if scale == "unit" else (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(x))
    train, val = perm[:split], perm[split:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


def mlp(
    depth: int,
    width: int,
    act: Callable[[], nn.Module] = nn.ReLU,
    norm: Callable[[int], nn.Module] | None = None,
    in_features: int = 64,
    out_features: int = 10,
) -> nn.Sequential:
    """``depth`` hidden blocks ``Linear -> [norm] -> act`` of ``width`` units, then a logits ``Linear``."""
    layers: list[nn.Module] = []
    features = in_features
    for _ in range(depth):
        layers.append(nn.Linear(features, width, bias=norm is None))
        if norm is not None:
            layers.append(norm(width))
        layers.append(act())
        features = width
    layers.append(nn.Linear(features, out_features))
    return nn.Sequential(*layers)


def init_linear_(net: nn.Module, scheme: str, generator: torch.Generator | None = None) -> nn.Module:
    """Initialize every ``nn.Linear`` of ``net`` in place, biases to zero; returns ``net``.

    Schemes: ``"standard"`` U[-1/sqrt(n_in), 1/sqrt(n_in)] (the pre-2010 heuristic, Glorot & Bengio eq. 1);
    ``"xavier"`` U[±sqrt(6 / (n_in + n_out))] (Glorot & Bengio 2010, normalized init); ``"he"`` N(0, 2 / n_in)
    (He et al. 2015); ``"xavier_normal"`` N(0, 2 / (n_in + n_out)).
    """
    for module in net.modules():
        if not isinstance(module, nn.Linear):
            continue
        n_out, n_in = module.weight.shape
        with torch.no_grad():
            if scheme == "standard":
                bound = 1.0 / math.sqrt(n_in)
                module.weight.uniform_(-bound, bound, generator=generator)
            elif scheme == "xavier":
                bound = math.sqrt(6.0 / (n_in + n_out))
                module.weight.uniform_(-bound, bound, generator=generator)
            elif scheme == "xavier_normal":
                module.weight.normal_(0.0, math.sqrt(2.0 / (n_in + n_out)), generator=generator)
            elif scheme == "he":
                module.weight.normal_(0.0, math.sqrt(2.0 / n_in), generator=generator)
            else:
                raise ValueError(
                    f"Expected `scheme` in ('standard', 'xavier', 'xavier_normal', 'he') but got {scheme!r}"
                )
            if module.bias is not None:
                module.bias.zero_()
    return net


class Classifier(pl.LightningModule):
    """Any ``nn.Module`` classifier as a LightningModule: cross-entropy, ``train_loss`` every step, ``val_acc``.

    Args:
        net: maps a batch of inputs to logits.
        lr: learning rate.
        optimizer: ``"sgd"`` (plain, no momentum) or ``"adam"``.
        example_input: a batch for ``example_input_array`` (needed by ``AutoInit`` and ``BatchNormGuard``).
    """

    def __init__(
        self, net: nn.Module, lr: float = 0.1, optimizer: str = "sgd", example_input: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"Expected `optimizer` to be 'sgd' or 'adam' but got {optimizer!r}")
        self.net = net
        self.lr = lr
        self.optimizer_name = optimizer
        self.example_input_array = example_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loader(data: TensorDataset, batch_size: int, shuffle: bool = True, seed: int = 0) -> DataLoader:
    """A DataLoader whose shuffling has its own seeded generator (same batches whatever ran before)."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=shuffle)


def trainer(out: Path, run: str, max_steps: int, callbacks: Sequence[pl.Callback] = (), **kwargs: Any) -> pl.Trainer:
    """A CPU Trainer logging every 5 steps to TensorBoard in ``<out>/logs/<run>`` (cleared first); kwargs override."""
    import shutil

    logdir = Path(out) / "logs" / run
    shutil.rmtree(logdir, ignore_errors=True)
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        max_epochs=-1,
        logger=TensorBoardLogger(str(logdir), name="", version=""),
        callbacks=list(callbacks),
        log_every_n_steps=5,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def logdir_of(trainer: pl.Trainer) -> Path:
    """The TensorBoard directory of ``trainer``'s logger."""
    return Path(trainer.logger.log_dir)


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``logdir``: tag -> [(step, value)] sorted by step. The
    monitors' per-layer figures (by default one compact record per logging step, not scalars) are read with
    :func:`lightning_bn.report.reading.read_scalars`, as the scalars they stand for."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_bn.report.reading import read_scalars as read_figures

    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted({p.parent for p in Path(logdir).rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "histograms": 1, "images": 1})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
        for tag, values in read_figures(events).items():
            if tag not in acc.Tags()["scalars"]:  # a compact record's cell
                out.setdefault(tag, []).extend(values)
    return {tag: sorted(values) for tag, values in out.items()}


def layer_series(
    scalars: dict[str, list[tuple[int, float]]], statistic: str, layers: Sequence[str] | None = None
) -> dict[str, list[tuple[int, float]]]:
    """The series of one logged statistic per layer, e.g. ``act_mean`` -> {``"net.1"``: [(step, value)]}.

    ``layers`` picks and orders them; by default every layer logged for ``statistic``, in the order of the tags.
    """
    prefix = f"{statistic}/"
    found = {tag[len(prefix) :]: values for tag, values in scalars.items() if tag.startswith(prefix)}
    if layers is None:
        return found
    missing = [name for name in layers if name not in found]
    if missing:
        raise KeyError(f"No `{statistic}` logged for {missing}; logged: {sorted(found)}")
    return {name: found[name] for name in layers}


def module_names(net: nn.Module, kind: type[nn.Module], prefix: str = "net") -> list[str]:
    """Qualified names (as logged for a :class:`Classifier`, i.e. under ``net.``) of the ``kind`` modules of ``net``."""
    return [f"{prefix}.{name}" if prefix else name for name, m in net.named_modules() if isinstance(m, kind)]


def mean_of(values: Sequence[tuple[int, float]] | Sequence[float]) -> float:
    """Mean of the values of a ``[(step, value)]`` series (or of plain numbers)."""
    numbers = [v[1] if isinstance(v, tuple) else v for v in values]
    return sum(numbers) / len(numbers) if numbers else math.nan


def save_figure(fig: plt.Figure, out: Path, name: str) -> Path:
    """Save ``fig`` as ``<out>/<name>.png`` (tight, 120 dpi), close it, return the path."""
    path = Path(out) / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_summary(out: Path, name: str, summary: dict[str, Any]) -> Path:
    """Write the machine-readable summary ``<out>/<name>.json`` that the tests parse."""
    path = Path(out) / f"{name}.json"
    path.write_text(json.dumps(summary, indent=2, sort_keys=True, default=float) + "\n")
    return path


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 4) -> None:
    """Print a plain aligned table; floats with ``digits`` significant digits."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.{digits}g}"
        return str(value)

    text = [[str(h) for h in headers], *[[cell(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in text) for i in range(len(headers))]
    for i, row in enumerate(text):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def subplots(ncols: int, width: float = 4.6, height: float = 3.6) -> tuple[plt.Figure, list[plt.Axes]]:
    """A row of ``ncols`` axes (always a list)."""
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def plot_series(ax: plt.Axes, series: dict[str, list[tuple[int, float]]], **kwargs: Any) -> None:
    """One line per entry of ``series`` (label = key), x = step."""
    for label, values in series.items():
        if values:
            steps, ys = zip(*values)
            ax.plot(steps, ys, label=label, **kwargs)
