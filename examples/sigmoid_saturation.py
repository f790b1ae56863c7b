"""Glorot & Bengio (AISTATS 2010), Figure 2: the top sigmoid layer of a deep MLP is driven towards 0 early in training.

"Understanding the difficulty of training deep feedforward neural networks": with 4 hidden sigmoid layers, a softmax
on top, inputs in [0, 1] and the then-standard init U[-1/sqrt(n), 1/sqrt(n)], the mean activation of the *top* hidden
layer falls quickly towards 0 (the sigmoid's lower asymptote) while the lower layers stay near or above 0.5.

This script trains that network on scikit-learn's digits with plain SGD twice, with the standard init and with
Glorot's normalized (Xavier) init, and lets ``ActivationMonitor`` log ``act_mean``, ``act_std`` and
``act_saturation`` of every sigmoid layer. It plots the per-layer means over the steps (Figure 2's panel) and the
top layer's saturation, prints a table and writes ``sigmoid_saturation.{png,json}`` to ``--out``.

What reproduces on digits, and what does not: the collapse of the top layer's mean (under both inits here; Glorot
showed it for the standard init) and the lower layers drifting up. The library's ``act_saturation`` counts an element
only where the sigmoid's derivative is below 1% of its maximum (output below ~0.0025 or above ~0.9975); the top
layer's outputs settle around 0.01-0.05, which is on the way to, but not inside, that band, so ``act_saturation``
stays near 0 at this learning rate. The table prints both figures so you can see it.

Run::

    python examples/sigmoid_saturation.py          # ~4000 steps per init
    python examples/sigmoid_saturation.py --fast   # a few hundred steps (for the tests)
"""

from __future__ import annotations

import time

import common
import lightning.pytorch as pl
import torch
from torch import nn

from lightning_bn import ActivationMonitor

NAME = "sigmoid_saturation"
DEPTH, WIDTH, LR, BATCH = 4, 128, 0.3, 10
INITS = ("standard", "xavier")


def train(init: str, steps: int, every: int, args) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Train one network; return the logged ``act_mean`` / ``act_std`` / ``act_saturation`` per sigmoid layer."""
    pl.seed_everything(args.seed, verbose=False)
    train_data, _ = common.digits(scale="unit")
    net = common.init_linear_(common.mlp(DEPTH, WIDTH, act=nn.Sigmoid), init, torch.Generator().manual_seed(args.seed))
    sigmoids = common.module_names(net, nn.Sigmoid)
    monitor = ActivationMonitor(every_n_steps=every, modules=[nn.Sigmoid], histograms=False)
    trainer = common.trainer(args.out, f"{NAME}/{init}", steps, [monitor])
    trainer.fit(common.Classifier(net, lr=LR), common.loader(train_data, BATCH, seed=args.seed))
    scalars = common.read_scalars(common.logdir_of(trainer))
    figures = {stat: common.layer_series(scalars, stat, sigmoids) for stat in ("act_mean", "act_std", "act_saturation")}
    figures["train_loss"] = {"loss": scalars["train_loss"]}
    return figures


def plot(runs: dict, args) -> None:
    fig, axes = common.subplots(3)
    for ax, init in zip(axes[:2], INITS):
        means = runs[init]["act_mean"]
        stds = runs[init]["act_std"]
        for i, (layer, values) in enumerate(means.items()):
            steps = [s for s, _ in values]
            mean = [v for _, v in values]
            std = [v for _, v in stds[layer]]
            line = ax.plot(steps, mean, label=f"layer {i + 1} ({layer})")[0]
            ax.fill_between(
                steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                color=line.get_color(), alpha=0.12,
            )  # fmt: skip
        ax.set(title=f"{init} init: act_mean ± act_std", xlabel="step", ylabel="sigmoid output", ylim=(-0.05, 1.05))
        ax.legend(fontsize=8)
    for init in INITS:
        top = list(runs[init]["act_saturation"])[-1]
        common.plot_series(axes[2], {f"{init}: top layer ({top})": runs[init]["act_saturation"][top]})
        common.plot_series(axes[2], {f"{init}: top-layer mean": runs[init]["act_mean"][top]}, linestyle="--")
    axes[2].set(title="top layer: act_saturation (solid), act_mean (--)", xlabel="step", ylim=(-0.02, 1))
    axes[2].legend(fontsize=8)
    common.save_figure(fig, args.out, NAME)


def main(argv: list[str] | None = None) -> None:
    args = common.parse_args(__doc__, argv)
    common.quiet()
    steps, every = (300, 20) if args.fast else (4000, 50)
    start = time.perf_counter()
    runs = {init: train(init, steps, every, args) for init in INITS}
    plot(runs, args)

    summary: dict = {"steps": steps, "depth": DEPTH, "width": WIDTH, "lr": LR, "batch_size": BATCH}
    rows = []
    for init in INITS:
        means = runs[init]["act_mean"]
        layers = list(means)
        top = layers[-1]
        saturation = runs[init]["act_saturation"][top]
        last_loss = runs[init]["train_loss"]["loss"][-10:]
        summary[init] = {
            "top_layer": top,
            "mean_at_init": {layer: values[0][1] for layer, values in means.items()},
            "mean_at_end": {layer: values[-1][1] for layer, values in means.items()},
            "top_saturation_avg": common.mean_of(saturation),
            "top_saturation_end": saturation[-1][1],
            "final_loss": common.mean_of(last_loss),
        }
        rows.append(
            [
                init,
                *[f"{values[0][1]:.3f}->{values[-1][1]:.3f}" for values in means.values()],
                summary[init]["top_saturation_avg"],
                summary[init]["final_loss"],
            ]
        )
    summary["standard_saturates_more"] = (
        summary["standard"]["top_saturation_avg"] > summary["xavier"]["top_saturation_avg"]
    )
    summary["seconds"] = time.perf_counter() - start
    print(f"{DEPTH} x {WIDTH} sigmoid MLP on digits, SGD lr {LR}, batch {BATCH}, {steps} steps per init")
    print("act_mean per hidden layer, first logged step -> last:")
    headers = ["init", *[f"layer {i + 1}" for i in range(DEPTH)], "top act_saturation (avg)", "loss (last 10 logged)"]
    common.print_table(headers, rows)
    print(f"standard init saturates more than xavier in the top layer: {summary['standard_saturates_more']}")
    print(f"wrote {args.out / (NAME + '.png')} and {NAME}.json in {summary['seconds']:.1f} s")
    common.write_summary(args.out, NAME, summary)


if __name__ == "__main__":
    main()
