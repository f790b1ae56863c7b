"""The mean-field critical init (``init="critical"``, and ``init="auto"`` for bounded activations in a chain), checked
against the theory by independent quadrature and Monte Carlo, and by training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_bn import prepare
from lightning_bn.activations import get_activation
from lightning_bn.activations.meanfield import chi1, critical_point, fixed_point
from lightning_bn.init import init_layer_
from tests.test_composite import FORMULAS


def _hermite(f, q: float) -> float:
    """E[f(sqrt(q) z)], z ~ N(0, 1), by 301-point Gauss-Hermite quadrature (independent of the library's grid)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(301)
    values = f(torch.from_numpy(nodes * math.sqrt(q))).double().numpy()
    return float(np.sum(weights * values) / math.sqrt(2 * math.pi))


@pytest.mark.parametrize("name", ["tanh", "sigmoid"])
def test_critical_point_has_chi1_one_by_independent_quadrature(name):
    act = get_activation(name)
    point = critical_point(act)
    # q* is a fixed point of the variance map, and chi_1 there is 1 within 2%
    q_next = point.weight_variance * _hermite(lambda x: act(x) ** 2, point.q) + point.bias_variance
    assert q_next == pytest.approx(point.q, rel=1e-3)
    chi = point.weight_variance * _hermite(lambda x: act.derivative(x) ** 2, point.q)
    assert chi == pytest.approx(1.0, abs=0.02)
    assert point.stable and point.slope < 1


def test_critical_points_match_the_literature():
    """tanh: sigma_w^2 2.1533, sigma_b^2 0.1510 at q* = 1; sigmoid: no unit-variance point (its mean is not 0), so
    sigma_b = 0 and sigma_w^2 ~ 103 at q* ~ 45.6; ReLU: He's init."""
    tanh, sigmoid, relu = (critical_point(get_activation(n)) for n in ("tanh", "sigmoid", "relu"))
    assert (tanh.weight_variance, tanh.bias_variance, tanh.q) == pytest.approx((2.1533, 0.1510, 1.0), abs=2e-3)
    assert sigmoid.bias_variance == 0 and sigmoid.weight_variance == pytest.approx(103.0, rel=0.01)
    assert sigmoid.q == pytest.approx(45.6, rel=0.01)
    assert (relu.weight_variance, relu.bias_variance) == pytest.approx((2.0, 0.0), abs=1e-3) and relu.stable
    # today's forward-preserving gains: tanh chaotic (chi_1 1.178), sigmoid ordered (0.153)
    for name, expected in (("tanh", 1.178), ("sigmoid", 0.153)):
        act = get_activation(name)
        weight_variance = act.gain**2
        assert chi1(act, weight_variance, fixed_point(act, weight_variance)) == pytest.approx(expected, abs=2e-3)


@pytest.mark.parametrize("name", ["gelu", "silu", "mish"])
def test_unstable_critical_points_are_refused_with_the_reason(name):
    point = critical_point(get_activation(name))
    assert not point.stable and point.slope > 1 and "unstable fixed point" in point.reason
    with pytest.raises(ValueError, match=rf"{name}.*unstable fixed point of the variance map \(slope 1\.\d+ > 1\)"):
        init_layer_(nn.Linear(8, 8), "critical", get_activation(name))
    # prepare(init="critical") keeps auto's rescaled init for that layer and says why
    net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), get_module(name), nn.Linear(32, 4))
    report = prepare(net, torch.randn(128, 16), init="critical")
    assert [(r.scheme, r.corrected) for r in report.layers] == [("critical", False), ("numeric", True),
                                                                 ("critical", False)]  # fmt: skip
    assert report.layers[1].note == point.reason
    assert any(change.startswith("1 layer (2): the critical point of") for change in report.changes)


def get_module(name: str) -> nn.Module:
    return {"gelu": nn.GELU(), "silu": nn.SiLU(), "mish": nn.Mish()}[name]


def _mlp(depth: int, width: int, act: type[nn.Module], inputs: int = 64, outputs: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(inputs if i == 0 else width, width), act()]
    return nn.Sequential(*layers, nn.Linear(width, outputs))


def _gradient_ratio(net: nn.Sequential, x: torch.Tensor) -> float:
    """||dL/dh|| at the first hidden pre-activation over the last, for a random projection of the output."""
    outputs = []
    hidden = [m for m in net if isinstance(m, nn.Linear)][:-1]

    def keep(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        output.retain_grad()
        outputs.append(output)

    handles = [m.register_forward_hook(keep) for m in hidden]
    try:
        y = net(x)
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    finally:
        for h in handles:
            h.remove()
    return (outputs[0].grad.norm() / outputs[-1].grad.norm()).item()


def test_auto_makes_a_100_layer_tanh_net_critical():
    """Today's Xavier-gain tanh chain is chaotic (chi_1 1.178: the first layer's gradient is ~2.5e3x the last's at
    depth 100); after prepare() the ratio is within [0.1, 10] and the per-layer factor is within 3% of 1."""
    torch.manual_seed(0)
    x = torch.randn(256, 64)
    before = _mlp(100, 128, nn.Tanh)
    for m in before:
        if isinstance(m, nn.Linear):
            init_layer_(m, "xavier", get_activation("tanh"))
    chaotic = _gradient_ratio(before, x)
    assert chaotic > 300  # chi_1^(99/2) = 3.3e3 in mean-field theory
    net = _mlp(100, 128, nn.Tanh)
    report = prepare(net, x, seed=0)
    assert {r.scheme for r in report.layers[:-1]} == {"critical"} and report.layers[-1].scheme == "xavier"
    ratio = _gradient_ratio(net, x)
    assert 0.1 <= ratio <= 10
    assert ratio ** (2 / 99) == pytest.approx(1.0, abs=0.03)  # the measured chi_1 per layer
    assert any("χ₁ 1.18: gradients explode with depth" in change for change in report.changes)


def test_auto_makes_a_10_layer_sigmoid_net_critical():
    torch.manual_seed(0)
    x = torch.rand(256, 64)
    net = _mlp(10, 64, nn.Sigmoid)
    report = prepare(net, x, seed=0)
    assert {r.scheme for r in report.layers[:-1]} == {"critical"}
    assert [r.std_after for r in report.layers[:-1]] == pytest.approx([45.6**0.5] * 10, rel=0.12)
    assert 0.1 <= _gradient_ratio(net, x) <= 10
    assert any("χ₁ 0.153: gradients vanish with depth" in change for change in report.changes)


def test_no_critical_init_before_a_norm_for_a_gate_or_on_the_output():
    """A norm before tanh sets its input scale (the weight's scale does not matter forward); a sigmoid on the output
    is no chain; both keep auto's Xavier rule."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.bn, self.b = nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 1)

        def forward(self, x):
            return torch.sigmoid(self.b(torch.tanh(self.bn(self.a(x)))))

    report = prepare(Net(), torch.randn(32, 8))
    assert [(r.layer, r.activation, r.scheme) for r in report.layers] == [("a", "tanh", "xavier"),
                                                                          ("b", "sigmoid", "xavier")]  # fmt: skip


def _digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x, y, order[:1400], order[1400:]


def _train_sigmoid(seed: int, init: str | None) -> float:
    """10 sigmoid layers of width 64 on digits: 150 SGD steps (momentum 0.9, lr 0.3, batch 256); val accuracy."""
    x, y, train, val = _digits()
    torch.manual_seed(seed)
    net = _mlp(10, 64, nn.Sigmoid)
    if init is not None:
        prepare(net, x[train[:256]], init=init, seed=seed)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.3, momentum=0.9)
    batches = torch.Generator().manual_seed(seed)
    for _ in range(150):
        index = train[torch.randint(len(train), (256,), generator=batches)]
        loss = nn.functional.cross_entropy(net(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (net(x[val]).argmax(1) == y[val]).float().mean().item()


@pytest.mark.slow
def test_a_10_layer_sigmoid_net_trains_after_prepare():
    """The previous auto (Xavier with the forward-preserving gain, chi_1 0.153) stays at chance; auto's critical init
    reaches >= 0.85 on every seed (measured 0.88, 0.88, 0.92)."""
    auto = [_train_sigmoid(seed, "auto") for seed in range(3)]
    assert min(auto) >= 0.85, auto
    assert _train_sigmoid(0, "xavier") < 0.2


class LSTMCellNet(nn.Module):
    """A written-out LSTM cell: one Linear makes the four gates of cat(x, h), unrolled over the sequence."""

    def __init__(self, inputs: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.hidden = hidden
        self.gates = nn.Linear(inputs + hidden, 4 * hidden)
        self.head = nn.Linear(hidden, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.hidden)
        c = torch.zeros_like(h)
        for t in range(x.shape[1]):
            i, f, g, o = self.gates(torch.cat([x[:, t], h], -1)).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        return self.head(h)


def _first_output_std(model: nn.Module, name: str, example) -> float:
    seen: list[float] = []

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if not seen:
            seen.append(output.detach().float().std().item())

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        with torch.no_grad():
            model.eval()
            model(**example) if isinstance(example, dict) else model(example)
    finally:
        handle.remove()
    return seen[0]


# The gates' pre-activation std after prepare(seed=0) before the critical init existed (commit 0398e15, measured with
# the same models and inputs): a gate keeps a gate's rule, it must not become a chain's (sigma_w^2 103 would make it
# 0 or 1: std ~7).
_GATES_BEFORE = {
    ("efficientnet", "encoder.blocks.0.squeeze_excite.expand"): 1.354,
    ("regnet", "encoder.stages.0.layers.0.layer.2.attention.2"): 0.708,
    ("llama", "model.layers.0.mlp.gate_proj"): 1.0,
}


@pytest.mark.parametrize(("case", "layer"), list(_GATES_BEFORE))
def test_gates_keep_their_scale(case, layer):
    from tests.zoo import ZOO

    built = ZOO[case]()
    report = prepare(built.model, built.example_input, seed=0)
    row = next(r for r in report.layers if r.layer == layer)
    assert row.scheme != "critical"
    assert 0.5 <= _first_output_std(built.model, layer, built.example_input) / _GATES_BEFORE[case, layer] <= 2


def test_a_written_out_lstm_cell_and_nn_lstm_keep_their_gates():
    torch.manual_seed(0)
    net, x = LSTMCellNet(), torch.randn(64, 6, 16)
    report = prepare(net, x, seed=0)
    assert report.layers[0].scheme == "xavier" and report.layers[0].activation == "sigmoid"
    assert 0.5 <= _first_output_std(net, "gates", x) / 0.8025 <= 2  # 0.8025 before (commit 0398e15)
    from tests.zoo import ZOO

    case = ZOO["lstm_classifier"]()
    prepare(case.model, case.example_input, seed=0)
    lstm = next(m for m in case.model.modules() if isinstance(m, nn.LSTM))
    embedding = next(m for m in case.model.modules() if isinstance(m, nn.Embedding))
    with torch.no_grad():
        gates = embedding(case.example_input) @ lstm.weight_ih_l0.T + lstm.bias_ih_l0 + lstm.bias_hh_l0
    assert 0.5 <= gates.std().item() / 1.1145 <= 2  # first step's gate pre-activations; 1.1145 before


def test_the_value_branch_of_a_gated_unit_is_scaled_for_its_gate():
    """Llama's SwiGLU: silu(gate_proj(x)) * up_proj(x). up_proj was kept (std 0.165 at 0.02-normal weights: the
    product ~0.1); now its output std is 1/sqrt(E[silu(z)^2]) = 1.68, so the product has unit second moment."""
    from tests.zoo import ZOO

    built = ZOO["llama"]()
    report = prepare(built.model, built.example_input, seed=0)
    up = "model.layers.0.mlp.up_proj"
    assert up not in {k.layer for k in report.kept}
    expected = get_activation("silu").gain
    assert _first_output_std(built.model, up, built.example_input) == pytest.approx(expected, rel=0.1)
    assert any("value side of a gated unit" in change for change in report.changes)


def test_explicit_kaiming_on_an_unknown_activation_uses_the_relu_gain_and_says_so():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 2)

        def forward(self, x):
            return self.b(torch.softmax(self.a(x), -1))  # softmax mixes units: no element-wise activation

    report = prepare(Net(), torch.randn(32, 8), init="kaiming")
    row = report.layers[0]
    assert (row.layer, row.how, row.scheme) == ("a", "none", "kaiming") and row.gain == pytest.approx(2**0.5)
    assert report.layers[1].gain == pytest.approx(1.0)  # the logits: identity, found at the output
    assert any("feeds no known activation: the ReLU gain √2" in change for change in report.changes)


class _DeepWritten(nn.Module):
    """20 Linear layers, each followed by an activation written out in ``forward`` (or a learnable-swish module)."""

    def __init__(self, formula, width: int = 64, depth: int = 20) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(32 if i == 0 else width, width) for i in range(depth))
        self.head, self.formula = nn.Linear(width, 4), formula

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.formula(layer(x))
        return self.head(x)


class _Swish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.beta * x)


_WRITTEN = {name: (formula, kind.split("(")[0]) for name, (formula, kind) in FORMULAS.items()}
_WRITTEN["learnable_swish"] = (_Swish(), "silu")


@pytest.mark.parametrize("case", sorted(_WRITTEN))
def test_composite_activations_get_their_own_init_at_depth_20(case):
    """Read as their inner sigmoid/tanh, these got Xavier with sigmoid's gain: the pre-activation std went 1.84 ->
    144 over 20 layers. Found as what they are, every layer's pre-activation std after prepare() is in [0.5, 2]."""
    formula, kind = _WRITTEN[case]
    torch.manual_seed(0)
    net, x = _DeepWritten(formula), torch.randn(256, 32)
    report = prepare(net, x, seed=0)
    assert {r.activation.split("(")[0] for r in report.layers[:-1]} == {kind}
    stds = [_first_output_std(net, f"layers.{i}", x) for i in range(20)]
    assert 0.5 <= min(stds) and max(stds) <= 2, stds


def test_prelu_gets_the_he_gain_for_its_slope():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.PReLU(init=0.25), nn.Linear(64, 64), nn.PReLU(64, init=0.5),
                        nn.Linear(64, 4))  # fmt: skip
    report = prepare(net, torch.randn(256, 32), seed=0)
    assert [(r.activation.split("(")[0], r.scheme) for r in report.layers] == [("prelu", "kaiming"),
                                                                               ("prelu", "kaiming"),
                                                                               ("identity", "xavier")]  # fmt: skip
    assert [r.gain for r in report.layers[:2]] == pytest.approx([(2 / 1.0625) ** 0.5, (2 / 1.25) ** 0.5], rel=1e-6)
    assert not [k for k in report.kept if "weight" in k.layer]  # the slopes are no "LayerScale-like gain"
