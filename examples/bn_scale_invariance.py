"""BatchNorm's scale invariance (Ioffe & Szegedy, ICML 2015, section 3.3): why larger weights take smaller steps.

For a layer ``Wu`` followed by BatchNorm and any ``a > 0``::

    BN((aW)u) = BN(Wu)        and        dL/d(aW) = (1/a) dL/dW

so the output does not depend on the scale of ``W``, while the gradient shrinks as the weights grow: the relative
update ``||dW|| / ||W||`` of an SGD step scales as ``1/a^2``. Large weights learn slowly; the scale of the weights acts
as an automatic learning-rate schedule (van Laarhoven 2017; Bjorck et al., NeurIPS 2018).

This script checks both identities numerically in float64 for several ``a``, then trains two copies of the same
BatchNorm MLP on scikit-learn's digits with the same SGD learning rate, one with every BN-followed weight scaled by
10, and lets ``GradientMonitor`` log ``update_ratio`` (``||dW|| / ||W||``) per layer. It prints a table and writes
``bn_scale_invariance.{png,json}`` to ``--out``.

Run::

    python examples/bn_scale_invariance.py          # 600 training steps per copy
    python examples/bn_scale_invariance.py --fast   # 60 steps (for the tests)
"""

from __future__ import annotations

import time

import common
import lightning.pytorch as pl
import torch
from torch import nn

from lightning_bn import GradientMonitor

NAME = "bn_scale_invariance"
SCALES = (0.1, 10.0, 100.0)
DEPTH, WIDTH, LR, BATCH = 3, 128, 0.1, 64
COPIES = (1.0, 10.0)


def identities(a: float, seed: int, eps: float = 1e-30) -> dict[str, float]:
    """Relative errors of ``BN((aW)u) = BN(Wu)`` and ``grad(aW) = grad(W) / a`` on one random batch, in float64.

    The identities are exact as ``eps -> 0`` (PyTorch refuses 0, so 1e-30 here); BatchNorm's ``eps`` (1e-5 by
    default) in ``sqrt(var + eps)`` does not scale with ``a`` and breaks them by about ``eps / (a^2 var)``.
    """
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(32, 20, generator=g, dtype=torch.float64)
    weight = torch.randn(16, 20, generator=g, dtype=torch.float64)
    probe = torch.randn(32, 16, generator=g, dtype=torch.float64)  # a fixed random loss: L = <probe, BN(Wu)>
    bn = nn.BatchNorm1d(16, eps=eps).double()

    def forward(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = w.clone().requires_grad_(True)
        out = bn(u @ w.T)
        (out * probe).sum().backward()
        return out.detach(), w.grad

    out, grad = forward(weight)
    out_scaled, grad_scaled = forward(a * weight)
    return {
        "output": ((out_scaled - out).norm() / out.norm()).item(),
        "gradient": ((grad_scaled - grad / a).norm() / (grad / a).norm()).item(),
    }


def train(scale: float, steps: int, args) -> dict[str, list[tuple[int, float]]]:
    """Train the BN MLP with every BN-followed weight multiplied by ``scale``; return ``update_ratio`` per layer."""
    pl.seed_everything(args.seed, verbose=False)
    train_data, _ = common.digits()
    net = common.mlp(DEPTH, WIDTH, act=nn.ReLU, norm=nn.BatchNorm1d)
    common.init_linear_(net, "he", torch.Generator().manual_seed(args.seed))
    hidden = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)][:-1]  # the ones BN follows
    with torch.no_grad():
        for name in hidden:
            net.get_submodule(name).weight.mul_(scale)
    trainer = common.trainer(args.out, f"{NAME}/x{scale:g}", steps, [GradientMonitor(every_n_steps=1)])
    trainer.fit(common.Classifier(net, lr=LR), common.loader(train_data, BATCH, seed=args.seed))
    scalars = common.read_scalars(common.logdir_of(trainer))
    series = common.layer_series(scalars, "update_ratio", [f"net.{name}.weight" for name in hidden])
    series["train_loss"] = scalars["train_loss"]
    return series


def main(argv: list[str] | None = None) -> None:
    args = common.parse_args(__doc__, argv)
    common.quiet()
    torch.manual_seed(args.seed)
    steps = 60 if args.fast else 600
    start = time.perf_counter()
    checks = {f"{a:g}": identities(a, args.seed + i) for i, a in enumerate(SCALES)}
    with_eps = {f"{a:g}": identities(a, args.seed + i, eps=1e-5) for i, a in enumerate(SCALES)}
    runs = {scale: train(scale, steps, args) for scale in COPIES}

    layers = [k for k in runs[1.0] if k != "train_loss"]
    fig, (ax_ratio, ax_loss) = common.subplots(2, width=5.2)
    for scale, style in zip(COPIES, ("-", "--")):
        for layer in layers:
            steps_, ratios = zip(*runs[scale][layer])
            ax_ratio.semilogy(steps_, ratios, linestyle=style, label=f"weights x{scale:g}: {layer}")
        common.plot_series(ax_loss, {f"weights x{scale:g}": runs[scale]["train_loss"]}, linestyle=style)
    ax_ratio.set(title=f"GradientMonitor update_ratio ||dW||/||W||, SGD lr {LR}", xlabel="step", ylabel="ratio")
    ax_loss.set(title="training loss", xlabel="step", ylabel="cross-entropy")
    ax_ratio.legend(fontsize=7)
    ax_loss.legend(fontsize=8)
    common.save_figure(fig, args.out, NAME)

    ratio_rows, summary_runs = [], {}
    for layer in layers:
        first = [runs[s][layer][0][1] for s in COPIES]
        avg = [common.mean_of(runs[s][layer]) for s in COPIES]
        ratio_rows.append([layer, first[0], first[1], first[0] / first[1], avg[0], avg[1], avg[0] / avg[1]])
        summary_runs[layer] = {"step0": first, "average": avg, "step0_quotient": first[0] / first[1]}
    loss_last = {f"{s:g}": common.mean_of(runs[s]["train_loss"][-5:]) for s in COPIES}
    summary = {
        "identities": checks,
        "identities_default_eps": with_eps,
        "max_relative_error": max(v for check in checks.values() for v in check.values()),
        "update_ratio": summary_runs,
        "loss_last": loss_last,
        "steps": steps,
        "lr": LR,
        "seconds": time.perf_counter() - start,
    }

    print("scale invariance in float64, relative errors (BN eps = 1e-30, and PyTorch's default eps = 1e-5):")
    common.print_table(
        ["a", "output, eps 1e-30", "gradient, eps 1e-30", "output, eps 1e-5", "gradient, eps 1e-5"],
        [[a, c["output"], c["gradient"], with_eps[a]["output"], with_eps[a]["gradient"]] for a, c in checks.items()],
        digits=3,
    )
    print(f"\nupdate_ratio ||dW||/||W|| with the same SGD lr {LR}, weights x1 vs x10 ({steps} steps):")
    common.print_table(
        ["layer", "x1 step 0", "x10 step 0", "quotient", "x1 avg", "x10 avg", "quotient"], ratio_rows, digits=3
    )
    print(f"loss after {steps} steps (last 5 logged): " + ", ".join(f"x{k}: {v:.3f}" for k, v in loss_last.items()))
    print(f"wrote {args.out / (NAME + '.png')} and {NAME}.json in {summary['seconds']:.1f} s")
    common.write_summary(args.out, NAME, summary)


if __name__ == "__main__":
    main()
