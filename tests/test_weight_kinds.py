"""How a layer's weight acts (issue 23, items 1 and 4): weight-standardized convolutions, weight norm, spectral norm,
and prepare()'s check of its own outcome.

timm is not needed: its ``StdConv2d`` and ``ScaledStdConv2d`` are written out below with timm's forward (the weight of
each output channel standardized with ``F.batch_norm``, times ``gain * scale`` for the scaled one). Every claim a row
makes is checked against the model itself: the weight forward uses (read inside a forward hook) and the layer's output
on a fresh forward pass.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations

import lightning_bn
from lightning_bn.init import check_weights, init_layer_, lsuv_, weight_samples
from lightning_bn.layers import (
    LayerKind,
    WeightSpec,
    effective_weights,
    fixed_scale,
    get_layer_kind,
    register_layer,
    scheme_std,
)
from lightning_bn.prepare import Report
from lightning_bn.tracing import model_state
from tests.zoo import ZOO, run_model

# ---- timm's weight-standardized convolutions (timm/layers/std_conv.py), same forward ---------------------------------


class StdConv2d(nn.Conv2d):
    """timm's ``StdConv2d`` (BiT): each output channel's weight standardized in forward."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, bias: bool = False, eps: float = 1e-6):
        super().__init__(cin, cout, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                              eps=self.eps).reshape_as(self.weight)  # fmt: skip
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2d(nn.Conv2d):
    """timm's ``ScaledStdConv2d`` (NF-Nets): standardized, times a learnable per-channel ``gain`` and fan_in^-0.5."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, bias: bool = True, gamma: float = 1.0,
                 eps: float = 1e-6, gain_init: float = 1.0):  # fmt: skip
        super().__init__(cin, cout, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias)
        self.gain = nn.Parameter(torch.full((self.out_channels, 1, 1, 1), gain_init))
        self.scale = gamma * self.weight[0].numel() ** -0.5
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                              eps=self.eps).reshape_as(self.weight)  # fmt: skip
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2dSame(ScaledStdConv2d):
    """A ``Same`` variant: recognized by its class name too."""


def timm_effective(conv: nn.Conv2d) -> Tensor:
    """The weight timm's forward uses, computed here independently of the library."""
    gain = getattr(conv, "gain", None)
    affine = None if gain is None else (gain * conv.scale).view(-1)
    flat = F.batch_norm(conv.weight.reshape(1, conv.out_channels, -1), None, None, weight=affine, training=True,
                        momentum=0.0, eps=conv.eps)  # fmt: skip
    return flat.reshape_as(conv.weight).detach().clone()


def std_conv_net(conv: type[nn.Conv2d], act: type[nn.Module], eps: float = 1e-6, depth: int = 6) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    channels = 3
    for _ in range(depth):
        layers += [conv(channels, 16, 3, eps=eps), act()]
        channels = 16
    return nn.Sequential(*layers)


def image() -> Tensor:
    return torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(2))


# ---- measuring the model itself -------------------------------------------------------------------------------------


def forward_view(model: nn.Module, example_input: Any, names: list[str]) -> dict[str, tuple[Tensor, float]]:
    """For each named layer, at its first call in one forward pass (as prepare measures: eval mode, BatchNorm on batch
    statistics): the weight forward uses (``module.weight`` inside the call: a parametrization's computed value, the
    legacy weight norm's recomputed one) and the output's std."""
    modules = dict(model.named_modules())
    seen: dict[str, tuple[Tensor, float]] = {}

    def hook(name: str):
        def record(module: nn.Module, args: Any, output: Any) -> None:
            if name in seen:
                return
            main = output[0] if isinstance(output, tuple) else output
            weight = getattr(module, "weight", None)
            weight = weight.detach().clone() if isinstance(weight, Tensor) else None
            seen[name] = (weight, main.detach().float().std().item())

        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        with model_state(model, batch_stats=True):
            run_model(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def adamw_step(model: nn.Module, x: Tensor, effective: Any) -> list[float]:
    """Relative change of each layer's effective weight under one AdamW step (lr 1e-3) on a fixed loss."""
    model = copy.deepcopy(model)
    layers = [m for m in model.modules() if get_layer_kind(m) is not None]
    before = [effective(m) for m in layers]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(x).pow(2).mean().backward()
    optimizer.step()
    return [((effective(m) - b).norm() / b.norm()).item() for m, b in zip(layers, before)]


def summary_count(report: Report, pattern: str) -> int:
    found = [re.match(pattern, c) for c in report.changes]
    found = [m for m in found if m]
    return int(found[0].group(1)) if found else 0


# ---- weight-standardized convolutions -------------------------------------------------------------------------------


def test_registry_knows_how_a_standardized_weight_acts():
    std, scaled = StdConv2d(3, 8, 3), ScaledStdConv2dSame(3, 8, 3)
    (spec,) = get_layer_kind(std).weights(std)
    assert get_layer_kind(std).name == "std_conv" and get_layer_kind(scaled).name == "std_conv"
    assert spec.fixed == "weight standardized: its scale cannot change the output" and spec.scaled(std) == []
    assert fixed_scale(std) == spec.fixed
    (spec,) = get_layer_kind(scaled).weights(scaled)
    assert spec.fixed is None and spec.scale == "gain" and spec.scaled(scaled)[0] is scaled.gain
    torch.testing.assert_close(effective_weights(scaled)[0], timm_effective(scaled))
    torch.testing.assert_close(effective_weights(std)[0], timm_effective(std))


@pytest.mark.parametrize("act", [nn.SiLU, nn.ReLU])
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_std_conv_is_kept_with_the_reason_and_trains_like_stock(act, eps):
    """StdConv2d: no scale of the weight changes the output, so nothing is drawn or rescaled (it was shrunk to 1e-4
    and the first AdamW step moved it by ~480% under SiLU); every layer is kept with the reason."""
    stock = std_conv_net(StdConv2d, act, eps)
    model = copy.deepcopy(stock)
    report = lightning_bn.prepare(model, image(), seed=0)
    assert report.layers == []
    assert [(k.layer, k.reason) for k in report.kept] == [
        (str(i), "weight standardized: its scale cannot change the output") for i in range(0, 12, 2)
    ]
    assert not any(c.startswith(("initialized", "rescaled")) for c in report.changes), report.changes
    for before, after in zip(stock.parameters(), model.parameters()):
        assert torch.equal(before, after)
    # one line for the reason shared by every layer, not one per layer
    kept_line = "kept (weight standardized: its scale cannot change the output): 0, 2, 4, 6, 8, 10"
    assert kept_line in str(report).splitlines()
    x = image()
    steps, stock_steps = adamw_step(model, x, timm_effective), adamw_step(stock, x, timm_effective)
    assert steps == pytest.approx(stock_steps, rel=1e-5)  # was 3.7-5.2 (480%) vs 0.009-0.021 under SiLU


@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_scaled_std_conv_silu_rescales_the_gain_not_the_weight(eps):
    """ScaledStdConv2d + SiLU: the rescale acts on ``gain`` (it multiplied the raw weight, which changes nothing: the
    weight's std went 0.048 -> 1e14 and one AdamW step moved the effective weights by 1e-3, 21x less than stock)."""
    x = image()
    stock = std_conv_net(ScaledStdConv2d, nn.SiLU, eps)
    model = copy.deepcopy(stock)
    report = lightning_bn.prepare(model, x, seed=0)
    names = [str(i) for i in range(0, 12, 2)]
    assert [r.layer for r in report.layers] == names and report.kept == [] and report.skipped == []
    fresh = forward_view(model, x, names)
    for row in report.layers:
        assert row.corrected and row.reached and row.missed is None, row
        assert row.weight_form == "weight standardized, scaled by gain"
        assert 1 / 1.5 <= fresh[row.layer][1] <= 1.5, (row.layer, fresh[row.layer][1])  # unit output variance
        assert fresh[row.layer][1] == pytest.approx(row.std_after, rel=1e-4)
    assert summary_count(report, r"initialized (\d+) layers") == 6
    assert summary_count(report, r"rescaled (\d+) layers before silu to unit output variance") == 6
    for old, new in zip(stock, model):
        if isinstance(old, nn.Conv2d):
            ratio = new.weight.std().item() / old.weight.std().item()
            assert 0.1 <= ratio <= 10, ratio  # measured 2.9
    steps, stock_steps = adamw_step(model, x, timm_effective), adamw_step(stock, x, timm_effective)
    for step, stock_step in zip(steps, stock_steps):
        assert 0.1 <= step / stock_step <= 10, (steps, stock_steps)  # measured 0.34-0.35 (was 0.05)


def test_scaled_std_conv_relu_gets_the_scheme_std_in_its_effective_weight():
    x = image()
    stock = std_conv_net(ScaledStdConv2d, nn.ReLU)
    model = copy.deepcopy(stock)
    report = lightning_bn.prepare(model, x, seed=0)
    assert [r.scheme for r in report.layers] == ["kaiming"] * 6
    for row, conv in zip(report.layers, [m for m in model if isinstance(m, nn.Conv2d)]):
        fan_in = conv.weight[0].numel()
        target = scheme_std("kaiming", fan_in, 0, math.sqrt(2))
        effective = timm_effective(conv)
        assert effective.pow(2).mean().sqrt().item() == pytest.approx(target, rel=0.2)
        assert row.reached and row.weight_target == pytest.approx(target)
        assert row.weight_std == pytest.approx(effective.pow(2).mean().sqrt().item(), rel=1e-4)
        # the effective weight is the draw less its per-channel mean, each channel with the draw's norm (the gain)
        drawn = conv.weight.detach()
        centered = drawn - drawn.mean(dim=(1, 2, 3), keepdim=True)
        squares = (1, 2, 3)
        norms = (drawn.pow(2).sum(dim=squares, keepdim=True) / centered.pow(2).sum(dim=squares, keepdim=True)).sqrt()
        torch.testing.assert_close(effective, centered * norms, rtol=1e-3, atol=1e-5)
    steps, stock_steps = adamw_step(model, x, timm_effective), adamw_step(stock, x, timm_effective)
    for step, stock_step in zip(steps, stock_steps):
        assert 0.1 <= step / stock_step <= 10, (steps, stock_steps)


def test_forced_init_on_std_conv_is_skipped_with_the_reason_and_lsuv_leaves_it():
    model = std_conv_net(StdConv2d, nn.ReLU, depth=2)
    state = copy.deepcopy(model.state_dict())
    report = lightning_bn.prepare(model, image(), init="orthogonal")
    assert [(s.layer, s.reason) for s in report.skipped] == [
        ("0", "weight standardized: its scale cannot change the output"),
        ("2", "weight standardized: its scale cannot change the output"),
    ]
    assert report.layers == [] and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert lsuv_(model, image()) == {}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


# ---- weight norm ----------------------------------------------------------------------------------------------------


def weight_normed(api: str, layer: str, act: type[nn.Module], depth: int = 4) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        plain = nn.Linear(64, 64) if layer == "linear" else nn.Conv1d(64, 64, 3, padding=1)
        if api == "parametrization":
            layers.append(parametrizations.weight_norm(plain))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                layers.append(torch.nn.utils.weight_norm(plain))
        layers.append(act())
    return nn.Sequential(*layers)


def example(layer: str) -> Tensor:
    generator = torch.Generator().manual_seed(3)
    shape = (128, 64) if layer == "linear" else (16, 64, 20)
    return torch.randn(*shape, generator=generator)


def g_and_v(module: nn.Module) -> tuple[Tensor, Tensor]:
    if hasattr(module, "parametrizations"):
        return module.parametrizations.weight.original0, module.parametrizations.weight.original1
    return module.weight_g, module.weight_v


API = ["parametrization", "legacy"]
LAYER = ["linear", "conv1d"]


@pytest.mark.parametrize("layer", LAYER)
@pytest.mark.parametrize("api", API)
def test_weight_norm_gets_the_draw_in_the_weight_forward_uses(api, layer):
    """Before: g and v untouched, every row claiming kaiming (the legacy layer's report said std 1.38 while the next
    forward was back at 0.0058), two of four parametrized layers missing from the report."""
    x = example(layer)
    model = weight_normed(api, layer, nn.ReLU)
    names = ["0", "2", "4", "6"]
    before = forward_view(model, x, names)
    report = lightning_bn.prepare(model, x, seed=0)
    assert [r.layer for r in report.layers] == names
    after = forward_view(model, x, names)
    fan_in = 64 if layer == "linear" else 192
    target = math.sqrt(2 / fan_in)
    for row in report.layers:
        weight, std = after[row.layer]
        assert not torch.equal(weight, before[row.layer][0])
        assert weight.pow(2).mean().sqrt().item() == pytest.approx(target, rel=0.2)  # was 0.41x (0.072 vs 0.177)
        assert row.scheme == "kaiming" and row.reached and row.weight_target == pytest.approx(target)
        assert row.weight_form.startswith("weight norm")
        assert std == pytest.approx(row.std_after, rel=1e-4)  # the table's std is the next forward's
        g, v = g_and_v(dict(model.named_modules())[row.layer])
        dims = tuple(range(1, v.dim()))
        torch.testing.assert_close(g.detach(), v.detach().norm(dim=dims, keepdim=True))  # g = ‖v‖ per output row
        torch.testing.assert_close(weight, v.detach())  # the effective weight is the draw
    assert summary_count(report, r"initialized (\d+) layers") == 4
    assert "weight 0: weight norm" in str(report)


@pytest.mark.parametrize("layer", LAYER)
@pytest.mark.parametrize("api", API)
def test_weight_norm_rescales_through_g(api, layer):
    x = example(layer)
    model = weight_normed(api, layer, nn.SiLU)
    report = lightning_bn.prepare(model, x, seed=0)
    fresh = forward_view(model, x, ["0", "2", "4", "6"])
    for row in report.layers:
        assert row.corrected and row.reached, row
        assert 1 / 1.5 <= fresh[row.layer][1] <= 1.5  # was 0.57 -> 0.016 along depth, claimed "rescaled"
        assert fresh[row.layer][1] == pytest.approx(row.std_after, rel=1e-4)
    assert summary_count(report, r"rescaled (\d+) layers before silu") == 4


@pytest.mark.parametrize("layer", LAYER)
@pytest.mark.parametrize("api", API)
def test_forced_orthogonal_reaches_a_weight_normed_layer(api, layer):
    """A forced ``init="orthogonal"`` was a silent no-op; now the effective weight is the orthogonal draw."""
    x = example(layer)
    model = weight_normed(api, layer, nn.ReLU)
    names = ["0", "2", "4", "6"]
    before = forward_view(model, x, names)
    report = lightning_bn.prepare(model, x, init="orthogonal", seed=0)
    after = forward_view(model, x, names)
    assert [(r.layer, r.scheme, r.reached) for r in report.layers] == [(n, "orthogonal", True) for n in names]
    for name in names:
        weight = after[name][0]
        assert not torch.equal(weight, before[name][0])
        assert weight.pow(2).mean().sqrt().item() == pytest.approx(math.sqrt(2 / weight[0].numel()), rel=1e-3)
        if layer == "linear":  # orthogonal rows, scaled by the ReLU gain: W Wᵀ = 2 I
            gram = weight @ weight.T / 2
            torch.testing.assert_close(gram, torch.eye(64), atol=1e-4, rtol=0)


def test_init_layer_on_weight_norm_with_dim_none_and_a_zero_g():
    layer = parametrizations.weight_norm(nn.Linear(32, 16), dim=None)
    with torch.no_grad():
        layer.parametrizations.weight.original0.zero_()  # effective weight 0: g is first set to 1
    before = weight_samples(layer)
    gain = init_layer_(layer, "kaiming", generator=torch.Generator().manual_seed(0))
    check = check_weights(layer, before, "kaiming", gain)
    assert check.changed and check.missed is None and check.std == pytest.approx(math.sqrt(1 / 32), rel=0.2)
    torch.testing.assert_close(layer.weight, layer.parametrizations.weight.original1)


# ---- fixed scales: spectral norm, orthogonal parametrization --------------------------------------------------------


def spectral(api: str) -> nn.Sequential:
    torch.manual_seed(0)
    if api == "parametrization":
        wrap = parametrizations.spectral_norm
    elif api == "orthogonal":
        wrap = parametrizations.orthogonal
    else:
        wrap = torch.nn.utils.spectral_norm
    return nn.Sequential(wrap(nn.Linear(32, 32)), nn.ReLU(), wrap(nn.Linear(32, 32)), nn.ReLU(), nn.Linear(32, 4))


@pytest.mark.parametrize("api", ["parametrization", "legacy", "orthogonal"])
@pytest.mark.parametrize("init", ["auto", "kaiming"])
def test_spectral_norm_and_orthogonal_are_reported_honestly(api, init):
    model = spectral(api)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    state = copy.deepcopy(model.state_dict())
    report = lightning_bn.prepare(model, x, init=init)
    why = "orthogonal parametrization" if api == "orthogonal" else "spectral norm"
    listed = report.kept if init == "auto" else report.skipped
    assert [(k.layer, k.reason.split(":")[0]) for k in listed if k.layer in ("0", "2")] == [("0", why), ("2", why)]
    assert [r.layer for r in report.layers] == ["4"]
    assert summary_count(report, r"initialized (\d+) layer") == 1
    for key in [k for k in state if k.startswith(("0.", "2.")) and "_u" not in k and "_v" not in k]:
        assert torch.equal(state[key], model.state_dict()[key]), key


# ---- prepare() checks its own outcome -------------------------------------------------------------------------------


class Detached(nn.Module):
    """A layer whose forward uses a frozen copy of its weight: no init or rescale of ``weight`` reaches the output."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, n) / n**0.5)
        self.register_buffer("used", self.weight.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.used.T


def test_a_claim_that_did_not_hold_is_marked_not_reached():
    """A kind that describes its weight wrongly (forward uses a buffer): the rescale cannot reach unit variance, the
    row says so, and the summary does not count it as rescaled."""
    register_layer(LayerKind("detached_demo", lambda m: [WeightSpec("weight", 32.0, 32.0)], (Detached,)),
                   overwrite=True)  # fmt: skip
    model = nn.Sequential(Detached(32), nn.SiLU(), nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, 2))
    with torch.no_grad():
        model[0].used.mul_(0.05)
    report = lightning_bn.prepare(model, torch.randn(256, 32, generator=torch.Generator().manual_seed(0)), seed=0)
    rows = {r.layer: r for r in report.layers}
    assert not rows["0"].reached and rows["0"].missed.startswith("output std 0.0")
    assert rows["0"].missed.endswith("after rescaling, target 1")
    assert rows["2"].reached and rows["4"].reached
    text = str(report)
    assert f"not reached 0: {rows['0'].missed}" in text
    assert summary_count(report, r"rescaled (\d+) layers? before silu") == 1
    assert any(c.startswith("not reached for 1 layer (0)") for c in report.changes)
    assert report.to_dict()["layers"][0]["reached"] is False


def test_an_init_that_does_not_reach_the_weight_is_never_claimed():
    """A kind whose effective weight the draw does not reach (``effective`` reads the buffer): not counted."""
    register_layer(LayerKind("detached_demo", lambda m: [WeightSpec("weight", 32.0, 32.0, effective=lambda m: m.used)],
                             (Detached,)), overwrite=True)  # fmt: skip
    model = nn.Sequential(Detached(32), nn.ReLU(), nn.Linear(32, 2))
    report = lightning_bn.prepare(model, torch.randn(64, 32), seed=0)
    row = report.layers[0]
    assert not row.reached and row.missed == "the weight forward uses did not change: the draw did not reach it"
    assert summary_count(report, r"initialized (\d+) layers?") == 1  # the Linear only


def test_lsuv_on_attention_is_marked_not_reached():
    """``nn.MultiheadAttention``'s output is not linear in its weights' scale (softmax): forced LSUV misses unit
    variance, and the report now says so instead of counting it as rescaled."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    x = torch.randn(8, 16, 32, generator=torch.Generator().manual_seed(0))
    report = lightning_bn.prepare(layer, x, init="lsuv", seed=0)
    fresh = forward_view(layer, x, [r.layer for r in report.layers])
    for row in report.layers:
        assert row.reached == (1 / 1.5 <= fresh[row.layer][1] <= 1.5), (row.layer, fresh[row.layer][1], row.missed)
    assert summary_count(report, r"LSUV: rescaled (\d+) layers?") == sum(r.reached for r in report.layers)


# ---- the summary matches the table on the zoo -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_every_claim_holds_on_a_fresh_forward_pass(name):
    """For each architecture of tests/zoo.py: every row's claim checked against the model itself, and the summary's
    counts against the rows."""
    try:
        case = ZOO[name]()
    except ImportError as error:
        pytest.skip(f"{name}: {error}")
    model = case.model
    modules = dict(model.named_modules())
    before = {n: [w.detach().clone() for w in effective_weights(m)] for n, m in modules.items()
              if get_layer_kind(m) is not None}  # fmt: skip
    report = lightning_bn.prepare(model, case.example_input, seed=0)
    fresh = forward_view(model, case.example_input, [r.layer for r in report.layers])
    for row in report.layers:
        assert row.reached, (row.layer, row.missed)
        after = [w.detach() for w in effective_weights(modules[row.layer])]
        assert any(not torch.equal(a, b) for a, b in zip(after, before[row.layer])), (
            f"{row.layer}: claims {row.scheme}, the weight forward uses did not change"
        )
        std = fresh[row.layer][1]
        assert std == pytest.approx(row.std_after, rel=1e-3, abs=1e-6), row.layer  # the table is the next forward's
        if math.isfinite(row.output_target):  # rescaled: to unit variance, q*, the gate's or the branch's share
            assert 1 / 1.5 <= std / row.output_target <= 1.5, (row.layer, std, row.output_target)
        else:  # drawn: the weight forward uses has the scheme's std
            assert row.weight_std == pytest.approx(after[0].float().pow(2).mean().sqrt().item(), rel=1e-4)
            allowed = max(1.2, 1 + 5 / math.sqrt(2 * after[0].numel()))  # a small layer's sample std spreads
            assert 1 / allowed <= row.weight_std / row.weight_target <= allowed, (row.layer, row.weight_std)
    assert summary_count(report, r"initialized (\d+) layers?") == len(report.layers)
    rescaled = [r for r in report.layers if r.corrected and 1 / 1.5 <= fresh[r.layer][1] <= 1.5]
    assert summary_count(report, r"rescaled (\d+) layers? before") == len(rescaled)
