"""BatchNorm permits larger learning rates: a learning-rate sweep with and without BatchNorm.

Ioffe & Szegedy (ICML 2015) report that BatchNorm lets a network train with much higher learning rates; Bjorck et
al. (NeurIPS 2018, "Understanding Batch Normalization") argue this is its main benefit: without BN a large step makes
activations and gradients explode with depth, while BN's scale invariance (larger weights get proportionally smaller
gradients) keeps the effective step in check.

This script builds an 8-hidden-layer ReLU MLP (width 128) on scikit-learn's digits twice: once prepared by
``lightning_bn.prepare(net, example, init="auto")`` (He init, no norm) and once by
``prepare(net, example, init="auto", norm="batch")`` (the same init, a BatchNorm after every hidden Linear), so only
BatchNorm differs. Each is trained with plain SGD (batch 64) for a fixed number of steps at every learning rate of a
log-spaced sweep, with a Lightning ``Trainer``; the validation accuracy is measured in eval mode. A learning rate
*trains* when that accuracy is at least ``THRESHOLD`` (0.8). The script reports, per arm, the smallest and largest
learning rate that trains and their quotient (the width of the trainable range), plots accuracy against learning rate
(log axis), prints a table and writes ``bn_learning_rate.{png,json}`` to ``--out``.

Run::

    python examples/bn_learning_rate.py          # 19 learning rates 1e-3 .. 31.6 (4 per decade), 400 steps each
    python examples/bn_learning_rate.py --fast   # 8 learning rates 3e-3 .. 10 (2 per decade), 150 steps (tests)
"""

from __future__ import annotations

import math
import time

import common
import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import TensorDataset

import lightning_bn

NAME = "bn_learning_rate"
DEPTH, WIDTH, BATCH = 8, 128, 64
THRESHOLD = 0.8  # a learning rate "trains" when the final validation accuracy reaches this
ARMS = {"plain": None, "batchnorm": "batch"}


def accuracy(net: nn.Module, data: TensorDataset) -> float:
    """Validation accuracy in eval mode (BatchNorm with its running statistics); a diverged net scores ~0.1."""
    net.eval()
    with torch.no_grad():
        return (net(data.tensors[0]).argmax(-1) == data.tensors[1]).float().mean().item()


def train(arm: str, lr: float, steps: int, args) -> tuple[float, float]:
    """Train one network at ``lr``; return (validation accuracy, last logged training loss)."""
    pl.seed_everything(args.seed, verbose=False)
    train_data, val_data = common.digits()
    net = common.mlp(DEPTH, WIDTH, act=nn.ReLU)
    lightning_bn.prepare(net, train_data.tensors[0][:BATCH], init="auto", norm=ARMS[arm], seed=args.seed)
    trainer = common.trainer(args.out, f"{NAME}/{arm}/lr{lr:.3g}", steps)
    trainer.fit(common.Classifier(net, lr=lr), common.loader(train_data, BATCH, seed=args.seed))
    return accuracy(net, val_data), float(trainer.callback_metrics["train_loss"])


def trainable_range(lrs: list[float], accs: list[float]) -> dict:
    """Smallest and largest learning rate whose accuracy reaches ``THRESHOLD``, and their quotient."""
    ok = [lr for lr, acc in zip(lrs, accs) if acc >= THRESHOLD]
    if not ok:
        return {"min_lr": None, "max_lr": None, "factor": 0.0, "count": 0}
    return {"min_lr": min(ok), "max_lr": max(ok), "factor": max(ok) / min(ok), "count": len(ok)}


def main(argv: list[str] | None = None) -> None:
    args = common.parse_args(__doc__, argv)
    common.quiet()
    start = time.perf_counter()
    if args.fast:
        steps, lrs = 150, [float(f"{10 ** (k / 2):.1g}") for k in range(-5, 3)]  # 0.003, 0.01, 0.03, ..., 10
    else:
        steps, lrs = 400, [float(f"{10 ** (k / 4 - 3):.3g}") for k in range(19)]  # 1e-3 .. 31.6
    results = {arm: {"accuracy": [], "loss": []} for arm in ARMS}
    for arm in ARMS:
        for lr in lrs:
            acc, loss = train(arm, lr, steps, args)
            results[arm]["accuracy"].append(acc)
            results[arm]["loss"].append(loss)
    for arm in ARMS:
        results[arm]["range"] = trainable_range(lrs, results[arm]["accuracy"])
    plain, bn = results["plain"]["range"], results["batchnorm"]["range"]

    fig, (ax,) = common.subplots(1, width=6.0, height=4.0)
    for arm, label in (("plain", "no norm (He init)"), ("batchnorm", "BatchNorm (He init)")):
        (line,) = ax.plot(lrs, results[arm]["accuracy"], marker="o", label=label)
        span = results[arm]["range"]
        if span["count"]:
            ax.axvspan(span["min_lr"], span["max_lr"], color=line.get_color(), alpha=0.12)
    ax.axhline(THRESHOLD, color="black", linestyle="--", linewidth=1, label=f"'trains': accuracy >= {THRESHOLD}")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set(
        title=f"{DEPTH}x{WIDTH} ReLU MLP on digits, SGD, {steps} steps",
        xlabel="learning rate",
        ylabel="validation accuracy (eval mode)",
    )
    ax.legend(fontsize=8, loc="lower center")
    common.save_figure(fig, args.out, NAME)

    summary = {
        "steps": steps,
        "threshold": THRESHOLD,
        "learning_rates": lrs,
        **{arm: results[arm] for arm in ARMS},
        "range_factor_ratio": (bn["factor"] / plain["factor"]) if plain["factor"] else math.inf,
        "max_lr_ratio": (bn["max_lr"] / plain["max_lr"]) if plain["max_lr"] and bn["max_lr"] else None,
        "seconds": time.perf_counter() - start,
    }
    print(f"{DEPTH}x{WIDTH} ReLU MLP on digits, plain SGD, batch {BATCH}, {steps} steps per learning rate;")
    print("final validation accuracy (eval mode) / last training loss:")
    rows = [
        [lr, results["plain"]["accuracy"][i], results["plain"]["loss"][i]]
        + [results["batchnorm"]["accuracy"][i], results["batchnorm"]["loss"][i]]
        for i, lr in enumerate(lrs)
    ]
    common.print_table(["lr", "plain acc", "plain loss", "BN acc", "BN loss"], rows, digits=3)
    print(f"\nlearning rates that train (validation accuracy >= {THRESHOLD}):")
    common.print_table(
        ["arm", "min lr", "max lr", "max / min", "# lrs"],
        [[arm, *(results[arm]["range"][k] for k in ("min_lr", "max_lr", "factor", "count"))] for arm in ARMS],
        digits=3,
    )
    if summary["max_lr_ratio"] is not None:
        print(
            f"BN's trainable range is {summary['range_factor_ratio']:.3g}x as wide; its largest trainable"
            f" learning rate is {summary['max_lr_ratio']:.3g}x the largest without BN."
        )
    print(f"wrote {args.out / (NAME + '.png')} and {NAME}.json in {summary['seconds']:.1f} s")
    common.write_summary(args.out, NAME, summary)


if __name__ == "__main__":
    main()
