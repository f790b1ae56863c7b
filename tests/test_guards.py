"""Tests for lightning_bn.guards and the BatchNormGuard callback."""

from __future__ import annotations

import re
import sys
import warnings

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import TensorDataset

import lightning_bn
from lightning_bn import guards
from lightning_bn.callbacks.norm_guard import BatchNormGuard
from lightning_bn.guards import BatchNormWarning, guard, init_mismatches
from lightning_bn.tracing import module_order_activations
from tests.helpers import BoringClassifier, bn_mlp, mlp, trainer


def images(n: int = 64, size: int = 8) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g))


def cnn(norm: str) -> nn.Sequential:
    def make_norm(c: int) -> nn.Module:
        return nn.BatchNorm2d(c) if norm == "batch" else nn.GroupNorm(4, c)

    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        make_norm(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        make_norm(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


class TransformerClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x.view(x.shape[0], 4, 16)).mean(1))


def he_mlp(depth: int, width: int = 256, init: str = "kaiming") -> nn.Sequential:
    net = mlp(depth, width)
    for module in net:
        if isinstance(module, nn.Linear):
            if init == "kaiming":
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            else:
                nn.init.xavier_normal_(module.weight)
            nn.init.zeros_(module.bias)
    return net


class TrainsInValidation(BoringClassifier):
    def validation_step(self, batch, batch_idx):
        self.train()
        return super().validation_step(batch, batch_idx)


class LeaksInValidation(BoringClassifier):
    def validation_step(self, batch, batch_idx):
        self.net.train()
        self(batch[0])
        self.net.eval()
        return super().validation_step(batch, batch_idx)


def fit(tmp_path, model, **kwargs):
    kwargs = {"callbacks": [BatchNormGuard()], "max_steps": 4, "limit_val_batches": 2, **kwargs}
    t = trainer(tmp_path, **kwargs)
    t.fit(model)
    return t


def guard_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, BatchNormWarning)]


# ---- plain torch ------------------------------------------------------------------------------------------------


def test_find_train_mode_norms_covers_the_batchnorm_family():
    """BatchNorm, SyncBatchNorm and InstanceNorm with running stats count; LayerNorm/GroupNorm/stat-less IN do not."""
    net = nn.ModuleDict(
        {
            "bn": nn.BatchNorm2d(4),
            "sync": nn.SyncBatchNorm(4),
            "inst": nn.InstanceNorm1d(4, track_running_stats=True),
            "inst_plain": nn.InstanceNorm1d(4),
            "ln": nn.LayerNorm(4),
            "gn": nn.GroupNorm(2, 4),
        }
    )
    assert guards.find_train_mode_norms(net) == ["bn", "sync", "inst"]
    net.eval()
    assert guards.find_train_mode_norms(net) == []


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_guard_warns_for_train_mode_without_gradients(context):
    """A BatchNorm in training mode under no_grad / inference_mode warns once, naming the module and model.eval()."""
    net = bn_mlp()
    with guard(net), context(), pytest.warns(BatchNormWarning, match=r"'1'.*model\.eval\(\)") as record:
        net(torch.randn(8, 64))
        net(torch.randn(8, 64))
    assert len(guard_warnings(record)) == 1


def test_guard_warning_points_at_the_users_line():
    """The warning, raised in a hook deep inside ``net(x)``, names this file and the line of the call, not torch's."""
    net = bn_mlp()
    with guard(net), torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        net(torch.randn(8, 64))
    [warning] = [w for w in caught if issubclass(w.category, BatchNormWarning)]
    assert (warning.filename, warning.lineno) == (__file__, line)


def test_guard_silent_in_eval_mode_and_with_gradients():
    """Eval mode under no_grad, and training mode with gradients, are both silent."""
    net = bn_mlp()
    with guard(net), warnings.catch_warnings():
        warnings.simplefilter("error")
        net(torch.randn(8, 64))
        with torch.no_grad():
            net.eval()(torch.randn(8, 64))


def test_guard_remove_stops_it():
    """After `.remove()` (or leaving the context), the forgotten eval() no longer warns."""
    net = bn_mlp()
    handle = guard(net)
    assert handle.active
    handle.remove()
    assert not handle.active
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        net(torch.randn(8, 64))
    assert all(not m._forward_pre_hooks for m in net.modules())


def test_guard_hooks_only_batchnorm_modules_and_cleans_up():
    """The guard's cost is bounded by construction: one pre-hook per BatchNorm-family module, none elsewhere, all gone
    after `.remove()` (its per-forward time is measured in benchmarks/guard_overhead.py, not here)."""
    net = cnn("batch").eval()

    def hooks() -> dict[str, int]:
        return {name: len(m._forward_pre_hooks) for name, m in net.named_modules() if m._forward_pre_hooks}

    handle = guard(net)
    bn_names = {name for name, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert bn_names and hooks() == dict.fromkeys(bn_names, 1)
    handle.remove()
    assert hooks() == {}


def test_changed_running_stats_sees_num_batches_tracked():
    """A train-mode forward with momentum 0 changes no mean/var but is still caught by num_batches_tracked."""
    net = bn_mlp(momentum=0.0)
    before = guards.running_stats_snapshot(net)
    net(torch.randn(8, 64))
    assert guards.changed_running_stats(net, before) == ["1"]


def test_uncalibrated_norms():
    """Fresh, momentum-0 and non-finite running statistics are flagged; estimated ones are not."""
    net = bn_mlp()
    assert guards.uncalibrated_norms(net) == ["1"]
    net(torch.randn(8, 64))
    assert guards.uncalibrated_norms(net) == []
    net[1].running_var[0] = float("nan")
    assert guards.uncalibrated_norms(net) == ["1"]
    frozen = bn_mlp(momentum=0.0)
    frozen(torch.randn(8, 64))
    assert frozen[1].num_batches_tracked.item() == 1
    assert guards.uncalibrated_norms(frozen) == ["1"]


def test_batch_size_recorder_counts_samples_for_images_and_values_for_features():
    """A BatchNorm over images is judged by its samples per device (Wu & He), not batch x spatial; a BatchNorm1d
    over (N, C) features by its values per channel; only BatchNorms in training mode are recorded."""
    net = cnn("batch")
    with guards.BatchSizeRecorder(net) as recorder:
        net(torch.randn(2, 3, 8, 8))  # 2 images of 8x8: 128 values per channel, but 2 samples
    assert recorder.values == {"1": 2, "4": 2} and set(recorder.units.values()) == {"samples"}
    assert guards.small_batch_norms(recorder.values) == ["1", "4"]
    features = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    with guards.BatchSizeRecorder(features) as recorder:
        features(torch.randn(20, 4))
    assert recorder.values == {"1": 20} and recorder.units == {"1": "values per channel"}
    assert guards.small_batch_norms(recorder.values) == []
    net.eval()
    with guards.BatchSizeRecorder(net) as recorder:
        net(torch.randn(2, 3, 8, 8))
    assert recorder.values == {}


def test_init_mismatch_fires_for_xavier_under_relu_at_depth_30():
    """Xavier under ReLU: every weight is within 3x, but the std falls > 10x over 30 layers (measured ~5e-5), and so
    does the gradient toward the input (mean-field chi_1 = 1 * E[relu'(z)^2] = 1/2 per layer)."""
    torch.manual_seed(0)
    findings = init_mismatches(he_mlp(30, init="xavier"), torch.randn(32, 64))
    found = {f.problem: f for f in findings}
    assert sorted(found) == ["gradient_vanishing", "vanishing"]
    assert found["vanishing"].value < 1e-3 and found["gradient_vanishing"].value < 1e-3
    assert found["vanishing"].name == found["gradient_vanishing"].name == "0 -> 58"
    assert 0.45 < found["gradient_vanishing"].value ** (2 / 29) < 0.55  # chi_1 = 1/2


def test_init_mismatch_fires_for_a_saturating_sigmoid_net():
    """10 sigmoid layers with N(0, 3²) weights (256 wide): the pre-activations are ~50x too wide, ~80% saturated and
    pass back < 0.1 of a healthy layer's gradient power. N(0, 1) weights (std ~11 in: 55% saturated) still pass back
    ~0.15 (the run report leaves that net alone too: it trains, slowly), and prepare()'s critical init (std 6.75, 40%
    saturated, chi_1 = 1) gives no finding at all."""
    for std, expected in ((3.0, 10), (1.0, 0)):
        torch.manual_seed(0)
        net = mlp(10, 256, nn.Sigmoid, in_features=64)
        for module in net:
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
        findings = init_mismatches(net, torch.randn(64, 64))
        saturating = [f for f in findings if f.problem == "saturating"]
        assert len(saturating) == expected and all(f.value > 0.75 for f in saturating)
        assert all("healthy: 0%" in f.detail and "gradient power" in f.detail for f in saturating)
    torch.manual_seed(0)
    net, x = mlp(10, 256, nn.Sigmoid, in_features=64), torch.randn(256, 64)
    lightning_bn.prepare(net, x, seed=0)
    assert init_mismatches(net, x) == []
    # PyTorch's default init: weights well within range and the forward signal too, but the gradients vanish toward
    # the input (sigma_w^2 = 1/3: mean-field chi_1 = sigma_w^2 E[sigmoid'(z)^2] ~ 0.02 per layer; Glorot & Bengio 2010)
    xavier = mlp(10, 256, nn.Sigmoid, in_features=64)
    findings = init_mismatches(xavier, torch.randn(64, 64))
    assert [f.problem for f in findings] == ["gradient_vanishing"]
    assert findings[0].value < 1e-6
    assert 0.015 < findings[0].value ** (2 / 9) < 0.025  # measured 0.0199


def test_init_mismatch_silent_for_he_under_relu():
    """He under ReLU at depth 30: no weight off by 3x and the std stays within 10x."""
    torch.manual_seed(0)
    assert init_mismatches(he_mlp(30), torch.randn(32, 64)) == []


def test_init_mismatch_fires_for_huge_weights_before_batchnorm():
    """N(0, 10^2) weights in front of BatchNorm: each layer's std is ~100x what ReLU needs."""
    torch.manual_seed(0)
    net = nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU())])
    for module in net:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=10.0)
    findings = init_mismatches(net, torch.randn(32, 64))
    assert [(f.name, f.problem) for f in findings] == [
        ("0", "weight_scale"),
        ("3", "weight_scale"),
        ("6", "weight_scale"),
    ]
    assert all(50 < f.value < 65 for f in findings)  # 10 / sqrt(2 / 64) = 56.6
    assert net[0].weight.std() > 9  # nothing was re-initialized
    assert guards.uncalibrated_norms(net) == ["1", "4", "7"]  # the probing forward pass left no trace


def test_init_mismatch_reports_overflow_before_batchnorm():
    """20 layers of N(0, 10^2) weights before a BatchNorm overflow float32 in the first forward pass."""
    torch.manual_seed(0)
    net = nn.Sequential(mlp(20, 64, out_features=64), nn.BatchNorm1d(64), nn.Linear(64, 10))
    for module in net.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=10.0)
    findings = init_mismatches(net, torch.randn(32, 64))
    overflow = [f for f in findings if f.problem == "nonfinite"]
    assert len(overflow) == 1 and overflow[0].value > 0
    assert "overflows" in guards.init_messages(findings)["nonfinite"]


def test_fallback_activation_heuristic():
    """Each layer gets the next activation module unless another weighted layer comes first; the last is identity."""
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    found = module_order_activations(net, (nn.Linear, nn.modules.conv._ConvNd))
    names = {k: v.name for k, v in found.items()}
    assert names == {"0": "tanh", "2": "identity", "3": "relu", "5": "identity"}


# ---- the callback -----------------------------------------------------------------------------------------------


def test_callback_rejects_bad_arguments():
    """Bad arguments raise MisconfigurationException naming the value received."""
    with pytest.raises(MisconfigurationException, match="min_values_per_channel.*0"):
        BatchNormGuard(min_values_per_channel=0)
    with pytest.raises(MisconfigurationException, match="init_factor.*0.5"):
        BatchNormGuard(init_factor=0.5)
    with pytest.raises(MisconfigurationException, match="strict.*'yes'"):
        BatchNormGuard(strict="yes")


def test_train_in_validation_step_warns(tmp_path):
    """`self.train()` in validation_step triggers the inference-on-batch-statistics warning, naming the module."""
    model = TrainsInValidation(bn_mlp())
    with pytest.warns(BatchNormWarning, match=r"'net\.1'.*training mode during validation") as record:
        fit(tmp_path, model)
    train_mode = [m for m in guard_warnings(record) if "training mode" in m]
    assert len(train_mode) == 1


def test_train_in_validation_step_strict_raises(tmp_path):
    """With strict=True the same mistake raises."""
    with pytest.raises(RuntimeError, match="training mode during validation"):
        fit(tmp_path, TrainsInValidation(bn_mlp()), callbacks=[BatchNormGuard(strict=True)])


def test_leak_into_running_stats_is_detected(tmp_path):
    """A step that toggles train() around a forward and restores eval() still leaks: the statistics changed."""
    with pytest.warns(BatchNormWarning, match=r"Running statistics of 'net\.1' changed during validation") as record:
        fit(tmp_path, LeaksInValidation(bn_mlp()))
    assert not [m for m in guard_warnings(record) if "training mode" in m]


def test_batch_size_two_warns(tmp_path):
    """Batch size 2 with BatchNorm1d: 2 values per channel < 16, the warning names GroupNorm/LayerNorm."""
    with pytest.warns(BatchNormWarning, match=r"'net\.1' normalize only 2 value.*GroupNorm or LayerNorm"):
        fit(tmp_path, BoringClassifier(bn_mlp(), batch_size=2), limit_val_batches=0)


@pytest.mark.parametrize(
    "net, batch_size",
    [(bn_mlp(), 64), (nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 10)), 2)],
    ids=["batchnorm-64", "layernorm-2"],
)
def test_batch_size_silent(tmp_path, net, batch_size):
    """Batch size 64 with BatchNorm, and LayerNorm at batch size 2, are silent."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", BatchNormWarning)
        fit(tmp_path, BoringClassifier(net, batch_size=batch_size), limit_val_batches=0)


def test_group_norm_model_never_triggers_batchnorm_checks(tmp_path):
    """Batch size 2 on 2 x 2 images (2 samples, 8 values per channel) and `self.train()` in validation_step: the CNN
    with BatchNorm gets both warnings (tiny batch, training mode during validation); the same CNN with GroupNorm, under
    the same conditions, gets no warning at all."""
    data = images(size=2)
    torch.manual_seed(0)
    with pytest.warns(BatchNormWarning) as record:
        fit(tmp_path / "batch", TrainsInValidation(cnn("batch"), batch_size=2, data=data))
    messages = guard_warnings(record)
    assert any(re.search(r"'net\.1', 'net\.4' normalize\b.* only \d+ ", m) for m in messages), messages
    assert any("training mode during validation" in m for m in messages), messages

    torch.manual_seed(0)
    model = TrainsInValidation(cnn("group"), batch_size=2, data=data)
    modes = []  # (stage, GroupNorm in training mode) at each forward of the GroupNorm
    model.net[1].register_forward_pre_hook(lambda m, args: modes.append((model.trainer.state.stage, m.training)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", r".*does not have many workers")  # Lightning's, on machines with > 2 cores
        warnings.filterwarnings("ignore", r".*LeafSpec.*is deprecated", FutureWarning)  # Lightning's own, torch 2.13
        fit(tmp_path / "group", model)
    assert modes.count(("train", True)) >= 4  # the same conditions: (at least) 4 training steps at batch size 2
    assert ("sanity_check", True) in modes or ("validate", True) in modes  # evaluated in training mode too


def test_uncalibrated_statistics_warn_on_validate(tmp_path):
    """Validating a never-trained BatchNorm model warns that its running statistics are uncalibrated."""
    t = trainer(tmp_path, callbacks=[BatchNormGuard()], limit_val_batches=2)
    with pytest.warns(BatchNormWarning, match=r"'net\.1' have uncalibrated running statistics when validation"):
        t.validate(BoringClassifier(bn_mlp()))


def test_init_check_warns_at_fit_start(tmp_path):
    """The callback runs the init check on example_input_array: Xavier under ReLU at depth 30 warns 'vanishing'."""
    torch.manual_seed(0)
    model = BoringClassifier(he_mlp(30, width=128, init="xavier"))
    with pytest.warns(BatchNormWarning, match=r"Init mismatch \(vanishing\): 'net\.0 -> net\.58'"):
        fit(tmp_path, model, max_steps=1, limit_val_batches=0)


@pytest.mark.parametrize(
    "net, data",
    [
        (bn_mlp(), None),
        (cnn("batch"), images()),
        (TransformerClassifier(), None),
        (cnn("group"), images()),
        (he_mlp(3, width=64), None),
    ],
    ids=["mlp-batchnorm", "cnn-batchnorm", "transformer-layernorm", "cnn-groupnorm", "mlp-no-norm"],
)
def test_healthy_models_are_silent(tmp_path, net, data):
    """Healthy models, fitted with validation and tested, raise no warning at all from the guard."""
    torch.manual_seed(0)
    model = BoringClassifier(net, data=data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", r".*LeafSpec.*is deprecated", FutureWarning)  # Lightning's own, torch 2.13
        t = fit(tmp_path, model)
        t.validate(model)
    assert guards.uncalibrated_norms(model) == []
