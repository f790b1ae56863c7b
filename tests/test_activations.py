"""The activation registry: lookup by module / functional / name, derivatives, saturation rule, numeric gains."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_bn.activations import (
    ActivationKind,
    activation_of_call,
    activation_of_module,
    available_activations,
    get_activation,
    register_activation,
)

REQUIRED = [
    "identity", "sigmoid", "tanh", "relu", "leaky_relu", "relu6", "elu", "selu", "celu", "gelu", "silu", "mish",
    "softplus", "hardtanh", "hardswish", "hardsigmoid", "softsign",
]  # fmt: skip


def test_registry_has_every_required_kind():
    """All kinds the issue lists are registered."""
    assert set(REQUIRED) <= set(available_activations())


@pytest.mark.parametrize("name", REQUIRED)
def test_derivative_matches_autograd(name):
    """Each closed-form derivative equals autograd's on random inputs."""
    act = get_activation(name)
    x = torch.randn(2000, dtype=torch.float64) * 4
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(act(leaf).sum(), leaf)
    torch.testing.assert_close(act.derivative(x), grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    ("module", "func", "name"),
    [
        (nn.ReLU(), torch.relu, "relu"),
        (nn.ReLU(), F.relu, "relu"),
        (nn.ReLU(), torch.Tensor.relu, "relu"),
        (nn.Tanh(), torch.tanh, "tanh"),
        (nn.Sigmoid(), torch.Tensor.sigmoid, "sigmoid"),
        (nn.GELU(), F.gelu, "gelu"),
        (nn.SiLU(), F.silu, "silu"),
        (nn.Mish(), F.mish, "mish"),
        (nn.SELU(), torch.selu, "selu"),
    ],
)
def test_lookup_by_module_and_functional(module, func, name):
    """A module and its functional / tensor-method forms resolve to the same kind."""
    assert activation_of_module(module).name == name
    assert activation_of_call(func, (torch.zeros(1),)).name == name


def test_parameters_are_read_from_modules_and_calls():
    """Leaky slope, GELU approximation and ELU alpha come from the module or the call."""
    assert activation_of_module(nn.LeakyReLU(0.2)).kwargs["negative_slope"] == 0.2
    assert activation_of_call(F.leaky_relu, (torch.zeros(1), 0.3)).kwargs["negative_slope"] == 0.3
    assert activation_of_call(F.gelu, (torch.zeros(1),), {"approximate": "tanh"}).kwargs["approximate"] == "tanh"
    assert activation_of_module(nn.ELU(alpha=2.0)).kwargs["alpha"] == 2.0
    assert activation_of_module(nn.Linear(1, 1)) is None


def test_names_are_normalized():
    """'leaky_relu', 'LeakyReLU' and 'leakyrelu' are the same kind."""
    assert {get_activation(n).name for n in ("leaky_relu", "LeakyReLU", "leakyrelu")} == {"leaky_relu"}


def test_unknown_activation_names_the_value():
    """An unknown name raises ValueError naming it and listing the known ones."""
    with pytest.raises(ValueError, match=r"'swishy'") as err:
        get_activation("swishy")
    assert "relu" in str(err.value)


@pytest.mark.parametrize(
    ("name", "x", "expected"),
    [
        ("sigmoid", [0.0, 3.0, 6.0, -6.0], [False, False, True, True]),
        ("tanh", [0.0, 2.5, 3.5, -3.5], [False, False, True, True]),
        ("relu", [1.0, 0.5, -0.1, -5.0], [False, False, True, True]),
        ("leaky_relu", [1.0, -5.0], [False, False]),
        ("gelu", [0.0, 2.0, -4.0, -6.0], [False, False, True, True]),
        ("silu", [0.0, -3.0, -8.0], [False, False, True]),
        ("identity", [1e6, -1e6], [False, False]),
    ],
)
def test_saturation_is_one_percent_of_max_derivative(name, x, expected):
    """Saturated where |f'| < 1% of max |f'|: asymptotes of sigmoid/tanh, ReLU below 0, GELU/SiLU far left."""
    assert get_activation(name).saturated(torch.tensor(x)).tolist() == expected


def test_numeric_gains_match_calculate_gain_where_it_answers():
    """ReLU exactly √2 and leaky ReLU as torch; tanh's numeric gain (≈1.59) is below torch's conventional 5/3."""
    assert get_activation("relu").gain == pytest.approx(nn.init.calculate_gain("relu"), rel=1e-12)
    leaky = activation_of_module(nn.LeakyReLU(0.2))
    assert leaky.gain == pytest.approx(nn.init.calculate_gain("leaky_relu", 0.2), rel=1e-10)
    assert get_activation("tanh").gain ** 2 == pytest.approx(2.536, abs=2e-3)
    assert get_activation("tanh").gain < 5 / 3
    assert get_activation("selu").gain == pytest.approx(1.0, abs=1e-3)
    assert get_activation("identity").gain == pytest.approx(1.0)


def test_user_registered_kind_is_used_everywhere():
    """A registered kind is found from its module and gets a numeric gain and a saturation rule."""

    class Cube(nn.Module):
        def forward(self, x):
            return x**3

    register_activation(ActivationKind("cube_test", lambda x: x**3, modules=(Cube,)), overwrite=True)
    act = get_activation(Cube())
    assert act.name == "cube_test"
    assert act.gain == pytest.approx(1 / math.sqrt(15), rel=1e-6)  # E[z^6] = 15
    # 3x² is below 1% of its max (2700 on the grid) only in a band around 0: no asymptote, so no saturation
    assert act.saturated(torch.tensor([0.0, 10.0])).tolist() == [False, False]
    with pytest.raises(ValueError, match="cube_test"):
        register_activation(ActivationKind("cube_test", lambda x: x**3))


@pytest.mark.parametrize("name", [n for n in REQUIRED if get_activation(n).kind.output_derivative is not None])
def test_output_derivative_agrees_with_the_input_derivative(name):
    """Where f' is written from the output, it equals f'(x) at y = f(x) (same saturation, cheaper to judge)."""
    act = get_activation(name)
    x = torch.linspace(-12, 12, 4801, dtype=torch.float64)
    torch.testing.assert_close(act.derivative_from_output(act(x)), act.derivative(x), atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize(("name", "band"), [("gelu", -0.75), ("silu", -1.28), ("mish", -1.19), ("hardswish", -1.5)])
def test_the_band_at_a_minimum_is_not_saturation(name, band):
    """Where GELU/SiLU/Mish/hardswish have f' = 0 at their minimum is no asymptote; far left is."""
    act = get_activation(name)
    assert abs(act.derivative(torch.tensor([band], dtype=torch.float64)).item()) < 0.02  # f' ~ 0 there
    assert act.saturated(torch.tensor([band, -8.0, 3.0])).tolist() == [False, True, False]


def test_healthy_saturation_counts_asymptotes_only():
    """At N(0, 1) input: ReLU 50%, sigmoid 0, GELU ~0.1% (the band at its minimum used to make it 1.7%)."""
    assert get_activation("relu").healthy_saturation == pytest.approx(0.5, abs=1e-3)
    assert get_activation("sigmoid").healthy_saturation < 1e-6
    assert get_activation("gelu").healthy_saturation < 0.002
