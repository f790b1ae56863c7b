"""The report's rules on patterns of real models that read as problems but are not (issue 24): each a real Trainer
run of a tiny model, a few steps, its TensorBoard files read back and analyzed.

- a zero-initialized head wider than the update ratio's sampling threshold (4096 weights) is deliberate;
- the activation inside a zero-gamma norm-act layer (timm ``BatchNormAct2d`` under ``zero_init_last``) shares its
  norm's zero-init grace;
- the first activation of each kind is compared with the first layer of the same kind, not the first of any kind;
- ``dead`` is not judged on batches of fewer than :data:`lightning_bn.report.health.MIN_DEAD_SAMPLES` samples per
  unit (at batch size 1 a healthy ReLU layer reads "dead" on about half its units).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_bn import ActivationMonitor, GradientMonitor, HealthCheck
from lightning_bn.report import analyze
from lightning_bn.report.health import MIN_DEAD_SAMPLES, RunHealth
from tests.helpers import BoringClassifier, trainer
from tests.zoo import BatchNormAct2d

STEPS = 3


def _fit(tmp_path: Path, net: nn.Module, data: TensorDataset, batch_size: int = 16, steps: int = STEPS,
         health: HealthCheck | None = None, lr: float = 0.01) -> RunHealth:  # fmt: skip
    torch.manual_seed(0)
    model = BoringClassifier(net, lr=lr, batch_size=batch_size, data=data)
    callbacks = [ActivationMonitor(every_n_steps=1, histograms=False, heatmap=False), GradientMonitor(every_n_steps=1)]
    if health is not None:
        callbacks.append(health)
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer(tmp_path, logger=logger, max_steps=steps, callbacks=callbacks).fit(model)
    (run,) = analyze(tmp_path / "run" / "version_0")
    return run


def _flagged(run) -> dict[str, list[str]]:
    return {name: problem["layers"] for name, problem in run.problems().items()}


def _vectors(n: int, features: int, classes: int = 10) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g))


def _images(n: int, channels: int = 3, size: int = 8, classes: int = 10) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, channels, size, size, generator=g)
    return TensorDataset(x, torch.randint(0, classes, (n,), generator=g))


# --- a wide zero-initialized head ----------------------------------------------------------------------------------


def wide_zero_head(width: int = 4096, classes: int = 10) -> nn.Module:
    """An MLP whose classifier (``classes x width``, above the 4096 weights the update ratio samples from) is zeroed."""
    head = nn.Linear(width, classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return nn.Sequential(nn.Linear(32, width), nn.LayerNorm(width), nn.GELU(), head)


def test_wide_zero_head_is_deliberate(tmp_path):
    """A 10 x 4096 zero head: its first update ratio is sampled (0.99999x, not exactly 1); it is zero-init, not
    `exploding` (update ratio 1) or `vanishing` (std 0), and no layer is flagged."""
    run = _fit(tmp_path, wide_zero_head(), _vectors(16 * STEPS, 32))
    head = next(layer for layer in run.layers if layer.name == "net.3")
    assert head.zero_init, head
    assert not _flagged(run), _flagged(run)


def test_sampled_first_update_ratio_of_a_zero_weight():
    """The monitor samples weights above 4096 elements and sums in float32: a zero head's first update ratio reads
    0.999997, not 1; it is still zero-init. A weight that moved by 0.99 of itself is not."""
    figures = {"act_std/a": [(0, 1.0), (1, 1.0)], "act_std/head": [(0, 0.5), (1, 0.6)],
               "weight_norm/a.weight": [(0, 1.0), (1, 1.0)], "update_ratio/a.weight": [(0, 0.0), (1, 1e-3)],
               "grad_norm/a.weight": [(0, 0.0), (1, 0.1)],  # behind the zero head: no gradient at step 0
               "weight_norm/head.weight": [(0, 0.05), (1, 0.07)], "update_ratio/head.weight": [(0, 0.999997), (1, 0.3)],
               "grad_norm/head.weight": [(0, 0.1), (1, 0.1)]}  # fmt: skip
    run = analyze(figures)
    assert run.zero_init == ["head"] and not run.problems(), run.problems()  # before: a vanishing_gradient
    figures["update_ratio/head.weight"] = [(0, 0.99), (1, 0.3)]
    run = analyze(figures)
    assert run.zero_init == [] and "vanishing_gradient" in run.problems()


# --- the activation of a zero-gamma norm-act layer -----------------------------------------------------------------


class ZeroLastBlock(nn.Module):
    """CSPDarknet's DarkBlock: 1x1 then 3x3 conv, each a timm norm-act layer (LeakyReLU), plus the identity; the last
    norm's weight zeroed (``zero_init_last``). (Under a plain ReLU the zero norm would never learn: ReLU passes no
    gradient at 0, and the report rightly flags it.)"""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn1 = BatchNormAct2d(channels, nn.LeakyReLU)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = BatchNormAct2d(channels, nn.LeakyReLU)
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bn2(self.conv2(self.bn1(self.conv1(x))))


def zero_gamma_norm_act(channels: int = 8) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1, bias=False),
        BatchNormAct2d(channels, nn.LeakyReLU),
        ZeroLastBlock(channels),
        ZeroLastBlock(channels),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, 10),
    )


def test_zero_gamma_norm_act_activation_shares_the_grace(tmp_path):
    """The ReLU inside a zero-gamma ``BatchNormAct2d`` outputs 0 until the gamma has learned: not `vanishing`."""
    run = _fit(tmp_path, zero_gamma_norm_act(), _images(16 * STEPS))
    assert run.zero_init, [layer.name for layer in run.layers]
    assert not _flagged(run), _flagged(run)


# --- std/first within the same kind ------------------------------------------------------------------------------


class SegformerLike(nn.Module):
    """A depthwise-conv GELU encoder whose activations are tiny (small depthwise init), then a BN + ReLU decode head."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        nn.init.normal_(self.dw.weight, std=0.005)  # the GELU's input ~1e-2: as behind Segformer's 0.02-init fc1
        nn.init.zeros_(self.dw.bias)
        self.gelu = nn.GELU()
        self.proj = nn.Conv2d(channels, channels, 1)
        self.fuse = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.cls = nn.Conv2d(channels, 10, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = x + self.proj(self.gelu(self.dw(x)))
        return self.cls(self.relu(self.bn(self.fuse(x)))).mean((2, 3))


def test_first_activation_of_a_kind_is_compared_within_its_kind(tmp_path):
    """The decode head's ReLU (std ~0.6 after BatchNorm) is not `exploding` against the encoder's tiny GELU: it is the
    first ReLU, its own reference."""
    run = _fit(tmp_path, SegformerLike(), _images(16 * STEPS))
    relu = next(layer for layer in run.layers if layer.name == "net.relu")
    assert relu.std_reference in (None, "net.relu"), relu.std_reference
    assert "exploding" not in relu.flags, relu.flags
    assert not _flagged(run), _flagged(run)


def test_std_ratio_still_finds_a_vanishing_stack(tmp_path):
    """Xavier under ReLU, 30 layers: the later ReLUs are still `vanishing` against the first ReLU."""
    layers: list[nn.Module] = [nn.Linear(32, 32)]
    for _ in range(30):
        linear = nn.Linear(32, 32)
        nn.init.xavier_normal_(linear.weight, gain=0.5)
        nn.init.zeros_(linear.bias)
        layers += [nn.ReLU(), linear]
    run = _fit(tmp_path, nn.Sequential(*layers, nn.Linear(32, 10)), _vectors(16 * STEPS, 32), steps=1)
    assert "vanishing" in _flagged(run)


# --- dead needs enough samples -----------------------------------------------------------------------------------


def test_dead_is_not_judged_on_one_sample(tmp_path):
    """Batch size 1: a healthy He-init ReLU MLP reads ~0.5 "dead" (one sample: dead = saturated); with
    ``stop_on="dead"`` training is not stopped and the report raises no `dead` flag."""
    health = HealthCheck(stop_on="dead")
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    run = _fit(tmp_path, net, _vectors(STEPS, 32), batch_size=1, health=health)
    assert health.stopped is None, health.stopped
    assert "dead" not in _flagged(run)
    relu = next(layer for layer in run.layers if layer.name == "net.1")
    assert relu.worst_dead is not None and relu.worst_dead > 0.3  # the figure is there, just not judged


def test_dead_is_still_found_on_a_full_batch(tmp_path):
    """Every unit dead (bias -10) on a batch of 32: `dead`, and ``stop_on="dead"`` stops at the first logged step."""
    assert MIN_DEAD_SAMPLES <= 32
    first = nn.Linear(32, 64)
    nn.init.constant_(first.bias, -10.0)
    health = HealthCheck(stop_on="dead")
    run = _fit(tmp_path, nn.Sequential(first, nn.ReLU(), nn.Linear(64, 10)), _vectors(32 * STEPS, 32),
               batch_size=32, health=health)  # fmt: skip
    assert health.stopped is not None and health.stopped[1] == "dead", health.stopped
    assert "dead" in _flagged(run)


@pytest.mark.parametrize("samples", [1, 4])
def test_dead_minimum_from_figures(samples):
    """Without the sample count (a run logged before it existed) `dead` is judged as before; with it, not below the
    minimum."""
    base = {"act_std/r": [(0, 0.5)], "act_dead/r": [(0, 0.9)], "act_saturation/r": [(0, 0.9)]}
    assert "dead" in analyze(base).layers[0].flags
    counted = {**base, "act_samples/r": [(0, float(samples))]}
    assert "dead" not in analyze(counted).layers[0].flags
    counted["act_samples/r"] = [(0, float(MIN_DEAD_SAMPLES))]
    assert "dead" in analyze(counted).layers[0].flags


# --- the init check's depth rule: a trend, not two end points --------------------------------------------------------


def _relu_stack(depth: int, xavier: bool, small_head: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        linear = nn.Linear(64, 64)
        (nn.init.xavier_normal_ if xavier else nn.init.kaiming_normal_)(linear.weight)
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU()]
    if small_head:  # as MobileNetV3's classifier (Linear N(0, 0.01) -> the last activation -> Linear), smaller
        head = nn.Linear(64, 256)
        nn.init.normal_(head.weight, 0, 0.002)
        nn.init.zeros_(head.bias)
        layers += [head, nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(layers[-2].out_features, 10))


def test_depth_rule_ignores_one_small_layer_at_the_end():
    """He-init ReLU stack whose last activation is fed by a deliberately small N(0, 0.002) classifier: no depth
    finding (two end points read it as 'vanishing with depth': the rule before issue 24 flagged it)."""
    from lightning_bn.guards import init_mismatches

    torch.manual_seed(0)
    found = init_mismatches(_relu_stack(12, xavier=False, small_head=True), torch.randn(64, 64))
    assert not [f for f in found if f.problem in ("vanishing", "exploding")], found


def test_depth_rule_still_finds_xavier_under_relu_with_a_small_head():
    """Xavier under ReLU at depth 30 halves the variance per layer: the trend finds it, with or without the head."""
    from lightning_bn.guards import init_mismatches

    for small_head in (False, True):
        torch.manual_seed(0)
        found = init_mismatches(_relu_stack(30, xavier=True, small_head=small_head), torch.randn(64, 64))
        assert any(f.problem == "vanishing" for f in found), (small_head, found)
