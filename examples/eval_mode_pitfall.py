"""The forgotten ``model.eval()``: BatchNorm in training mode at inference normalizes with each batch's statistics.

Ioffe & Szegedy (ICML 2015) normalize with mini-batch statistics while training and with running (population)
statistics at inference. Left in training mode, a BatchNorm network's prediction for one sample depends on the
other samples of its batch, which on small batches is noisy enough to cost accuracy; and every such forward pass
overwrites the running statistics with evaluation data.

This script trains a BatchNorm MLP on scikit-learn's digits with a Lightning ``Trainer``, then measures validation
accuracy (a) correctly in eval mode and (b) in training mode with batches of 1-4 samples (on a copy, so the running
statistics of the model stay clean), while ``lightning_bn.guards.guard(model)`` watches and warns. It also runs
``Trainer.validate`` on a model that forgets to switch to eval mode, with ``BatchNormGuard`` in the callbacks, and
shows its warnings. It prints a table and writes ``eval_mode_pitfall.{png,json}`` to ``--out``.

Run::

    python examples/eval_mode_pitfall.py          # 600 training steps
    python examples/eval_mode_pitfall.py --fast   # 150 steps (for the tests)
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

from lightning_bn.callbacks.norm_guard import BatchNormGuard
from lightning_bn.guards import BatchNormWarning, guard

NAME = "eval_mode_pitfall"
DEPTH, WIDTH, LR, BATCH = 2, 128, 1e-3, 64
TRAIN_MODE_BATCHES = (4, 8, 16, 64)


class ForgetsEval(common.Classifier):
    """The bug: custom evaluation code that leaves the model in training mode (Lightning's default calls eval())."""

    def on_validation_model_eval(self) -> None:
        self.train()


def accuracy(net: nn.Module, data: TensorDataset, batch_size: int, train_mode: bool) -> float:
    """Accuracy over ``data`` in batches of ``batch_size``, under ``torch.no_grad()``, in train or eval mode."""
    net.train(train_mode)
    correct = 0
    with torch.no_grad():
        for x, y in common.loader(data, batch_size, shuffle=False):
            correct += (net(x).argmax(-1) == y).sum().item()
    return correct / len(data)


def main(argv: list[str] | None = None) -> None:
    args = common.parse_args(__doc__, argv)
    common.quiet()
    steps = 150 if args.fast else 600
    start = time.perf_counter()
    pl.seed_everything(args.seed, verbose=False)
    train_data, val_data = common.digits()
    net = common.mlp(DEPTH, WIDTH, act=nn.ReLU, norm=nn.BatchNorm1d)
    trainer = common.trainer(args.out, f"{NAME}/fit", steps)
    trainer.fit(common.Classifier(net, lr=LR, optimizer="adam"), common.loader(train_data, BATCH, seed=args.seed))

    rows = [["eval", "any", accuracy(net, val_data, 256, train_mode=False), "no"]]
    guard_messages: list[str] = []
    for batch_size in TRAIN_MODE_BATCHES:
        forgetful = copy.deepcopy(net)  # train-mode passes overwrite running statistics: keep the model clean
        with guard(forgetful), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            acc = accuracy(forgetful, val_data, batch_size, train_mode=True)
        found = [str(w.message) for w in caught if issubclass(w.category, BatchNormWarning)]
        guard_messages += found
        rows.append(["train", batch_size, acc, "yes" if found else "no"])

    # The same mistake inside a Trainer: BatchNormGuard notices during `validate`.
    bugged = ForgetsEval(copy.deepcopy(net), example_input=train_data.tensors[0][:BATCH])
    validator = common.trainer(args.out, f"{NAME}/validate", steps, [BatchNormGuard()], limit_val_batches=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        validator.validate(bugged, common.loader(val_data, 4, shuffle=False), verbose=False)
    callback_messages = [str(w.message) for w in caught if issubclass(w.category, BatchNormWarning)]

    eval_acc = rows[0][2]
    fig, (ax,) = common.subplots(1, width=5.6)
    ax.axhline(eval_acc, color="black", linestyle="--", label=f"eval mode (running stats): {eval_acc:.3f}")
    ax.plot(TRAIN_MODE_BATCHES, [r[2] for r in rows[1:]], marker="o", label="train mode (batch stats)")
    ax.set_xscale("log", base=2)
    ax.set(title="BatchNorm MLP on digits: validation accuracy", xlabel="inference batch size", ylabel="accuracy")
    ax.legend(fontsize=8)
    common.save_figure(fig, args.out, NAME)

    summary = {
        "steps": steps,
        "eval_accuracy": eval_acc,
        "train_mode_accuracy": {str(r[1]): r[2] for r in rows[1:]},
        "guard_warned": bool(guard_messages),
        "guard_messages": sorted(set(guard_messages)),
        "callback_warned": bool(callback_messages),
        "callback_messages": sorted(set(callback_messages)),
        "seconds": time.perf_counter() - start,
    }
    print(f"BatchNorm MLP ({DEPTH} x {WIDTH}) on digits, Adam lr {LR}, {steps} steps; validation accuracy:")
    common.print_table(["mode", "inference batch", "accuracy", "guard(model) warned"], rows)
    print("\nguard(model) said:")
    for message in summary["guard_messages"]:
        print(f"  BatchNormWarning: {message}")
    print("BatchNormGuard in Trainer.validate (model that forgets eval()) said:")
    for message in summary["callback_messages"]:
        print(f"  BatchNormWarning: {message}")
    print(f"wrote {args.out / (NAME + '.png')} and {NAME}.json in {summary['seconds']:.1f} s")
    common.write_summary(args.out, NAME, summary)


if __name__ == "__main__":
    main()
