"""He et al. (ICCV 2015), "Delving Deep into Rectifiers": a 30-layer ReLU net stalls under Xavier init, learns under He.

Xavier's variance 1 / n (square layers) ignores that ReLU zeroes half of its input, so every layer halves the second
moment of the signal: after 30 layers the activations (and the gradients) are ~2^-15 times smaller than at the input
and SGD makes no progress. He's variance 2 / n keeps it constant. ``AutoInit`` traces the network, finds the ReLU
after every Linear and picks He by itself.

This script builds a 30-hidden-layer ReLU MLP on scikit-learn's digits three times (Xavier, He, ``AutoInit``), trains
each with the same plain SGD, and lets ``ActivationMonitor`` log ``act_std`` of every ReLU at step 0 (the init) and
along training. It plots the per-layer std at init and the loss curves, prints a table and writes
``deep_relu_init.{png,json}`` to ``--out``.

Run::

    python examples/deep_relu_init.py          # 1000 steps per init
    python examples/deep_relu_init.py --fast   # 150 steps (for the tests)
"""

from __future__ import annotations

import math
import time

import common
import lightning.pytorch as pl
import torch
from torch import nn

from lightning_bn import ActivationMonitor, AutoInit

NAME = "deep_relu_init"
DEPTH, WIDTH, LR, BATCH = 30, 256, 0.01, 64
INITS = ("xavier", "he", "autoinit")


def train(init: str, steps: int, every: int, args) -> dict:
    """Train one network; return the logged per-ReLU ``act_std`` series and the ``train_loss`` series."""
    pl.seed_everything(args.seed, verbose=False)
    train_data, _ = common.digits()
    net = common.mlp(DEPTH, WIDTH, act=nn.ReLU)
    callbacks: list[pl.Callback] = [ActivationMonitor(every_n_steps=every, modules=[nn.ReLU], histograms=False)]
    if init == "autoinit":
        callbacks.insert(0, AutoInit(init="auto", seed=args.seed))
    else:
        common.init_linear_(
            net, "xavier_normal" if init == "xavier" else "he", torch.Generator().manual_seed(args.seed)
        )
    model = common.Classifier(net, lr=LR, example_input=train_data.tensors[0][:BATCH])
    trainer = common.trainer(args.out, f"{NAME}/{init}", steps, callbacks, log_every_n_steps=1)
    trainer.fit(model, common.loader(train_data, BATCH, seed=args.seed))
    scalars = common.read_scalars(common.logdir_of(trainer))
    return {
        "act_std": common.layer_series(scalars, "act_std", common.module_names(net, nn.ReLU)),
        "loss": scalars["train_loss"],
    }


def main(argv: list[str] | None = None) -> None:
    args = common.parse_args(__doc__, argv)
    common.quiet()
    steps, every = (150, 50) if args.fast else (1000, 100)
    start = time.perf_counter()
    runs = {init: train(init, steps, every, args) for init in INITS}

    fig, (ax_std, ax_loss) = common.subplots(2, width=5.2)
    summary: dict = {"steps": steps, "depth": DEPTH, "width": WIDTH, "lr": LR, "batch_size": BATCH}
    rows = []
    for init in INITS:
        at_init = [values[0][1] for values in runs[init]["act_std"].values()]
        ratios = [s / at_init[0] for s in at_init]
        losses = [v for _, v in runs[init]["loss"]]
        window = max(len(losses) // 10, 1)
        first, last = common.mean_of(losses[:window]), common.mean_of(losses[-window:])
        summary[init] = {
            "std_at_init": at_init,
            "std_ratio_last_to_first": ratios[-1],
            "std_ratio_min": min(ratios),
            "std_ratio_max": max(ratios),
            "loss_first": first,
            "loss_last": last,
        }
        rows.append([init, at_init[0], at_init[len(at_init) // 2], at_init[-1], ratios[-1], first, last])
        ax_std.semilogy(range(1, DEPTH + 1), at_init, marker="o", markersize=3, label=init)
        ax_loss.plot([s for s, _ in runs[init]["loss"]], losses, label=init)
    summary["ln10"] = math.log(10)
    summary["seconds"] = time.perf_counter() - start
    ax_std.set(title="act_std of each ReLU at init (step 0)", xlabel="hidden layer", ylabel="std (log scale)")
    ax_loss.axhline(math.log(10), color="gray", linestyle=":", label="ln 10 (chance)")
    ax_loss.set(title=f"training loss, SGD lr {LR}", xlabel="step", ylabel="cross-entropy")
    for ax in (ax_std, ax_loss):
        ax.legend(fontsize=8)
    common.save_figure(fig, args.out, NAME)

    print(f"{DEPTH}-layer ReLU MLP (width {WIDTH}) on digits, SGD lr {LR}, batch {BATCH}, {steps} steps per init")
    headers = ["init", "std layer 1", f"std layer {DEPTH // 2 + 1}", f"std layer {DEPTH}", "last/first",
               "loss first 10%", "loss last 10%"]  # fmt: skip
    common.print_table(headers, rows)
    print(f"wrote {args.out / (NAME + '.png')} and {NAME}.json in {summary['seconds']:.1f} s")
    common.write_summary(args.out, NAME, summary)


if __name__ == "__main__":
    main()
