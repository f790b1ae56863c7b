"""BatchNorm vs GroupNorm vs LayerNorm in the convolutions, at batch 32 and at batch 2 (Wu & He 2018).

Wu & He (ECCV 2018, "Group Normalization"): BatchNorm normalizes with the mean and variance of the mini-batch, so its
error rises quickly as the per-device batch shrinks (in their ImageNet ResNet-50 study, ~10 points worse than
GroupNorm at 2 images per GPU), while GroupNorm and LayerNorm compute their statistics per sample and do not depend
on the batch size at all. In a convolution a BatchNorm pools each channel over the batch *and* the positions, but the
positions of one image are strongly correlated, so at batch 2 its statistics still rest on essentially 2 samples.

Only the normalization of the convolutions differs between the arms. The network is 4 convolutions (3x3, 16-32-64-64
channels, the last three with stride 2: 32x32 -> 4x4), each followed by its norm and a ReLU, then the 4x4x64 features
flattened into one logits Linear — no norm, and no hidden Linear, after the convolutions in any arm.
``lightning_bn.prepare(net, example, norm="batch")`` inserts a BatchNorm2d after every convolution (the logits layer
never gets one), and copies of that network (same weights) are converted with ``lightning_bn.convert_norms`` to
GroupNorm (4 groups) and to the library's channel LayerNorm (``LayerNorm(C)`` at each position, as in ConvNeXt — not
Wu & He's LayerNorm over C, H, W, which is GroupNorm with 1 group).

The data are scikit-learn's bundled digits (no download): each 8x8 image upsampled to 32x32 (bilinear), shifted by a
random -3..3 pixels in each direction (zero fill; one fixed draw per image, train and validation alike), and
standardized. Each network is trained with a Lightning ``Trainer`` at batch 2 and at batch 32 for the same number of
epochs (so the same number of samples seen), SGD with momentum 0.9 and the learning rate scaled linearly with the
batch (He et al.'s CIFAR recipe, 0.1 at batch 128: 0.025 at batch 32, 0.0016 at batch 2; Goyal et al. 2017), with
``BatchNormGuard`` among the callbacks; this is repeated for 3 seeds (weights and shuffling). The
validation accuracy is measured in eval mode; for BatchNorm also with the whole validation set's own batch statistics
(a train-mode pass on a copy), to show whether better running statistics alone would help. It prints the guard's
small-batch warning and a table (mean, min–max over the seeds), plots grouped bars and writes ``small_batch.{png,json}``
to ``--out``.

What it finds (README, "The evidence"): at this scale the gap does not appear — BatchNorm2d at batch 2 is as accurate
as at batch 32 and as GroupNorm / LayerNorm. (An earlier version of this script had a BatchNorm1d after a hidden
Linear in every arm, 2 values per feature at batch 2, so it did not isolate the convolutions' norm.)

Run::

    python examples/small_batch.py          # 3 seeds, 6 epochs per run
    python examples/small_batch.py --fast   # 1 seed, 2 epochs (for the tests)
"""

from __future__ import annotations

import copy
import time
import warnings

import common
import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import lightning_bn
from lightning_bn import BatchNormGuard, BatchNormWarning

NAME = "small_batch"
BATCHES = (2, 32)
NORMS = ("batch", "group", "layer")
LABELS = {"batch": "BatchNorm2d", "group": "GroupNorm(4)", "layer": "LayerNorm(C)"}
LR_AT_32, MOMENTUM, GROUPS = 0.025, 0.9, 4
SIZE, SHIFT = 32, 3


def images(data: TensorDataset, seed: int) -> TensorDataset:
    """The 8x8 digits (pixels in [0, 1]) as 1x32x32 images, upsampled bilinearly and shifted by -SHIFT..SHIFT pixels."""
    x = F.interpolate(data.tensors[0].view(-1, 1, 8, 8), size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    padded = F.pad(x, (SHIFT, SHIFT, SHIFT, SHIFT))
    offsets = torch.randint(0, 2 * SHIFT + 1, (len(x), 2), generator=torch.Generator().manual_seed(seed))
    shifted = torch.stack([p[:, i : i + SIZE, j : j + SIZE] for p, (i, j) in zip(padded, offsets.tolist())])
    return TensorDataset(shifted, data.tensors[1])


def cnn() -> nn.Sequential:
    """32x32 -> conv 16 -> conv 32 (16x16) -> conv 64 (8x8) -> conv 64 (4x4), ReLU after each; flatten, logits."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 10),
    )


class Classifier(common.Classifier):
    """``common.Classifier`` with SGD momentum (He et al.'s CIFAR recipe: momentum 0.9, lr 0.1 at batch 128)."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=MOMENTUM)


def accuracy(net: nn.Module, data: TensorDataset, train_mode: bool = False) -> float:
    """Accuracy on all of ``data`` in one batch; ``train_mode`` normalizes a BatchNorm with that batch's statistics."""
    net.train(train_mode)
    with torch.no_grad():
        return (net(data.tensors[0]).argmax(-1) == data.tensors[1]).float().mean().item()


def build(seed: int, example: torch.Tensor) -> dict[str, nn.Module]:
    """The BatchNorm CNN from ``prepare`` and its GroupNorm / LayerNorm conversions (same weights)."""
    torch.manual_seed(seed)
    base = cnn()
    lightning_bn.prepare(base, example, init="auto", norm="batch", seed=seed)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in base.modules()), "no norm after the Linear"
    models = {"batch": base}
    models["group"] = copy.deepcopy(base)
    lightning_bn.convert_norms(models["group"], "group", num_groups=GROUPS)
    models["layer"] = copy.deepcopy(base)
    lightning_bn.convert_norms(models["layer"], "layer")
    return models


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def plot(results: dict[str, dict[str, dict]], epochs: int, num_seeds: int, args) -> None:
    """Grouped bars (mean over the seeds, whiskers min-max, one dot per seed), batch 2 beside batch 32 per norm."""
    fig, (ax,) = common.subplots(1, width=6.4, height=4.2)
    width = 0.8 / len(BATCHES)
    lowest = 1.0
    for i, batch in enumerate(BATCHES):
        xs = [j + (i - (len(BATCHES) - 1) / 2) * width for j in range(len(NORMS))]
        acc = [results[norm][str(batch)]["accuracy"] for norm in NORMS]
        means = [a["mean"] for a in acc]
        errors = [[a["mean"] - a["min"] for a in acc], [a["max"] - a["mean"] for a in acc]]
        ax.bar(xs, means, width, yerr=errors, capsize=3, label=f"batch {batch}")
        for x, a in zip(xs, acc):
            ax.annotate(
                f"{a['mean']:.3f}", (x, a["max"]), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=8
            )
        for x, norm in zip(xs, NORMS):
            points = [r["accuracy"] for r in results[norm][str(batch)]["runs"]]
            ax.plot([x] * len(points), points, "k.", markersize=4)
        lowest = min(lowest, *(a["min"] for a in acc))
    ax.set_xticks(range(len(NORMS)), [LABELS[n] for n in NORMS])
    ax.set_ylim(max(0.0, (lowest - 0.1) // 0.05 * 0.05), 1.01)
    seeds = f"{num_seeds} seeds" if num_seeds > 1 else "1 seed"
    ax.set_title(
        f"CNN on 32x32 digits, only the conv norm differs; {epochs} epochs\n"
        f"bars: mean of {seeds}, whiskers: min-max, dots: each seed",
        fontsize=10,
    )
    ax.set_ylabel("validation accuracy (eval mode)")
    ax.legend(fontsize=8, loc="lower right", ncol=len(BATCHES))
    common.save_figure(fig, args.out, NAME)


def main(argv: list[str] | None = None) -> None:
    args = common.parse_args(__doc__, argv)
    common.quiet()
    start = time.perf_counter()
    epochs, seeds = (2, [args.seed]) if args.fast else (6, [args.seed + i for i in range(3)])
    data = common.digits(scale="unit")
    train_data, val_data = images(data[0], seed=1), images(data[1], seed=2)
    mean, std = train_data.tensors[0].mean(), train_data.tensors[0].std()
    train_data, val_data = (TensorDataset((d.tensors[0] - mean) / std, d.tensors[1]) for d in (train_data, val_data))
    example = train_data.tensors[0][:32]

    runs: dict[str, dict[str, list[dict]]] = {norm: {str(b): [] for b in BATCHES} for norm in NORMS}
    guard_messages: list[str] = []
    for seed in seeds:
        models = build(seed, example)
        for batch in BATCHES:
            for norm in NORMS:
                pl.seed_everything(seed, verbose=False)
                net = copy.deepcopy(models[norm])
                lr = LR_AT_32 * batch / 32
                steps = epochs * (len(train_data) // batch)
                model = Classifier(net, lr=lr, example_input=example)
                trainer = common.trainer(args.out, f"{NAME}/{norm}_b{batch}_s{seed}", steps, [BatchNormGuard()])
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    trainer.fit(model, common.loader(train_data, batch, seed=seed))
                found = [str(w.message) for w in caught if issubclass(w.category, BatchNormWarning)]
                guard_messages += found
                runs[norm][str(batch)].append(
                    {
                        "seed": seed,
                        "accuracy": accuracy(net, val_data),
                        "batch_stats_accuracy": accuracy(copy.deepcopy(net), val_data, train_mode=True)
                        if norm == "batch"
                        else None,
                        "lr": lr,
                        "steps": steps,
                        "guard_warned": bool(found),
                    }
                )

    results: dict[str, dict[str, dict]] = {norm: {} for norm in NORMS}
    for norm in NORMS:
        for batch in BATCHES:
            per_seed = runs[norm][str(batch)]
            results[norm][str(batch)] = {
                "accuracy": spread([r["accuracy"] for r in per_seed]),
                "batch_stats_accuracy": spread([r["batch_stats_accuracy"] for r in per_seed])
                if norm == "batch"
                else None,
                "lr": per_seed[0]["lr"],
                "steps": per_seed[0]["steps"],
                "guard_warned": any(r["guard_warned"] for r in per_seed),
                "runs": per_seed,
            }

    plot(results, epochs, len(seeds), args)

    small = [m for m in guard_messages if "normalize only" in m]
    summary = {
        "epochs": epochs,
        "seeds": seeds,
        "groups": GROUPS,
        "image_size": SIZE,
        "shift": SHIFT,
        "results": results,
        "guard_messages": sorted(set(guard_messages)),
        "guard_small_batch_warned": bool(small),
        "seconds": time.perf_counter() - start,
    }
    print(
        f"CNN on {SIZE}x{SIZE} digits (random shifts up to {SHIFT} px), the arms differ only in the convolutions' norm;"
    )
    print(
        f"SGD, momentum {MOMENTUM}, lr {LR_AT_32} x batch / 32, {epochs} epoch(s) per run (same samples at both "
        f"batches), seeds {seeds}; validation accuracy in eval mode (for BatchNorm also with the validation set's "
        "own batch statistics), mean [min-max] over the seeds:"
    )

    def cell(figures: dict[str, float] | None) -> str:
        if figures is None:
            return "-"
        return f"{figures['mean']:.3f} [{figures['min']:.3f}-{figures['max']:.3f}]"

    rows = []
    for batch in BATCHES:
        for norm in NORMS:
            r = results[norm][str(batch)]
            per_seed = " ".join(f"{x['accuracy']:.3f}" for x in r["runs"])
            rows.append(
                [
                    LABELS[norm],
                    batch,
                    r["steps"],
                    cell(r["accuracy"]),
                    per_seed,
                    cell(r["batch_stats_accuracy"]),
                    "yes" if r["guard_warned"] else "no",
                ]
            )
    common.print_table(
        ["norm", "batch", "steps", "val acc", "per seed", "val acc (batch stats)", "guard warned"], rows, digits=3
    )
    print("\nBatchNormGuard said:")
    for message in summary["guard_messages"]:
        print(f"  BatchNormWarning: {message}")
    print(f"wrote {args.out / (NAME + '.png')} and {NAME}.json in {summary['seconds']:.1f} s")
    common.write_summary(args.out, NAME, summary)


if __name__ == "__main__":
    main()
