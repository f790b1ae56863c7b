"""Poole et al. (2016), Schoenholz et al. (2017): deep bounded-activation nets train from the critical init.

For a chain ``h_{l+1} = W φ(h_l) + b``, mean-field theory gives the factor ``χ₁ = σ_w² E[φ′(h)²]`` by which each layer
multiplies the back-propagated gradient's power: below 1 (the ordered phase) gradients vanish toward the input,
above 1 (the chaotic phase) they explode, and at ``χ₁ = 1`` (the critical init) they travel through any depth.
Xavier's forward-preserving gain 1/sqrt(E[φ(z)²]) keeps the *forward* variance but misses ``χ₁ = 1``: it puts tanh in
the chaotic phase (χ₁ 1.18) and sigmoid deep in the ordered one (χ₁ 0.15). ``prepare(init="auto")`` now draws the
critical point for such chains (tanh σ_w² 2.153, σ_b² 0.151; sigmoid σ_w² 103, σ_b 0).

This script trains two nets on scikit-learn's digits (pixels / 16) with a real ``Trainer``, four inits each, three
seeds: a 10-layer sigmoid MLP (width 64) and a 100-layer tanh MLP (width 128), each with one optimizer setting for
every arm (SGD, momentum 0.9, batch 256; sigmoid lr 0.3 for 150 steps, tanh lr 3e-4 for 300 steps). The arms:

- ``default``: PyTorch's own ``nn.Linear`` init (U[±1/sqrt(fan_in)] for weights and biases: σ_w² = 1/3);
- ``xavier``: ``nn.init.xavier_normal_(w, gain=nn.init.calculate_gain(kind))`` (5/3 for tanh, 1 for sigmoid), zero
  biases;
- ``previous_auto``: ``prepare(model, x, init="xavier")``: what ``init="auto"`` drew for these nets before the
  critical init, Xavier with the forward-preserving gain 1/sqrt(E[φ(z)²]) (tanh 1.593, sigmoid 1.846), zero biases;
- ``critical``: ``prepare(model, x, init="auto")``, which now reports ``critical`` for every hidden layer.

For each arm and seed it measures, at init, the gradient ratio ‖∂L/∂h₁‖ / ‖∂L/∂h_L‖ (L the cross-entropy loss of the
example batch — the first 256 training images, the batch ``prepare`` sees — h₁ / h_L the pre-activations of the first
and the last hidden layer) and the findings of the init check (``lightning_bn.guards.init_mismatches``); as a
cross-check ``GradientMonitor`` logs the per-parameter gradient norms of the first optimizer step (its first/last
hidden weight gradient ratio goes in the table too). After the fixed budget it reports the validation accuracy.
It plots the gradient ratios (log axis) and the accuracies (mean, min–max bars), prints a table and writes
``critical_init.{png,json}`` to ``--out``.

Run::

    python examples/critical_init.py          # both nets, 3 seeds (sigmoid 150 steps, tanh 300 steps)
    python examples/critical_init.py --fast   # the tanh net at init only, not trained (for the tests)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import common
import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F

import lightning_bn
from lightning_bn import GradientMonitor
from lightning_bn.guards import init_mismatches

NAME = "critical_init"
BATCH, MOMENTUM = 256, 0.9
ARMS = ("default", "xavier", "previous_auto", "critical")
LABELS = {
    "default": "PyTorch default",
    "xavier": "Xavier (calculate_gain)",
    "previous_auto": "previous auto (Xavier, fwd gain)",
    "critical": "critical (auto)",
}


@dataclass(frozen=True)
class Net:
    """One of the two nets, with its (fixed, shared by every arm) training budget."""

    kind: str  # "sigmoid" or "tanh": the activation, and torch's calculate_gain name
    depth: int
    width: int
    lr: float
    steps: int

    @property
    def act(self) -> type[nn.Module]:
        return nn.Sigmoid if self.kind == "sigmoid" else nn.Tanh

    @property
    def title(self) -> str:
        return f"{self.depth}-layer {self.kind} MLP (width {self.width})"


SIGMOID = Net("sigmoid", depth=10, width=64, lr=0.3, steps=150)
TANH = Net("tanh", depth=100, width=128, lr=0.0003, steps=300)


class MomentumClassifier(common.Classifier):
    """``common.Classifier`` trained with SGD with momentum (the same optimizer for every arm of a net)."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=MOMENTUM)


def initialize(net: nn.Sequential, spec: Net, arm: str, example: torch.Tensor, seed: int) -> list[str]:
    """Apply ``arm``'s init to ``net`` in place; return each Linear's scheme (``prepare``'s report, or the arm's)."""
    linears = [m for m in net if isinstance(m, nn.Linear)]
    if arm == "default":
        return ["default"] * len(linears)  # as nn.Linear drew it (the global generator, seeded by the caller)
    if arm == "xavier":
        generator = torch.Generator().manual_seed(seed)
        gain = nn.init.calculate_gain(spec.kind)
        with torch.no_grad():
            for layer in linears:
                nn.init.xavier_normal_(layer.weight, gain=gain, generator=generator)
                layer.bias.zero_()
        return ["xavier"] * len(linears)
    report = lightning_bn.prepare(net, example, init="xavier" if arm == "previous_auto" else "auto", seed=seed)
    schemes = [row.scheme for row in report.layers]
    expected = "xavier" if arm == "previous_auto" else "critical"
    if set(schemes[:-1]) != {expected}:
        raise RuntimeError(f"{arm}: expected {expected!r} for every hidden layer, the report says {schemes}")
    return schemes


def gradient_ratio(net: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> float:
    """‖∂L/∂h‖ at the first hidden pre-activation over the last, L the cross-entropy of ``(x, y)`` (no .grad set)."""
    hidden = [m for m in net if isinstance(m, nn.Linear)][:-1]
    outputs: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda module, args, out: outputs.append(out)) for m in hidden]
    try:
        loss = F.cross_entropy(net(x), y)
    finally:
        for handle in handles:
            handle.remove()
    first, last = torch.autograd.grad(loss, [outputs[0], outputs[-1]])
    norm = lambda g: torch.linalg.vector_norm(g, dtype=torch.float64)  # noqa: E731  (no float32 underflow)
    return (norm(first) / norm(last)).item()


def run(spec: Net, arm: str, seed: int, steps: int, args) -> dict:
    """One arm, one seed: the figures at init, then ``steps`` training steps (none: the init only) and the accuracy."""
    pl.seed_everything(seed, verbose=False)
    train_data, val_data = common.digits("unit")
    example, labels = train_data.tensors[0][:BATCH], train_data.tensors[1][:BATCH]
    net = common.mlp(spec.depth, spec.width, act=spec.act)
    schemes = initialize(net, spec, arm, example, seed)
    findings = [f.problem for f in init_mismatches(net, example)]
    result = {"schemes": sorted(set(schemes)), "gradient_ratio": gradient_ratio(net, example, labels),
              "findings": findings, "accuracy": None, "weight_grad_ratio": None}  # fmt: skip
    if steps == 0:
        return result
    model = MomentumClassifier(net, lr=spec.lr, example_input=example)
    monitor = GradientMonitor(every_n_steps=steps, update_ratio=False)  # logs step 0 only: the init's gradients
    trainer = common.trainer(args.out, f"{NAME}/{spec.kind}/{arm}/{seed}", steps, [monitor], limit_val_batches=1.0)
    trainer.fit(model, common.loader(train_data, BATCH, seed=seed))
    validated = trainer.validate(model, common.loader(val_data, len(val_data), shuffle=False), verbose=False)
    scalars = common.read_scalars(common.logdir_of(trainer))
    names = common.module_names(net, nn.Linear)
    first, last = (scalars[f"grad_norm/{name}.weight"][0] for name in (names[0], names[-2]))
    assert first[0] == last[0] == 0, (first, last)  # the first optimizer step: the gradients of the init
    result.update(accuracy=validated[0]["val_acc"], weight_grad_ratio=first[1] / last[1])
    return result


def geometric(values: list[float]) -> float:
    """Geometric mean; 0 if any value is 0 (a float32 gradient norm that underflowed: the default tanh init)."""
    if min(values) <= 0:
        return 0.0
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summarize(runs: list[dict]) -> dict:
    """Mean and min–max over the seeds (the gradient ratios: geometric mean), and the findings per seed."""
    ratios = [r["gradient_ratio"] for r in runs]
    out = {
        "gradient_ratio": {"geomean": geometric(ratios), "min": min(ratios), "max": max(ratios), "seeds": ratios},
        "findings": [r["findings"] for r in runs],
        "finding_kinds": sorted({p for r in runs for p in r["findings"]}),
        "schemes": sorted({s for r in runs for s in r["schemes"]}),
    }
    accuracies = [r["accuracy"] for r in runs if r["accuracy"] is not None]
    weight = [r["weight_grad_ratio"] for r in runs if r["weight_grad_ratio"] is not None]
    if accuracies:
        out["accuracy"] = {"mean": sum(accuracies) / len(accuracies), "min": min(accuracies),
                           "max": max(accuracies), "seeds": accuracies}  # fmt: skip
    if weight:
        out["weight_grad_ratio"] = {"geomean": geometric(weight), "min": min(weight), "max": max(weight),
                                    "seeds": weight}  # fmt: skip
    return out


def findings_text(summary: dict) -> str:
    """``gradient_vanishing 3/3, saturating(x10) 3/3``: each problem, how many seeds, and the count per seed if > 1."""
    seeds = summary["findings"]
    if not any(seeds):
        return "none"
    parts = []
    for problem in summary["finding_kinds"]:
        counts = [found.count(problem) for found in seeds]
        hit = sum(1 for c in counts if c)
        times = f"(x{max(counts)})" if max(counts) > 1 else ""
        parts.append(f"{problem}{times} {hit}/{len(seeds)}")
    return ", ".join(parts)


def plot(results: dict, nets: list[Net], args) -> None:
    fig, axes = common.plt.subplots(len(nets), 2, figsize=(11, 3.9 * len(nets)), squeeze=False)
    positions = range(len(ARMS))
    for (ax_grad, ax_acc), spec in zip(axes, nets):
        arms = results[spec.kind]["arms"]
        for i, arm in enumerate(ARMS):
            ratio = arms[arm]["gradient_ratio"]
            ax_grad.scatter([i] * len(ratio["seeds"]), ratio["seeds"], color=f"C{i}", s=18, zorder=3)
            ax_grad.scatter([i], [ratio["geomean"]], color=f"C{i}", marker="_", s=400, zorder=3)
            ax_grad.annotate(findings_text(arms[arm]).replace(", ", "\n"), (i, ratio["max"]), fontsize=6,
                             ha="center", va="bottom", xytext=(0, 6), textcoords="offset points",
                             bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1))  # fmt: skip
        ax_grad.set_yscale("log")
        low, high = ax_grad.get_ylim()
        ax_grad.set_ylim(min(low, 0.05) / 30, max(high, 20) * 30)  # room for the findings above the points
        ax_grad.axhspan(0.1, 10, color="green", alpha=0.08, label="within 10x")
        ax_grad.axhline(1, color="gray", linewidth=0.8, linestyle=":")
        ax_grad.set(title=f"{spec.title}: gradient ratio at init (text: init check)",
                    ylabel="‖∂L/∂h₁‖ / ‖∂L/∂h_L‖ (log)")  # fmt: skip
        ax_grad.legend(fontsize=7, loc="upper left")
        budget = results[spec.kind]
        if budget["steps"]:
            for i, arm in enumerate(ARMS):
                acc = arms[arm]["accuracy"]
                ax_acc.bar(i, acc["mean"], color=f"C{i}", yerr=[[acc["mean"] - acc["min"]], [acc["max"] - acc["mean"]]],
                           capsize=5)  # fmt: skip
                ax_acc.text(i, acc["max"] + 0.02, f"{acc['mean']:.2f}", ha="center", fontsize=8)
            ax_acc.axhline(0.1, color="gray", linestyle=":", label="chance")
            ax_acc.legend(fontsize=7)
        else:
            ax_acc.text(0.5, 0.5, "not trained in --fast", ha="center", va="center", transform=ax_acc.transAxes)
        ax_acc.set_ylim(0, 1.05)
        seeds = len(budget["seeds"])
        trained = (f"after {budget['steps']} steps\n(SGD lr {spec.lr}, momentum {MOMENTUM}, batch {BATCH}; "
                   f"{seeds} seed{'s' if seeds > 1 else ''}: mean, min–max)")  # fmt: skip
        trained = trained if budget["steps"] else "(--fast: init only)"
        ax_acc.set(title=f"validation accuracy {trained}", ylabel="accuracy")
        ax_acc.title.set_fontsize(9)
        ax_grad.title.set_fontsize(9)
        for ax in (ax_grad, ax_acc):
            ax.set_xticks(list(positions), [LABELS[arm] for arm in ARMS], fontsize=7, rotation=12)
            ax.set_xlim(-0.7, len(ARMS) - 0.3)  # room for the findings text of the outer arms
    common.save_figure(fig, args.out, NAME)


def main(argv: list[str] | None = None) -> None:
    args = common.parse_args(__doc__, argv)
    common.quiet()
    start = time.perf_counter()
    seeds = [args.seed + i for i in range(3)]
    # --fast: the tanh net at init only (training it takes minutes), the sigmoid net trained as in the full run
    plan = [(SIGMOID, seeds, SIGMOID.steps), (TANH, seeds, 0 if args.fast else TANH.steps)]
    results: dict = {}
    rows = []
    for spec, seeds, steps in plan:
        arms = {arm: summarize([run(spec, arm, seed, steps, args) for seed in seeds]) for arm in ARMS}
        results[spec.kind] = {"depth": spec.depth, "width": spec.width, "lr": spec.lr, "momentum": MOMENTUM,
                              "batch_size": BATCH, "steps": steps, "seeds": seeds, "arms": arms}  # fmt: skip
        for arm in ARMS:
            figures = arms[arm]
            ratio, acc, weight = figures["gradient_ratio"], figures.get("accuracy"), figures.get("weight_grad_ratio")
            rows.append([
                f"{spec.kind} {spec.depth}", arm,
                f"{ratio['geomean']:.3g} [{ratio['min']:.3g}–{ratio['max']:.3g}]",
                f"{weight['geomean']:.3g}" if weight else "-",
                f"{acc['mean']:.3f} [{acc['min']:.3f}–{acc['max']:.3f}]" if acc else "-",
                findings_text(figures),
            ])  # fmt: skip
    summary: dict = {"nets": results, "fast": args.fast, "seconds": time.perf_counter() - start}
    plot(results, [spec for spec, _, _ in plan], args)

    print(
        f"digits (pixels / 16), SGD momentum {MOMENTUM}, batch {BATCH}; sigmoid lr {SIGMOID.lr}, tanh lr {TANH.lr}; "
        "gradient ratio = ||dL/dh_1|| / ||dL/dh_L|| of the cross-entropy at init (geometric mean [min-max])"
    )
    headers = ["net", "init", "gradient ratio at init", "weight-grad ratio (GradientMonitor)", "val accuracy [min-max]",
               "init check findings (seeds)"]  # fmt: skip
    common.print_table(headers, rows)
    print(f"wrote {args.out / (NAME + '.png')} and {NAME}.json in {summary['seconds']:.1f} s")
    common.write_summary(args.out, NAME, summary)


if __name__ == "__main__":
    main()
