"""`prepare()` and its Report (lightning_bn.prepare), and the AutoInit callback (lightning_bn.callbacks.auto_init)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_bn.callbacks.auto_init import REPORT_TAG, AutoInit
from lightning_bn.norms import NormInsertion
from lightning_bn.prepare import Kept, LayerReport, Report, Skipped, prepare
from lightning_bn.tracing import output_stds
from tests.helpers import BoringClassifier, digits_data, event_tags, mlp, resnet18, trainer


class FunctionalMLP(nn.Module):
    """Linear layers with the activation called as a function inside `forward` (e.g. ``F.silu``)."""

    def __init__(self, depth: int, width: int, act, in_features: int = 64, out_features: int = 10) -> None:
        super().__init__()
        sizes = [in_features] + [width] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.head = nn.Linear(width, out_features)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = self.act(layer(x))
        return self.head(x)


def hidden_layers(net: nn.Module) -> list[str]:
    linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    return linears[:-1]


def std_ratio(net: nn.Module, x: torch.Tensor) -> float:
    """Std of the last hidden Linear's output over the first's (pre-activation), on ``x``."""
    names = hidden_layers(net)
    stds = output_stds(net, x, names)
    return stds[names[-1]] / stds[names[0]]


def xavier_(net: nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)


DEEP_NETS = {
    "relu": lambda: mlp(30, 256, nn.ReLU),
    "tanh": lambda: mlp(20, 256, nn.Tanh),
    "gelu": lambda: mlp(20, 256, nn.GELU),
    "silu": lambda: FunctionalMLP(20, 256, F.silu),
    "selu": lambda: mlp(20, 256, nn.SELU),
}


@pytest.mark.parametrize("start", ["xavier", "pytorch_default"])
@pytest.mark.parametrize("kind", list(DEEP_NETS))
def test_prepare_holds_the_signal_at_depth(kind, start):
    """Hidden std ratio last/first within [0.5, 2] after prepare(init="auto"); Xavier under ReLU is below 1/100.

    "Hidden std" is the std of each hidden Linear's output (the pre-activation) on a unit-variance input of 128
    samples: that is the quantity the schemes hold constant, and it is defined the same way for every activation.
    """
    torch.manual_seed(0)
    net = DEEP_NETS[kind]()
    if start == "xavier":
        xavier_(net)
    x = torch.randn(128, 64)
    before = std_ratio(net, x)
    if kind == "relu" and start == "xavier":
        assert before < 0.01
    report = prepare(net, x, init="auto")
    after = std_ratio(net, x)
    assert 0.5 <= after <= 2.0, f"{kind} from {start}: ratio {before:.3g} -> {after:.3g}"
    assert report.layers[0].activation.startswith(kind)
    assert report.layers[-1].activation == "identity"


def test_auto_picks_the_scheme_from_the_registry_and_says_so():
    """Scheme per layer: critical for a tanh chain, He for ReLU, LeCun for SELU, numeric + rescaling for GELU, Xavier
    for the logits."""
    net = nn.Sequential(
        nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.SELU(),
        nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4),
    )  # fmt: skip
    report = prepare(net, torch.randn(64, 16))
    assert [(r.activation, r.how, r.scheme, r.corrected) for r in report.layers] == [
        ("tanh", "module", "critical", False),
        ("relu", "module", "kaiming", False),
        ("selu", "module", "lecun", False),
        ("gelu(approximate=none)", "module", "numeric", True),
        ("identity", "output", "xavier", False),
    ]
    assert report.layers[1].gain == pytest.approx(2**0.5)
    assert any("gelu" in change and "rescaled 1 layer " in change for change in report.changes)
    # the critical init draws the tanh layer's biases from N(0, 0.151) (zeroed elsewhere)
    assert 0.2 < net[0].bias.std().item() < 0.6 and net[2].bias.abs().max().item() == 0.0
    assert any("critical init" in change and "σ_b² 0.151" in change for change in report.changes)


def _rebuild(data: dict) -> Report:
    """A Report from ``Report.to_dict()``'s output."""
    return Report(
        layers=[LayerReport(**row) for row in data["layers"]],
        skipped=[Skipped(**s) for s in data["skipped"]],
        kept=[Kept(**k) for k in data["kept"]],
        changes=data["changes"],
        insertions=[NormInsertion(**i) for i in data["insertions"]],
        renamed_keys=data["renamed_keys"],
        removed_keys=data["removed_keys"],
    )


def test_report_prints_a_table_and_converts_to_a_dict():
    """Each table row holds the layer's own name, type, shape, activation, scheme, gain and its output std before ->
    after as measured here (3 significant digits); kept (one line per reason), skipped, inserted and renamed lines
    follow; to_dict holds the same values and rebuilds an equal Report with the same table."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))
    nn.init.zeros_(net[5].weight)  # a deliberate zero init: kept
    x = torch.randn(32, 8)
    skipped_weight = net[2].weight.clone()
    before = output_stds(net, x, ["0", "3"])
    report = prepare(net, x, overrides={"2": "skip"})
    after = output_stds(net, x, ["0", "3"])
    assert after["0"] > 1.5 * before["0"] and after["3"] > 1.5 * before["3"]  # the two std columns differ
    assert torch.equal(net[2].weight, skipped_weight) and net[5].weight.abs().max().item() == 0.0

    text = str(report)
    lines = text.splitlines()
    cells = [re.split(r" {2,}", line) for line in lines[:3]]  # columns are padded; a cell has single spaces only
    assert cells == [
        ["layer", "type", "output shape", "activation (found by)", "scheme", "gain", "std before -> after"],
        ["0", "Linear", "32x16", "relu (module)", "kaiming", "1.414", f"{before['0']:.3g} -> {after['0']:.3g}"],
        ["3", "Linear", "32x16", "tanh (module)", "critical", "1.467", f"{before['3']:.3g} -> {after['3']:.3g}"],
    ]
    assert len(report.kept) == 1 and report.changes
    assert lines[3:] == [
        f"kept ({report.kept[0].reason}): 5",
        "skipped 2: override 'skip'",
        *(f"- {change}" for change in report.changes),
    ]

    data = report.to_dict()
    rows = [(r["layer"], r["type"], r["shape"], r["activation"], r["how"], r["scheme"]) for r in data["layers"]]
    assert rows == [
        ("0", "Linear", (32, 16), "relu", "module", "kaiming"),
        ("3", "Linear", (32, 16), "tanh", "module", "critical"),
    ]
    assert [r["gain"] for r in data["layers"]] == pytest.approx([2**0.5, 2.1533**0.5], rel=1e-4)
    for row in data["layers"]:
        assert row["std_before"] == pytest.approx(before[row["layer"]], rel=1e-5)
        assert row["std_after"] == pytest.approx(after[row["layer"]], rel=1e-5)
    assert data["skipped"] == [{"layer": "2", "reason": "override 'skip'"}]
    assert [k["layer"] for k in data["kept"]] == ["5"] and "zero" in data["kept"][0]["reason"]
    assert data["changes"] == report.changes
    json.dumps(data)  # plain values only
    rebuilt = _rebuild(data)
    assert rebuilt == report and str(rebuilt) == text and rebuilt.to_dict() == data

    # norm insertions and renamed keys: the same on the model, in the table and through to_dict
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    report = prepare(net, x, norm="layer")
    assert isinstance(net[0][1], nn.LayerNorm)
    data = report.to_dict()
    inserted = {"layer": "0", "norm": "0.1", "module": "LayerNorm(16)", "position": "pre", "shape": (32, 16)}
    assert data["insertions"] == [{**inserted, "bias_removed": False}]
    assert data["renamed_keys"] == {"0.weight": "0.0.weight", "0.bias": "0.0.bias"}
    assert {"0.0.weight", "0.0.bias", "0.1.weight", "0.1.bias"} <= set(net.state_dict())
    text = str(report)
    assert "inserted LayerNorm(16) as 0.1 after 0 (pre-activation)" in text.splitlines()
    assert {"renamed key 0.weight -> 0.0.weight", "renamed key 0.bias -> 0.0.bias"} <= set(text.splitlines())
    rebuilt = _rebuild(data)
    assert rebuilt == report and str(rebuilt) == text and rebuilt.to_dict() == data


def test_overrides_by_glob_and_lsuv():
    """Glob overrides pick the scheme per layer (first match wins); "lsuv" reaches unit output variance."""
    torch.manual_seed(0)
    net = FunctionalMLP(4, 64, torch.tanh, in_features=16)
    x = torch.randn(256, 16)
    report = prepare(net, x, init="lsuv", overrides={"hidden.0": "kaiming", "hidden.*": "xavier"})
    schemes = {r.layer: r.scheme for r in report.layers}
    assert schemes == {"hidden.0": "kaiming", "hidden.1": "xavier", "hidden.2": "xavier", "hidden.3": "xavier"} | {
        "head": "lsuv"
    }
    assert abs(report.layers[-1].std_after ** 2 - 1) <= 0.1


def test_prepare_is_reproducible_with_a_seed():
    """The same seed gives the same weights whatever the global RNG state."""
    weights = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        net = mlp(3, 32, nn.GELU, in_features=8)
        torch.manual_seed(global_seed * 100)
        prepare(net, torch.ones(16, 8).cumsum(0), seed=7)
        weights.append(net.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def _state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


class NoLayers(nn.Module):
    def forward(self, x):
        return torch.relu(x)


BAD_CALLS = {
    "unknown scheme": (lambda: mlp(2, 8, in_features=4), {"init": "he_uniform"}, ValueError, "'he_uniform'"),
    "forward fails": (lambda: mlp(2, 8, in_features=4), {"example_input": torch.randn(3, 5)}, ValueError, "mat1"),
    "no layer": (NoLayers, {}, ValueError, "NoLayers"),
    "override matches nothing": (lambda: mlp(2, 8, in_features=4), {"overrides": {"enc*": "xavier"}}, ValueError,
                                 "'enc\\*'"),
    "bad override value": (lambda: mlp(2, 8, in_features=4), {"overrides": {"0": "zeros"}}, ValueError, "'zeros'"),
    "unknown norm": (lambda: mlp(2, 8, in_features=4), {"norm": "batchy"}, ValueError, "'batchy'"),
    "post after a function": (lambda: FunctionalMLP(2, 8, F.silu, in_features=4),
                              {"norm": "batch", "position": "post"}, ValueError, "'hidden.0'.*silu"),
    "norm does not fit": (lambda: mlp(2, 8, in_features=4), {"norm": "instance"}, ValueError, "'0'.*rank >= 3"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_raises_naming_the_value_and_leaves_the_model_untouched(case):
    """Each bad call raises an error naming the value; the state_dict is bit-identical to before."""
    build, kwargs, error, match = BAD_CALLS[case]
    torch.manual_seed(0)
    net = build()
    before, tree = _state(net), str(net)
    kwargs = {"example_input": torch.randn(3, 4)} | kwargs
    with pytest.raises(error, match=match):
        prepare(net, **kwargs)
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert str(net) == tree


def test_example_input_from_example_input_array_or_a_clear_error():
    """A LightningModule's example_input_array is used when none is given; without one the error says how."""
    module = BoringClassifier(mlp(2, 16))
    report = prepare(module)
    assert report.layers[0].layer == "net.0" and report.layers[0].shape == (32, 16)
    with pytest.raises(ValueError, match="example_input_array"):
        prepare(mlp(2, 16))


def test_prepare_resnet18_initializes_every_conv_and_zero_inits_the_residuals():
    """prepare on a ResNet-18 (11.7 M parameters, 2 x 3 x 64 x 64 input): He for the 20 convs (measured weight variance
    2 / fan_in), Xavier for fc, bn2 of all 8 blocks zeroed, every other norm at 1. Its time is measured by
    benchmarks/prepare_timing.py, not here."""
    torch.manual_seed(0)
    net = resnet18()
    report = prepare(net, torch.randn(2, 3, 64, 64), zero_init_residual=True)
    convs = [name for name, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20 and sum(p.numel() for p in net.parameters()) > 11_000_000
    assert [(r.layer, r.activation, r.scheme) for r in report.layers] == [
        *((name, "relu", "kaiming") for name in convs),
        ("fc", "identity", "xavier"),
    ]
    for name in ("conv1", "layers.2.downsample.0", "layers.7.conv2"):
        weight = net.get_submodule(name).weight
        assert weight.var().item() == pytest.approx(2 / weight[0].numel(), rel=0.1), name
    norms = {name: m.weight for name, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)}
    zeroed = {name for name in norms if name.endswith("bn2")}
    assert len(zeroed) == 8
    assert all(norms[name].abs().max().item() == 0.0 for name in zeroed)
    assert all(torch.equal(w, torch.ones_like(w)) for name, w in norms.items() if name not in zeroed)


# ---- AutoInit -----------------------------------------------------------------------------------------------------


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _fit_digits(tmp_path, callbacks, steps: int = 60, seed: int = 0, xavier_tanh: bool = False) -> list[float]:
    """Train the 20-layer, 64-wide tanh MLP on digits (SGD lr 0.05, batch 64); the training losses of every step.

    ``xavier_tanh``: Xavier normal with PyTorch's tanh gain 5/3 and zero biases, drawn from a generator of its own so
    the global RNG (and so the batches) is the same as in the other arms."""
    train, val = digits_data()
    torch.manual_seed(seed)
    net = mlp(20, 64, nn.Tanh)
    if xavier_tanh:
        generator = torch.Generator().manual_seed(seed)
        for layer in net:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_normal_(layer.weight, gain=nn.init.calculate_gain("tanh"), generator=generator)
                nn.init.zeros_(layer.bias)
    module = BoringClassifier(net, lr=0.05, batch_size=64, data=train, val_data=val)
    recorder = LossRecorder()
    trainer(tmp_path, max_steps=steps, callbacks=[*callbacks, recorder], logger=False).fit(module)
    return recorder.losses


def test_autoinit_trains_a_deep_tanh_mlp_to_a_lower_loss(tmp_path):
    """20-layer tanh MLP on digits, 60 steps, seeds 0-2, mean of the last 10 losses: PyTorch's default init stays at
    ln 10 (2.30) while AutoInit trains (0.75 / 0.53 / 0.64) — and so does the control that matters, Xavier with the
    tanh gain 5/3 (0.70 / 0.57 / 0.66): AutoInit is as good as Xavier(5/3) within the seed spread, not better."""
    ends: dict[str, list[float]] = {"default": [], "xavier_5/3": [], "auto": []}
    for seed in range(3):
        runs = {
            "default": _fit_digits(tmp_path / f"plain{seed}", [], seed=seed),
            "xavier_5/3": _fit_digits(tmp_path / f"xavier{seed}", [], seed=seed, xavier_tanh=True),
            "auto": _fit_digits(tmp_path / f"auto{seed}", [AutoInit(seed=seed)], seed=seed),
        }
        for arm, losses in runs.items():
            assert len(losses) == 60, arm
            ends[arm].append(sum(losses[-10:]) / 10)
    assert all(abs(end - math.log(10)) < 0.05 for end in ends["default"]), ends
    assert all(auto < 0.75 * plain for auto, plain in zip(ends["auto"], ends["default"])), ends
    assert all(xavier < 0.75 * plain for xavier, plain in zip(ends["xavier_5/3"], ends["default"])), ends
    mean = {arm: sum(values) / len(values) for arm, values in ends.items()}
    assert mean["auto"] <= mean["xavier_5/3"] + 0.1, ends  # at least as good as Xavier(5/3), within the seed spread


def test_autoinit_logs_the_report_to_tensorboard(tmp_path):
    """With a TensorBoardLogger the report is written as text `lightning_bn/init_report`, and kept on the callback."""
    callback = AutoInit()
    module = BoringClassifier(mlp(3, 16))
    logger = TensorBoardLogger(tmp_path)
    trainer(tmp_path, max_steps=1, callbacks=[callback], logger=logger).fit(module)
    assert callback.report is not None and [r.layer for r in callback.report.layers][:2] == ["net.0", "net.2"]
    assert any(tag.startswith(REPORT_TAG) for tag in event_tags(tmp_path).get("tensors", []))


def test_autoinit_resume_ends_with_the_checkpoint_weights(tmp_path):
    """trainer.fit(ckpt_path=...) with AutoInit restores the checkpoint's weights after the init ran in setup."""
    torch.manual_seed(0)
    module = BoringClassifier(mlp(3, 16))
    first = trainer(tmp_path, max_steps=3, callbacks=[AutoInit()])
    first.fit(module)
    ckpt = tmp_path / "last.ckpt"
    first.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["state_dict"]

    torch.manual_seed(1)
    fresh = BoringClassifier(mlp(3, 16))
    callback = AutoInit()
    # max_steps reached already: the resumed fit takes no step, so its weights are what the restore left
    trainer(tmp_path, max_steps=3, callbacks=[callback]).fit(fresh, ckpt_path=ckpt)
    assert callback.report is not None  # the init ran in setup, and the checkpoint then replaced it
    final = fresh.state_dict()
    assert saved.keys() == final.keys() and all(torch.equal(final[k], saved[k]) for k in saved)


def test_autoinit_rejects_bad_arguments_and_missing_example_input(tmp_path):
    """Bad arguments fail at construction naming the value; a module without example input fails at fit start."""
    with pytest.raises(MisconfigurationException, match="'glorot'"):
        AutoInit(init="glorot")
    with pytest.raises(MisconfigurationException, match="'batchy'"):
        AutoInit(norm="batchy")
    with pytest.raises(MisconfigurationException, match="'middle'"):
        AutoInit(norm="batch", position="middle")
    with pytest.raises(MisconfigurationException, match="'1'"):
        AutoInit(seed="1")
    module = BoringClassifier(mlp(2, 16))
    module.example_input_array = None
    with pytest.raises(MisconfigurationException, match="example_input_array"):
        trainer(tmp_path, max_steps=1, callbacks=[AutoInit()]).fit(module)
