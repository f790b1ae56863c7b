"""Activation detection by data flow, the initializers, LSUV and residual zero-init (lightning_bn.init)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_bn.activations import get_activation
from lightning_bn.init import init_layer_, layer_fans, lsuv_, zero_init_residual_
from lightning_bn.tracing import output_stds, trace_activations
from tests.helpers import tiny_resnet


class FourWays(nn.Module):
    """One activation of each kind of call, behind BatchNorm / Dropout / reshape, and a logits layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.5)
        self.act = nn.GELU()
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 16)
        self.d = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.drop(self.bn(self.a(x))))
        x = F.silu(F.dropout(self.b(x), 0.1, self.training))
        x = torch.tanh(self.c(x))
        x = self.d(x).view(-1, 4, 4).flatten(1).relu()
        return self.head(x)


def test_detects_module_function_torch_function_and_method():
    """Each call style is found with its kind, through BatchNorm/Dropout/reshapes; the logits layer is linear."""
    traces = trace_activations(FourWays(), torch.randn(6, 8))
    found = {n: (t.activation.name, t.how, t.through) for n, t in traces.items()}
    assert found == {
        "a": ("gelu", "module", ["BatchNorm1d", "Dropout"]),
        "b": ("silu", "function", ["dropout"]),
        "c": ("tanh", "function", []),
        "d": ("relu", "method", ["view", "flatten"]),
        "head": ("identity", "output", []),
    }
    assert list(traces) == ["a", "b", "c", "d", "head"]
    assert traces["a"].consumer == "act" and traces["a"].norm_after == "bn"
    assert traces["b"].consumer is None and traces["b"].norm_after is None
    assert traces["head"].activation.is_identity and traces["head"].output_shape == (6, 3)


def test_detects_activation_parameters():
    """Parameters come with the kind: leaky slope from a module, GELU approximation from a functional call."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
            self.leaky = nn.LeakyReLU(0.2)

        def forward(self, x):
            return self.c(F.gelu(self.b(self.leaky(self.a(x))), approximate="tanh"))

    traces = trace_activations(Net(), torch.randn(3, 4))
    assert traces["a"].activation.kwargs == {"negative_slope": 0.2}
    assert traces["b"].activation.kwargs == {"approximate": "tanh"}


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x + self.norm(self.fc(x)))


class Looped(nn.Module):
    """Nested blocks run in a Python loop, a data-dependent branch, a kwargs input and a tensor-method activation."""

    def __init__(self, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.stem = nn.Linear(8, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        x = self.stem(x * scale)
        x = x.sigmoid() if x.mean() > 1e6 else x.tanh()
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_detection_with_control_flow_nested_modules_and_residuals():
    """Qualified names of nested layers, the branch actually taken, residual adds looked through and noted."""
    traces = trace_activations(Looped(), {"x": torch.randn(5, 8), "scale": 2.0})
    assert traces["stem"].activation.name == "tanh" and traces["stem"].how == "method"
    for i in range(3):
        trace = traces[f"blocks.{i}.fc"]
        assert (trace.activation.name, trace.how) == ("elu", "function")
        assert trace.through == ["LayerNorm", "add"]
        assert trace.norm_after == f"blocks.{i}.norm" and trace.residual_norm == f"blocks.{i}.norm"
    assert traces["head"].how == "output" and traces["stem"].residual_norm is None


def test_layer_consumed_by_another_layer_is_linear():
    """A layer whose output feeds another layer directly meets no nonlinearity: identity, found by "none"."""
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    traces = trace_activations(net, torch.randn(3, 4))
    assert [(t.activation.name, t.how) for t in traces.values()] == [
        ("identity", "none"),
        ("relu", "module"),
        ("identity", "output"),
    ]


def test_trace_restores_mode_and_state():
    """The trace runs in eval mode without grad, then restores every module's mode; no buffer or weight changes."""
    net = FourWays().train()
    net.drop.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trace_activations(net, torch.randn(6, 8))
    assert net.training and net.bn.training and not net.drop.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_trace_names_the_forward_error():
    """An example input that fails in forward raises ValueError naming the exception."""
    with pytest.raises(ValueError, match="RuntimeError.*mat1 and mat2"):
        trace_activations(FourWays(), torch.randn(6, 5))


def test_rnn_and_embedding_are_traced_and_initialized():
    """Embedding and GRU layers are traced; init zeroes biases, keeps the padding row at zero, unit embedding var."""

    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(1000, 32, padding_idx=0)
            self.rnn = nn.GRU(32, 32, batch_first=True)
            self.head = nn.Linear(32, 2)

        def forward(self, ids):
            out, _ = self.rnn(self.emb(ids))
            return self.head(out[:, -1])

    net = Seq()
    traces = trace_activations(net, torch.randint(0, 1000, (4, 7)))
    assert list(traces) == ["emb", "rnn", "head"]
    assert traces["rnn"].output_shape == (4, 7, 32) and traces["emb"].output_shape == (4, 7, 32)
    init_layer_(net.emb, "kaiming")
    init_layer_(net.rnn, "xavier")
    assert net.emb.weight[0].abs().max().item() == 0.0
    assert abs(net.emb.weight[1:].var().item() - 1.0) < 0.05
    assert all(p.abs().max().item() == 0.0 for n, p in net.rnn.named_parameters() if n.startswith("bias"))
    hh = net.rnn.weight_hh_l0[:32]
    assert torch.allclose(hh @ hh.T, torch.eye(32), atol=1e-5)


# Where the numeric gain 1 / sqrt(E[f(z)^2]) must equal torch.nn.init.calculate_gain: the positively homogeneous kinds.
# ReLU: E[relu(z)^2] = 1/2, so sqrt(2); leaky ReLU with slope a: E = (1 + a^2) / 2, so sqrt(2 / (1 + a^2));
# identity: E[z^2] = 1, so 1 (torch's "linear" and the conv kinds).
TORCH_AGREES = {
    "relu": ("relu", ("relu",)),
    "leaky_relu-0.01": (nn.LeakyReLU(), ("leaky_relu", 0.01)),
    "leaky_relu-0.2": (nn.LeakyReLU(0.2), ("leaky_relu", 0.2)),
    "leaky_relu-0.5": (nn.LeakyReLU(0.5), ("leaky_relu", 0.5)),
    "identity-linear": ("identity", ("linear",)),
    "identity-conv2d": ("identity", ("conv2d",)),
}


@pytest.mark.parametrize("case", list(TORCH_AGREES))
def test_numeric_gain_matches_torch_where_torch_has_an_answer(case):
    """For ReLU, leaky ReLU (three slopes) and identity the registry's quadrature gain equals calculate_gain (1e-9)."""
    spec, torch_args = TORCH_AGREES[case]
    assert get_activation(spec).gain == pytest.approx(nn.init.calculate_gain(*torch_args), rel=1e-9)


# Where torch has no answer (GELU, SiLU) or a conventional one (tanh 5/3, sigmoid 1, SELU 3/4, ELU none), the gain
# must still be what the docstring says: 1 / sqrt(E[f(z)^2]) for z ~ N(0, 1). Monte Carlo over 2^22 draws in float64
# (fixed seed) estimates it independently of the library's Gauss-Hermite quadrature; the relative standard error of
# the estimate is at most 6.1e-4 (GELU, SiLU), so 3e-3 is about 5 standard errors, while torch's 5/3 for tanh is off
# by 4.7% and a gain without the square root (1 / E[f(z)^2]) by 59%.
MONTE_CARLO = {
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "selu": F.selu,
    "elu": F.elu,
}


@pytest.mark.parametrize("name", list(MONTE_CARLO))
def test_numeric_gain_matches_a_monte_carlo_estimate(name):
    """gain = 1 / sqrt(mean f(z)^2) over 2^22 normal draws, within 0.3%; torch's fixed constants differ where known."""
    z = torch.randn(2**22, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    estimate = 1.0 / math.sqrt(MONTE_CARLO[name](z).square().mean().item())
    assert get_activation(name).gain == pytest.approx(estimate, rel=3e-3)
    if name in ("tanh", "sigmoid", "selu"):  # torch's conventions are no unit-variance gain: they must differ
        assert abs(get_activation(name).gain / nn.init.calculate_gain(name) - 1) > 0.04


EXPECTED_VARIANCE = {
    "xavier": lambda fan_in, fan_out, g: g * g * 2 / (fan_in + fan_out),
    "kaiming": lambda fan_in, fan_out, g: g * g / fan_in,
    "numeric": lambda fan_in, fan_out, g: g * g / fan_in,
    "orthogonal": lambda fan_in, fan_out, g: g * g / fan_in,
    "lecun": lambda fan_in, fan_out, g: 1 / fan_in,
}


@pytest.mark.parametrize("scheme", list(EXPECTED_VARIANCE))
@pytest.mark.parametrize("distribution", ["normal", "uniform", "truncated_normal"])
def test_init_layer_variance(scheme, distribution):
    """Weight variance matches the scheme's formula within 5% for each distribution; bias zero."""
    torch.manual_seed(0)
    layer = nn.Linear(300, 500)
    act = get_activation("relu")
    gain = init_layer_(layer, scheme, act, distribution=distribution)
    expected = EXPECTED_VARIANCE[scheme](300, 500, act.gain)
    assert gain == pytest.approx(1.0 if scheme == "lecun" else math.sqrt(2))
    assert layer.weight.var().item() == pytest.approx(expected, rel=0.05)
    assert layer.bias.abs().max().item() == 0.0
    if distribution == "uniform" and scheme != "orthogonal":
        assert layer.weight.abs().max().item() <= math.sqrt(3 * expected) + 1e-6
    if distribution == "truncated_normal" and scheme != "orthogonal":
        assert layer.weight.abs().max().item() <= 2 * math.sqrt(expected) / 0.8796 + 1e-6


def test_init_layer_fan_out_and_conv_fans():
    """fan_out mode uses the output fan; conv fans count the kernel; transposed conv divides by the stride."""
    conv = nn.Conv2d(16, 64, 3)
    assert layer_fans(conv) == (144.0, 576.0)
    assert layer_fans(nn.ConvTranspose2d(64, 16, 4, stride=2)) == (256.0, 256.0)
    torch.manual_seed(0)
    init_layer_(conv, "kaiming", get_activation("relu"), mode="fan_out")
    assert conv.weight.var().item() == pytest.approx(2 / 576, rel=0.05)


def test_init_layer_rejects_bad_arguments():
    """Unknown scheme, distribution or mode raise ValueError naming the value; a non-layer raises TypeError."""
    with pytest.raises(ValueError, match="'he_normal'"):
        init_layer_(nn.Linear(2, 2), "he_normal")
    with pytest.raises(ValueError, match="'laplace'"):
        init_layer_(nn.Linear(2, 2), "xavier", distribution="laplace")
    with pytest.raises(ValueError, match="'fan_avg'"):
        init_layer_(nn.Linear(2, 2), "xavier", mode="fan_avg")
    with pytest.raises(TypeError, match="BatchNorm1d"):
        init_layer_(nn.BatchNorm1d(2), "xavier")


def _output_variances(model, x, names):
    return {n: s**2 for n, s in output_stds(model, x, names).items()}


def test_lsuv_brings_every_layer_to_unit_variance_mlp():
    """LSUV on a 10-layer GELU MLP with BatchNorm and Dropout: every layer's output variance is 1 ± 0.1."""
    torch.manual_seed(0)
    layers = []
    for i in range(10):
        layers += [nn.Linear(32 if i == 0 else 128, 128), nn.BatchNorm1d(128), nn.GELU(), nn.Dropout(0.1)]
    net = nn.Sequential(*layers, nn.Linear(128, 10))
    x = torch.randn(256, 32) * 3
    variances = lsuv_(net, x)
    assert len(variances) == 11
    measured = _output_variances(net, x, list(variances))
    assert max(abs(v - 1) for v in measured.values()) <= 0.1
    assert measured == pytest.approx(variances)


def test_lsuv_on_a_residual_cnn():
    """LSUV on a small residual CNN (BatchNorm, identity and projection shortcuts): every conv at 1 ± 0.1."""
    torch.manual_seed(0)
    net = tiny_resnet()
    x = torch.randn(8, 3, 16, 16)
    variances = lsuv_(net, x, tol=0.1)
    measured = _output_variances(net, x, list(variances))
    assert len(measured) == len([m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))])
    assert max(abs(v - 1) for v in measured.values()) <= 0.1


def test_lsuv_rejects_unknown_layer_names():
    """A name in `layers` that is no traced layer raises ValueError naming it."""
    with pytest.raises(ValueError, match="'nope'"):
        lsuv_(nn.Sequential(nn.Linear(2, 2)), torch.randn(4, 2), layers=["nope"])


def test_resnet_trace_and_zero_init_residual():
    """In a ResNet every conv feeds a ReLU through BN (and add); zero-init hits bn2 of each block, not the shortcut."""
    net = tiny_resnet()
    traces = trace_activations(net, torch.randn(2, 3, 16, 16))
    convs = [n for n, t in traces.items() if isinstance(t.module, nn.Conv2d)]
    assert all(traces[n].activation.name == "relu" and traces[n].how == "module" for n in convs)
    assert traces["layers.0.conv2"].through == ["BatchNorm2d", "add"]
    assert traces["layers.1.downsample.0"].norm_after == "layers.1.downsample.1"
    assert (traces["fc"].how, traces["conv1"].through) == ("output", ["BatchNorm2d"])
    zeroed = zero_init_residual_(net, traces)
    assert zeroed == ["layers.0.bn2", "layers.1.bn2"]
    assert net.layers[1].bn2.weight.abs().sum().item() == 0.0
    assert net.layers[1].downsample[1].weight.abs().min().item() == 1.0


def test_trace_keeps_no_tensor_alive():
    """After the trace no intermediate tensor survives: the tracer holds weak references only, then clears them."""
    import gc
    import weakref

    net = FourWays()
    refs = []
    handles = [m.register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o))) for m in net.children()]
    trace_activations(net, torch.randn(6, 8))
    for handle in handles:
        handle.remove()
    gc.collect()
    assert len(refs) == 8 and all(ref() is None for ref in refs)
