"""The layer registry and the default that respects deliberate inits: what prepare() keeps, what it forces, and the
attention logit scale (T5 folds 1/sqrt(d) into the query's init)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lightning_bn
from lightning_bn.init import init_layer_
from lightning_bn.layers import LayerKind, WeightSpec, get_layer_kind, layer_fans, register_layer
from tests.zoo import T5LikeNet, run_model


def _entropy(model: T5LikeNet, ids: torch.Tensor) -> float:
    """Mean entropy (nats) of the attention probabilities of the T5-like block on ``ids``."""
    seen = {}

    def grab(module, args, output):
        seen[module] = output

    attn = model.attn
    handles = [m.register_forward_hook(grab) for m in (attn.q, attn.k)]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    n, t, c = seen[attn.q].shape
    q = seen[attn.q].view(n, t, attn.heads, attn.d_kv).transpose(1, 2)
    k = seen[attn.k].view(n, t, attn.heads, attn.d_kv).transpose(1, 2)
    p = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
    return float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())


@pytest.mark.parametrize("init", ["auto", "xavier", "kaiming", "lsuv"])
def test_t5_attention_entropy_survives_prepare(init):
    """Entropy of the attention probabilities after prepare() is within 10% of before, whatever the init."""
    torch.manual_seed(0)
    model = T5LikeNet().eval()
    ids = torch.randint(0, 100, (4, 16))
    before = _entropy(model, ids)
    report = lightning_bn.prepare(model, ids, init=init)
    after = _entropy(model, ids)
    assert abs(after - before) <= 0.1 * before, (before, after)
    if init != "auto":  # forced: q and k were drawn anew, then put back to their logit scale
        assert {"attn.q", "attn.k"} <= {r.layer for r in report.layers}
        assert any("logit scale kept" in c for c in report.changes)
    else:
        assert {k.layer for k in report.kept} >= {"attn.q", "attn.k"}


def test_naive_reinit_of_the_query_would_collapse_attention():
    """The case is real: Xavier on q without the rescale changes the entropy by far more than 10%."""
    torch.manual_seed(0)
    model = T5LikeNet().eval()
    ids = torch.randint(0, 100, (4, 16))
    before = _entropy(model, ids)
    init_layer_(model.attn.q, "xavier")
    init_layer_(model.attn.k, "xavier")
    assert abs(_entropy(model, ids) - before) > 0.1 * before


def _gpt2_like():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=100, n_positions=32)
    return transformers.GPT2LMHeadModel(config).eval(), {"input_ids": torch.randint(0, 100, (2, 16))}


def test_tied_embedding_is_kept_once_with_every_alias_named():
    """GPT-2's lm_head.weight is transformer.wte.weight: one kept row naming both, the tensor untouched."""
    model, x = _gpt2_like()
    before = model.transformer.wte.weight.detach().clone()
    report = lightning_bn.prepare(model, x)
    rows = [k for k in report.kept if "tied" in k.reason]
    assert len(rows) == 1 and "lm_head.weight" in rows[0].reason and "transformer.wte.weight" in rows[0].reason
    assert torch.equal(model.transformer.wte.weight, before) and model.lm_head.weight is model.transformer.wte.weight
    assert "lm_head" not in [s.layer for s in report.skipped]


def test_forced_init_draws_a_tied_tensor_once_and_names_its_aliases():
    """With init='xavier' the tied tensor is drawn once, its row lists the aliases, and the tie holds."""
    model, x = _gpt2_like()
    report = lightning_bn.prepare(model, x, init="xavier", seed=0)
    rows = [r for r in report.layers if "lm_head.weight" in r.aliases]
    assert len(rows) == 1 and "transformer.wte.weight" in rows[0].aliases
    assert model.lm_head.weight is model.transformer.wte.weight
    assert "tied transformer.wte: also lm_head.weight" in str(report)


def test_gpt2_conv1d_layers_are_initialized_and_listed():
    """transformers' Conv1D (weight stored (in, out)) is a registered layer: c_fc gets GELU's gain, right fans."""
    from transformers.pytorch_utils import Conv1D

    model, x = _gpt2_like()
    report = lightning_bn.prepare(model, x)
    rows = {r.layer: r for r in report.layers}
    c_fc = rows["transformer.h.0.mlp.c_fc"]
    assert c_fc.type == "Conv1D" and c_fc.activation == "gelu(approximate=tanh)" and c_fc.corrected
    assert rows["transformer.h.0.mlp.c_proj"].scheme == "xavier"
    layer = Conv1D(256, 64)
    assert layer_fans(layer) == (64.0, 256.0)
    init_layer_(layer, "kaiming", lightning_bn.activations.get_activation("relu"))
    assert layer.weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.05)
    mlp = nn.Sequential(Conv1D(32, 16), nn.ReLU(), Conv1D(4, 32))
    assert [r.layer for r in lightning_bn.prepare(mlp, torch.randn(64, 16)).layers] == ["0", "2"]


def test_zero_head_embeddings_and_layerscale_are_kept_with_reasons():
    """A zero-initialized head stays zero, embeddings keep their scale, constant gains are listed."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = nn.Embedding(100, 32), nn.Embedding(16, 32)
            nn.init.normal_(self.tok.weight, std=0.02)
            nn.init.normal_(self.pos.weight, std=0.02)
            self.fc, self.gamma = nn.Linear(32, 32), nn.Parameter(1e-5 * torch.ones(32))
            self.head = nn.Linear(32, 10)
            nn.init.zeros_(self.head.weight)

        def forward(self, ids):
            x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
            x = x + self.gamma * torch.relu(self.fc(x))
            return self.head(x.mean(1))

    torch.manual_seed(0)
    net = Net()
    report = lightning_bn.prepare(net, torch.randint(0, 100, (8, 16)))
    reasons = {k.layer: k.reason for k in report.kept}
    assert reasons["head"].startswith("all zero") and net.head.weight.abs().max() == 0
    assert "embedding" in reasons["tok"] and "embedding" in reasons["pos"]
    assert net.tok.weight.std().item() == pytest.approx(0.02, rel=0.1)  # token and position embeddings: same scale
    assert net.pos.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert "LayerScale" in reasons["gamma"]
    assert [r.layer for r in report.layers] == ["fc"]
    forced = lightning_bn.prepare(net, torch.randint(0, 100, (8, 16)), overrides={"head": "xavier"})
    assert "head" in [r.layer for r in forced.layers] and net.head.weight.abs().max() > 0


def test_multihead_attention_is_a_layer():
    """nn.MultiheadAttention: kept by default (q, k inside); forced, its packed in_proj is drawn per block with the
    query/key scale kept, and out_proj is not reported 'not called'."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 2, 64, batch_first=True, dropout=0.0)
    x = torch.randn(4, 8, 32)
    auto = lightning_bn.prepare(layer, x)
    assert "self_attn" in {k.layer for k in auto.kept}
    assert "self_attn.out_proj" not in [s.layer for s in auto.skipped]
    qk = layer.self_attn.in_proj_weight[:64].detach().pow(2).mean().sqrt().item()
    forced = lightning_bn.prepare(layer, x, init="xavier")
    assert "self_attn" in [r.layer for r in forced.layers]
    assert layer.self_attn.in_proj_weight[:64].pow(2).mean().sqrt().item() == pytest.approx(qk, rel=1e-5)
    v = layer.self_attn.in_proj_weight[64:]
    assert v.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.15)  # xavier per block: fans (32, 32)
    assert layer.self_attn.in_proj_bias.abs().max() == 0


def test_users_can_register_a_layer_kind():
    """A registered kind is traced, initialized on its fans and reported."""

    class Bilinearish(nn.Module):
        def __init__(self, n, m):
            super().__init__()
            self.kernel = nn.Parameter(torch.ones(m, n))

        def forward(self, x):
            return x @ self.kernel.T

    register_layer(
        LayerKind("bilinearish_test", lambda mod: [WeightSpec("kernel", mod.kernel.shape[1], mod.kernel.shape[0])],
                  types=(Bilinearish,)),
        overwrite=True,
    )  # fmt: skip
    net = nn.Sequential(Bilinearish(16, 64), nn.Tanh(), nn.Linear(64, 2))
    assert get_layer_kind(net[0]).name == "bilinearish_test"
    report = lightning_bn.prepare(net, torch.randn(128, 16), overrides={"0": "xavier"})
    row = next(r for r in report.layers if r.layer == "0")
    xavier_tanh = math.sqrt(2 / (16 + 64)) * lightning_bn.activations.get_activation("tanh").gain
    assert row.activation == "tanh" and net[0].kernel.std().item() == pytest.approx(xavier_tanh, rel=0.1)
    assert torch.isfinite(run_model(net, torch.randn(4, 16))).all()
