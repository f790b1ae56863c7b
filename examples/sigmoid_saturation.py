"""Glorot & Bengio (AISTATS 2010), Figure 2: the top sigmoid layer of a deep MLP is driven into saturation at 0.

"Understanding the difficulty of training deep feedforward neural networks": with 5 hidden sigmoid layers, a softmax
on top, inputs in [0, 1], SGD on minibatches of 10 and the then-standard init U[-1/sqrt(n), 1/sqrt(n)], the mean
activation of the *top* hidden layer falls to 0 (the sigmoid's lower asymptote) within the first epochs and stays there
for a long time, while the lower layers stay near or above 0.5. Their explanation: the lower layers' features are
nearly uninformative at first, so the fastest way to lower the loss is to silence the top layer's noise and let the
output biases fit the class prior.

The paper used Shapeset-3x2, synthetic 32x32 images; this script uses synthetic data too: 10 classes, each a random
binary 32x32 prototype, every sample its class prototype with 30% of the pixels replaced by uniform noise (1024 inputs
in [0, 1], generated with a fixed seed, no download). It trains a 5 x 512 sigmoid MLP with plain SGD (lr 1, batch 10)
twice, with the standard init and with Glorot's normalized (Xavier) init, and lets ``ActivationMonitor`` log
``act_mean``, ``act_std`` and ``act_saturation`` of every sigmoid layer. ``act_saturation`` counts an element where the
sigmoid's derivative is below 1% of its maximum (output below ~0.0025 or above ~0.9975). It plots the per-layer means
over the steps (Figure 2's panel) and the top layer's saturation, prints a table and writes
``sigmoid_saturation.{png,json}`` to ``--out``.

What to expect: within a few hundred steps the top layer saturates under both inits, but under the standard init
nearly all of it (act_saturation ~0.9-1.0, and it stays there: the net does not learn in 3000 steps), under Xavier
less of it (~0.6-0.8 on the plateau). In the full run Xavier's top layer left the plateau and the loss fell for
seeds 0 and 1 (top-layer act_saturation over the second half 0.43 and 0.30 against the standard init's 1.0); with
seed 2 it was still on the plateau at step 3000 (0.95 against 1.0). The standard init's smaller weights pass on
less input-dependent signal, so the whole top layer is pushed to 0 together. The contrast needs a large learning
rate: at lr 0.5-0.7 the top layer reaches the band only partly under both inits, at lr 1.5 it saturates fully under
both.

Run::

    python examples/sigmoid_saturation.py          # 3000 steps per init
    python examples/sigmoid_saturation.py --fast   # 600 steps per init (for the tests)
"""

from __future__ import annotations

import time

import common
import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_bn import ActivationMonitor

NAME = "sigmoid_saturation"
DEPTH, WIDTH, LR, BATCH = 5, 512, 1.0, 10
SIDE, CLASSES, NOISE, SAMPLES = 32, 10, 0.3, 10_000
INITS = ("standard", "xavier")


def prototypes(seed: int = 0) -> TensorDataset:
    """Synthetic images in [0, 1]: ``CLASSES`` random binary ``SIDE`` x ``SIDE`` prototypes; each of the ``SAMPLES``
    samples is its class's prototype with a fraction ``NOISE`` of the pixels replaced by U[0, 1] noise."""
    g = torch.Generator().manual_seed(seed)
    protos = (torch.rand(CLASSES, SIDE * SIDE, generator=g) < 0.5).float()
    y = torch.randint(0, CLASSES, (SAMPLES,), generator=g)
    noisy = torch.rand(SAMPLES, SIDE * SIDE, generator=g) < NOISE
    x = torch.where(noisy, torch.rand(SAMPLES, SIDE * SIDE, generator=g), protos[y])
    return TensorDataset(x, y)


def train(init: str, steps: int, every: int, args) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Train one network; return the logged ``act_mean`` / ``act_std`` / ``act_saturation`` per sigmoid layer."""
    pl.seed_everything(args.seed, verbose=False)
    train_data = prototypes()
    net = common.mlp(DEPTH, WIDTH, act=nn.Sigmoid, in_features=SIDE * SIDE, out_features=CLASSES)
    net = common.init_linear_(net, init, torch.Generator().manual_seed(args.seed))
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
    steps, every = (600, 20) if args.fast else (3000, 50)
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
            "top_saturation_late": common.mean_of([(s, v) for s, v in saturation if s >= steps // 2]),
            "top_saturation_end": saturation[-1][1],
            "final_loss": common.mean_of(last_loss),
        }
        rows.append(
            [
                init,
                *[f"{values[0][1]:.3f}->{values[-1][1]:.3f}" for values in means.values()],
                summary[init]["top_saturation_avg"],
                summary[init]["top_saturation_late"],
                summary[init]["final_loss"],
            ]
        )
    summary["standard_saturates_more"] = all(
        summary["standard"][key] > summary["xavier"][key] for key in ("top_saturation_avg", "top_saturation_late")
    )
    summary["seconds"] = time.perf_counter() - start
    data = f"{CLASSES} noisy {SIDE}x{SIDE} prototypes"
    print(f"{DEPTH} x {WIDTH} sigmoid MLP on {data}, SGD lr {LR}, batch {BATCH}, {steps} steps per init")
    print("act_mean per hidden layer, first logged step -> last:")
    headers = ["init", *[f"layer {i + 1}" for i in range(DEPTH)], "top sat avg", "top sat 2nd half", "loss (last 10)"]
    common.print_table(headers, rows)
    print(f"standard init saturates more than xavier in the top layer: {summary['standard_saturates_more']}")
    print(f"wrote {args.out / (NAME + '.png')} and {NAME}.json in {summary['seconds']:.1f} s")
    common.write_summary(args.out, NAME, summary)


if __name__ == "__main__":
    main()
