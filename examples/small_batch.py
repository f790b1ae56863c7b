"""BatchNorm vs GroupNorm vs LayerNorm at batch size 2: BatchNorm's batch statistics break down on tiny batches.

Wu & He (ECCV 2018, "Group Normalization"): BatchNorm normalizes with the mean and variance of the mini-batch, so its
error rises quickly as the per-device batch shrinks (in their ImageNet ResNet-50 study, ~10 points worse than
GroupNorm at 2 images per GPU), while GroupNorm and LayerNorm compute their statistics per sample and do not depend
on the batch size at all. At batch 2 a BatchNorm after a Linear sees 2 values per feature: in training it maps them
to about -1 and +1 whatever they were, a function the eval-mode network (running statistics) never reproduces.

This script builds a small CNN (3 convolutions, then a hidden Linear) on scikit-learn's digits as 1x8x8 images,
inserts a BatchNorm after every hidden layer with ``lightning_bn.prepare(net, example, norm="batch")``, and converts
copies of that same network (same weights) to GroupNorm (4 groups) and LayerNorm with
``lightning_bn.convert_norms``. Each is trained with a Lightning ``Trainer`` at batch 2 and, as a reference, batch 32,
on the same number of samples (plain SGD, learning rate scaled linearly with the batch), with ``BatchNormGuard``
among the callbacks; the validation accuracy is measured in eval mode. For BatchNorm it is also measured with the
whole validation set's own batch statistics (a train-mode pass on a copy), to show whether better running statistics
alone would help. It prints the guard's small-batch warning and a table, plots grouped bars and writes
``small_batch.{png,json}`` to ``--out``.

Run::

    python examples/small_batch.py          # 8000 training samples per run
    python examples/small_batch.py --fast   # 2000 samples (for the tests)
"""

from __future__ import annotations

import copy
import time
import warnings

import common
import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import TensorDataset

import lightning_bn
from lightning_bn import BatchNormGuard, BatchNormWarning

NAME = "small_batch"
BATCHES = (2, 32)
NORMS = ("batch", "group", "layer")
LABELS = {"batch": "BatchNorm", "group": "GroupNorm", "layer": "LayerNorm"}
LR_AT_32, GROUPS = 0.1, 4


def images(data: TensorDataset) -> TensorDataset:
    """The flat 64-pixel digits as 1x8x8 images."""
    return TensorDataset(data.tensors[0].view(-1, 1, 8, 8), data.tensors[1])


def cnn() -> nn.Sequential:
    """8x8 -> conv 16 -> conv 32 (stride 2, 4x4) -> conv 32 (stride 2, 2x2) -> Linear 64 -> logits; ReLU after each."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 2 * 2, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


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
    models = {"batch": base}
    models["group"] = copy.deepcopy(base)
    lightning_bn.convert_norms(models["group"], "group", num_groups=GROUPS)
    models["layer"] = copy.deepcopy(base)
    lightning_bn.convert_norms(models["layer"], "layer")
    return models


def main(argv: list[str] | None = None) -> None:
    args = common.parse_args(__doc__, argv)
    common.quiet()
    start = time.perf_counter()
    samples = 2000 if args.fast else 8000
    train_data, val_data = (images(d) for d in common.digits())
    example = train_data.tensors[0][:32]
    models = build(args.seed, example)

    results: dict[str, dict[str, dict]] = {norm: {} for norm in NORMS}
    guard_messages: list[str] = []
    for batch in BATCHES:
        for norm in NORMS:
            pl.seed_everything(args.seed, verbose=False)
            net = copy.deepcopy(models[norm])
            lr = LR_AT_32 * batch / 32
            model = common.Classifier(net, lr=lr, example_input=example)
            trainer = common.trainer(args.out, f"{NAME}/{norm}_b{batch}", samples // batch, [BatchNormGuard()])
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                trainer.fit(model, common.loader(train_data, batch, seed=args.seed))
            found = [str(w.message) for w in caught if issubclass(w.category, BatchNormWarning)]
            guard_messages += found
            results[norm][str(batch)] = {
                "accuracy": accuracy(net, val_data),
                "batch_stats_accuracy": accuracy(copy.deepcopy(net), val_data, train_mode=True)
                if norm == "batch"
                else None,
                "lr": lr,
                "steps": samples // batch,
                "guard_warned": bool(found),
            }

    fig, (ax,) = common.subplots(1, width=6.0, height=4.0)
    width = 0.8 / len(BATCHES)
    for i, batch in enumerate(BATCHES):
        xs = [j + (i - (len(BATCHES) - 1) / 2) * width for j in range(len(NORMS))]
        accs = [results[norm][str(batch)]["accuracy"] for norm in NORMS]
        bars = ax.bar(xs, accs, width, label=f"batch {batch}")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(NORMS)), [LABELS[n] for n in NORMS])
    ax.set_ylim(0, 1.2)
    ax.set(title=f"Small CNN on 8x8 digits, {samples} training samples", ylabel="validation accuracy (eval mode)")
    ax.legend(fontsize=8, loc="upper center", ncol=len(BATCHES))
    common.save_figure(fig, args.out, NAME)

    small = [m for m in guard_messages if "per channel" in m]
    summary = {
        "samples": samples,
        "groups": GROUPS,
        "results": results,
        "guard_messages": sorted(set(guard_messages)),
        "guard_small_batch_warned": bool(small),
        "seconds": time.perf_counter() - start,
    }
    print(f"Small CNN on 8x8 digits, plain SGD (lr {LR_AT_32} x batch / 32), {samples} training samples per run;")
    print("validation accuracy (eval mode; for BatchNorm also with the validation set's own batch statistics):")
    rows = []
    for batch in BATCHES:
        for norm in NORMS:
            r = results[norm][str(batch)]
            stats = "-" if r["batch_stats_accuracy"] is None else r["batch_stats_accuracy"]
            rows.append([LABELS[norm], batch, r["steps"], r["accuracy"], stats, "yes" if r["guard_warned"] else "no"])
    common.print_table(["norm", "batch", "steps", "val acc", "val acc (batch stats)", "guard warned"], rows, digits=3)
    print("\nBatchNormGuard said:")
    for message in summary["guard_messages"]:
        print(f"  BatchNormWarning: {message}")
    print(f"wrote {args.out / (NAME + '.png')} and {NAME}.json in {summary['seconds']:.1f} s")
    common.write_summary(args.out, NAME, summary)


if __name__ == "__main__":
    main()
