"""Composite activations written in ``forward``, learnable element-wise modules, gates and PReLU, through the one trace.

Every case runs a real forward pass of a small model and checks what ``trace_model`` reports against the numbers the
model computes: the activation found after a layer is the whole element-wise function (``h * torch.sigmoid(h)`` is
SiLU, never its inner sigmoid), a product of an activation with another layer's output marks a gate, and PReLU's
learned slopes are read by the monitors when they log.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lightning_bn
from lightning_bn.activations import get_activation
from lightning_bn.tracing import recognize, trace_call, trace_model
from tests.zoo import ZOO


def _gelu_new(h: Tensor) -> Tensor:
    return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))))


# formula written in forward -> (expected Activation.describe(), inner calls that must not stay sites)
FORMULAS = {
    "swish": (lambda h: h * torch.sigmoid(h), "silu"),
    "quick_gelu": (lambda h: h * torch.sigmoid(1.702 * h), "quick_gelu"),
    "gelu_new": (_gelu_new, "gelu(approximate=tanh)"),
    "gelu_erf": (lambda h: 0.5 * h * (1 + torch.erf(h / math.sqrt(2))), "gelu(approximate=none)"),
    "mish": (lambda h: h * torch.tanh(F.softplus(h)), "mish"),
}
INNER = ("sigmoid", "tanh", "softplus", "erf")


class Written(nn.Module):
    """``fc -> formula written in forward -> out``."""

    def __init__(self, formula, width: int = 16) -> None:
        super().__init__()
        self.fc, self.out, self.formula = nn.Linear(8, width), nn.Linear(width, 2), formula

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.formula(self.fc(x)))


def _no_inner_site(found) -> None:
    names = found.site_names + [name for name, _ in found.unwatchable]
    assert not [n for n in names if n.rsplit(".", 1)[-1] in INNER], names


@pytest.mark.parametrize("case", sorted(FORMULAS))
def test_composite_formula_after_a_linear_is_recognized_as_one_function(case):
    """Each formula is found as its kind (how="composite"), the inner call's site is replaced by one site for the
    whole function on the layer's output, and the kind computes what the formula computes (to 2e-6)."""
    formula, expected = FORMULAS[case]
    torch.manual_seed(0)
    net, x = Written(formula), torch.randn(64, 8)
    found = trace_model(net, x)
    layer = found.layers["fc"]
    assert (layer.activation.describe(), layer.how) == (expected, "composite")
    assert not layer.gate and layer.gated_by is None
    _no_inner_site(found)
    (site,) = found.sites
    assert (site.name, site.how, site.hook, site.module_name) == (f"fc.{layer.activation.name}", "composite", "input",
                                                                  "fc")  # fmt: skip
    with torch.no_grad():
        h = net.fc(x)
        assert (layer.activation(h) - formula(h)).abs().max().item() < 2e-6
    assert site.input_std == pytest.approx(h.std().item(), rel=1e-5)  # 1024 elements: every one is sampled


def test_failing_recognition_never_gives_the_inner_kind():
    """``h * sigmoid(h) ** 2`` matches no kind: a kind "by behaviour" that computes it (replayed: to 1e-6 on a grid),
    with the numeric init (gain from quadrature, data-driven rescale), never the inner sigmoid."""
    formula = lambda h: h * torch.sigmoid(h) ** 2  # noqa: E731
    found = trace_model(Written(formula), torch.randn(64, 8))
    act = found.layers["fc"].activation
    assert found.layers["fc"].how == "composite" and act.name == "composite (by behaviour)"
    assert act.kind.init == "numeric" and not act.kind.homogeneous
    grid = torch.linspace(-6, 6, 121)
    assert (act(grid) - formula(grid)).abs().max().item() < 1e-6
    assert found.site_names == ["fc.composite"]
    _no_inner_site(found)
    expected_gain = 1 / math.sqrt(float(((formula(torch.randn(2_000_000, dtype=torch.float64))) ** 2).mean()))
    assert act.gain == pytest.approx(expected_gain, rel=5e-3)


def test_composite_after_a_norm_is_watched_on_the_norm_and_monitored():
    """DDPM's ``h = norm(conv(x)); h * torch.sigmoid(h)``: conv's activation is SiLU, watched on the norm's output;
    the monitor logs it under ``conv.silu`` with the std of silu(norm(conv(x))) (1e-4)."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x: Tensor) -> Tensor:
            h = self.norm(self.conv(x))
            h = h * torch.sigmoid(h)
            return self.head(h.mean((2, 3)))

    torch.manual_seed(0)
    net, x = Block(), torch.randn(4, 3, 8, 8)
    found = trace_model(net, x)
    assert (found.layers["conv"].activation.name, found.layers["conv"].how) == ("silu", "composite")
    assert [(s.name, s.hook, s.module_name) for s in found.sites] == [("conv.silu", "input", "norm")]
    with lightning_bn.Monitor(net, every_n_steps=1, example_input=x, gradients=False) as monitor:
        net(x).sum().backward()
        figures = monitor.step()
    with torch.no_grad():
        expected = F.silu(net.norm(net.conv(x)))
    assert figures["act_std/conv.silu"] == pytest.approx(expected.std().item(), rel=1e-4)
    assert figures["act_mean/conv.silu"] == pytest.approx(expected.mean().item(), abs=1e-5)


def test_composite_of_no_module_output_is_unwatchable_not_its_inner_call():
    """After a bias added in forward (a new root, per-channel constants), ``h * sigmoid(h)`` is still SiLU; no hook
    sees it, so it is listed unwatchable as ``fc.silu`` (the inner sigmoid is not)."""

    class Biased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.b, self.out = nn.Linear(8, 16, bias=False), nn.Parameter(torch.randn(16)), nn.Linear(16, 2)

        def forward(self, x: Tensor) -> Tensor:
            h = self.fc(x) + self.b
            return self.out(h * torch.sigmoid(h))

    found = trace_model(Biased(), torch.randn(64, 8))
    assert (found.layers["fc"].activation.name, found.layers["fc"].how) == ("silu", "composite")
    assert found.sites == [] and [n for n, _ in found.unwatchable] == ["fc.silu"]


def test_in_place_composite_and_a_live_trace():
    """``h.mul_(torch.sigmoid(h))`` is SiLU too, traced while it runs (trace_call): the output is the model's own,
    the map holds the composite site only; the observer got the inner site as it ran (a monitor measures it once
    and drops it) and not the composite's, whose input the in-place call overwrote; written out of place, both."""

    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.out = nn.Linear(8, 16), nn.Linear(16, 2)

        def forward(self, x: Tensor) -> Tensor:
            h = self.fc(x)
            h.mul_(torch.sigmoid(h))
            return self.out(h)

    torch.manual_seed(0)
    net, x = InPlace(), torch.randn(4, 8)
    seen = []
    out, found, failed = trace_call(net, net.forward, (x,), {}, lambda site, t: seen.append((site.name, t.shape)))
    assert failed is None and torch.equal(out, net(x))
    assert (found.layers["fc"].activation.name, found.layers["fc"].how) == ("silu", "composite")
    assert found.site_names == ["fc.silu"] and seen == [("fc.sigmoid", torch.Size([4, 16]))]
    swish, seen = Written(FORMULAS["swish"][0]), []  # not in place: the composite's input is handed over too
    _, found, _ = trace_call(swish, swish.forward, (x,), {}, lambda site, t: seen.append((site.name, t.shape)))
    assert found.site_names == ["fc.silu"] and seen == [("fc.sigmoid", (4, 16)), ("fc.silu", (4, 16))]


def test_composite_of_a_half_precision_model():
    """The written-out gelu_new in bfloat16 is still gelu(approximate=tanh)."""
    net = Written(_gelu_new).to(torch.bfloat16)
    found = trace_model(net, torch.randn(64, 8, dtype=torch.bfloat16))
    assert found.layers["fc"].activation.describe() == "gelu(approximate=tanh)"


class LearnableSwish(nn.Module):
    """``x * sigmoid(beta * x)`` with a learned ``beta`` (one, or one per channel)."""

    def __init__(self, beta: float = 1.0, channels: int = 1) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.full((channels,), beta))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.beta * x)


@pytest.mark.parametrize(
    ("beta", "expected", "how"), [(1.0, "silu", "numeric"), (1.702, "quick_gelu", "numeric"), (2.0, None, "behaviour")]
)
def test_learnable_elementwise_module_is_recognized_by_what_it_computes(beta, expected, how):
    """A leaf module with a parameter that acts element-wise is recognized like a parameter-free one: beta 1 is
    SiLU, 1.702 QuickGELU, 2 a kind by behaviour that computes the module (1e-6); its site is the module."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), LearnableSwish(beta), nn.Linear(16, 2))
    found = trace_model(net, torch.randn(64, 8))
    layer = found.layers["0"]
    assert layer.how == how and layer.consumer == "1" and found.site_names == ["1"]
    if expected is not None:
        assert layer.activation.describe() == expected
    else:
        grid = torch.linspace(-6, 6, 121)
        assert layer.activation.name == "LearnableSwish (by behaviour)"
        assert (layer.activation(grid) - grid * torch.sigmoid(2 * grid)).abs().max().item() < 1e-6
    assert layer.activation.name != "sigmoid"


def test_learnable_swish_per_channel_is_judged_from_its_samples():
    """With one beta per channel the module cannot run on a grid; its calls are followed in the trace: all betas 1
    read SiLU from the samples; betas 0.5..2 a kind by behaviour, interpolated from the samples: within 0.015 of the
    mean channel's function near 0, and closer to the module's output than SiLU is (RMS 0.109 vs 0.135 of its std)."""
    torch.manual_seed(0)
    net, x = nn.Sequential(nn.Linear(8, 16), LearnableSwish(1.0, 16), nn.Linear(16, 2)), torch.randn(256, 8)
    found = trace_model(net, x)
    assert (found.layers["0"].activation.name, found.layers["0"].how) == ("silu", "composite")
    with torch.no_grad():
        net[1].beta.copy_(torch.linspace(0.5, 2.0, 16))
    found = trace_model(net, x)
    act = found.layers["0"].activation
    assert found.layers["0"].how == "composite" and act.name == "composite (by behaviour)"
    assert "0.sigmoid" not in found.site_names and found.site_names == ["0.composite"]
    grid = torch.linspace(-0.5, 0.5, 21)
    mean_channel = (grid[:, None] * torch.sigmoid(torch.linspace(0.5, 2.0, 16) * grid[:, None])).mean(1)
    assert (act(grid) - mean_channel).abs().max().item() < 0.015
    with torch.no_grad():
        h = net[0](x)
        y = net[1](h)
    residual = ((act(h) - y).pow(2).mean().sqrt() / y.std()).item()
    assert residual < 0.9 * ((F.silu(h) - y).pow(2).mean().sqrt() / y.std()).item()


def test_layers_norms_and_prelu_keep_their_roles():
    """Modules with parameters that are layers, norms or registered kinds are never taken for element-wise
    functions: a LayerNorm after a Linear stays the norm after it, PReLU is the registered kind."""
    net = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.PReLU(), nn.Linear(16, 2))
    found = trace_model(net, torch.randn(4, 8))
    layer = found.layers["0"]
    assert layer.norm_after == "1" and (layer.activation.describe(), layer.how) == ("prelu(negative_slope=0.25)",
                                                                                      "module")  # fmt: skip
    assert recognize(nn.LayerNorm(16)) is None


# ---------------------------------------------------------------------------------------------------------------------
# gates
# ---------------------------------------------------------------------------------------------------------------------


class SqueezeExcite(nn.Module):
    """conv -> ReLU, then the feature map scaled by sigmoid(fc2(relu(fc1(pool)))) (broadcast), as torchvision."""

    def __init__(self, expand: bool = False) -> None:
        super().__init__()
        self.conv, self.fc1, self.fc2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.head, self.expand = nn.Linear(8, 2), expand

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv(x))
        scale = torch.sigmoid(self.fc2(F.relu(self.fc1(h.mean((2, 3), keepdim=True)))))
        h = h * (scale.expand_as(h) if self.expand else scale)
        return self.head(h.mean((2, 3)))


class SwiGLU(nn.Module):
    """LlamaMLP: ``down(silu(gate(x)) * up(x))``; ``written``: the SiLU as ``g * torch.sigmoid(g)``."""

    def __init__(self, written: bool = False) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
        self.written = written

    def forward(self, x: Tensor) -> Tensor:
        g = self.gate_proj(x)
        g = g * torch.sigmoid(g) if self.written else F.silu(g)
        return self.down_proj(g * self.up_proj(x))


class ChunkGLU(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.proj, self.out, self.how, self.glu = nn.Linear(8, 32), nn.Linear(16, 8), how, nn.GLU()

    def forward(self, x: Tensor) -> Tensor:
        if self.how == "chunk":
            a, b = self.proj(x).chunk(2, -1)
            return self.out(a * torch.sigmoid(b))
        return self.out(F.glu(self.proj(x)) if self.how == "F.glu" else self.glu(self.proj(x)))


class LSTMCell(nn.Module):
    """An LSTM written out in forward, one Linear per gate and input: i, f, o gate; g is the candidate."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        for gate in "ifgo":
            setattr(self, f"x{gate}", nn.Linear(width, width))
            setattr(self, f"h{gate}", nn.Linear(width, width))
        self.head, self.width = nn.Linear(width, 2), width

    def forward(self, x: Tensor) -> Tensor:
        h = c = torch.zeros(x.shape[0], self.width)
        for t in range(x.shape[1]):
            xt = x[:, t]
            i = torch.sigmoid(self.xi(xt) + self.hi(h))
            f = torch.sigmoid(self.xf(xt) + self.hf(h))
            g = torch.tanh(self.xg(xt) + self.hg(h))
            o = torch.sigmoid(self.xo(xt) + self.ho(h))
            c = f * c + i * g
            h = o * torch.tanh(c)
        return self.head(h)


def _gates(found) -> tuple[list[str], dict[str, str]]:
    return ([n for n, t in found.layers.items() if t.gate],
            {n: t.gated_by for n, t in found.layers.items() if t.gated_by})  # fmt: skip


@pytest.mark.parametrize("expand", [False, True])
def test_squeeze_excite_gate_is_marked_without_gated_by(expand):
    """The excite layer's sigmoid gates the feature map by broadcasting (directly or through ``expand_as``): fc2 is a
    gate, no layer is gated element by element, and the activations stay what they are."""
    found = trace_model(SqueezeExcite(expand), torch.randn(4, 3, 8, 8))
    assert _gates(found) == (["fc2"], {})
    activations = {n: t.activation.name for n, t in found.layers.items()}
    assert activations == {"conv": "relu", "fc1": "relu", "fc2": "sigmoid", "head": "identity"}


@pytest.mark.parametrize("written", [False, True])
def test_swiglu_gate_and_gated_by(written):
    """SwiGLU: gate_proj is the gate (SiLU, as F.silu or written out: then found as a composite), up_proj is gated by
    it; a composite is no gate of itself."""
    found = trace_model(SwiGLU(written), torch.randn(4, 8))
    assert _gates(found) == (["gate_proj"], {"up_proj": "gate_proj"})
    gate = found.layers["gate_proj"]
    assert (gate.activation.name, gate.how) == ("silu", "composite" if written else "function")
    assert found.layers["up_proj"].activation.is_identity and not found.layers["down_proj"].gate


@pytest.mark.parametrize("how", ["chunk", "F.glu", "nn.GLU"])
def test_glu_layer_gates_itself(how):
    """``a * sigmoid(b)`` of ``proj(x).chunk(2, -1)``, ``F.glu`` and ``nn.GLU``: proj is a gate gated by itself, and
    its activation is the sigmoid (no hook can watch half a tensor: listed unwatchable)."""
    found = trace_model(ChunkGLU(how), torch.randn(4, 8))
    assert _gates(found) == (["proj"], {"proj": "proj"})
    assert (found.layers["proj"].activation.name, found.layers["proj"].how) == ("sigmoid", "function")
    assert [n for n, _ in found.unwatchable] == ["proj.sigmoid"] and found.site_names == []


def test_written_out_lstm_cell_gates():
    """i, f and o (sigmoid) gate; g's tanh multiplies i but is the candidate, not a gate: the factor in [0, 1] is."""
    found = trace_model(LSTMCell(), torch.randn(4, 5, 8))
    gates, gated_by = _gates(found)
    assert gates == ["xi", "hi", "xf", "hf", "xo", "ho"] and gated_by == {}
    assert {found.layers[n].activation.name for n in ("xi", "hf", "xo")} == {"sigmoid"}
    assert found.layers["xg"].activation.name == "tanh"


def _zoo(name: str):
    try:
        return ZOO[name]()
    except ImportError as error:
        pytest.skip(f"{name}: {error}")


def test_zoo_llama_mlp_is_a_gated_unit():
    """LlamaMLP ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``: every gate_proj is a gate (SiLU), every up_proj is
    gated by its gate_proj, and the zoo's expected activations still hold."""
    case = _zoo("llama")
    found = trace_model(case.model, case.example_input)
    gates, gated_by = _gates(found)
    layers = [f"model.layers.{i}.mlp" for i in range(2)]
    assert gates == [f"{m}.gate_proj" for m in layers]
    assert gated_by == {f"{m}.up_proj": f"{m}.gate_proj" for m in layers}
    assert {n: found.layers[n].activation.describe() for n in case.expected} == case.expected


@pytest.mark.parametrize(
    ("name", "gates"),
    [
        ("efficientnet", ["encoder.blocks.0.squeeze_excite.expand", "encoder.blocks.1.squeeze_excite.expand"]),
        ("regnet", [f"encoder.stages.{i}.layers.0.layer.2.attention.2" for i in range(2)]),
    ],
)
def test_zoo_squeeze_excite_expand_is_a_gate(name, gates):
    """EfficientNet's and RegNet's squeeze-excite: the expand conv (sigmoid) is the gate of each block, nothing else
    (the depthwise SiLU output it scales is no gate), no gated_by (broadcast); expected activations hold."""
    case = _zoo(name)
    found = trace_model(case.model, case.example_input)
    assert _gates(found) == (gates, {})
    assert {n: found.layers[n].activation.describe() for n in case.expected} == case.expected


@pytest.mark.parametrize("name", ["bert", "gpt2", "t5", "resnet", "mobilenet_v2", "lstm_classifier", "timm_norm_act"])
def test_zoo_models_without_gates_or_composites(name):
    """Architectures with neither gates nor composites: none is reported, and the expected activations hold."""
    case = _zoo(name)
    found = trace_model(case.model, case.example_input)
    assert _gates(found) == ([], {})
    assert not [n for n, t in found.layers.items() if t.how == "composite"]
    assert {n: found.layers[n].activation.describe() for n in case.expected} == case.expected


# ---------------------------------------------------------------------------------------------------------------------
# PReLU
# ---------------------------------------------------------------------------------------------------------------------


class FunctionalPReLU(nn.Module):
    """``fc -> F.prelu(., slope 0.1 per channel) -> out``: PReLU as a function, not a module."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.slope, self.out = nn.Linear(8, 16), nn.Parameter(torch.full((16,), 0.1)), nn.Linear(16, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.prelu(self.fc(x), self.slope))


def test_prelu_is_a_registered_kind_with_the_he_gain():
    """``get_activation(nn.PReLU())`` is ``prelu`` at its mean slope; the gain 1/sqrt(E[f(z)^2]) is He et al.'s
    sqrt(2 / (1 + a^2)) to 1e-9 (a = 0.25: 1.37199; a = 0: sqrt 2); Linear -> PReLU is found as a module, F.prelu as
    a function."""
    prelu = nn.PReLU(4)
    with torch.no_grad():
        prelu.weight.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    assert get_activation(prelu).describe() == "prelu(negative_slope=0.25)"
    for slope in (0.25, 0.0, 0.6):
        act = get_activation("prelu").with_params(negative_slope=slope)
        assert act.gain == pytest.approx(math.sqrt(2 / (1 + slope**2)), abs=1e-9)
        assert act.kind.init == "kaiming" and act.kind.homogeneous
    assert get_activation(nn.PReLU()).gain == pytest.approx(1.3719886811, abs=1e-9)
    found = trace_model(nn.Sequential(nn.Linear(8, 16), nn.PReLU(16), nn.Linear(16, 2)), torch.randn(4, 8))
    assert (found.layers["0"].activation.name, found.layers["0"].how, found.site_names) == ("prelu", "module", ["1"])


    layer = trace_model(FunctionalPReLU(), torch.randn(4, 8)).layers["fc"]
    assert (layer.activation.describe(), layer.how) == ("prelu(negative_slope=0.1)", "function")


def test_prelu_bounds_are_per_channel_from_the_current_slopes():
    """A channel whose slope is below 1% of its largest slope is saturated at or below 0; the others never are."""
    prelu = nn.PReLU(3)
    with torch.no_grad():
        prelu.weight.copy_(torch.tensor([0.0, 0.005, 0.25]))
    low, high = get_activation(prelu).unit_asymptotes(prelu, 4)
    assert low.shape == (1, 3, 1, 1) and low.reshape(-1).tolist() == [0.0, 0.0, -math.inf]
    assert high.reshape(-1).tolist() == [math.inf] * 3


def _prelu_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.PReLU(32), nn.Linear(32, 1))
    with torch.no_grad():
        net[0].bias[:8] = -100.0  # units 0-7 only ever see negative inputs
    return net


@pytest.mark.parametrize(("zeroed", "dead"), [(slice(None), 8 / 32), (slice(0, 4), 4 / 32)])
def test_prelu_slope_learned_to_zero_shows_dead_units(zeroed, dead):
    """Units 0-7 only see negative inputs. At slope 0.25 none is dead (act_dead 0, act_saturation 0); once the
    slopes reach 0 after the first logging step, the monitor reads the module's slopes at the next logging step: all
    eight units are dead (0.25) — or the four whose own slope is 0 (0.125) when only those are zeroed."""
    net, x = _prelu_net(), torch.randn(64, 16)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    figures = []
    with lightning_bn.Monitor(net, every_n_steps=1, example_input=x) as monitor:
        for step in range(3):
            optimizer.zero_grad()
            net(x).pow(2).mean().backward()
            optimizer.step()
            figures.append(monitor.step())
            if step == 0:
                with torch.no_grad():
                    net[1].weight[zeroed] = 0.0
    assert figures[0]["act_dead/1"] == 0.0 and figures[0]["act_saturation/1"] == 0.0
    with torch.no_grad():
        pre = net[0](x)
    saturated = (pre[:, zeroed] <= 0).double().sum().item() / pre.numel()
    for later in figures[1:]:
        assert later["act_dead/1"] == dead
        assert later["act_saturation/1"] == pytest.approx(saturated, abs=1e-12)


def test_kinds_without_an_asymptote_are_never_read_saturated():
    """F.prelu (slope 0.1) and a composite fitted to per-channel samples have no flat side: watched on the layer's
    output (hook "input"), act_saturation and act_dead read 0 (an infinite bound made every element saturated), and
    act_std is the std of the activation applied to the layer's output (1e-5)."""


    torch.manual_seed(0)
    swish = nn.Sequential(nn.Linear(8, 16), LearnableSwish(1.0, 16), nn.Linear(16, 2))
    with torch.no_grad():
        swish[1].beta.copy_(torch.linspace(0.5, 2.0, 16))
    x = torch.randn(64, 8)
    for net, site, fc in [(FunctionalPReLU(), "fc.prelu", "fc"), (swish, "0.composite", "0")]:
        with lightning_bn.Monitor(net, every_n_steps=1, example_input=x, gradients=False) as monitor:
            net(x).sum().backward()
            figures = monitor.step()
        activation = monitor.model_map.site(site).activation
        assert activation.asymptotes == (-math.inf, math.inf)
        assert figures[f"act_saturation/{site}"] == 0.0 and figures[f"act_dead/{site}"] == 0.0
        with torch.no_grad():
            expected = activation(getattr(net, fc)(x) if fc == "fc" else net[0](x)).std().item()
        assert figures[f"act_std/{site}"] == pytest.approx(expected, rel=1e-5)
