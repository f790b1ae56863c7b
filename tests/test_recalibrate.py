"""Tests for lightning_bn.recalibration and the BatchNormRecalibration callback."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn.callbacks.recalibrate import BatchNormRecalibration, shift_metrics
from lightning_bn.guards import guard
from lightning_bn.recalibration import default_forward, recalibrate
from tests.helpers import BoringClassifier, digits_data, read_scalars, run_ddp_script, trainer

DDP_SCRIPT = Path(__file__).parent / "ddp_scripts" / "recalibrate_ddp.py"


def bn_net(momentum: float | None = 0.1) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, 32),
        nn.BatchNorm1d(32, momentum=momentum),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.BatchNorm1d(32, momentum=momentum),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def conv_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def record_inputs(net: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Hooks that keep every BatchNorm's input, channels first and flattened."""
    inputs: dict[str, list[torch.Tensor]] = {}
    for name, module in net.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.register_forward_pre_hook(
                lambda m, args, name=name: inputs.setdefault(name, []).append(
                    args[0].detach().transpose(0, 1).reshape(args[0].shape[1], -1).double()
                )
            )
    return inputs


def max_rel_error(net: nn.Module, inputs: dict[str, list[torch.Tensor]]) -> float:
    errors = []
    for name, module in net.named_modules():
        if name in inputs:
            x = torch.cat(inputs[name], dim=1)
            for got, want in ((module.running_mean, x.mean(1)), (module.running_var, x.var(1))):
                errors.append(((got.double() - want).abs() / want.abs().clamp_min(1e-6)).max().item())
    return max(errors)


@pytest.mark.parametrize(
    "make_net, shape", [(bn_net, (64,)), (conv_net, (3, 6, 6))], ids=["batchnorm1d", "batchnorm2d"]
)
def test_recalibrate_gives_exact_statistics(make_net, shape):
    """After recalibrate, each running mean/var equals the exact (unbiased) statistics of its inputs (rel. 1e-4)."""
    torch.manual_seed(0)
    net = make_net().eval()
    data = TensorDataset(torch.randn(100, *shape) * 3 + 2)  # the last of 7 batches is smaller: plain averaging errs
    inputs = record_inputs(net)
    recalibrate(net, DataLoader(data, batch_size=16), num_batches=7)
    assert max_rel_error(net, inputs) < 1e-4
    assert not net.training and all(not m.training for m in net.modules())
    assert all(m.momentum == 0.1 for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert all(m.num_batches_tracked.item() == 7 for m in net.modules() if hasattr(m, "num_batches_tracked"))


def test_recalibrate_beats_update_bn_on_uneven_batches():
    """torch's update_bn averages per-batch variances (off by the spread of the batch means); we are exact."""
    torch.manual_seed(0)
    net = bn_net()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 64, generator=g) + torch.linspace(-3, 3, 96)[:, None]  # batch means differ
    reference = bn_net()
    reference.load_state_dict(net.state_dict())
    inputs = record_inputs(net)
    recalibrate(net, DataLoader(TensorDataset(x), batch_size=32), num_batches=3)
    ours = max_rel_error(net, inputs)
    inputs_ref = record_inputs(reference)
    torch.optim.swa_utils.update_bn(DataLoader(TensorDataset(x), batch_size=32), reference)
    theirs = max_rel_error(reference, inputs_ref)
    assert ours < 1e-4 < 0.1 < theirs


def test_recalibrate_uses_only_num_batches_and_keeps_momentum_none():
    """Only the first num_batches batches count; a cumulative-average BatchNorm (momentum=None) stays one."""
    net = bn_net(momentum=None)
    data = TensorDataset(torch.randn(64, 64))
    inputs = record_inputs(net)
    shifts = recalibrate(net, DataLoader(data, batch_size=16), num_batches=2)
    assert shifts["1"]["count"] == 32.0
    assert max_rel_error(net, inputs) < 1e-4
    assert net[1].momentum is None


def test_recalibrate_rejects_bad_num_batches():
    """A non-positive num_batches raises ValueError naming it."""
    with pytest.raises(ValueError, match="num_batches.*0"):
        recalibrate(bn_net(), [], num_batches=0)


def test_recalibrate_does_not_trip_the_guard():
    """The deliberate train-mode pass without gradients is not the forgotten model.eval()."""
    net = bn_net().eval()
    with guard(net), warnings.catch_warnings():
        warnings.simplefilter("error")
        recalibrate(net, DataLoader(TensorDataset(torch.randn(32, 64)), batch_size=16), num_batches=2)


def test_callback_rejects_bad_arguments():
    """Bad arguments raise MisconfigurationException naming the value received."""
    with pytest.raises(MisconfigurationException, match="when.*'never'"):
        BatchNormRecalibration(when="never")
    with pytest.raises(MisconfigurationException, match="num_batches.*-1"):
        BatchNormRecalibration(num_batches=-1)


def accuracy(model: BoringClassifier, data: TensorDataset) -> float:
    model.eval()
    with torch.no_grad():
        x, y = data.tensors
        return (model(x).argmax(-1) == y).float().mean().item()


class AccuracyBeforeRecalibration(Callback):
    def __init__(self, data: TensorDataset) -> None:
        self.data = data
        self.accuracy = float("nan")

    def on_train_end(self, trainer, pl_module) -> None:
        self.accuracy = accuracy(pl_module, self.data)
        pl_module.train()


@pytest.mark.parametrize("momentum", [0.9, 0.1])
def test_recalibration_accuracy_before_and_after_at_high_and_default_momentum(tmp_path, momentum):
    """Digits, 150 SGD steps at batch 16, validation accuracy before -> after recalibration over 50 batches (seeds
    0, 1, 2; 360 validation samples, one is 0.0028). BatchNorm momentum 0.9 (running statistics ~ the last batch):
    0.922 / 0.922 / 0.925 -> 0.950 / 0.953 / 0.950. PyTorch's default momentum 0.1: 0.947 / 0.950 / 0.953 -> 0.950 /
    0.953 / 0.950, i.e. no gain beyond one sample either way. This test runs seed 0."""
    torch.manual_seed(0)
    train, val = digits_data()
    model = BoringClassifier(bn_net(momentum=momentum), lr=0.2, batch_size=16, data=train, val_data=val)
    spy = AccuracyBeforeRecalibration(val)
    recalibration = BatchNormRecalibration(num_batches=50)
    t = trainer(tmp_path, callbacks=[spy, recalibration], max_steps=150, max_epochs=None)
    t.fit(model)
    after = accuracy(model, val)
    if momentum == 0.9:
        assert after >= spy.accuracy + 0.02, (spy.accuracy, after)
    else:
        assert abs(after - spy.accuracy) <= 1.5 / len(val), (spy.accuracy, after)
    assert after > 0.9
    assert recalibration.shifts["net.1"]["count"] == 50 * 16
    logged = read_scalars(tmp_path)
    for key, value in shift_metrics(recalibration.shifts).items():
        assert logged[key] == [(150, pytest.approx(value, rel=1e-5))]
    assert recalibration.shifts["net.4"]["mean_shift"] > 0


class TrackedAtValidation(Callback):
    def __init__(self) -> None:
        self.tracked: list[int] = []

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.tracked.append(int(pl_module.net[1].num_batches_tracked))


def test_epoch_end_recalibrates_before_each_validation(tmp_path):
    """when='epoch_end': every end-of-epoch validation sees statistics refreshed over 3 more batches."""
    spy = TrackedAtValidation()
    callbacks = [BatchNormRecalibration(num_batches=3, when="epoch_end"), spy]
    t = trainer(tmp_path, callbacks=callbacks, max_steps=-1, max_epochs=2, limit_train_batches=4, limit_val_batches=1)
    t.fit(BoringClassifier(bn_net()))
    assert spy.tracked == [4 + 3, 8 + 3 + 3]  # training steps + recalibration batches


@pytest.mark.slow
def test_ddp_recalibration_pools_statistics_over_ranks(tmp_path):
    """2-process DDP (gloo): both ranks hold the exact statistics of the values both ranks saw (rel. 1e-4)."""
    run_ddp_script(DDP_SCRIPT.name, str(tmp_path), timeout=600)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    inputs = [json.loads((tmp_path / f"inputs{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["stats"] == ranks[1]["stats"]
    for name, (mean, var) in ranks[0]["stats"].items():
        pooled = torch.cat([torch.tensor(inputs[r][name], dtype=torch.float64) for r in (0, 1)])
        own = torch.tensor(inputs[0][name], dtype=torch.float64)
        assert pooled.shape[0] == 128 and own.shape[0] == 64
        got_mean, got_var = torch.tensor(mean, dtype=torch.float64), torch.tensor(var, dtype=torch.float64)
        assert torch.allclose(got_mean, pooled.mean(0), rtol=1e-4, atol=1e-6)
        assert torch.allclose(got_var, pooled.var(0), rtol=1e-4)
        assert not torch.allclose(got_var, own.var(0), rtol=1e-2)  # rank 0's data alone gives other figures
        assert ranks[0]["shifts"][name]["count"] == 128.0


def model_snapshot(net: nn.Module) -> dict:
    """Everything a recalibration may touch: parameters, every buffer, momentum, each module's mode, the grad mode."""
    return {
        "state": {k: v.detach().clone() for k, v in net.state_dict().items()},
        "momentum": [m.momentum for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)],
        "training": [m.training for m in net.modules()],
        "grad": torch.is_grad_enabled(),
    }


def assert_same_model(net: nn.Module, before: dict) -> None:
    after = model_snapshot(net)
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert (after["momentum"], after["training"], after["grad"]) == (before["momentum"], before["training"], True)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules())


def used_net() -> nn.Sequential:
    """bn_net with trained-looking running statistics, num_batches_tracked 3, mixed momentum and mixed modes."""
    torch.manual_seed(0)
    net = bn_net()
    net[4].momentum = None
    for _ in range(3):
        net(torch.randn(16, 64) * 2 + 1)
    net.eval()
    net[2].train()  # a module in another mode than the model
    return net


@pytest.mark.parametrize(
    "batches",
    [
        DataLoader(TensorDataset(torch.randn(33, 64)), batch_size=16),  # 16, 16, then 1: "more than 1 value"
        [torch.randn(16, 64), torch.randn(16, 64), torch.randn(16, 63)],  # the third batch does not fit Linear(64)
    ],
    ids=["batch_of_one", "wrong_shape"],
)
def test_recalibrate_failure_restores_the_whole_model(batches):
    """A batch that fails mid-pass raises, and leaves every buffer (num_batches_tracked too), momentum, every
    module's mode and the grad mode as they were, with no hook behind."""
    net = used_net()
    before = model_snapshot(net)
    assert int(net[1].num_batches_tracked) == 3
    with pytest.raises((ValueError, RuntimeError), match="more than 1 value|shapes cannot be multiplied"):
        recalibrate(net, batches, num_batches=10)
    assert_same_model(net, before)


def test_recalibrate_changes_only_the_batchnorm_statistics():
    """Another module's buffer updated in training mode (InstanceNorm's running statistics) is put back; a
    BatchNorm that does not run keeps its statistics and num_batches_tracked."""
    torch.manual_seed(0)
    norm = nn.InstanceNorm1d(1, affine=True, track_running_stats=True)
    net = nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Unflatten(1, (1, 8)), norm)
    net.add_module("idle", nn.BatchNorm1d(4))  # left out of the forward below
    before = model_snapshot(net)
    recalibrate(net, [torch.randn(16, 64) * 3 for _ in range(2)], forward=lambda model, x: model[:4](x))
    after = net.state_dict()
    for key in ("3.running_mean", "3.running_var", "3.num_batches_tracked", "idle.running_mean", "idle.running_var"):
        assert torch.equal(after[key], before["state"][key]), key
    assert int(after["idle.num_batches_tracked"]) == 0 and int(after["1.num_batches_tracked"]) == 2
    assert not torch.equal(after["1.running_var"], before["state"]["1.running_var"])


@pytest.mark.parametrize("forward", ["nope", 3, lambda model: model, lambda: None], ids=["str", "int", "one", "none"])
def test_bad_forward_is_rejected_before_training(forward):
    """`forward` must be None or a callable taking (model, batch): rejected in __init__ (and by recalibrate before it
    touches the model), naming the value."""
    with pytest.raises(MisconfigurationException, match=r"forward.*\(model, batch\).*" + re.escape(repr(forward))):
        BatchNormRecalibration(forward=forward)
    with pytest.raises(TypeError, match=re.escape(repr(forward))):
        recalibrate(bn_net(), [torch.randn(4, 64)], forward=forward)


def test_forward_none_or_any_two_argument_callable_is_accepted():
    assert BatchNormRecalibration(forward=None).forward is default_forward
    for forward in (lambda model, batch: model(batch[0]), lambda *args: None, default_forward):
        assert BatchNormRecalibration(forward=forward).forward is forward


class CountingForward:
    """A forward that counts its calls (and can fail on one of them)."""

    def __init__(self, fail_at: int = 0) -> None:
        self.calls = 0
        self.fail_at = fail_at

    def __call__(self, model: nn.Module, batch) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("forward failed on purpose")
        return default_forward(model, batch)


def test_same_callback_recalibrates_every_epoch_of_a_second_fit(tmp_path):
    """One instance, two Trainer.fit calls (1 epoch, then 2): the second fit recalibrates at its epoch 0 too, though
    epoch 0 was the last one the first fit recalibrated."""
    forward = CountingForward()
    recalibration = BatchNormRecalibration(num_batches=3, when="epoch_end", forward=forward)
    for epochs, calls, tracked in ((1, 3, [4 + 3]), (2, 3 + 6, [4 + 3, 8 + 3 + 3])):
        spy = TrackedAtValidation()
        t = trainer(
            tmp_path / str(epochs),
            callbacks=[recalibration, spy],
            max_steps=-1,
            max_epochs=epochs,
            limit_train_batches=4,
            limit_val_batches=1,
        )
        t.fit(BoringClassifier(bn_net()))
        assert (forward.calls, spy.tracked) == (calls, tracked)
        assert recalibration.shifts["net.1"]["count"] == 3 * 32


def test_resumed_fit_recalibrates_each_epoch_once(tmp_path):
    """Resuming from a checkpoint taken right after epoch 0's recalibration: the callback's state comes back from the
    checkpoint (setup's reset comes first), epoch 0 is not recalibrated again and epoch 1 is."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    kwargs = dict(max_steps=-1, limit_train_batches=4, enable_checkpointing=True)
    first = CountingForward()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_on_train_epoch_end=False)
    callbacks = [BatchNormRecalibration(num_batches=3, when="epoch_end", forward=first), checkpoint]
    trainer(tmp_path, callbacks=callbacks, max_epochs=1, **kwargs).fit(BoringClassifier(bn_net()))
    assert first.calls == 3
    saved_path = checkpoint.best_model_path
    saved = torch.load(saved_path, weights_only=False)
    assert saved["global_step"] == 4
    assert [s for k, s in saved["callbacks"].items() if "BatchNormRecalibration" in k] == [{"last_epoch": 0}]

    resumed = CountingForward()
    recalibration = BatchNormRecalibration(num_batches=3, when="epoch_end", forward=resumed)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt2", every_n_train_steps=4, save_on_train_epoch_end=False)
    restored = StateAtTrainStart(recalibration)
    t = trainer(tmp_path / "resumed", callbacks=[recalibration, checkpoint, restored], max_epochs=2, **kwargs)
    t.fit(BoringClassifier(bn_net()), ckpt_path=saved_path)
    assert restored.state == {"last_epoch": 0}
    assert t.global_step == 8 and resumed.calls == 3  # epoch 1 only


class StateAtTrainStart(Callback):
    def __init__(self, callback: Callback) -> None:
        self.callback = callback
        self.state: dict | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.state = self.callback.state_dict()


class FailAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("training failed on purpose")


@pytest.mark.parametrize("where", ["recalibration", "training"])
def test_exception_in_training_leaves_nothing_attached(tmp_path, where):
    """A fit that fails inside the recalibration (second batch) or in a later training step: no hook remains on any
    module, momentum is restored, and a failed recalibration leaves num_batches_tracked at the training steps."""
    model = BoringClassifier(bn_net())
    forward = CountingForward(fail_at=2 if where == "recalibration" else 0)
    callbacks = [BatchNormRecalibration(num_batches=3, when="epoch_end", forward=forward), FailAtStep(5)]
    t = trainer(tmp_path, callbacks=callbacks, max_steps=-1, max_epochs=3, limit_train_batches=4)
    with pytest.raises(RuntimeError, match="on purpose"):
        t.fit(model)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert [m.momentum for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == [0.1, 0.1]
    assert int(model.net[1].num_batches_tracked) == (4 if where == "recalibration" else 5 + 3)
