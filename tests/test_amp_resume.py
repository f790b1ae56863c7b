"""Issue 24: a mixed-precision step the GradScaler skips is counted, never reported as non-finite; a resumed
HealthCheck judges again; sparse gradients are measured; ``stop_on`` is validated like every other argument.

Lightning turns ``Trainer(accelerator="cpu", precision="16-mixed")`` into bf16 (no GradScaler), so the AMP tests pass
Lightning's own ``MixedPrecision("16-mixed", "cpu", scaler=...)`` plugin: real fp16 autocast on the CPU and a real
``torch.amp.GradScaler("cpu")`` whose first scale overflows the fp16 backward, as a scale still calibrating does.
"""

import math
import warnings

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn import ActivationMonitor, GradientMonitor, HealthCheck, Monitor
from lightning_bn.tags import SKIPPED_STEPS_TAG, TOTAL_GRADIENT_TAG
from tests.helpers import BoringClassifier, mlp, random_data, trainer


def _relevant(caught):
    return [str(w.message) for w in caught if "non-finite" in str(w.message) or "HealthCheck" in str(w.message)]


class _ScaleRecorder(BoringClassifier):
    """Records the GradScaler's scale after every optimizer step: a drop is a step the scaler skipped."""

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.scales.append(self.trainer.precision_plugin.scaler.get_scale())


@pytest.mark.parametrize(("every", "init", "growth"), [(1, 2.0**20, 1000), (4, 2.0**19, 1)])
def test_amp_overflow_skip_is_counted_not_stopped(tmp_path, every, init, growth):
    """fp16 autocast with a real GradScaler whose scale overflows the fp16 backward: at 2**20 the first step
    overflows once (a logging step, every=1); at 2**19 growing every step, every other step overflows (between
    logging steps, every=4). GradientMonitor + HealthCheck(stop_on=("nonfinite",)) train on, warn nothing and log
    the count of skipped steps under lightning_bn/skipped_steps; no inf gradient norm is logged."""
    torch.manual_seed(0)
    model = _ScaleRecorder(mlp(2, 32), lr=0.05, batch_size=32, data=random_data(32 * 12))
    model.scales = []
    scaler = torch.amp.GradScaler("cpu", init_scale=init, growth_interval=growth)
    check = HealthCheck(stop_on=("nonfinite",), summary=False)
    monitors = [ActivationMonitor(every_n_steps=every, histograms=False, heatmap=False), GradientMonitor(every)]
    t = trainer(tmp_path, logger=TensorBoardLogger(tmp_path), max_steps=12, callbacks=[*monitors, check],
                plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(model)
    skipped = [b < a for a, b in zip([init, *model.scales], model.scales)]  # per step: the scale dropped
    drops = sum(skipped)
    assert drops >= 1, model.scales  # the scale calibrated: steps were skipped
    assert t.global_step == 12 and check.stopped is None
    assert _relevant(caught) == []
    gradients = monitors[1]
    assert gradients.engine.skipped_steps == drops
    figures = gradients.figures
    assert all(v == sum(skipped[: s + 1]) for s, v in figures[SKIPPED_STEPS_TAG])  # as of each logging step
    assert all(math.isfinite(v) for _, v in figures[TOTAL_GRADIENT_TAG])  # a skipped step logs no inf gradient
    assert all(math.isfinite(p.detach().float().norm()) for p in model.parameters())


def test_amp_monitor_plain_loop_counts_the_skip():
    """Monitor in a plain fp16-autocast loop with a real GradScaler: the overflow steps are counted, no warning;
    then a real NaN (weights non-finite after an applied step) is still reported."""
    torch.manual_seed(0)
    net = mlp(2, 32)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**19, growth_interval=1)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    drops, before = 0, scaler.get_scale()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Monitor(net, every_n_steps=5) as monitor:
            for _ in range(11):  # the last one (10) a logging step
                opt.zero_grad()
                with torch.autocast("cpu", dtype=torch.float16):
                    loss = nn.functional.cross_entropy(net(x), y)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                drops += scaler.get_scale() < before
                before = scaler.get_scale()
                monitor.step(loss)
            assert drops >= 3 and _relevant(caught) == []
            assert monitor.engine.skipped_steps == drops
            assert monitor.figures[SKIPPED_STEPS_TAG][-1][1] == drops
            # a step taken with NaN gradients (no scaler): the weights go NaN, which is reported
            opt.zero_grad()
            (net(x).sum() * math.nan).backward()
            opt.step()
            monitor.step()
            monitor.engine.check_nonfinite()
    assert any("non-finite gradient at step 11" in m for m in _relevant(caught))


class _Spike(nn.Module):
    """Identity, except on the training steps in ``at``: NaN in half of its output (the loss does not see it)."""

    def __init__(self) -> None:
        super().__init__()
        self.at: set[int] = set()
        self.step = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.step in self.at:
            mask = torch.zeros_like(x)
            mask[: len(x) // 2] = math.nan
            return x + mask
        return x


class _SpikeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.spike, self.act, self.fc2 = nn.Linear(64, 32), _Spike(), nn.ReLU(), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the NaN shows in the ReLU's output (act_nonfinite) and is removed before the loss: the weights stay finite
        return self.fc2(torch.nan_to_num(self.act(self.spike(self.fc1(x)))))


class _SpikeModel(BoringClassifier):
    def training_step(self, batch, batch_idx):
        self.net.spike.step = self.global_step
        return super().training_step(batch, batch_idx)


def _resume_callbacks():
    return [ActivationMonitor(every_n_steps=1, histograms=False, heatmap=False), GradientMonitor(1),
            HealthCheck(stop_on=("nonfinite",), summary=False)]  # fmt: skip


def test_resumed_health_check_stops_at_its_new_nan(tmp_path):
    """fit: NaN at step 5, HealthCheck stops there; checkpoint; resume with ckpt_path: a new NaN at step 20 stops
    the resumed run at step 20 (it used to be restored as 'stopped' and train on to max_steps in silence)."""
    torch.manual_seed(0)
    net = _SpikeNet()
    net.spike.at = {5, 20}
    model = _SpikeModel(net, lr=0.05, batch_size=16, data=random_data(16 * 50))
    first = _resume_callbacks()
    t = trainer(tmp_path / "a", logger=TensorBoardLogger(tmp_path / "a"), max_steps=40, callbacks=first)
    with pytest.warns(RuntimeWarning, match=r"stopping training at step 5: net\.act is nonfinite"):
        t.fit(model)
    assert first[-1].stopped[:2] == (5, "nonfinite") and t.global_step == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())
    ckpt = tmp_path / "stopped.ckpt"
    t.save_checkpoint(ckpt)

    second = _resume_callbacks()
    t2 = trainer(tmp_path / "b", logger=TensorBoardLogger(tmp_path / "b"), max_steps=40, callbacks=second)
    with pytest.warns(RuntimeWarning, match=r"stopping training at step 20: net\.act is nonfinite"):
        t2.fit(model, ckpt_path=ckpt)
    check = second[-1]
    assert check.stopped[:2] == (20, "nonfinite") and t2.global_step == 21
    assert [stop[:2] for stop in check.previous_stops] == [(5, "nonfinite")]  # the history is kept
    assert [stop[:2] for stop in check.state_dict()["previous_stops"]] == [[5, "nonfinite"]]


class _Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 16, sparse=True)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.embed(x).mean(1)))


class _SparseModel(BoringClassifier):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size)


def _tokens(n: int = 256) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randint(0, 100, (n, 6), generator=g), torch.randint(0, 4, (n,), generator=g))


def test_sparse_embedding_trains_with_gradient_monitor(tmp_path):
    """nn.Embedding(sparse=True) under SGD with GradientMonitor (every step watched, logging every 3rd) and
    HealthCheck: no crash; the embedding's gradient norm is the norm of the sparse gradient's values."""
    torch.manual_seed(0)
    model = _SparseModel(_Bag(), batch_size=32, data=_tokens())
    monitors = [ActivationMonitor(every_n_steps=3, histograms=False, heatmap=False),
                GradientMonitor(3, histograms=True)]  # fmt: skip
    t = trainer(tmp_path, logger=TensorBoardLogger(tmp_path), max_steps=7,
                callbacks=[*monitors, HealthCheck(stop_on="all", summary=False)])  # fmt: skip
    t.fit(model)
    assert t.global_step == 7
    norms = monitors[1].figures["grad_norm/net.embed.weight"]
    assert [s for s, _ in norms] == [0, 3, 6] and all(math.isfinite(v) and v > 0 for _, v in norms)


@pytest.mark.parametrize("optimizer", ["sgd", "sparse_adam"])
def test_sparse_embedding_trains_with_monitor(optimizer):
    """Monitor in a plain loop on nn.Embedding(sparse=True) (SGD, or SparseAdam for the embedding): figures on
    logging steps, the watch in between, no crash; the norm equals that of the coalesced values."""
    torch.manual_seed(0)
    net = _Bag()
    if optimizer == "sgd":
        opts = [torch.optim.SGD(net.parameters(), lr=0.1)]
    else:
        opts = [torch.optim.SparseAdam(net.embed.parameters(), lr=0.01), torch.optim.Adam(net.fc.parameters())]
    x, y = _tokens(32).tensors
    with Monitor(net, every_n_steps=2) as monitor:
        for step in range(5):
            for opt in opts:
                opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            expected = net.embed.weight.grad.coalesce().values().norm().item()
            for opt in opts:
                opt.step()
            figures = monitor.step()
            if step % 2 == 0:
                assert figures["grad_norm/embed.weight"] == pytest.approx(expected, rel=1e-5)
    assert monitor.engine.skipped_steps == 0 and not monitor.engine.warned_nonfinite


def test_stop_on_none_never_stops_and_bad_values_are_named(tmp_path):
    """stop_on=None means never stop (a NaN run trains on); 123, [1] and 'nope' raise MisconfigurationException
    naming the value, as every other argument does."""
    assert HealthCheck(stop_on=None).stop_on == ()
    assert HealthCheck(stop_on=["nonfinite"]).stop_on == ("nonfinite",)
    for bad, shown in [(123, "123"), ([1], "1"), ("nope", "'nope'"), (3.5, "3.5")]:
        with pytest.raises(MisconfigurationException, match=rf"Expected `stop_on` to .* but got {shown}$"):
            HealthCheck(stop_on=bad)
    torch.manual_seed(0)
    net = _SpikeNet()
    net.spike.at = {1}
    model = _SpikeModel(net, lr=0.05, batch_size=16, data=random_data(16 * 6))
    check = HealthCheck(stop_on=None, summary=False)
    t = trainer(tmp_path, logger=TensorBoardLogger(tmp_path), max_steps=4, callbacks=[*_resume_callbacks()[:2], check])
    t.fit(model)
    assert t.global_step == 4 and check.stopped is None
