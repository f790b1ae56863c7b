"""`lightning-bn report` on real runs of models whose zeros, layer types and forward order matter: a ResNet with
zero-initialized residual norms, a GPT-2 LM, a model whose modules are registered out of forward order."""

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn import ActivationMonitor, GradientMonitor
from lightning_bn.cli import EXIT_FLAGGED, EXIT_OK, main, read_layers, read_scalars
from lightning_bn.report import analyze
from tests.helpers import BoringClassifier, trainer

STEPS = 3


class Block(nn.Module):
    """conv-bn-relu-conv-bn + identity, then relu; the last norm's weight zero (``zero_init_residual``)."""

    def __init__(self, channels: int, frozen: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()
        nn.init.zeros_(self.bn2.weight)
        self.bn2.weight.requires_grad_(not frozen)  # frozen: a zero that can never learn, no deliberate init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(x + self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))


def resnet(frozen: bool = False, channels: int = 8) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        Block(channels, frozen),
        Block(channels, frozen),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, 10),
    )


def images(n: int = 16 * STEPS) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def dead_into_batchnorm() -> nn.Module:
    """Every ReLU dead (bias -10), so the BatchNorm after it sees only zeros: output exactly 0 with weight 1."""
    first = nn.Linear(64, 32)
    nn.init.constant_(first.bias, -10.0)
    return nn.Sequential(first, nn.ReLU(), nn.BatchNorm1d(32), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10))


class OutOfOrder(nn.Module):
    """Modules registered in the reverse of the order they run."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(32, 10)
        self.tanh = nn.Tanh()
        self.fc2 = nn.Linear(32, 32)
        self.relu = nn.ReLU()
        self.fc1 = nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tanh(self.fc2(self.relu(self.fc1(x)))))


class CallsNetDirectly(BoringClassifier):
    """No example input, and ``training_step`` calls ``self.net``: the monitor watches the modules in registration
    order at step 0 and learns the forward order from that first batch."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)


class TinyGPT2(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=100, n_positions=32)
        config.bos_token_id = config.eos_token_id = 0  # inside the tiny vocabulary
        self.model = GPT2LMHeadModel(config)
        self.example_input_array = {"input_ids": torch.randint(0, 100, (2, 16))}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        logits = self(ids)
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 100), ids[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randint(0, 100, (4 * STEPS, 16))), batch_size=4)


def _out_of_order() -> pl.LightningModule:
    model = CallsNetDirectly(OutOfOrder())
    model.example_input_array = None
    return model


#: run name -> (model, monitors)
RUNS = {
    "zero_init": lambda: (BoringClassifier(resnet(), lr=0.01, batch_size=16, data=images()), "both"),
    "zero_init_activations_only": lambda: (BoringClassifier(resnet(), lr=0.01, batch_size=16, data=images()), "act"),
    "frozen_zero": lambda: (BoringClassifier(resnet(frozen=True), lr=0.01, batch_size=16, data=images()), "both"),
    "dead_into_batchnorm": lambda: (BoringClassifier(dead_into_batchnorm(), lr=0.01), "both"),
    "gpt2": lambda: (TinyGPT2(), "both"),
    "out_of_order": lambda: (_out_of_order(), "both"),
}


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    """Every run of RUNS as ``<name>/version_0``, logged at every step."""
    root = tmp_path_factory.mktemp("zoo")
    for name, build in RUNS.items():
        torch.manual_seed(0)
        model, monitors = build()
        callbacks = [ActivationMonitor(every_n_steps=1, histograms=False, heatmap=False)]
        if monitors == "both":
            callbacks.append(GradientMonitor(every_n_steps=1))
        trainer(root, logger=TensorBoardLogger(root, name=name), max_steps=STEPS, callbacks=callbacks).fit(model)
    return root


def _run(logs: Path, name: str) -> Path:
    return logs / name / "version_0"


def _json(logs: Path, name: str, capsys) -> dict:
    capsys.readouterr()
    main(["report", str(_run(logs, name)), "--format", "json"])
    return json.loads(capsys.readouterr().out)["runs"]["."]


@pytest.mark.parametrize("run", ["zero_init", "zero_init_activations_only"])
def test_zero_init_residual_is_deliberate_not_vanishing(logs, capsys, run):
    """A ResNet whose residual branches end in a zero-weight BatchNorm passes --fail-on all; the report marks those
    norms zero-init (deliberate), from their weights or (without GradientMonitor) from the layers table."""
    assert main(["report", str(_run(logs, run)), "--fail-on", "all", "--all"]) == EXIT_OK
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("net.")}
    assert rows["net.3.bn2"].endswith("zero-init (deliberate)")
    assert rows["net.4.bn2"].endswith("zero-init (deliberate)") and rows["net.4.bn1"].endswith("  -")
    assert "  zero-init (deliberate): 2 layers: net.3.bn2, net.4.bn2" in out.splitlines()
    report = _json(logs, run, capsys)
    assert report["zero_init"] == ["net.3.bn2", "net.4.bn2"] and report["problems"] == {}
    bn2 = report["layers"]["net.3.bn2"]
    assert bn2["std_ratio"] < 0.01 and bn2["std_reference"] == "net.1"  # small by design, vs the first BatchNorm2d
    assert bn2["module_type"] == "BatchNorm2d" and report["layers"]["net.3.bn1"]["zero_init"] is False


def test_zero_init_is_recognized_from_the_weights_without_the_table(logs):
    """Old logs (no layers table) with GradientMonitor: the weights that leave 0 at the first step tell it; with
    neither table nor weights the zero output is vanishing, as before."""
    run = analyze(read_scalars(_run(logs, "zero_init")))
    assert run.zero_init == ["net.3.bn2", "net.4.bn2"] and run.problems() == {}
    bare = analyze(read_scalars(_run(logs, "zero_init_activations_only")))
    assert bare.zero_init == [] and bare.problems()["vanishing"]["layers"] == ["net.3.bn2", "net.4.bn2"]


def test_zero_weight_that_cannot_learn_is_vanishing(logs, capsys):
    """A frozen zero-weight norm never leaves 0: no deliberate init, its branch is gone for good."""
    assert main(["report", str(_run(logs, "frozen_zero")), "--fail-on", "vanishing"]) == EXIT_FLAGGED
    report = _json(logs, "frozen_zero", capsys)
    assert report["zero_init"] == [] and report["problems"]["vanishing"]["layers"] == ["net.3.bn2", "net.4.bn2"]


def test_norm_of_a_dead_layer_is_still_vanishing(logs, capsys):
    """A BatchNorm whose input is all zeros outputs exactly 0 like a zero-weight one, but its weight is 1: still
    flagged vanishing (and the ReLU before it dead)."""
    assert main(["report", str(_run(logs, "dead_into_batchnorm")), "--fail-on", "vanishing"]) == EXIT_FLAGGED
    report = _json(logs, "dead_into_batchnorm", capsys)
    assert report["zero_init"] == []
    assert "net.2" in report["problems"]["vanishing"]["layers"] and report["problems"]["dead"]["layers"] == ["net.1"]


def test_gpt2_compares_each_layer_with_the_first_of_its_type(logs, capsys):
    """std/first of GPT-2's final LayerNorm is relative to the first LayerNorm (about 1), not to the embedding
    (about 50); each type has its own reference; rows follow the forward order of the layers table."""
    report = _json(logs, "gpt2", capsys)
    layers = report["layers"]
    prefix = "model.transformer."
    ln_f, ln_1 = layers[prefix + "ln_f"], layers[prefix + "h.0.ln_1"]
    assert ln_f["std_reference"] == prefix + "h.0.ln_1" and ln_f["std_ratio"] == pytest.approx(1.0, abs=0.05)
    assert ln_f["std_ratio"] == pytest.approx(ln_f["std"] / ln_1["std"])
    references = {name: layer["std_reference"] for name, layer in layers.items()}
    assert references[prefix + "wpe"] == prefix + "wte"  # Embedding
    assert references[prefix + "h.1.mlp.act"] == prefix + "h.0.mlp.act"  # gelu(approximate=tanh)
    assert references[prefix + "h.1.attn.c_proj"] == prefix + "h.0.attn.c_attn"  # transformers' Conv1D
    # the first of a type has nothing of its type before it: the first layer of its kind, as without the table
    assert references[prefix + "h.0.ln_1"] == references["model.lm_head"] == prefix + "wte"
    assert layers[prefix + "h.0.ln_2"]["module_type"] == "LayerNorm" and report["forward_order"] is True
    table = [entry["name"] for entry in read_layers(_run(logs, "gpt2"))]
    assert list(layers) == table
    rows = [prefix + "wte", prefix + "h.0.ln_1", prefix + "h.0.mlp.act", "model.lm_head"]
    assert sorted(rows, key=list(layers).index) == rows
    # without the table: today's rule, the first non-activation layer (the embedding) is every layer's reference
    old = {layer.name: layer for layer in analyze(read_scalars(_run(logs, "gpt2"))).layers}
    assert old[prefix + "ln_f"].std_reference == prefix + "wte" and old[prefix + "ln_f"].std_ratio > 10


def test_rows_follow_forward_order_not_registration_order(logs, capsys):
    """Registered head before fc1 and traced on its first call (as it runs): logged in forward order; tags in
    any other order are put back in forward order by the layers table, in every format."""
    run = _run(logs, "out_of_order")
    forward = ["net.fc1", "net.relu", "net.fc2", "net.tanh", "net.head"]
    scalars = read_scalars(run)
    assert [layer.name for layer in analyze(scalars).layers] == forward  # logged in forward order from step 0
    shuffled = dict(reversed(list(scalars.items())))
    assert [layer.name for layer in analyze(shuffled).layers] == forward[::-1]  # without a table: tag order
    assert [layer.name for layer in analyze(shuffled, layers=read_layers(run)).layers] == forward
    assert [entry["name"] for entry in read_layers(run)] == forward  # the last of the tables written
    assert list(_json(logs, "out_of_order", capsys)["layers"]) == forward
    main(["report", str(run), "--all"])
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines() if line.startswith("net.")] == forward
    assert "layers in forward order" in out
    main(["report", str(run), "--format", "markdown", "--all"])
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("| net.")] == forward


def test_layers_table_partial_or_malformed():
    """Layers missing from the table follow the tag before them; entries without a name are ignored; a layer
    missing from the table is compared within its kind."""
    scalars = {
        "act_std/b": [(0, 2.0)],
        "act_std/a": [(0, 1.0)],
        "act_std/extra": [(0, 4.0)],
        "act_std/c": [(0, 0.001)],
        "act_saturation/c": [(0, 0.1)],
    }
    table = [{"name": "a", "module_type": "Linear"}, {"oops": 1}, {"name": "b", "module_type": "Linear"}]
    table.append({"name": "c", "module_type": "Sigmoid", "activation": "sigmoid", "hook": "module"})
    run = analyze(scalars, layers=table)
    assert [layer.name for layer in run.layers] == ["a", "extra", "b", "c"]  # extra: after a, as in the tags
    ratios = {layer.name: (layer.std_reference, layer.std_ratio) for layer in run.layers}
    assert ratios == {"a": ("a", 1.0), "b": ("a", 2.0), "extra": ("a", 4.0), "c": ("c", 1.0)}
    assert run.forward_order and not analyze(scalars).forward_order


def test_zero_init_is_not_a_reference_and_wakes_up():
    """A zero-init layer first of its type is no reference; once its ratio reaches min_std_ratio it is judged
    vanishing again; its update from 0 (ratio 1) is not judged exploding."""
    scalars = {
        "act_std/n0": [(0, 0.0), (1, 0.5), (2, 0.001)],
        "weight_norm/n0.weight": [(0, 0.01), (1, 0.5), (2, 0.5)],
        "update_ratio/n0.weight": [(0, 1.0), (1, 0.01), (2, 0.01)],
        "act_std/n1": [(0, 1.0), (1, 1.0), (2, 1.0)],
        "weight_norm/n1.weight": [(0, 1.0), (1, 1.0), (2, 1.0)],
        "update_ratio/n1.weight": [(0, 0.001), (1, 0.001), (2, 0.001)],
    }
    table = [{"name": n, "module_type": "LayerNorm", "activation": None, "hook": "layer"} for n in ("n0", "n1")]
    from lightning_bn.report import Thresholds

    run = analyze(scalars, thresholds=Thresholds(max_update_ratio=0.5), layers=table)
    n0, n1 = run.layers
    assert n0.zero_init and not n1.zero_init and n0.std_reference == n1.std_reference == "n1"
    assert n0.flags["vanishing"].describe() == "vanishing since step 2" and "exploding" not in n0.flags


@pytest.mark.parametrize("arch", ["bert", "swin", "convnext", "mobilenet_v2", "llama", "vit_layer_scale"])
def test_real_architectures_raise_no_gradient_flags_as_built(arch):
    """transformers' BERT, Swin, ConvNeXt (LayerScale 1e-6), MobileNetV2 and Llama, and a timm-style LayerScale ViT,
    stock init, 4 AdamW steps: no `vanishing_gradient`, `stalled` or `exploding` flag. Their layers' gradient norms span
    1e-4..1e-6 of the largest (a rule on raw norms flagged 4-20 layers of each); their relative gradients ||g||/||w||
    stay within 1e-2 of the median's. LayerScale gains (1e-6) move by their own size at the first AdamW step (update
    ratio ~1): that first step is not judged, as for a zero init."""
    import torch

    from lightning_bn import Monitor
    from tests import zoo

    case = getattr(zoo, arch)()
    model = case.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with Monitor(model, every_n_steps=1, example_input=case.example_input, histograms=False,
                 optimizer=optimizer) as monitor:  # fmt: skip  (grad_rms_eps: the uniform-vanish rule judges too)
        for _ in range(4):
            optimizer.zero_grad()
            zoo.main_output(zoo.run_model(model, case.example_input)).float().pow(2).mean().backward()
            optimizer.step()
            monitor.step()
    run = analyze({tag: list(series) for tag, series in monitor.figures.items()}, layers=monitor.layers)
    assert sum(layer.grad_norm is not None for layer in run.layers) > 10
    assert any(tag.startswith("grad_rms_eps/") for tag in monitor.figures)
    problems = run.problems()
    assert not {"vanishing_gradient", "stalled", "exploding"} & set(problems), problems


@pytest.mark.parametrize("arch", ["cspdarknet_zero_last", "wide_zero_head", "segformer_like", "mobilenet_v3_like",
                                  "mixer_zero_head", "timm_norm_act", "resnet_zero_init_residual"])  # fmt: skip
def test_stand_ins_raise_no_flag_as_built(arch):
    """Stand-ins for stock models that the report once flagged (issue 24), 4 SGD steps, every figure logged: no flag
    at all. A zero-gamma norm-act layer's activation shares the norm's zero-init grace (CSPDarknet53: 23 layers
    `vanishing`); a 10 x 4096 zero head is recognized although its first update ratio is sampled (Mixer: 51 layers);
    the decode head's first ReLU is compared with itself, not the encoder's tiny first GELU (Segformer: `exploding`
    242x); MobileNetV3's N(0, 0.01) classifier."""
    from lightning_bn import Monitor
    from tests import zoo

    case = getattr(zoo, arch)()
    model = case.model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    with Monitor(model, every_n_steps=1, example_input=case.example_input, histograms=False,
                 optimizer=optimizer) as monitor:  # fmt: skip
        for _ in range(4):
            optimizer.zero_grad()
            # against a target of 1: at a zero head, out^2 would have no gradient at all (nothing could learn)
            (zoo.main_output(zoo.run_model(model, case.example_input)).float() - 1).pow(2).mean().backward()
            optimizer.step()
            monitor.step()
    run = analyze({tag: list(series) for tag, series in monitor.figures.items()}, layers=monitor.layers)
    assert any(layer.kind == "activation" for layer in run.layers)
    assert set(case.zero_params) <= {f"{name}.weight" for name in run.zero_init} | {
        f"{name}.bias" for name in run.zero_init}, (run.zero_init, case.zero_params)  # fmt: skip
    assert not run.problems(), {name: p["layers"] for name, p in run.problems().items()}


_ATTENTION_ZOO = ["bert", "gpt2", "llama", "t5", "vit", "swin", "vit_layer_scale", "t5_like_attention",
                  "lightning_transformer"]  # fmt: skip  (every model of tests/zoo.py whose trace finds attention)


@pytest.mark.parametrize("arch", _ATTENTION_ZOO)
def test_zoo_attention_rows_and_no_attention_flag_after_a_few_steps(arch):
    """Every zoo model with attention, stock init, 6 AdamW steps (lr 1e-3): one attention row per site with finite
    figures (logits, entropy within [0, log keys]), and none of the attention / output-logit flags."""
    from lightning_bn import Monitor
    from lightning_bn.report.health import ATTENTION_FLAGS
    from lightning_bn.tracing import trace_model
    from tests import zoo

    torch.manual_seed(0)
    case = getattr(zoo, arch)()
    model = case.model.train()
    sites = [site.name for site in trace_model(model, case.example_input).attention_sites]
    assert sites, arch
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with Monitor(model, every_n_steps=1, example_input=case.example_input, histograms=False) as monitor:
        for _ in range(6):
            optimizer.zero_grad()
            zoo.main_output(zoo.run_model(model, case.example_input)).float().pow(2).mean().backward()
            optimizer.step()
            monitor.step()
    figures = {tag: list(series) for tag, series in monitor.figures.items()}
    for site in sites:
        maxima = [v for _, v in figures[f"attn_logit_max/{site}"]]
        entropy = [v for _, v in figures[f"attn_entropy/{site}"]]
        assert len(maxima) == 6 and all(math.isfinite(v) for v in maxima), (site, maxima)
        assert all(0 <= v < 10 for v in entropy), (site, entropy)
    run = analyze(figures, layers=monitor.layers)
    # a row each (kind "attention"; an nn.MultiheadAttention's row is also its layer's, with its weights' figures)
    assert {layer.name for layer in run.layers} >= set(sites)
    if arch != "lightning_transformer":
        assert all(layer.kind == "attention" for layer in run.layers if layer.name in sites)
    flagged = {name: p["layers"] for name, p in run.problems().items() if name in ATTENTION_FLAGS}
    assert not flagged, flagged
