"""Norm registry, insertion after layers, conversion between kinds (lightning_bn.norms) and prepare(norm=...)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_bn.callbacks.auto_init import AutoInit
from lightning_bn.norms import (
    BatchNormXd,
    ChannelsFirst,
    ChannelsLast,
    convert_norms,
    create_norm_layer,
    get_norm_layer,
    insert_norms,
    plan_insertions,
    register_norm,
)
from lightning_bn.prepare import prepare
from lightning_bn.tracing import output_stds, trace_activations
from tests.helpers import BoringClassifier, digits_data, mlp, trainer


def of_type(net: nn.Module, cls: type) -> list[str]:
    return [n for n, m in net.named_modules() if type(m) is cls]


def snapshot(net: nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    return str(net), {k: v.clone() for k, v in net.state_dict().items()}


def unchanged(net: nn.Module, before: tuple[str, dict[str, torch.Tensor]]) -> bool:
    text, state = before
    after = net.state_dict()
    return str(net) == text and state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)


class SequenceBlock(nn.Module):
    """Transformer-style MLP block on (N, T, C): Linear -> GELU -> Linear with a residual add, then a head."""

    def __init__(self, width: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.fc2(self.act(self.fc1(x)))
        return self.head(x.mean(1))


def cnn(dims: int = 2) -> nn.Sequential:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[dims]
    return nn.Sequential(conv(3, 12, 3), nn.ReLU(), conv(12, 24, 3), nn.ReLU(), pool(1), nn.Flatten(), nn.Linear(24, 5))


# ---- registry -----------------------------------------------------------------------------------------------------


def test_registry_resolves_names_classes_and_partials():
    """Names are normalized, torch classes map to their kind, partial keywords are bound, unknown names are listed."""
    assert {get_norm_layer(s).name for s in ("batch_norm", "BatchNorm", "batchnorm", "bn", "BatchNorm2d")} == {"batch"}
    assert get_norm_layer("SyncBatchNorm").name == "sync_batch" and get_norm_layer("layer_norm").name == "layer"
    assert get_norm_layer(nn.GroupNorm).name == "group" and get_norm_layer(nn.RMSNorm).name == "rms"
    assert get_norm_layer(None) is None
    group = get_norm_layer(functools.partial(nn.GroupNorm, num_groups=4))
    assert create_norm_layer(group, 16).num_groups == 4
    assert create_norm_layer("group", 24).num_groups == 8  # largest of 32, 16, 8, ... dividing 24
    with pytest.raises(ValueError, match="'batchy'.*"):
        get_norm_layer("batchy")
    with pytest.raises(ValueError, match="'batch'"):
        register_norm("batch", nn.BatchNorm1d)


@pytest.mark.parametrize(
    ("kind", "layout", "rank", "expected"),
    [
        ("batch", "channels_first", 2, nn.BatchNorm1d),
        ("batch", "channels_first", 4, nn.BatchNorm2d),
        ("batch", "channels_first", 5, nn.BatchNorm3d),
        ("batch", "channels_first", None, BatchNormXd),
        ("instance", "channels_first", 4, nn.InstanceNorm2d),
        ("layer", "channels_last", 3, nn.LayerNorm),
        ("rms", "channels_last", 2, nn.RMSNorm),
    ],
)
def test_create_norm_layer_picks_the_class_by_rank(kind, layout, rank, expected):
    """The rank picks BatchNorm1d/2d/3d; an unknown rank gives the rank-agnostic class; γ = 1 and β = 0."""
    norm = create_norm_layer(kind, 8, layout=layout, rank=rank)
    assert type(norm) is expected
    assert torch.equal(norm.weight, torch.ones(8))
    assert getattr(norm, "bias", None) is None or torch.equal(norm.bias, torch.zeros(8))


def test_registered_norm_is_used_by_insertion():
    """A user-registered kind is found by name and inserted like a built-in."""
    register_norm("half_group_demo", lambda c, **kw: nn.GroupNorm(c // 2, c, **kw), overwrite=True)
    net = mlp(2, 16, in_features=8)
    report = insert_norms(net, torch.randn(4, 8), norm="HalfGroupDemo")
    assert [net[i][1].num_groups for i in (0, 2)] == [8, 8] and len(report.insertions) == 2


# ---- insertion ----------------------------------------------------------------------------------------------------


def test_mlp_batch_inserts_one_batchnorm_per_hidden_layer_and_reports_it():
    """3 hidden layers -> 3 BatchNorm1d before the ReLUs, none after the logits; keys renamed, redundant biases gone."""
    torch.manual_seed(0)
    net = mlp(3, 32, in_features=8)
    x = torch.randn(64, 8)
    shape = net(x).shape
    report = prepare(net, x, norm="batch")
    assert len(of_type(net, nn.BatchNorm1d)) == 3 and of_type(net, nn.BatchNorm1d) == ["0.1", "2.1", "4.1"]
    assert isinstance(net[6], nn.Linear) and net[6].bias is not None  # the logits: no norm, bias kept
    assert net(x).shape == shape
    assert [(i.layer, i.norm, i.module, i.position, i.bias_removed) for i in report.insertions] == [
        (name, f"{name}.1", "BatchNorm1d(32)", "pre", True) for name in ("0", "2", "4")
    ]
    assert report.renamed_keys == {"0.weight": "0.0.weight", "2.weight": "2.0.weight", "4.weight": "4.0.weight"}
    assert report.removed_keys == ["0.bias", "2.bias", "4.bias"]
    keys = net.state_dict().keys()
    assert {"0.0.weight", "0.1.weight", "0.1.running_mean", "0.1.num_batches_tracked"} <= keys
    assert "0.0.bias" not in keys and net[0][0].bias is None
    assert "BatchNorm1d(32" in str(net) and "bias=False" in str(net[0][0])
    assert ("6", "norm not inserted: output layer") in [tuple(s) for s in report.skipped]
    text = str(report)
    assert "inserted BatchNorm1d(32) as 0.1 after 0 (pre-activation); bias removed" in text
    assert "renamed key 0.weight -> 0.0.weight" in text and "inserted 3 norms" in text
    assert report.to_dict()["renamed_keys"]["2.weight"] == "2.0.weight"
    # measured at the norm's output in eval mode: fresh running statistics (0, 1) pass the layer's output through
    assert report.layers[0].std_after == pytest.approx(output_stds(net, x, ["0.0"])["0.0"], rel=1e-4)


def test_autoinit_inserts_norms_before_the_optimizer_and_trains(tmp_path):
    """AutoInit(norm="batch") in a real Trainer: the optimizer holds the new norms' parameters and the loss drops."""
    train, val = digits_data()
    torch.manual_seed(0)
    module = BoringClassifier(mlp(3, 64), lr=0.1, batch_size=64, data=train, val_data=val)
    callback = AutoInit(norm="batch", seed=0)
    first = nn.functional.cross_entropy(module(train.tensors[0][:256]), train.tensors[1][:256]).item()
    trainer(tmp_path, max_steps=40, callbacks=[callback], logger=False).fit(module)
    assert len(of_type(module, nn.BatchNorm1d)) == 3 and len(callback.report.insertions) == 3
    bn = module.net[0][1]
    assert bn.num_batches_tracked.item() == 40 and not torch.equal(bn.weight, torch.ones(64))  # stepped by SGD
    module.eval()
    with torch.no_grad():
        last = nn.functional.cross_entropy(module(train.tensors[0][:256]), train.tensors[1][:256]).item()
    assert last < 0.3 * first, f"loss {first:.3f} -> {last:.3f}"


@pytest.mark.parametrize(("dims", "cls"), [(1, nn.BatchNorm1d), (2, nn.BatchNorm2d), (3, nn.BatchNorm3d)])
def test_cnn_batch_norm_matches_the_conv_rank(dims, cls):
    """Conv1d/2d/3d get BatchNorm1d/2d/3d over their channels; the conv biases go; the Linear head gets none."""
    net = cnn(dims)
    x = torch.randn(4, 3, *[8] * dims)
    report = insert_norms(net, x, norm="batch")
    assert [(n, net.get_submodule(n).num_features) for n in of_type(net, cls)] == [("0.1", 12), ("2.1", 24)]
    assert net[0][0].bias is None and len(report.insertions) == 2 and net(x).shape == (4, 5)


def test_cnn_group_norm_gets_a_group_count_dividing_the_channels():
    """GroupNorm after each conv: 12 channels -> 4 groups, 24 -> 8; biases kept (GN does not center per channel)."""
    net = cnn(2)
    report = insert_norms(net, torch.randn(2, 3, 8, 8), norm="group")
    groups = [(net.get_submodule(n).num_groups, net.get_submodule(n).num_channels) for n in of_type(net, nn.GroupNorm)]
    assert groups == [(4, 12), (8, 24)] and all(c % g == 0 for g, c in groups)
    assert net[0][0].bias is not None and report.removed_keys == []
    assert report.renamed_keys == {"0.weight": "0.0.weight", "0.bias": "0.0.bias", "2.weight": "2.0.weight",
                                   "2.bias": "2.0.bias"}  # fmt: skip


def test_cnn_layer_norm_is_a_channel_layer_norm():
    """norm="layer" on (N, C, H, W) normalizes over C at each position (ConvNeXt-style), via ChannelsFirst."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 2, 1))
    insert_norms(net, torch.randn(2, 3, 6, 6), norm="layer")
    norm = net[0][1]
    assert isinstance(norm, ChannelsFirst) and norm.norm.normalized_shape == (8,)
    y = norm(torch.randn(2, 8, 4, 4) * 3 + 1)
    assert y.mean(1).abs().max().item() < 1e-5 and (y.var(1, unbiased=False) - 1).abs().max().item() < 1e-3


def test_sequence_block_gets_layer_norm_over_channels():
    """(N, T, C) from a Linear: norm="layer" gives LayerNorm(C) on fc1 and fc2; the head gets none."""
    net = SequenceBlock()
    report = insert_norms(net, torch.randn(4, 10, 16), norm="layer")
    assert [(n, net.get_submodule(n).normalized_shape) for n in of_type(net, nn.LayerNorm)] == [
        ("fc1.1", (32,)),
        ("fc2.1", (16,)),
    ]
    assert [i.layer for i in report.insertions] == ["fc1", "fc2"]


@pytest.mark.parametrize("time_steps", [10, 32])  # 32 = channels: a wrong axis would not fail on shape
def test_sequence_batch_norm_normalizes_over_channels(time_steps):
    """BatchNorm on (N, T, C) normalizes each channel over N and T: matches a hand-computed reference to 1e-5."""
    torch.manual_seed(0)
    net = SequenceBlock()
    insert_norms(net, torch.randn(4, time_steps, 16), norm="batch")
    norm = net.fc1[1]
    assert isinstance(norm, ChannelsLast) and norm.norm.num_features == 32
    h = torch.randn(8, time_steps, 32) * torch.linspace(0.5, 3, 32) + torch.linspace(-2, 2, 32)
    mean = h.mean(dim=(0, 1))
    var = h.var(dim=(0, 1), unbiased=False)
    reference = (h - mean) / torch.sqrt(var + norm.norm.eps)
    with torch.no_grad():
        error = (norm(h) - reference).abs().max().item()
    assert error < 1e-5, f"max |BN - reference| = {error:.2e}"
    assert torch.allclose(norm.norm.running_mean, 0.1 * mean, atol=1e-6)


@pytest.mark.parametrize(
    ("build", "shape", "expected"),
    [
        (lambda: mlp(2, 16, in_features=8), (32, 8), nn.BatchNorm1d),
        (lambda: mlp(2, 16, in_features=8), (4, 8), nn.LayerNorm),
        (cnn, (32, 3, 8, 8), nn.BatchNorm2d),
        (cnn, (4, 3, 8, 8), nn.GroupNorm),
        (SequenceBlock, (32, 10, 16), nn.LayerNorm),
    ],
)
def test_auto_picks_by_shape_and_batch_size(build, shape, expected):
    """norm="auto": BatchNorm for batches >= 16, LayerNorm for tiny MLP batches and sequences, GroupNorm for convs."""
    net = build()
    report = insert_norms(net, torch.randn(*shape), norm="auto")
    assert len(report.insertions) == 2 and len(of_type(net, expected)) == 2


def test_layers_already_followed_by_a_norm_are_left_alone():
    """A layer whose output feeds a norm is skipped, naming that norm; a second insertion inserts nothing."""
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    x = torch.randn(32, 8)
    report = insert_norms(net, x, norm="batch")
    assert [i.layer for i in report.insertions] == ["3"]
    assert ("0", "norm not inserted: already followed by norm '1'") in report.skipped
    again = insert_norms(net, x, norm="batch")
    assert again.insertions == [] and len(of_type(net, nn.BatchNorm1d)) == 2


def test_output_layer_behind_a_function_gets_no_norm():
    """The logits layer gets no norm even when log_softmax / sigmoid follows it (found on the autograd graph)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)

        def forward(self, x):
            return F.log_softmax(self.head(torch.sigmoid(self.b(F.relu(self.a(x))))), dim=-1)

    report = insert_norms(Net(), torch.randn(32, 8), norm="layer")
    assert [i.layer for i in report.insertions] == ["a", "b"]
    assert ("head", "norm not inserted: output layer") in report.skipped


def test_post_position_wraps_the_activation_and_keeps_the_layer_keys():
    """position="post": ReLU -> Sequential(ReLU, BatchNorm1d); layer keys and biases are untouched."""
    net = mlp(2, 16, in_features=8)
    keys = set(net.state_dict())
    report = insert_norms(net, torch.randn(32, 8), norm="batch", position="post")
    assert [type(m) for m in net[1]] == [nn.ReLU, nn.BatchNorm1d] and isinstance(net[0], nn.Linear)
    assert keys <= set(net.state_dict()) and report.renamed_keys == {} and report.removed_keys == []
    assert [(i.layer, i.norm, i.position) for i in report.insertions] == [("0", "1.1", "post"), ("2", "3.1", "post")]


def test_exclude_keep_bias_dtype_and_mode():
    """exclude globs skip layers; keep_bias keeps the bias; new norms take the layer's dtype and eval mode."""
    net = mlp(3, 16, in_features=8).double().eval()
    report = insert_norms(net, torch.randn(32, 8, dtype=torch.float64), norm="batch", exclude=["2"], keep_bias=True)
    assert [i.layer for i in report.insertions] == ["0", "4"] and ("2", "norm not inserted: excluded") in report.skipped
    assert net[0][0].bias is not None and report.removed_keys == []
    assert net[0][1].weight.dtype == torch.float64 and not net[0][1].training


def test_sigmoid_mlp_with_unit_normal_weights_learns_with_batch_norm(tmp_path):
    """10-layer sigmoid MLP, N(0, 1) weights, digits, 150 SGD steps: with BatchNorm val accuracy is far higher."""
    train, val = digits_data()

    def accuracy(with_norm: bool) -> float:
        torch.manual_seed(0)
        net = mlp(10, 64, nn.Sigmoid)
        for m in net.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 1.0)
                nn.init.zeros_(m.bias)
        if with_norm:
            assert len(insert_norms(net, train.tensors[0][:128], norm="batch").insertions) == 10
        module = BoringClassifier(net, lr=0.1, batch_size=64, data=train, val_data=val)
        trainer(tmp_path / str(with_norm), max_steps=150, logger=False).fit(module)
        net.eval()
        with torch.no_grad():
            return (net(val.tensors[0]).argmax(-1) == val.tensors[1]).float().mean().item()

    plain, normed = accuracy(False), accuracy(True)
    assert normed > 0.8 and normed > plain + 0.2, f"val accuracy: plain {plain:.3f}, BatchNorm {normed:.3f}"


# ---- conversion ---------------------------------------------------------------------------------------------------


def _trained_bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1))
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 2.0)
        net[1].bias.uniform_(-1.0, 1.0)
        for _ in range(3):
            net(torch.randn(8, 3, 6, 6) * 2 + 1)
    return net


def test_convert_batch_to_group_keeps_gamma_and_beta():
    """BN -> GN in place: γ and β bit-identical, the group count divides the channels, keys unchanged."""
    net = _trained_bn_net()
    gamma, beta = net[1].weight.clone(), net[1].bias.clone()
    report = convert_norms(net, "group", num_groups=4)
    assert type(net[1]) is nn.GroupNorm and net[1].num_groups == 4
    assert torch.equal(net[1].weight, gamma) and torch.equal(net[1].bias, beta)
    assert report.conversions[0].carried == ["weight", "bias"] and report.renamed_keys == {}
    assert report.removed_keys == ["1.running_mean", "1.running_var", "1.num_batches_tracked"]
    assert net(torch.randn(1, 3, 6, 6)).shape == (1, 8, 4, 4)


def test_convert_batch_to_sync_and_back_round_trips_running_stats():
    """BN -> SyncBN -> BN: weights and running statistics bit-identical, eval outputs equal; with an example input
    the original BatchNorm2d class comes back, without it the rank-agnostic BatchNormXd."""
    net = _trained_bn_net().double()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    expected = net.eval()(x)
    convert_norms(net, "sync_batch")
    assert type(net[1]) is nn.SyncBatchNorm and net[1].running_mean.dtype == torch.float64
    convert_norms(net, "batch", example_input=x)
    assert type(net[1]) is nn.BatchNorm2d and not net[1].training
    after = net.state_dict()
    errors = {k: (after[k].double() - before[k].double()).abs().max().item() for k in before}
    assert before.keys() == after.keys() and max(errors.values()) == 0.0, errors
    assert torch.equal(net(x), expected)
    convert_norms(net, "sync_batch")
    convert_norms(net, "batch")
    assert type(net[1]) is BatchNormXd and torch.equal(net[1].running_var, before["1.running_var"])


def test_convert_layer_norm_in_a_sequence_model_keeps_the_layout():
    """LayerNorm(C) on (N, T, C) -> GroupNorm wrapped in ChannelsLast; -> layer again on GN unwraps the keys."""
    net = SequenceBlock()
    insert_norms(net, torch.randn(4, 10, 16), norm="layer")
    report = convert_norms(net, "group", num_groups=1)
    assert isinstance(net.fc1[1], ChannelsLast) and type(net.fc1[1].norm) is nn.GroupNorm
    assert report.renamed_keys["fc1.1.weight"] == "fc1.1.norm.weight"
    assert net(torch.randn(2, 10, 16)).shape == (2, 3)


def test_convert_validates_before_changing_anything():
    """A group count that divides no channel count, or instance norm on (N, C), raises naming the norm; no change."""
    net = nn.Sequential(nn.Linear(8, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 16), nn.BatchNorm1d(16))
    before = snapshot(net)
    with pytest.raises(ValueError, match="'1'.*5"):
        convert_norms(net, "group", num_groups=5)
    with pytest.raises(ValueError, match="'1'.*rank"):
        convert_norms(net, "instance", example_input=torch.randn(4, 8))
    with pytest.raises(ValueError, match="'nonsense'"):
        convert_norms(net, "nonsense")
    assert unchanged(net, before)


# ---- bad input ----------------------------------------------------------------------------------------------------


class FunctionalAct(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(8, 16), nn.Linear(16, 2)

    def forward(self, x):
        return self.head(F.gelu(self.fc(x)))


class SharedAct(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head, self.act = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 2), nn.ReLU()

    def forward(self, x):
        return self.head(self.act(self.b(self.act(self.a(x)))))


BAD_NORMS = {
    "unknown norm": (lambda: mlp(2, 16, in_features=8), (32, 8), {"norm": "batchy"}, "'batchy'"),
    "bad position": (lambda: mlp(2, 16, in_features=8), (32, 8), {"norm": "batch", "position": "mid"}, "'mid'"),
    "post after a function": (FunctionalAct, (32, 8), {"norm": "batch", "position": "post"}, "'fc'.*gelu.*function"),
    "post after a shared module": (SharedAct, (32, 8), {"norm": "batch", "position": "post"}, "'a'.*'act'"),
    "groups do not divide": (lambda: mlp(2, 16, in_features=8), (32, 8),
                             {"norm": functools.partial(nn.GroupNorm, num_groups=5)}, "'0'.*16 channels.*5"),
    "instance norm on (N, C)": (lambda: mlp(2, 16, in_features=8), (32, 8), {"norm": "instance"}, "'0'.*rank"),
    "batch norm on a 1-D output": (lambda: mlp(2, 16, in_features=8), (8,), {"norm": "batch"}, "'0'.*rank >= 2"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_NORMS))
def test_bad_norm_requests_raise_naming_the_layer_and_leave_the_model_untouched(case):
    """Each bad request raises ValueError naming the layer / value; str(model) and state_dict are bit-identical."""
    build, shape, kwargs, match = BAD_NORMS[case]
    torch.manual_seed(0)
    net = build()
    before = snapshot(net)
    with pytest.raises(ValueError, match=match):
        prepare(net, torch.randn(*shape), **kwargs)
    assert unchanged(net, before)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"norm": "batchy"}, "'batchy'"),
        ({"norm": 3}, "got 3"),
        ({"norm": "batch", "position": "after"}, "'after'"),
    ],
)
def test_autoinit_rejects_a_bad_norm_at_construction(kwargs, named):
    """AutoInit(norm=..., position=...) is checked in __init__: exactly MisconfigurationException, naming AutoInit and
    the bad value; no callback comes out of it."""
    built = []
    with pytest.raises(MisconfigurationException) as err:
        built.append(AutoInit(**kwargs))
    assert err.type is MisconfigurationException
    assert "AutoInit" in str(err.value) and named in str(err.value)
    assert built == []
    good = AutoInit(norm="group", position="post", exclude=["net.0"])
    assert (good.norm, good.position, tuple(good.exclude)) == ("group", "post", ("net.0",))


# ---- reliability: arguments, shared modules, idempotent insertion ---------------------------------------------------


def _bn_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"to": "group", "num_groups": 2.0}, ValueError, r"`num_groups`.*2\.0"),
        ({"to": "group", "num_groups": True}, ValueError, r"`num_groups`.*True"),
        ({"to": "group", "num_groups": 0}, ValueError, r"`num_groups`.* 0$"),
        ({"to": "group", "num_groups": -4}, ValueError, r"`num_groups`.*-4"),
        ({"to": "group", "exclude": "bn"}, TypeError, r"`exclude`.*'bn'"),
        ({"to": "group", "exclude": ["1", 3]}, TypeError, r"`exclude`.*\['1', 3\]"),
        ({"to": "instance"}, ValueError, r"'1' \(BatchNorm1d\).*rank.*example_input="),
        ({"to": "instance", "example_input": torch.randn(4, 8)}, ValueError, r"'1'.*rank"),
        ({"to": "batch", "example_input": torch.randn(4, 5)}, ValueError, r"Sequential\.forward.*mat1 and mat2"),
    ],
    ids=["groups float", "groups bool", "groups zero", "groups negative", "exclude str", "exclude non-str",
         "instance unknown rank", "instance rank 2", "input failing in forward"],
)  # fmt: skip
def test_convert_checks_its_arguments_before_changing_anything(kwargs, error, match):
    """A float / bool / non-positive group count, a string exclude, instance norm on a norm of unknown rank without
    an example input: refused naming the value (or norm), and the model is bit-identical afterwards."""
    net = _bn_mlp()
    before = snapshot(net)
    with pytest.raises(error, match=match):
        convert_norms(net, **kwargs)
    assert unchanged(net, before)
    assert net(torch.randn(4, 8)).shape == (4, 4)


def test_convert_to_instance_with_a_known_rank_needs_no_example_input():
    """BatchNorm2d says its rank: InstanceNorm2d without an example input; BatchNorm1d on (N, C, L) with one."""
    net = _trained_bn_net()
    convert_norms(net, "instance")
    assert type(net[1]) is nn.InstanceNorm2d and net(torch.randn(2, 3, 6, 6)).shape == (2, 8, 4, 4)
    seq = nn.Sequential(nn.Conv1d(3, 8, 3), nn.BatchNorm1d(8), nn.ReLU(), nn.Conv1d(8, 2, 1))
    convert_norms(seq, "instance", example_input=torch.randn(2, 3, 10))
    assert type(seq[1]) is nn.InstanceNorm1d and seq(torch.randn(2, 3, 10)).shape == (2, 2, 8)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"exclude": "0"}, TypeError, r"`exclude`.*'0'"),
        ({"exclude": [0]}, TypeError, r"`exclude`.*\[0\]"),
        ({"keep_bias": "yes"}, ValueError, r"`keep_bias`.*'yes'"),
        ({"keep_bias": 1}, ValueError, r"`keep_bias`.*1"),
        ({"position": "mid"}, ValueError, r"`position`.*'mid'"),
        ({"position": 3}, ValueError, r"`position`.*3"),
        ({"norm": None}, ValueError, r"`norm`.*None"),
    ],
    ids=["exclude str", "exclude non-str", "keep_bias str", "keep_bias int", "position str", "position int", "no norm"],
)
def test_insert_checks_its_arguments_before_changing_anything(kwargs, error, match):
    """insert_norms and plan_insertions refuse a string exclude, a non-bool keep_bias, a bad position, naming it."""
    net = mlp(2, 16, in_features=8)
    before = snapshot(net)
    x = torch.randn(32, 8)
    with pytest.raises(error, match=match):
        insert_norms(net, x, **{"norm": "batch", **kwargs})
    with pytest.raises(error, match=match):
        plan_insertions(net, x, trace_activations(net, x), **{"norm": "batch", **kwargs})
    assert unchanged(net, before)


def test_convert_and_insert_refuse_a_model_that_is_no_module():
    with pytest.raises(TypeError, match=r"`model`.*'net'"):
        convert_norms("net", "group")
    with pytest.raises(TypeError, match=r"`model`.*'net'"):
        insert_norms("net", torch.randn(4, 8))


class SharedNorm(nn.Module):
    """One BatchNorm1d registered under two names and called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.a = self.b = nn.BatchNorm1d(8)

    def forward(self, x):
        return self.head(F.relu(self.b(self.fc2(F.relu(self.a(self.fc1(x)))))))


def test_convert_a_shared_norm_sets_the_new_module_under_every_name():
    """net.a = net.b = BatchNorm1d: converted once, the GroupNorm set under both names; the keys of both reported."""
    torch.manual_seed(0)
    net = SharedNorm()
    with torch.no_grad():
        net.a.weight.uniform_(0.5, 2.0)
    gamma = net.a.weight.clone()
    report = convert_norms(net, "group", num_groups=2)
    assert net.a is net.b and type(net.a) is nn.GroupNorm and torch.equal(net.b.weight, gamma)
    assert [c.name for c in report.conversions] == ["a"]
    assert {"a.running_mean", "b.running_mean"} <= set(report.removed_keys)
    assert net(torch.randn(4, 8)).shape == (4, 2)
    excluded = SharedNorm()
    assert convert_norms(excluded, "group", exclude=["b"]).conversions == []  # any alias excluded: left alone
    assert type(excluded.a) is nn.BatchNorm1d and excluded.a is excluded.b


def test_convert_a_norm_shared_inside_and_outside_a_wrapper_is_refused():
    """A BatchNorm both bare and inside ChannelsLast cannot be converted consistently: ValueError naming every name."""
    net = nn.Sequential(nn.Linear(8, 8))
    net.bn = nn.BatchNorm1d(8)
    net.wrapped = ChannelsLast(net.bn)
    before = snapshot(net)
    with pytest.raises(ValueError, match=r"'wrapped\.norm', 'bn'"):
        convert_norms(net, "group", num_groups=2)
    assert unchanged(net, before)


class SharedLinear(nn.Module):
    """One Linear registered under two names (fc, again) and called twice, between ReLUs."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.fc, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 2)
        self.again = self.fc

    def forward(self, x):
        return self.head(F.relu(self.again(F.relu(self.fc(F.relu(self.inp(x)))))))


@pytest.mark.parametrize("via", ["insert_norms", "prepare"])
def test_insert_after_a_shared_layer_wraps_every_alias_with_the_same_module(via):
    """The Linear under fc and again: both names get the same Sequential(Linear, BatchNorm1d), the bias goes once,
    and the keys of both names are reported; the model still runs and the aliases are still one module."""
    torch.manual_seed(0)
    net = SharedLinear()
    x = torch.randn(32, 8)
    report = insert_norms(net, x, norm="batch") if via == "insert_norms" else prepare(net, x, norm="batch")
    assert net.fc is net.again and isinstance(net.fc, nn.Sequential) and isinstance(net.fc[1], nn.BatchNorm1d)
    assert net.fc[0].bias is None and [i.layer for i in report.insertions] == ["inp", "fc"]
    assert {"fc.weight": "fc.0.weight", "again.weight": "again.0.weight"}.items() <= report.renamed_keys.items()
    assert {"fc.bias", "again.bias"} <= set(report.removed_keys)
    assert set(report.removed_keys) | set(net.state_dict()) >= set(report.renamed_keys.values())
    assert net(x).shape == (32, 2)


def test_exclude_matching_any_alias_of_a_shared_layer_leaves_it_alone():
    net = SharedLinear()
    report = insert_norms(net, torch.randn(32, 8), norm="batch", exclude=["again"])
    assert [i.layer for i in report.insertions] == ["inp"] and ("fc", "norm not inserted: excluded") in report.skipped
    assert isinstance(net.fc, nn.Linear) and net.fc is net.again and net.fc.bias is not None


@pytest.mark.parametrize("position", ["pre", "post"])
def test_prepare_twice_inserts_no_second_norm(position):
    """prepare(norm="batch") twice, "pre" or "post": same module tree and BatchNorm count; the second call reports
    every site as already followed by a norm."""
    torch.manual_seed(0)
    net = mlp(2, 16, in_features=8)
    x = torch.randn(32, 8)
    first = prepare(net, x, norm="batch", position=position)
    tree, count = str(net), len(of_type(net, nn.BatchNorm1d))
    second = prepare(net, x, norm="batch", position=position)
    assert str(net) == tree and len(of_type(net, nn.BatchNorm1d)) == count == len(first.insertions) == 2
    assert second.insertions == [] and second.renamed_keys == {} and second.removed_keys == []
    reasons = [s.reason for s in second.skipped if "already followed by norm" in s.reason]
    assert len(reasons) == 2, second.skipped
    assert net(x).shape == (32, 10)


@pytest.mark.parametrize("position", ["pre", "post"])
def test_insert_norms_twice_is_idempotent_for_any_registered_norm(position):
    """insert_norms twice with a norm the trace does not know as one (a registered class): no second norm."""

    class ScaleNorm(nn.Module):
        def __init__(self, num_features: int, **kwargs) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(num_features))

        def forward(self, x):
            return self.weight * x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)

    register_norm("scale_demo", ScaleNorm, channels="last", types=(ScaleNorm,), overwrite=True)
    net = mlp(2, 16, in_features=8)
    x = torch.randn(32, 8)
    insert_norms(net, x, norm="scale_demo", position=position)
    tree = str(net)
    again = insert_norms(net, x, norm="scale_demo", position=position)
    assert str(net) == tree and again.insertions == [] and len(of_type(net, ScaleNorm)) == 2
    assert all("already followed by norm" in r for n, r in again.skipped if n != "4")
