"""Reliability: nothing left behind on failure, callbacks that survive a second fit, exact figures on awkward models,
and warnings that fire when they should and only then."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn import ActivationMonitor, AutoInit, BatchNormGuard, GradientMonitor, guard
from lightning_bn.activations import get_activation
from lightning_bn.guards import BatchNormWarning, init_mismatches
from lightning_bn.init import init_layer_
from lightning_bn.monitoring import GradientProbe
from tests.helpers import BoringClassifier, mlp, read_scalars, trainer


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class FailsAtStep(BoringClassifier):
    def __init__(self, *args, fail_at: int = 0, error: type[BaseException] = RuntimeError, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fail_at, self.error = fail_at, error

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_step == self.fail_at:
            raise self.error("boom")
        return loss


def callbacks() -> list:
    return [ActivationMonitor(every_n_steps=1), GradientMonitor(every_n_steps=1), BatchNormGuard()]


@pytest.mark.parametrize("fail_at", [0, 2])
def test_an_exception_in_training_step_leaves_no_hook(tmp_path, fail_at):
    """An exception inside training_step on a logging step: every callback removes what it attached."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    model = FailsAtStep(net, fail_at=fail_at)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path, logger=TensorBoardLogger(tmp_path), max_steps=4, callbacks=callbacks()).fit(model)
    assert hook_count(model) == 0


def test_keyboard_interrupt_leaves_no_hook(tmp_path):
    """A KeyboardInterrupt (Lightning's graceful shutdown) leaves no hook either."""
    torch.manual_seed(0)
    model = FailsAtStep(mlp(2, 16), fail_at=1, error=KeyboardInterrupt)
    t = trainer(tmp_path, logger=TensorBoardLogger(tmp_path), max_steps=4, callbacks=callbacks())
    try:
        t.fit(model)
    except (KeyboardInterrupt, SystemExit):
        pass
    assert hook_count(model) == 0


def test_callbacks_work_again_in_a_second_fit(tmp_path):
    """The same instances in a second Trainer.fit: the monitors log step 0 again, AutoInit prepares the new model,
    BatchNormGuard and the non-finite warning fire again."""
    monitors = [ActivationMonitor(every_n_steps=1), GradientMonitor(every_n_steps=1)]
    auto, bn_guard = AutoInit(), BatchNormGuard()
    for run in ("first", "second"):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
        model = BoringClassifier(net, batch_size=2)  # batch 2: the small-batch warning
        model.net[3].weight.register_hook(lambda g: torch.full_like(g, math.nan))
        before = net[0].weight.detach().clone()
        logdir = tmp_path / run
        t = trainer(logdir, logger=TensorBoardLogger(logdir), max_steps=2, callbacks=[*monitors, auto, bn_guard])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t.fit(model)
        messages = [str(w.message) for w in caught]
        assert any("non-finite gradient at step 0" in m for m in messages), run
        assert any("normalize only 2 values per channel" in m for m in messages), run
        assert not torch.equal(before, net[0].weight), run  # AutoInit re-initialized this model
        assert [s for s, _ in read_scalars(logdir)["act_std/net.2"]] == [0, 1], run
        assert hook_count(model) == 0


class TwoWidths(nn.Module):
    """One ReLU module used at two places of different widths."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(64, 16), nn.Linear(16, 8), nn.Linear(8, 10)
        self.act = nn.ReLU()
        for layer in (self.a, self.b):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.constant_(layer.bias, 1.0)  # every unit positive on every sample: nothing dead

    def forward(self, x):
        return self.out(self.act(self.b(self.act(self.a(x)))))


def test_one_activation_at_two_widths_keeps_units_apart(tmp_path):
    """act_dead is 0 when no unit is dead, for a module used at two widths (was 0.875)."""
    model = BoringClassifier(TwoWidths(), lr=0.0)
    trainer(
        tmp_path, logger=TensorBoardLogger(tmp_path), max_steps=1, callbacks=[ActivationMonitor(every_n_steps=1)]
    ).fit(model)
    assert read_scalars(tmp_path)["act_dead/net.act"][0][1] == 0.0


def test_one_nan_sample_does_not_kill_every_unit(tmp_path):
    """A NaN in one sample of a tanh layer: act_dead stays 0, saturation is over the finite elements."""

    class NanSample(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act, self.out = nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)

        def forward(self, x):
            h = self.fc(x)
            h = torch.cat([h[:1] * math.nan, h[1:]])  # one sample of NaNs
            return self.out(self.act(h))

    torch.manual_seed(0)
    model = BoringClassifier(NanSample(), lr=0.0)
    model.example_input_array = None
    trainer(
        tmp_path, logger=TensorBoardLogger(tmp_path), max_steps=1, callbacks=[ActivationMonitor(every_n_steps=1)]
    ).fit(model)
    scalars = read_scalars(tmp_path)
    assert scalars["act_dead/net.act"][0][1] == 0.0
    assert scalars["act_nonfinite/net.act"][0][1] == 16
    assert 0.0 <= scalars["act_saturation/net.act"][0][1] < 0.2


def test_small_conv_batch_warns_on_samples(tmp_path):
    """BatchNorm2d at batch 2 on 32x32 inputs (2048 values per channel) warns: 2 samples per device."""

    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            return self.head(self.body(x.view(-1, 3, 32, 32)).mean((2, 3)))

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3 * 32 * 32, generator=g), torch.randint(0, 10, (16,), generator=g))
    model = BoringClassifier(ConvNet(), batch_size=2, data=data)
    with pytest.warns(BatchNormWarning, match=r"normalize only 2 samples on this device"):
        trainer(tmp_path, max_steps=3, callbacks=[BatchNormGuard(check_init=False)]).fit(model)
    big = BoringClassifier(ConvNet(), batch_size=16, data=data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BatchNormWarning)
        trainer(tmp_path, max_steps=1, callbacks=[BatchNormGuard(check_init=False)]).fit(big)


def test_guard_is_quiet_for_swa_update_bn_and_catches_eval_with_gradients():
    """swa_utils.update_bn (train-mode BN under no_grad on purpose) does not warn; guard(expect_eval=True) catches a
    forgotten eval() with gradients on, which plain guard() does not judge."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
    loader = DataLoader(TensorDataset(torch.randn(32, 4)), batch_size=8)
    with guard(net), warnings.catch_warnings():
        warnings.simplefilter("error", BatchNormWarning)
        torch.optim.swa_utils.update_bn(loader, net)
    net.train()
    with guard(net), warnings.catch_warnings():
        warnings.simplefilter("error", BatchNormWarning)
        net(torch.randn(8, 4))  # gradients on, no expectation: a training step
    with guard(net, expect_eval=True), pytest.warns(BatchNormWarning, match="expect_eval"):
        net(torch.randn(8, 4))
    with guard(net), pytest.warns(BatchNormWarning, match="no_grad"), torch.no_grad():
        net(torch.randn(8, 4))


def test_init_check_uses_the_initializers_fans_for_conv_transpose():
    """A ConvTranspose initialized by init_layer_ for ReLU is what the check expects (one fan function)."""
    torch.manual_seed(0)
    # weight (256, 4, 4, 4): fan-in 256 x 16 taps / stride 4 = 1024; weight[0] (the old rule) has only 64 elements
    net = nn.Sequential(nn.ConvTranspose2d(256, 4, 4, stride=2), nn.ReLU(), nn.Conv2d(4, 4, 3))
    init_layer_(net[0], "kaiming", get_activation("relu"))
    assert net[0].weight.std().item() == pytest.approx(math.sqrt(2 / 1024), rel=0.05)
    for example in (None, torch.randn(4, 256, 6, 6)):
        assert [f for f in init_mismatches(net, example) if f.problem == "weight_scale"] == []


def test_nonfinite_gradient_between_logging_steps_names_the_exact_step(tmp_path):
    """every_n_steps=5, a NaN gradient at step 2 only: the warning names step 2 and the layer, read at step 5."""
    torch.manual_seed(0)
    model = BoringClassifier(mlp(4, 8, nn.ReLU))
    hit = {"step": None}

    def poison(grad):
        if model.global_step == 2:
            hit["step"] = 2
            return torch.full_like(grad, math.nan)
        return grad

    model.net[4].weight.register_hook(poison)
    t = trainer(tmp_path, logger=CSVLogger(tmp_path), max_steps=7, callbacks=[GradientMonitor(every_n_steps=5)])
    with pytest.warns(RuntimeWarning, match=r"non-finite gradient at step 2; .*'net\.4'.*parameter 'net\.4\.weight'"):
        t.fit(model)
    assert hit["step"] == 2


def test_batchnorm_guard_runs_under_bf16_true(tmp_path):
    """BatchNormGuard's init check feeds the example input in the module's precision (bf16-true), not float32."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    model = BoringClassifier(net)
    monitor = ActivationMonitor(every_n_steps=1)
    t = trainer(tmp_path, max_steps=2, precision="bf16-true", callbacks=[BatchNormGuard(), monitor])
    t.fit(model)
    assert monitor.model_map is not None and monitor.model_map.layers["net.0"].activation.name == "relu"


def test_report_says_an_event_file_is_damaged(tmp_path, capsys):
    """A CRC-corrupted event file is reported as damaged, with its path (not as 'none holds lightning-bn scalars')."""
    from pathlib import Path

    from lightning_bn.cli import main

    torch.manual_seed(0)
    trainer(
        tmp_path, logger=TensorBoardLogger(tmp_path), max_steps=2, callbacks=[ActivationMonitor(every_n_steps=1)]
    ).fit(BoringClassifier(mlp(2, 16)))
    files = sorted(Path(tmp_path).rglob("events.out.tfevents.*"))
    assert main(["report", str(tmp_path)]) == 0
    capsys.readouterr()
    raw = bytearray(files[0].read_bytes())
    raw[20] ^= 0xFF  # a byte of the first record's data
    files[0].write_bytes(bytes(raw))
    code = main(["report", str(tmp_path)])
    err = capsys.readouterr().err
    assert f"damaged event file '{files[0]}'" in err and "record 1: the CRC of its data does not match" in err
    assert code == 2 and "none holds lightning-bn scalars" not in err


def test_update_ratio_sample_is_close_to_exact_and_copies_a_quarter(tmp_path, monkeypatch):
    """The default update ratio copies <= ~25% of the parameter bytes and lands within 5% of the exact one."""

    torch.manual_seed(0)
    net = mlp(2, 256, nn.ReLU)
    params = sum(p.numel() for p in net.parameters())
    runs = {}
    for mode in (True, "all"):
        torch.manual_seed(0)
        model = BoringClassifier(mlp(2, 256, nn.ReLU), optimizer="adam", lr=1e-3)
        monitor = GradientMonitor(every_n_steps=1, update_ratio=mode)
        copied = []
        original = GradientProbe.gather

        def spy(probe, *args, copied=copied, original=original, **kwargs):
            if probe._pending is not None:
                copied.append(sum(t.numel() for t in probe._pending["before"]))
            return original(probe, *args, **kwargs)

        monkeypatch.setattr(GradientProbe, "gather", spy)
        logdir = tmp_path / str(mode)
        trainer(logdir, logger=TensorBoardLogger(logdir), max_steps=2, callbacks=[monitor]).fit(model)
        runs[mode] = (read_scalars(logdir), max(copied))
    sampled, exact = runs[True][0], runs["all"][0]
    assert runs[True][1] <= 0.26 * params and runs["all"][1] == params
    for tag in [t for t in exact if t.startswith("update_ratio/")]:
        assert sampled[tag][-1][1] == pytest.approx(exact[tag][-1][1], rel=0.05), tag
