"""Deliberate inits beyond zero and constant weights (issue 23, item 2), on architectures written here after the
libraries that define them (timm and torchvision are not installed): what ``prepare()`` keeps, with the reason in
``Report.kept``, and the init check's silence on it.

- head-init scales: timm's ``head_init_scale`` (EVA-02, BEiT: trunc_normal(0.02) x 0.001) and torchvision
  SqueezeNet's N(0, 0.01) final conv were redrawn (std 2e-5 -> 0.17; 0.01 -> 0.062) and the EVA/BEiT head was an init
  check ``weight_scale`` finding (1.2e-4x);
- NF-Net zero gains: timm's ``ScaledStdConv2d`` with ``gain_init=0`` (the block's last conv), a per-channel zero gain
  after a plain conv and a ``skipinit_gain`` scalar at 0: kept and said so (the scalar was not listed);
- deliberate biases: an LSTM's forget-gate bias of 1 became 0; Mamba's ``dt_proj`` bias (softplus of it: time steps
  in [0.001, 0.1]) became 0, softplus 0.693 everywhere;
- frozen parameters: a frozen backbone was redrawn by ``prepare()`` and by ``AutoInit`` in a Trainer;
- uninitialized memory: a ``meta`` -> ``to_empty()`` model was kept whole ("all zero: a deliberate zero init", output
  std 0) or half kept with garbage (NaN output); now every layer is drawn and the report says why;
- a scripted submodule is named when ``prepare()`` refuses it (was torch's "register_forward_pre_hook is not supported
  on ScriptModules").
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import lightning_bn
from lightning_bn.callbacks.auto_init import AutoInit
from lightning_bn.guards import init_mismatches
from lightning_bn.tracing import trace_model
from lightning_bn.tracing.policy import HEAD_SCALE_FACTOR
from tests.helpers import BoringClassifier, trainer
from tests.zoo import TinyResNet

IMAGES = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def reasons(report) -> dict[str, str]:
    return {k.layer: k.reason for k in report.kept}


def findings(model: nn.Module, example) -> list[tuple[str, str, float]]:
    return [(f.name, f.problem, round(f.value, 4)) for f in init_mismatches(model, example)]


def state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def unchanged(module: nn.Module, before: dict[str, Tensor]) -> bool:
    after = module.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# ---- head-init scales -----------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, c))


class SwiGLU(nn.Module):
    """EVA-02's MLP: ``w3(silu(w1(x)) * w2(x))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1, self.w2, self.act, self.w3 = (
            nn.Linear(dim, hidden),
            nn.Linear(dim, hidden),
            nn.SiLU(),
            nn.Linear(hidden, dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(self.act(self.w1(x)) * self.w2(x))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, swiglu: bool) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), Attention(dim), nn.LayerNorm(dim)
        self.mlp = SwiGLU(dim, 2 * dim) if swiglu else Mlp(dim, 4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class HeadScaledViT(nn.Module):
    """timm's EVA-02 (``swiglu=True``) / BEiT layout and init: trunc_normal(0.02) weights, zero biases, then
    ``head.weight.mul_(head_init_scale)`` (0.001 in both)."""

    def __init__(self, dim: int = 64, depth: int = 2, classes: int = 10, swiglu: bool = True, scale: float = 1e-3):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 8, stride=8)
        self.cls_token, self.pos_embed = nn.Parameter(torch.zeros(1, 1, dim)), nn.Parameter(torch.zeros(1, 17, dim))
        self.blocks = nn.Sequential(*(Block(dim, swiglu) for _ in range(depth)))
        self.fc_norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.head.weight.mul_(scale)
            self.head.bias.mul_(scale)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.head(self.fc_norm(self.blocks(x)[:, 1:].mean(1)))


class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze, self.squeeze_activation = nn.Conv2d(cin, squeeze, 1), nn.ReLU(inplace=True)
        self.expand1x1, self.expand1x1_activation = nn.Conv2d(squeeze, expand, 1), nn.ReLU(inplace=True)
        self.expand3x3, self.expand3x3_activation = nn.Conv2d(squeeze, expand, 3, padding=1), nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        one, three = self.expand1x1_activation(self.expand1x1(x)), self.expand3x3_activation(self.expand3x3(x))
        return torch.cat([one, three], 1)


class SqueezeNet(nn.Module):
    """torchvision's squeezenet1_1 layout (four Fire modules) and init: ``final_conv`` N(0, 0.01) ("Final convolution
    is initialized differently from the rest"), then ReLU and global average pooling; the rest kaiming_uniform_."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, stride=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(64, 16, 64), Fire(128, 16, 64), nn.MaxPool2d(3, 2, ceil_mode=True), Fire(128, 32, 128),
            Fire(256, 64, 256),
        )  # fmt: skip
        final_conv = nn.Conv2d(512, classes, 1)
        self.classifier = nn.Sequential(nn.Dropout(0.5), final_conv, nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m is final_conv:
                    nn.init.normal_(m.weight, mean=0.0, std=0.01)
                else:
                    nn.init.kaiming_uniform_(m.weight)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


@pytest.mark.parametrize("swiglu", [True, False], ids=["eva02", "beit"])
def test_a_head_init_scale_is_kept_and_the_init_check_is_silent(swiglu):
    """EVA-02 / BEiT: the head's std 2e-5 is 1.2e-4x Xavier's 0.164 (the body: ~0.1x): kept with the reason (it was
    redrawn to 0.17), and the init check, which flagged it (weight_scale 1.2e-4), finds nothing as built or after."""
    torch.manual_seed(0)
    model = HeadScaledViT(swiglu=swiglu).eval()
    head = model.head.weight.detach().clone()
    assert findings(model, IMAGES) == []
    report = lightning_bn.prepare(model, IMAGES, seed=0)
    why = reasons(report)["head"]
    assert why.startswith("head init scale: weight std ") and "x the 0.164 that xavier would draw" in why, why
    std, ratio = float(why.split("std ")[1].split(" ")[0]), float(why.split(" is ")[1].split("x")[0])
    assert 1.5e-5 < std < 2.5e-5 and ratio < 1e-3 and ratio < 1 / HEAD_SCALE_FACTOR
    assert torch.equal(model.head.weight, head) and "head" not in [r.layer for r in report.layers]
    assert findings(model, IMAGES) == []
    forced = lightning_bn.prepare(model, IMAGES, overrides={"head": "xavier"}, seed=0)  # still forced, as before
    assert "head" in [r.layer for r in forced.layers]
    assert model.head.weight.std().item() == pytest.approx(math.sqrt(2 / 74), rel=0.15)


def test_squeezenet_final_conv_keeps_its_scale():
    """SqueezeNet's final conv (N(0, 0.01) feeding ReLU, then pooled): 0.16x He's 0.0625 while every other conv is at
    1x: kept (it was redrawn 6x larger); the other 13 convs are drawn; the init check stays silent."""
    torch.manual_seed(0)
    model, x = SqueezeNet().eval(), torch.randn(4, 3, 64, 64)
    final = model.classifier[1].weight.detach().clone()
    assert findings(model, x) == []
    report = lightning_bn.prepare(model, x, seed=0)
    why = reasons(report)["classifier.1"]
    assert "is 0.16x the 0.0625 that kaiming would draw (the model's other layers: 1x)" in why, why
    assert torch.equal(model.classifier[1].weight, final)
    assert len(report.layers) == 13 and report.kept == [report.kept[0]]
    assert findings(model, x) == []


def test_a_scale_the_whole_model_shares_is_no_head_scale():
    """N(0, 0.02) everywhere (BERT's convention) at width 64: the head is 0.12x Xavier, under 1/5, but the body is as
    far below its scheme (0.11x He), so the head is drawn like any layer."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    for m in net:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
    report = lightning_bn.prepare(net, torch.randn(128, 64), seed=0)
    assert [r.layer for r in report.layers] == ["0", "2", "4"] and report.kept == []


# ---- NF-Net zero gains ----------------------------------------------------------------------------------------------


class ScaledStdConv2d(nn.Conv2d):
    """timm's ``ScaledStdConv2d``: each output channel's weight standardized in forward, times ``gain * gamma /
    sqrt(fan_in)``; ``gain`` is a per-channel parameter (``gain_init=0`` for an NF block's last conv)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, gain_init: float = 1.0, eps: float = 1e-6):
        super().__init__(cin, cout, k, stride=stride, padding=k // 2)
        self.gain = nn.Parameter(torch.full((cout, 1, 1, 1), gain_init))
        self.scale, self.eps = self.weight[0].numel() ** -0.5, eps

    def forward(self, x: Tensor) -> Tensor:
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, weight=(self.gain * self.scale).view(-1),
            training=True, momentum=0.0, eps=self.eps,
        ).reshape_as(self.weight)  # fmt: skip
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class GammaAct(nn.Module):
    """timm's NF-Net activation: ``relu(x) * gamma`` (gamma 1.7139 restores unit variance)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x) * 1.7139


class NormFreeBlock(nn.Module):
    """timm's ``NormFreeBlock`` (the class name too: "norm" in it makes no norm of it, so its gains are listed):
    ``x + alpha * [skipinit_gain *] conv3(act(conv2(act(conv1(act(x) * beta)))))``; the
    zero start is ``conv3``'s gain (std convs), else a per-channel ``gain`` after a plain ``conv3`` or a scalar
    ``skipinit_gain`` = 0."""

    def __init__(self, chs: int, std_conv: bool, zero: str, alpha: float = 0.2, beta: float = 1.0) -> None:
        super().__init__()
        self.alpha, self.beta, mid = alpha, beta, chs // 2
        if std_conv:
            self.conv1, self.conv2 = ScaledStdConv2d(chs, mid, 1), ScaledStdConv2d(mid, mid, 3)
            self.conv3 = ScaledStdConv2d(mid, chs, 1, gain_init=0.0)
        else:
            self.conv1, self.conv2, self.conv3 = (
                nn.Conv2d(chs, mid, 1),
                nn.Conv2d(mid, mid, 3, padding=1),
                nn.Conv2d(mid, chs, 1),
            )
        self.act1, self.act2, self.act3 = GammaAct(), GammaAct(), GammaAct()
        self.gain = nn.Parameter(torch.zeros(chs, 1, 1)) if zero == "gain" else None
        self.skipinit_gain = nn.Parameter(torch.tensor(0.0)) if zero == "skipinit" else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv3(self.act3(self.conv2(self.act2(self.conv1(self.act1(x) * self.beta)))))
        if self.gain is not None:
            out = out * self.gain
        if self.skipinit_gain is not None:
            out = out * self.skipinit_gain
        return out * self.alpha + x


class NFNet(nn.Module):
    def __init__(self, std_conv: bool, chs: int = 32, depth: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, chs, 3, padding=1)
        zeros = ["conv3"] * depth if std_conv else ["gain", "skipinit"] * (depth // 2)
        self.blocks = nn.Sequential(*(NormFreeBlock(chs, std_conv, zero) for zero in zeros))
        self.final_act, self.head = GammaAct(), nn.Linear(chs, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.final_act(self.blocks(self.stem(x))).mean((2, 3)))


def test_nf_net_scaled_std_conv_zero_gain_is_kept():
    """Each block's last ``ScaledStdConv2d`` has ``gain`` 0: the layer is kept with the reason (its output starts at
    zero), so the gain stays 0 and the branch stays off; every other layer is drawn; the init check is silent."""
    torch.manual_seed(0)
    model = NFNet(std_conv=True).eval()
    assert findings(model, IMAGES) == []
    conv3 = {f"blocks.{i}.conv3": b.conv3.weight.detach().clone() for i, b in enumerate(model.blocks)}
    report = lightning_bn.prepare(model, IMAGES, seed=0)
    why = reasons(report)
    assert set(why) == set(conv3), why
    assert all(r.startswith("zero gain 'gain' (beside its weight and bias): the layer's output starts at zero")
               for r in why.values())  # fmt: skip
    assert all(not b.conv3.gain.any() and torch.equal(b.conv3.weight, conv3[f"blocks.{i}.conv3"])
               for i, b in enumerate(model.blocks))  # fmt: skip
    assert len(report.layers) == 10  # stem, 4 x (conv1, conv2), head
    assert findings(model, IMAGES) == []


def test_nf_net_per_channel_gain_and_skipinit_scalar_are_kept():
    """A per-channel zero ``gain`` after a plain conv3 and a ``skipinit_gain`` scalar at 0: both listed with the reason
    (the scalar was not listed at all; the per-channel gain as before), both still 0; the init check is silent before
    and after."""
    torch.manual_seed(0)
    model = NFNet(std_conv=False).eval()
    assert findings(model, IMAGES) == []
    report = lightning_bn.prepare(model, IMAGES, seed=0)
    why = reasons(report)
    assert set(why) == {"blocks.0.gain", "blocks.1.skipinit_gain", "blocks.2.gain", "blocks.3.skipinit_gain"}, why
    assert why["blocks.1.skipinit_gain"].startswith("zero scalar gain (skipinit, ReZero): what it multiplies starts")
    assert why["blocks.0.gain"].startswith("constant 0, not a layer weight (a LayerScale-like gain")
    assert not any(p.any() for n, p in model.named_parameters() if n in why)
    assert len(report.layers) == 14 and findings(model, IMAGES) == []


# ---- deliberate biases ----------------------------------------------------------------------------------------------


class LSTMNet(nn.Module):
    """An LSTM classifier with the usual forget-gate trick: chunk 1 of 4 (i, f, g, o) of every bias set to 1."""

    def __init__(self, vocab: int = 100, dim: int = 32, classes: int = 5) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, classes)
        self.lstm = nn.LSTM(dim, dim, num_layers=2, batch_first=True)
        with torch.no_grad():
            for name, bias in self.lstm.named_parameters():
                if name.startswith("bias"):
                    bias[dim : 2 * dim].fill_(1.0)

    def forward(self, ids: Tensor) -> Tensor:
        out, _ = self.lstm(self.embed(ids))
        return self.head(out[:, -1])


class MambaMixer(nn.Module):
    """Mamba's time-step projection: ``dt = softplus(dt_proj(x_proj(u)))``, ``dt_proj.bias`` the inverse softplus of
    time steps log-uniform in [0.001, 0.1] (``dt + log(-expm1(-dt))``)."""

    def __init__(self, dim: int = 32, rank: int = 8) -> None:
        super().__init__()
        inner = 2 * dim
        self.in_proj, self.x_proj = nn.Linear(dim, inner), nn.Linear(inner, rank, bias=False)
        self.dt_proj, self.out_proj = nn.Linear(rank, inner), nn.Linear(inner, dim)
        with torch.no_grad():
            nn.init.uniform_(self.dt_proj.weight, -(rank**-0.5), rank**-0.5)
            dt = torch.exp(torch.rand(inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, x: Tensor) -> Tensor:
        u = F.silu(self.in_proj(x))
        dt = F.softplus(self.dt_proj(self.x_proj(u)))
        return x + self.out_proj(u * torch.exp(-dt))


def _ids(n: int = 64, seed: int = 0) -> Tensor:
    return torch.randint(0, 100, (n, 12), generator=torch.Generator().manual_seed(seed))


def test_lstm_forget_gate_bias_is_kept_and_the_weights_drawn():
    """Every bias of both LSTM layers has its forget chunk at 1 (it became 0): kept, one row per bias, while the
    weights are drawn (Xavier for the gates); a forced init still zeroes them."""
    torch.manual_seed(0)
    model = LSTMNet().eval()
    before = {n: p.detach().clone() for n, p in model.lstm.named_parameters()}
    report = lightning_bn.prepare(model, _ids(), seed=0)
    biases = [n for n in before if n.startswith("bias")]
    assert {f"lstm.{n}": reasons(report)[f"lstm.{n}"] for n in biases} == {
        f"lstm.{n}": "deliberate bias (forget gate 1.0): kept, the layer's weights drawn" for n in biases
    }
    params = dict(model.lstm.named_parameters())
    assert all(torch.equal(params[n], before[n]) for n in biases)
    assert not any(torch.equal(params[n], before[n]) for n in before if n.startswith("weight"))
    assert "the biases of 1 layer kept (deliberate or frozen: see kept)" in report.changes[0]
    lightning_bn.prepare(model, _ids(), init="xavier", seed=0)
    assert all(not params[n].any() for n in biases)


def test_mamba_dt_bias_is_kept():
    """Mamba's dt_proj bias (in [-6.9, -2.25], 20x PyTorch's default bound 0.35): kept, so softplus of it still spans
    [0.001, 0.1] (it was zeroed: 0.693 everywhere)."""
    torch.manual_seed(0)
    model = nn.Sequential(MambaMixer(), MambaMixer()).eval()
    x = torch.randn(4, 16, 32)
    bias = model[0].dt_proj.bias.detach().clone()
    report = lightning_bn.prepare(model, x, seed=0)
    assert reasons(report)["0.dt_proj.bias"].startswith("deliberate bias (values in [-6.")
    assert "beyond PyTorch's default U(±0.354)" in reasons(report)["0.dt_proj.bias"]
    assert torch.equal(model[0].dt_proj.bias, bias) and "0.dt_proj" in [r.layer for r in report.layers]
    steps = F.softplus(model[0].dt_proj.bias)
    assert 1e-3 * 0.99 <= steps.min().item() and steps.max().item() <= 0.1 * 1.01


def test_default_biases_are_still_zeroed_and_critical_biases_still_drawn():
    """PyTorch's default draws (within U(±1/sqrt(fan_in))) give no row and are zeroed; the critical init draws its
    biases from N(0, sigma_b^2) even where they were set before, a second prepare() included."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    report = lightning_bn.prepare(net, torch.randn(128, 32), seed=0)
    assert report.kept == [] and not net[0].bias.any() and not net[2].bias.any()
    tanh = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    for _ in range(2):
        report = lightning_bn.prepare(tanh, torch.randn(128, 32), seed=0)
        assert report.kept == [] and 0.2 < tanh[2].bias.std().item() < 0.6  # sigma_b = 0.389


# ---- frozen parameters ----------------------------------------------------------------------------------------------


def _pretrained_backbone() -> nn.Sequential:
    backbone = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
    for m in backbone:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.3)  # "pretrained": nothing prepare() would draw
            nn.init.normal_(m.bias, std=0.5)
    backbone.requires_grad_(False)
    return backbone


@pytest.mark.parametrize("init", ["auto", "xavier", "lsuv"])
def test_frozen_layers_are_kept_under_every_init(init):
    """A frozen ResNet backbone (conv + BatchNorm, buffers included) under a new head: untouched by auto, by a forced
    scheme, by an override naming it and by ``zero_init_residual`` (its last norms at 1 stay 1); the head is drawn."""
    torch.manual_seed(0)
    backbone = TinyResNet()
    backbone.fc = nn.Identity()
    for m in backbone.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
    backbone.requires_grad_(False)
    model = nn.Sequential(backbone, nn.Linear(32, 10)).eval()
    before = state(backbone)
    overrides = {"0.layer1.*": "kaiming"}
    report = lightning_bn.prepare(model, IMAGES[:4], init=init, overrides=overrides, zero_init_residual=True, seed=0)
    assert unchanged(backbone, before)
    assert [r.layer for r in report.layers] == ["1"]
    why = reasons(report)
    assert len(why) == 10 and all(r.startswith("frozen (weight: requires_grad=False): kept under every init")
                                  for r in why.values())  # fmt: skip


def test_a_frozen_bias_stays_while_its_weights_are_drawn():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    nn.init.constant_(net[0].bias, 0.05)
    net[0].bias.requires_grad_(False)
    weight = net[0].weight.detach().clone()
    report = lightning_bn.prepare(net, torch.randn(128, 32), seed=0)
    assert reasons(report) == {"0.bias": "frozen bias (requires_grad=False): kept, the layer's weights drawn"}
    assert torch.equal(net[0].bias, torch.full((64,), 0.05)) and not torch.equal(net[0].weight, weight)


def test_autoinit_leaves_a_frozen_backbone_and_a_forget_gate_bias_alone(tmp_path):
    """In a Trainer: AutoInit draws the new head only (the frozen backbone ends the fit as it began), and an LSTM's
    forget-gate bias is still 1 after AutoInit (lr 0: what the callback left is what the fit ends with)."""
    torch.manual_seed(0)
    backbone = _pretrained_backbone()
    module = BoringClassifier(nn.Sequential(backbone, nn.Linear(64, 10)), lr=0.1)
    before = state(backbone)
    callback = AutoInit(seed=0)
    trainer(tmp_path / "frozen", max_steps=3, callbacks=[callback]).fit(module)
    assert unchanged(backbone, before)
    assert [r.layer for r in callback.report.layers] == ["net.1"]
    assert {"net.0.0", "net.0.2"} <= set(reasons(callback.report))

    torch.manual_seed(0)
    net = LSTMNet()
    ids = _ids(256)
    module = BoringClassifier(net, lr=0.0, data=TensorDataset(ids, torch.randint(0, 5, (256,))))
    callback = AutoInit(seed=0)
    trainer(tmp_path / "lstm", max_steps=2, callbacks=[callback]).fit(module)
    assert "net.lstm.bias_ih_l0" in reasons(callback.report)
    forget = [p[32:64] for n, p in net.lstm.named_parameters() if n.startswith("bias")]
    assert all(torch.equal(f, torch.ones(32)) for f in forget)
    assert any(r.layer == "net.lstm" for r in callback.report.layers)


# ---- uninitialized memory -------------------------------------------------------------------------------------------


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 100, dim: int = 64) -> None:
        super().__init__()
        self.embed, self.blocks = nn.Embedding(vocab, dim), nn.Sequential(Block(dim, False), Block(dim, False))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.norm(self.blocks(self.embed(ids))))


def _from_meta(cls: type[nn.Module], memory: str) -> nn.Module:
    """``cls()`` built on the meta device and materialized with ``to_empty``: memory left as it is ("garbage": every
    third tensor filled with 1e30, every third with NaN, the rest what ``torch.empty`` held) or zeroed ("zero")."""
    with torch.device("meta"):
        model = cls()
    model.to_empty(device="cpu")
    with torch.no_grad():
        tensors = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
        for i, t in enumerate(tensors):
            if memory == "zero":
                t.zero_()
            elif i % 3 == 0:
                t.fill_(1e30)
            elif i % 3 == 1:
                t.fill_(math.nan)
    return model.eval()


@pytest.mark.parametrize("memory", ["zero", "garbage"])
@pytest.mark.parametrize("cls, example", [(TinyLM, _ids(8)), (TinyResNet, IMAGES[:4])], ids=["transformer", "resnet"])
def test_a_meta_to_empty_model_gets_every_layer_initialized(cls, example, memory):
    """Zero memory was kept whole ("all zero: a deliberate zero init", output std 0); garbage was kept as "constant
    (1e+30): a deliberate init" (NaN output). Now every traced layer is drawn, biases zeroed, the norms reset, and the
    report says why."""
    torch.manual_seed(0)
    model = _from_meta(cls, memory)
    report = lightning_bn.prepare(model, example, seed=0)
    traced = list(trace_model(model, example).layers)
    assert [r.layer for r in report.layers] == traced and report.kept == []
    why = next(c for c in report.changes if "uninitialized memory (a meta -> to_empty model?)" in c)
    assert f"{len(traced)} layers" in why
    assert ("the weights of all" if memory == "zero" else "holds") in why
    assert any(c.startswith("reset ") and "norms holding uninitialized memory" in c for c in report.changes)
    for name in traced:
        layer = model.get_submodule(name)
        assert 0 < layer.weight.std().item() < 2, name
        assert getattr(layer, "bias", None) is None or not layer.bias.any(), name
    for m in model.modules():
        if isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any()
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.running_var, torch.ones_like(m.running_var)) and not m.running_mean.any()
    with torch.no_grad():
        out = model(example)
    assert torch.isfinite(out).all() and out.std().item() > 0.1


def test_a_meta_head_on_a_frozen_backbone():
    """A new head materialized from meta next to a frozen backbone: zero weights (a zero page) beside a garbage bias
    (up to 80: 640x PyTorch's bound) is no deliberate zero init (it was kept, bias and all: output std 51, and the
    frozen backbone redrawn): drawn, bias zeroed; the frozen backbone is kept."""
    torch.manual_seed(0)
    backbone = _pretrained_backbone()
    with torch.device("meta"):
        head = nn.Linear(64, 10)
    head.to_empty(device="cpu")
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.linspace(-80, 80, 10))
    model = nn.Sequential(backbone, head).eval()
    before = state(backbone)
    report = lightning_bn.prepare(model, torch.randn(64, 64), seed=0)
    assert [r.layer for r in report.layers] == ["1"] and unchanged(backbone, before)
    assert any("uninitialized memory" in c and "1.bias reaches 80 beside all-zero weights" in c for c in report.changes)
    assert not head.bias.any() and head.weight.std().item() > 0


# ---- a scripted submodule -------------------------------------------------------------------------------------------


def test_a_scripted_submodule_is_named_when_refused():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = torch.jit.script(nn.Sequential(nn.Linear(8, 8), nn.ReLU()))
            self.c = nn.Linear(8, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.c(self.b(torch.relu(self.a(x))))

    net = Net()
    before = state(net)
    with pytest.raises(ValueError, match=r"Cannot prepare Net: 'b' is a TorchScript module \(torch.jit.script"):
        lightning_bn.prepare(net, torch.randn(4, 8))
    assert unchanged(net, before)
    with pytest.raises(ValueError, match="the model itself"):
        lightning_bn.prepare(torch.jit.script(nn.Sequential(nn.Linear(8, 2))), torch.randn(4, 8))
