"""The report's rules in the regimes the classic papers describe: depth-aware gradient rules, `stalled` against a
logged loss, and kinds found by behaviour with a jump (issue #21)."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from lightning_bn import Monitor, analyze
from lightning_bn.report import Thresholds
from lightning_bn.tags import LOSS_TAG
from lightning_bn.tracing import trace_model


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def _train(net: nn.Module, digits, steps: int, optimizer: torch.optim.Optimizer, every: int = 1, batch: int = 64):
    x, y = digits
    generator = torch.Generator().manual_seed(0)
    with Monitor(net, every_n_steps=every, example_input=x[:batch], histograms=False) as monitor:
        for _ in range(steps):
            idx = torch.randint(0, len(x), (batch,), generator=generator) if batch < len(x) else slice(None)
            optimizer.zero_grad()
            loss = F.cross_entropy(net(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            monitor.step(loss)
    return analyze({tag: list(s) for tag, s in monitor.figures.items()}, layers=monitor.layers), loss.item()


def _mlp(depth: int, width: int, act, init=None) -> nn.Sequential:
    layers, features = [], 64
    for _ in range(depth):
        layers += [nn.Linear(features, width), act()]
        features = width
    layers.append(nn.Linear(features, 10))
    net = nn.Sequential(*layers)
    if init is not None:
        for m in net:
            if isinstance(m, nn.Linear):
                init(m.weight)
                nn.init.zeros_(m.bias)
    return net


def test_standard_init_20_layer_sigmoid_is_flagged_vanishing_gradient_with_chi(digits):
    """Glorot & Bengio's standard init U[-1/sqrt(n), 1/sqrt(n)] (PyTorch's Linear default) on 20 sigmoid layers:
    the relative gradient falls ~0.85 decades per layer going back (chi ~ 0.02, mean-field sigma_w^2 E[sigma'^2]);
    the depth rule flags at least 14 of the 20 hidden layers and says chi. The median-only rule found 6."""
    torch.manual_seed(0)
    net = _mlp(20, 64, nn.Sigmoid)
    run, _ = _train(net, digits, 3, torch.optim.SGD(net.parameters(), lr=0.1))
    flagged = [layer for layer in run.layers if "vanishing_gradient" in layer.flags]
    assert len(flagged) >= 14, [layer.name for layer in flagged]
    reason = flagged[0].flags["vanishing_gradient"].reason
    chi = float(reason.split("gradient power x")[1].split(" ")[0])
    assert 0.005 < chi < 0.05 and "decades" in reason, reason  # sigma_w^2 E[sigma'(h)^2] = (1/3)(~0.06) = 0.02


def test_he_relu_residual_net_has_no_gradient_flag(digits):
    """A He-initialized ReLU residual stack (20 blocks) trains without vanishing_gradient / exploding_gradient."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 64)
            nn.init.kaiming_normal_(self.fc.weight, nonlinearity="relu")
            nn.init.zeros_(self.fc.bias)

        def forward(self, x):
            return x + 0.2 * F.relu(self.fc(x))

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), *[Block() for _ in range(20)], nn.Linear(64, 10))
    run, _ = _train(net, digits, 20, torch.optim.SGD(net.parameters(), lr=0.05), every=5)
    problems = run.problems()
    assert not {"vanishing_gradient", "exploding_gradient", "stalled"} & set(problems), problems


@pytest.mark.slow
def test_converged_he_relu_mlp_is_not_stalled(digits):
    """A He-ReLU MLP trained to a training loss below 1e-3: its updates are tiny (2-6e-5 here) because its gradients
    are. With the rule's bound above them (min_update_ratio=1e-4), the update ratio alone calls every layer stalled;
    with the logged loss the report sees a converged net."""
    torch.manual_seed(0)
    net = _mlp(3, 128, nn.ReLU, lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"))
    x, y = digits
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    with Monitor(net, every_n_steps=10, example_input=x[:64], histograms=False) as monitor:
        for _ in range(1000):
            optimizer.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            optimizer.step()
            monitor.step(loss)
    assert loss.item() < 1e-3
    figures = {tag: list(series) for tag, series in monitor.figures.items()}
    strict = Thresholds(min_update_ratio=1e-4)
    run = analyze(figures, thresholds=strict, layers=monitor.layers)
    assert not {"stalled", "vanishing_gradient"} & set(run.problems()), run.problems()
    without_loss = {tag: series for tag, series in figures.items() if tag != LOSS_TAG}
    blind = analyze(without_loss, thresholds=strict, layers=monitor.layers)
    assert len(blind.problems().get("stalled", {}).get("layers", [])) == 4  # every Linear, judged on updates alone


def test_stalled_needs_a_flat_loss():
    """The same tiny updates are `stalled` while the loss stays high, not while it falls or once it is ~0."""
    update = {step: 1e-7 for step in range(0, 60, 10)}
    scalars = {"update_ratio/fc.weight": list(update.items()), "weight_norm/fc.weight": [(s, 1.0) for s in update],
               "grad_norm/fc.weight": [(s, 1e-3) for s in update]}  # fmt: skip
    flat = {**scalars, "lightning_bn/loss": [(s, 2.30) for s in update]}
    falling = {**scalars, "lightning_bn/loss": [(s, 2.3 - 0.2 * i) for i, s in enumerate(update)]}
    converged = {**scalars, "lightning_bn/loss": [(s, 1e-5) for s in update]}
    assert "stalled" in analyze(flat).layers[0].flags
    assert "loss stayed at 2.3" in analyze(flat).layers[0].flags["stalled"].reason
    assert "stalled" not in analyze(falling).layers[0].flags
    assert "stalled" not in analyze(converged).layers[0].flags
    assert "no training loss logged" in analyze(scalars).layers[0].flags["stalled"].reason


def test_huge_weights_are_named_as_the_cause():
    """A layer whose weights are 3e8 x its peers' reads a tiny ||g||/||w||: the reason names the weight scale."""
    steps = range(3)
    scalars = {}
    for i in range(6):
        weight = 3e8 if i == 2 else 1.0
        scalars[f"grad_norm/net.{i}.weight"] = [(s, 1e-2) for s in steps]
        scalars[f"weight_norm/net.{i}.weight"] = [(s, weight) for s in steps]
    layer = next(layer for layer in analyze(scalars).layers if layer.name == "net.2")
    assert "weight scale" in layer.flags["vanishing_gradient"].reason


def test_a_jump_is_no_slope_of_a_kind_found_by_behaviour():
    """nn.Threshold(0.1, 20) after a Linear: found by behaviour; its jump at 0.1 does not set max|f'| (a finite
    difference across it read 913), so a N(0, 1) input is saturated where f' = 0: Phi(0.1) = 0.54."""
    net = nn.Sequential(nn.Linear(8, 8), nn.Threshold(0.1, 20.0))
    site = trace_model(net, torch.randn(4, 8)).sites[0]
    assert site.activation.max_derivative == pytest.approx(1.0, abs=1e-3)
    phi = 0.5 * (1 + math.erf(0.1 / math.sqrt(2)))
    assert site.activation.healthy_saturation == pytest.approx(phi, abs=0.02)


@pytest.mark.slow
def test_glorot_top_sigmoid_layer_is_flagged_by_its_transmission(digits):
    """Glorot & Bengio (2010), Fig. 2: 5 x 1000 sigmoid, standard init U[-1/sqrt(n), 1/sqrt(n)] (PyTorch's Linear
    default), SGD lr 0.1, batch 10, 800 steps: the top layer is driven towards 0 (mean 0.5 -> ~0.05) and passes back
    ever less gradient. No element comes within 1% of sigma's maximum slope (act_saturation reads 0 throughout), but its
    transmission falls below 0.1: flagged saturated, the reason saying which figure the flag rests on."""
    torch.manual_seed(0)
    net = _mlp(5, 1000, nn.Sigmoid)
    run, _ = _train(net, digits, 801, torch.optim.SGD(net.parameters(), lr=0.1), every=200, batch=10)
    top = next(layer for layer in run.layers if layer.name == "9")
    assert top.saturation == 0.0 and top.transmission < 0.1
    assert "transmission" in top.flags["saturated"].reason and top.flags["saturated"].active
    first = next(layer for layer in run.layers if layer.name == "1")
    assert "saturated" not in first.flags and first.transmission > 1  # small inputs: sigma's steep middle


@pytest.mark.parametrize(
    ("act", "init", "width"),
    [
        (nn.ReLU, lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"), 256),
        (nn.Tanh, nn.init.xavier_normal_, 256),
        (nn.Sigmoid, lambda w: nn.init.normal_(w, 0.0, 1.0), 128),
    ],
    ids=["he-relu", "xavier-tanh", "normal-sigmoid-128"],
)
def test_healthy_or_slow_nets_are_not_flagged_saturated(digits, act, init, width):
    """He-ReLU and Xavier-tanh (transmission ~1), and a N(0, 1)-weight sigmoid net of width 128 (~45% of elements on
    the flat ends, yet transmission ~0.2: it trains, slowly), are not flagged saturated."""
    torch.manual_seed(0)
    net = _mlp(6, width, act, init)
    run, _ = _train(net, digits, 3, torch.optim.SGD(net.parameters(), lr=0.05))
    activations = [layer for layer in run.layers if layer.transmission is not None]
    assert len(activations) == 6
    assert not [layer.name for layer in activations if "saturated" in layer.flags]
    if act is nn.Sigmoid:
        assert all(0.1 < layer.transmission < 0.35 for layer in activations[1:])
        assert all(layer.saturation > 0.3 for layer in activations[1:])
    else:
        assert all(0.5 < layer.transmission < 2.0 for layer in activations)


def test_a_uniform_vanish_under_adam_is_caught_by_eps(digits):
    """Every layer starved at once (the loss scaled by 1e-7): no comparison between layers sees it, but each
    parameter's per-element RMS gradient falls below Adam's eps (1e-8), where Adam's step divides by eps instead of
    the gradient's scale: flagged vanishing_gradient on every layer. The same net at the normal loss scale is not."""
    x, y = digits
    flagged = {}
    for scale in (1.0, 1e-7):
        torch.manual_seed(0)
        net = _mlp(3, 64, nn.ReLU, lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"))
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
        with Monitor(net, every_n_steps=1, example_input=x[:64], optimizer=optimizer) as monitor:
            for i in range(3):
                optimizer.zero_grad()
                (scale * F.cross_entropy(net(x[64 * i : 64 * (i + 1)]), y[64 * i : 64 * (i + 1)])).backward()
                optimizer.step()
                monitor.step()
        assert any(tag.startswith("grad_rms_eps/") for tag in monitor.figures)
        run = analyze({tag: list(s) for tag, s in monitor.figures.items()}, layers=monitor.layers)
        flagged[scale] = [layer for layer in run.layers if "vanishing_gradient" in layer.flags]
    assert not flagged[1.0]
    assert len(flagged[1e-7]) == 4 and all("Adam eps" in layer.flags["vanishing_gradient"].reason
                                           for layer in flagged[1e-7])  # fmt: skip


def test_gradient_monitor_logs_grad_rms_eps_under_adam(tmp_path):
    """GradientMonitor reads eps from the Trainer's Adam-type optimizer; an SGD run logs no such figure."""
    from lightning_bn import GradientMonitor
    from tests.helpers import BoringClassifier, mlp, trainer

    for optimizer, expected in (("adam", True), ("sgd", False)):
        monitor = GradientMonitor(every_n_steps=1)
        trainer(tmp_path / optimizer, max_steps=2, callbacks=[monitor], logger=False).fit(
            BoringClassifier(mlp(1, 8, nn.ReLU), optimizer=optimizer)
        )
        assert any(tag.startswith("grad_rms_eps/") for tag in monitor.figures) is expected


@pytest.mark.parametrize("kind", ["relu", "tanh", "sigmoid", "gelu", "silu", "elu", "mish", "hardswish", "selu"])
def test_transmission_against_monte_carlo(kind):
    """act_transmission is 1 at a N(0, 1) input for every kind and, at std 2, what quadrature of E[f'(2z)^2] gives
    (float64 Monte Carlo, 400 000 samples; smooth kinds are read on a 16 384-element sample)."""
    from lightning_bn.activations import get_activation
    from lightning_bn.monitoring.rows import transmission_sum

    act = get_activation(kind)
    z = torch.randn(400_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert act.gradient_power == pytest.approx((act.derivative(z) ** 2).mean().item(), rel=0.01)
    assert transmission_sum(act(z), act, z).item() / len(z) == pytest.approx(1.0, abs=0.02)
    assert transmission_sum(act(2 * z), act, 2 * z).item() / len(z) == pytest.approx(act.transmission(2.0), rel=0.02)


def test_transmission_predicts_the_gradient_decay_of_mean_field_theory(digits):
    """On the standard-init 20-layer sigmoid net, sigma_w^2 x E[f'(z)^2] x act_transmission (the monitors' figure) is
    mean-field theory's chi_1, the per-layer factor on gradient power: it equals the chi the report fits to the
    logged gradients (~0.02), two independent measurements of one quantity."""
    import statistics

    from lightning_bn.activations import get_activation

    torch.manual_seed(0)
    net = _mlp(20, 64, nn.Sigmoid)
    run, _ = _train(net, digits, 1, torch.optim.SGD(net.parameters(), lr=0.1))
    hidden = [layer.transmission for layer in run.layers if layer.transmission is not None][1:]  # fed by a layer
    sigma_w2 = 64 * (1 / 64) / 3  # U[-1/8, 1/8]: variance 1/192, times fan-in 64
    chi = sigma_w2 * get_activation("sigmoid").gradient_power * statistics.mean(hidden)
    reason = next(layer for layer in run.layers if "vanishing_gradient" in layer.flags).flags["vanishing_gradient"]
    fitted = float(reason.reason.split("gradient power x")[1].split(" ")[0])
    assert chi == pytest.approx(fitted, rel=0.3) and 0.01 < chi < 0.04
