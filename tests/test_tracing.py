"""The one model trace (lightning_bn.tracing): activation sites of every kind, layouts, placeholders, recognition by
behaviour, what the monitor logs for them, and how often prepare() runs the model."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

import lightning_bn
from lightning_bn import ActivationMonitor, prepare
from lightning_bn.activations import get_activation
from lightning_bn.tracing import Layout, recognize, trace_model
from tests.helpers import BoringClassifier, event_tags, random_data, read_scalars, trainer


class ThreeCalls(nn.Module):
    """Activations called three ways in ``forward``: a function, a torch function and a tensor method."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.out = (
            nn.Linear(64, 32),
            nn.Linear(32, 32),
            nn.Linear(32, 32),
            nn.Linear(32, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x))
        x = torch.tanh(self.fc2(x))
        return self.out(self.fc3(x).sigmoid())


class QuickGELU(nn.Module):
    """CLIP's activation as transformers writes it: a class of no registered type."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class BatchNormAct1d(nn.BatchNorm1d):
    """timm's norm-act pattern: a BatchNorm subclass that applies its activation inside its own forward."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class FunctionalNormAct1d(nn.BatchNorm1d):
    """The same with the activation as a call: only the module's output shows it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


def _expected_saturation(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """By hand: sigmoid/tanh saturated where |f'| < 1% of max |f'|, ReLU where its input is <= 0."""
    with torch.no_grad():
        h1 = model.fc1(x)
        h2 = model.fc2(torch.relu(h1))
        h3 = model.fc3(torch.tanh(h2))
        tanh_slope = 1 - torch.tanh(h2) ** 2
        s = torch.sigmoid(h3)
    return {
        "fc1.relu": (h1 <= 0).double().mean().item(),
        "fc2.tanh": (tanh_slope < 0.01).double().mean().item(),
        "fc3.sigmoid": (s * (1 - s) < 0.0025).double().mean().item(),
    }


def test_functional_activations_are_monitored_with_exact_saturation(tmp_path):
    """F.relu, torch.tanh and x.sigmoid() in forward each log act_saturation equal to a hand computation (1e-6)."""
    torch.manual_seed(0)
    net = ThreeCalls()
    with torch.no_grad():
        net.fc2.weight.mul_(8.0)  # push tanh and sigmoid towards their asymptotes
        net.fc3.weight.mul_(8.0)
    data = random_data(64)
    model = BoringClassifier(net, batch_size=64, data=data, lr=0.0)
    expected = _expected_saturation(net, data.tensors[0])
    t = trainer(
        tmp_path, logger=TensorBoardLogger(tmp_path), max_steps=1, callbacks=[ActivationMonitor(every_n_steps=1)]
    )
    t.fit(model)
    scalars = read_scalars(tmp_path)
    for site, value in expected.items():
        assert scalars[f"act_saturation/net.{site}"][0][1] == pytest.approx(value, abs=1e-6), site
        assert f"act_dead/net.{site}" in scalars
    assert 0.05 < expected["fc2.tanh"] < 0.95 and 0.05 < expected["fc3.sigmoid"] < 0.95  # the case is not trivial
    assert scalars["act_mean/net.fc1.relu"][0][1] == pytest.approx(
        torch.relu(net.fc1(data.tensors[0])).mean().item(), rel=1e-5
    )


def test_first_batch_is_traced_when_there_is_no_example_input(tmp_path):
    """Without example_input_array, the trace runs on the first forward call of the training step."""
    torch.manual_seed(0)
    model = BoringClassifier(ThreeCalls(), batch_size=32)
    model.example_input_array = None
    monitor = ActivationMonitor(every_n_steps=1)
    trainer(tmp_path, logger=TensorBoardLogger(tmp_path), max_steps=2, callbacks=[monitor]).fit(model)
    scalars = read_scalars(tmp_path)
    assert [step for step, _ in scalars["act_saturation/net.fc2.tanh"]] == [0, 1]
    assert monitor.model_map.site_names == ["net.fc1.relu", "net.fc2.tanh", "net.fc3.sigmoid"]


def test_submodule_called_directly_is_traced_at_its_first_call(tmp_path):
    """training_step calling self.net(x) without forward: the net is traced at its first call as it runs, and its
    functional sites are logged from that very step on."""

    class Direct(BoringClassifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

    torch.manual_seed(0)
    model = Direct(nn.Sequential(ThreeCalls(), nn.Tanh()), batch_size=32)
    model.example_input_array = None
    monitor = ActivationMonitor(every_n_steps=1)
    trainer(tmp_path, logger=TensorBoardLogger(tmp_path), max_steps=3, callbacks=[monitor]).fit(model)
    scalars = read_scalars(tmp_path)
    assert [step for step, _ in scalars["act_saturation/net.1"]] == [0, 1, 2]
    assert [step for step, _ in scalars["act_saturation/net.0.fc2.tanh"]] == [0, 1, 2]
    assert "net.0.fc1.relu" in monitor.model_map.site_names


@pytest.mark.parametrize("norm_act", [BatchNormAct1d, FunctionalNormAct1d])
def test_norm_act_and_quick_gelu_are_detected_and_monitored(tmp_path, norm_act):
    """A norm-act layer's ReLU and an x*sigmoid(1.702x) class: prepare() inits for them, the monitor logs them."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), norm_act(32), nn.Linear(32, 32), QuickGELU(), nn.Linear(32, 10))
    x = torch.randn(128, 64)
    report = prepare(net, x)
    rows = {r.layer: r for r in report.layers}
    assert rows["0"].activation == "relu" and rows["0"].scheme == "kaiming"
    assert rows["2"].activation == "quick_gelu" and rows["2"].how == "numeric"
    model = BoringClassifier(net, batch_size=64)
    trainer(
        tmp_path, logger=TensorBoardLogger(tmp_path), max_steps=1, callbacks=[ActivationMonitor(every_n_steps=1)]
    ).fit(model)
    scalars = set(event_tags(tmp_path)["scalars"])
    relu_site = "net.1.act" if norm_act is BatchNormAct1d else "net.0.relu"
    assert {f"act_saturation/{relu_site}", "act_saturation/net.3", "act_dead/net.3"} <= scalars


def test_placeholders_are_not_activations(tmp_path):
    """nn.Identity and Dropout (and a drop-path-like module) log no act_saturation; real activations do."""

    class DropPath(nn.Module):
        def forward(self, x):
            return x if not self.training else x * (torch.rand_like(x[:, :1]) > 0.1) / 0.9

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.Identity(), nn.GELU(), nn.Dropout(0.1), DropPath(), nn.Linear(32, 10))
    found = trace_model(net, torch.randn(8, 64))
    assert found.placeholders == ["1", "3", "4"] and found.site_names == ["2"]
    trainer(
        tmp_path, logger=TensorBoardLogger(tmp_path), max_steps=1, callbacks=[ActivationMonitor(every_n_steps=1)]
    ).fit(BoringClassifier(net))
    saturation = {t for t in event_tags(tmp_path)["scalars"] if t.startswith(("act_saturation/", "act_dead/"))}
    assert saturation == {"act_saturation/net.2", "act_dead/net.2"}


def test_conv1d_dead_units_are_counted_by_channel(tmp_path):
    """Conv1d (N, C, L) + ReLU with one of C channels forced dead logs act_dead = 1/C, module or functional."""

    class Net(nn.Module):
        def __init__(self, functional: bool) -> None:
            super().__init__()
            self.functional = functional
            self.conv = nn.Conv1d(4, 8, 3, padding=1)
            self.act = nn.ReLU()
            self.head = nn.Linear(8 * 12, 10)

        def forward(self, x):
            h = self.conv(x.view(-1, 4, 16)[..., :12])
            h = F.relu(h) if self.functional else self.act(h)
            return self.head(h.flatten(1))

    for functional in (False, True):
        torch.manual_seed(0)
        net = Net(functional)
        with torch.no_grad():
            net.conv.weight[3].zero_()
            net.conv.bias[3] = -1.0  # channel 3 is negative everywhere: dead
        found = trace_model(net, torch.randn(8, 64))
        assert str(found.layers["conv"].layout) == "(N, C, L)"
        site = found.sites[0]
        assert site.layout == Layout(1, 3)
        logdir = tmp_path / str(functional)
        trainer(
            logdir, logger=TensorBoardLogger(logdir), max_steps=1, callbacks=[ActivationMonitor(every_n_steps=1)]
        ).fit(BoringClassifier(net, batch_size=64, lr=0.0))
        name = "net.conv.relu" if functional else "net.act"
        assert read_scalars(logdir)[f"act_dead/{name}"][0][1] == pytest.approx(1 / 8)


class _CountCalls:
    def __init__(self, model: nn.Module) -> None:
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1


class GeluCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = (
            nn.Conv2d(3, 16, 3, padding=1),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.Conv2d(16, 16, 3),
        )
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = F.gelu(self.c1(x))
        x = nn.functional.gelu(self.c2(x))
        x = F.gelu(self.c3(x)).mean((2, 3))
        return self.head(x)


@pytest.mark.parametrize("init", ["auto", "lsuv"])
@pytest.mark.parametrize("norm", [None, "batch"])
def test_prepare_runs_the_model_at_most_twice(init, norm):
    """prepare() on a GELU CNN (rescaled layers) and with LSUV: at most 2 forward calls; the variances still hit 1."""
    torch.manual_seed(0)
    net = GeluCNN()
    counter = _CountCalls(net)
    report = prepare(net, torch.randn(32, 3, 8, 8), init=init, norm=norm)
    assert counter.calls <= 2
    rescaled = [r for r in report.layers if r.corrected or r.scheme == "lsuv"]
    assert len(rescaled) >= 3
    if norm is None:
        assert all(abs(r.std_after**2 - 1) <= 0.1 for r in rescaled)


def test_lsuv_runs_the_model_twice():
    """lsuv_ traces once and initializes in one more pass."""
    torch.manual_seed(0)
    net = GeluCNN()
    counter = _CountCalls(net)
    variances = lightning_bn.init.lsuv_(net, torch.randn(64, 3, 8, 8))
    assert counter.calls == 2 and all(abs(v - 1) <= 0.1 for v in variances.values())


def test_recognize_by_behaviour():
    """Element-wise functions are matched numerically; unknown ones get a kind from their derivative."""
    sq_relu = recognize(lambda x: torch.relu(x) ** 2)
    assert sq_relu.how == "behaviour" and "(by behaviour)" in sq_relu.activation.name
    x = torch.tensor([-2.0, -0.5, 0.5, 2.0])
    assert sq_relu.activation.saturated(x).tolist() == [True, True, False, False]
    assert recognize(lambda x: 3 * x + 1) is None  # linear: no activation
    assert recognize(nn.Softmax(-1)) is None
    leaky = recognize(lambda x: torch.where(x > 0, x, 0.2 * x))
    assert leaky.activation.name == "leaky_relu" and leaky.activation.kwargs["negative_slope"] == pytest.approx(0.2)
    assert recognize(lambda x: x * torch.sigmoid(1.702 * x)).activation.name == "quick_gelu"
    assert get_activation("quick_gelu").gain == pytest.approx(1 / math.sqrt(get_activation("quick_gelu").second_moment))


def test_transformers_activations_are_recognized():
    """transformers' activation classes: gelu_new and gelu_fast are tanh-GELU, quick_gelu its own kind."""
    activations = pytest.importorskip("transformers.activations")
    expected = {
        "gelu": "gelu(approximate=none)",
        "gelu_new": "gelu(approximate=tanh)",
        "gelu_fast": "gelu(approximate=tanh)",
        "quick_gelu": "quick_gelu",
        "silu": "silu",
        "mish": "mish",
    }
    for key, described in expected.items():
        found = recognize(activations.ACT2FN[key], torch.randn(2, 4))
        assert found is not None and found.activation.describe() == described, key
    assert recognize(activations.ACT2FN["linear"]).is_placeholder


def _gpt2_and_llama():
    transformers = pytest.importorskip("transformers")
    ids = torch.randint(0, 100, (2, 16))
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=100, n_positions=32)
    )
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=2, vocab_size=100)
    )  # fmt: skip
    return {"gpt2": (gpt2, ids), "llama": (llama, ids)}


def test_transformer_sites_are_the_mlp_activations():
    """GPT-2's NewGELU and Llama's SiLU are the only activation sites; dropouts are placeholders."""
    for name, (model, ids) in _gpt2_and_llama().items():
        found = trace_model(model, {"input_ids": ids})
        kinds = {s.activation.describe() for s in found.sites}
        assert len(found.sites) == 2, (name, found.site_names)
        assert kinds == ({"gelu(approximate=tanh)"} if name == "gpt2" else {"silu"})
        assert all(s.layout.unit_dim == 2 and str(s.layout) == "(N, T, C)" for s in found.sites)
        if name == "llama":  # read from the Linear that feeds it (GPT-2's Conv1D is no known layer type yet)
            assert all(s.layout.known for s in found.sites)
    llama_map = trace_model(*_gpt2_and_llama()["llama"][:1], {"input_ids": torch.randint(0, 100, (2, 16))})
    assert llama_map.layers["model.layers.0.mlp.gate_proj"].activation.name == "silu"


def test_core_imports_without_lightning(tmp_path):
    """stats, activations, tracing, init, norms, guards and the top-level package import where lightning cannot."""
    code = textwrap.dedent(
        """
        import sys
        for name in ("lightning", "lightning.pytorch", "pytorch_lightning", "torchmetrics"):
            sys.modules[name] = None  # importing it raises ImportError
        import lightning_bn.monitoring.rows, lightning_bn.activations, lightning_bn.tracing, lightning_bn.init
        import lightning_bn.norms, lightning_bn.guards, lightning_bn.recalibration, lightning_bn.monitoring
        import lightning_bn
        import torch
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        lightning_bn.prepare(net, torch.randn(16, 4))
        try:
            lightning_bn.ActivationMonitor
        except ImportError:
            print("callbacks need lightning")
        print("ok")
        """
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["callbacks", "need", "lightning", "ok"]


def test_printed_model_map_is_a_short_table():
    """print(model_map): one aligned row per layer (type, activation and how it was found, output shape, the norm
    after it, residual branch or not) and a closing count of the sites, instead of the dataclass dump."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.bn, self.fc2 = nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 8)

        def forward(self, x):
            return x + self.fc2(F.gelu(self.bn(self.fc1(x))))

    model_map = trace_model(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), Block(), nn.Linear(8, 2)), torch.randn(5, 4))
    lines = str(model_map).splitlines()
    assert [line.split() for line in lines[:5]] == [
        ["layer", "type", "activation", "(how)", "output", "shape", "norm", "after", "residual"],
        ["0", "Linear", "tanh", "(module)", "5x8", "-", "-"],
        ["2.fc1", "Linear", "gelu(approximate=none)", "(function)", "5x8", "2.bn", "-"],
        ["2.fc2", "Linear", "identity", "(none)", "5x8", "-", "yes"],
        ["3", "Linear", "identity", "(output)", "5x2", "-", "-"],
    ]
    assert len({line.index(line.split()[1]) for line in lines[:5]}) == 1  # aligned columns
    assert lines[5:] == ["2 activation site(s); describe() lists them"]
