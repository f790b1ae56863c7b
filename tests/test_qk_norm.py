"""QK-norm (issue #26): a norm over the head dimension on the queries and keys of every attention, in one call."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

import lightning_bn
from lightning_bn.norms import QKNorm, QKNormMultiheadAttention, insert_qk_norm
from tests.zoo import ZOO, main_output, run_model

ZOO_CASES = ["gpt2", "llama", "bert", "vit", "t5", "lightning_transformer", "vit_layer_scale", "t5_like_attention"]


def _case(name: str):
    try:
        return ZOO[name]()
    except ImportError as err:  # pragma: no cover - an older / newer transformers
        pytest.skip(str(err))


class _Logits(TorchFunctionMode):
    """Capture ``q·kᵀ`` (unscaled) of every ``scaled_dot_product_attention`` call: the pre-softmax logits."""

    def __init__(self) -> None:
        super().__init__()
        self.logits: list[Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k = args[0], args[1]
            if k.shape[-3] != q.shape[-3]:  # grouped-query attention passed with enable_gqa
                k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
            self.logits.append((q @ k.transpose(-2, -1)).detach().clone())
        return func(*args, **kwargs)


def _logits(model: nn.Module, example) -> list[Tensor]:
    if type(model) is nn.MultiheadAttention:  # its attention runs inside F.multi_head_attention_forward: by hand
        x, e, h = example[0], model.embed_dim, model.num_heads
        with torch.no_grad():
            q, k = (F.linear(x, model.in_proj_weight[i * e : (i + 1) * e], model.in_proj_bias[i * e : (i + 1) * e])
                    for i in (0, 1))  # fmt: skip
            q, k = (t.unflatten(-1, (h, e // h)).transpose(1, 2) for t in (q, k))
            return [q @ k.transpose(-2, -1)]
    mode = _Logits()
    with torch.no_grad(), mode:
        run_model(model, example)
    return mode.logits


# --- plain PyTorch attentions (what an example builds) -------------------------------------------------------------


class SeparateAttention(nn.Module):
    """q / k / v Linear layers, SDPA or eager softmax, optional grouped-query keys."""

    def __init__(self, dim: int = 32, heads: int = 4, kv_heads: int | None = None, eager: bool = False) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.hd, self.eager = heads, kv_heads or heads, dim // heads, eager
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, self.kv_heads * self.hd)
        self.v_proj = nn.Linear(dim, self.kv_heads * self.hd)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        if self.kv_heads != self.heads:  # transformers' repeat_kv
            groups = self.heads // self.kv_heads
            k = k[:, :, None].expand(b, self.kv_heads, groups, t, self.hd).reshape(b, self.heads, t, self.hd)
            v = v[:, :, None].expand(b, self.kv_heads, groups, t, self.hd).reshape(b, self.heads, t, self.hd)
        if self.eager:
            w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.hd), dim=-1)
            out = w @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class QwenLikeAttention(SeparateAttention):
    """Its own ``q_norm`` / ``k_norm`` over the head dimension (Qwen3)."""

    def __init__(self) -> None:
        super().__init__()
        self.q_norm, self.k_norm = nn.RMSNorm(self.hd), nn.RMSNorm(self.hd)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.heads, self.hd)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, self.heads, self.hd)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.heads, self.hd).transpose(1, 2)
        return self.o_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1))


class PackedAttention(nn.Module):
    """A packed ``qkv`` Linear; ``interleaved`` packs per head (``[q_h | k_h | v_h]`` for each head, GPT-NeoX style)."""

    def __init__(self, dim: int = 32, heads: int = 4, interleaved: bool = False) -> None:
        super().__init__()
        self.heads, self.hd, self.interleaved = heads, dim // heads, interleaved
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        if self.interleaved:
            q, k, v = self.qkv(x).view(b, t, self.heads, 3 * self.hd).transpose(1, 2).split(self.hd, dim=-1)
        else:
            q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c))


class Decoder(nn.Module):
    def __init__(self, attention: nn.Module, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, dim)
        self.norm = nn.LayerNorm(dim)
        self.attn = attention
        self.head = nn.Linear(dim, 50)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids)
        return self.head(h + self.attn(self.norm(h)))


def _ids() -> Tensor:
    return torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))


# --- tests ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ZOO_CASES)
def test_zoo_forward_backward_and_state_dict(name: str) -> None:
    case = _case(name)
    model = case.model
    before = run_model(model, case.example_input)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    report = insert_qk_norm(model, case.example_input)
    assert report.sites and not report.skipped, str(report)
    # every site reported with its layers, heads, head_dim and keys; keys = old + added, none renamed
    assert set(model.state_dict()) == set(old) | set(report.added_keys)
    assert len(report.added_keys) == len(set(report.added_keys)) > 0
    assert sorted(k for s in report.sites for k in s.added_keys) == sorted(report.added_keys)
    assert all(".qk_norm." in k for k in report.added_keys)
    after = run_model(model, case.example_input)
    assert type(after) is type(before)
    assert main_output(after).shape == main_output(before).shape
    main_output(after).float().square().mean().backward()
    norms = [m for m in model.modules() if isinstance(m, QKNorm)]
    assert norms and all(p.grad is not None for n in norms for p in n.parameters())
    # an old checkpoint loads: every old key, only the norms missing
    fresh = copy.deepcopy(model)
    result = fresh.load_state_dict(old, strict=False)
    assert sorted(result.missing_keys) == sorted(report.added_keys) and not result.unexpected_keys
    assert report.to_dict()["added_keys"] == report.added_keys and str(report)


def test_zoo_sites_found() -> None:
    gpt2 = _case("gpt2")
    report = insert_qk_norm(gpt2.model, gpt2.example_input)
    site = report.sites[0]
    assert (site.query, site.key, site.packed) == ("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_attn", True)
    assert (site.heads, site.kv_heads, site.head_dim, site.norm) == (4, 4, 16, "LayerNorm")
    llama = _case("llama")
    report = insert_qk_norm(llama.model, llama.example_input, kind="rms")
    site = report.sites[0]
    assert (site.query, site.key) == ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj")
    assert (site.heads, site.kv_heads, site.norm) == (4, 2, "RMSNorm")  # grouped-query: 2 key heads
    assert report.added_keys[:2] == [
        "model.layers.0.self_attn.q_proj.qk_norm.q.weight",
        "model.layers.0.self_attn.k_proj.qk_norm.k.weight",
    ]


def _scale_q(model: nn.Module, name: str, factor: float, role: str = "q") -> None:
    """Multiply the query (or key) projection of the first attention by ``factor`` (weight and bias)."""
    with torch.no_grad():
        if name == "gpt2":
            c_attn, e = model.transformer.h[0].attn.c_attn, model.config.n_embd
            cols = slice(0, e) if role == "q" else slice(e, 2 * e)
            c_attn.weight[:, cols] *= factor
            c_attn.bias[cols] *= factor
        elif name == "llama":
            attn = model.model.layers[0].self_attn
            proj = attn.q_proj if role == "q" else attn.k_proj
            proj.weight *= factor
            if proj.bias is not None:
                proj.bias *= factor
        else:  # nn.MultiheadAttention
            mha, e = model, model.embed_dim
            rows = slice(0, e) if role == "q" else slice(e, 2 * e)
            mha.in_proj_weight[rows] *= factor
            mha.in_proj_bias[rows] *= factor


def _mha_case():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    x = torch.randn(2, 6, 32)
    return mha, (x, x, x, None, False)  # need_weights=False: the attention runs in scaled_dot_product_attention


@pytest.mark.parametrize("name", ["gpt2", "llama", "mha"])
@pytest.mark.parametrize("role", ["q", "k"])
def test_logit_scale_independent_of_qk_weight_norm(name: str, role: str) -> None:
    """W_q (or W_k) x10: with QK-norm the logits stay within 1e-4 (relative; the norm's eps); without, they x10."""
    if name == "mha":
        model, example = _mha_case()
        model.train()  # the eval fast path runs no scaled_dot_product_attention to intercept (dropout is 0)
    else:
        case = _case(name)
        model, example = case.model, case.example_input
    control = copy.deepcopy(model)
    base = _logits(control, example)[0]
    _scale_q(control, name, 10.0, role)
    scaled = _logits(control, example)[0]
    assert torch.allclose(scaled, 10 * base, rtol=1e-4, atol=1e-5 * base.abs().max().item())  # control: x10

    insert_qk_norm(model, example)
    base = _logits(model, example)[0]
    _scale_q(model, name, 10.0, role)
    scaled = _logits(model, example)[0]
    change = ((scaled - base).abs().max() / base.abs().max()).item()
    assert change < 1e-4, change


def test_logit_scale_prepare_qk_rms() -> None:
    case = _case("llama")
    report = lightning_bn.prepare(case.model, case.example_input, norm="qk_rms", seed=0)
    assert [s.norm for s in report.qk_norms] == ["RMSNorm", "RMSNorm"]
    base = _logits(case.model, case.example_input)[0]
    _scale_q(case.model, "llama", 10.0)
    change = ((_logits(case.model, case.example_input)[0] - base).abs().max() / base.abs().max()).item()
    assert change < 1e-4


def _identity_norms(module: nn.Module) -> None:
    module.qk_norm.q, module.qk_norm.k = nn.Identity(), nn.Identity()


MHA_CALLS = [
    dict(batch_first=True),
    dict(batch_first=False),
    dict(batch_first=True, padding=True),
    dict(batch_first=False, padding=True, need_weights=False),
    dict(batch_first=True, mask="bool", average_attn_weights=False),
    dict(batch_first=True, mask="float", padding=True),
    dict(batch_first=True, mask="causal", is_causal=True, need_weights=False),
    dict(batch_first=True, unbatched=True),
    dict(batch_first=True, kdim=24, vdim=20),
    dict(batch_first=True, bias=False, mask="3d"),
]


@pytest.mark.parametrize("call", MHA_CALLS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_mha_subclass_matches_multihead_attention(call: dict) -> None:
    """With identity norms, QKNormMultiheadAttention computes exactly nn.MultiheadAttention."""
    torch.manual_seed(0)
    kdim, vdim = call.get("kdim"), call.get("vdim")
    mha = nn.MultiheadAttention(
        32, 4, batch_first=call["batch_first"], kdim=kdim, vdim=vdim, bias=call.get("bias", True)
    )
    b, t, s = 3, 5, 6
    q = torch.randn(b, t, 32)
    k, v = torch.randn(b, s, kdim or 32), torch.randn(b, s, vdim or 32)
    mask, padding = None, None
    if call.get("mask") == "bool":
        mask = torch.rand(t, s) > 0.7
        mask[:, 0] = False
    elif call.get("mask") == "float":
        mask = torch.randn(t, s)
    elif call.get("mask") == "3d":
        mask = torch.randn(b * 4, t, s)
    elif call.get("mask") == "causal":
        s, k, v = t, q, q
        mask = nn.Transformer.generate_square_subsequent_mask(t)
    if call.get("padding"):
        padding = torch.zeros(b, s, dtype=torch.bool)
        padding[0, -2:] = True
    if not call["batch_first"]:
        q, k, v = (x.transpose(0, 1) for x in (q, k, v))
    if call.get("unbatched"):
        q, k, v = q[0], k[0], v[0]
        padding = padding[0] if padding is not None else None
        if mask is not None and mask.dim() == 3:
            mask = mask[:4]
    kwargs = dict(
        key_padding_mask=padding,
        attn_mask=mask,
        need_weights=call.get("need_weights", True),
        average_attn_weights=call.get("average_attn_weights", True),
        is_causal=call.get("is_causal", False),
    )
    new = copy.deepcopy(mha)
    report = insert_qk_norm(new, (q, k, v), kind="layer")
    assert type(new) is QKNormMultiheadAttention and report.sites
    assert set(new.state_dict()) == set(mha.state_dict()) | set(report.added_keys)
    _identity_norms(new)
    for train in (True, False):
        mha.train(train), new.train(train)
        with torch.no_grad():
            want, want_w = mha(q, k, v, **kwargs)
            got, got_w = new(q, k, v, **kwargs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (got_w is None) == (want_w is None)
        if want_w is not None:
            torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)


def test_mha_in_transformer_encoder_no_fast_path() -> None:
    """The fused eval fast path of nn.TransformerEncoderLayer would skip the norm: it is kept off."""
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2)
    x = torch.randn(2, 7, 32)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, -3:] = True
    reference = copy.deepcopy(encoder)
    insert_qk_norm(encoder, (x, None, padding))
    identity = copy.deepcopy(encoder)
    for layer in identity.layers:
        _identity_norms(layer.self_attn)
    encoder.eval(), identity.eval(), reference.eval()
    with torch.no_grad():
        want = reference(x, src_key_padding_mask=padding)
        same = identity(x, src_key_padding_mask=padding)
        normed = encoder(x, src_key_padding_mask=padding)
        grad_path = encoder.train()(x, src_key_padding_mask=padding)  # dropout 0: the slow path, same numbers
    keep = ~padding
    torch.testing.assert_close(same[keep], want[keep], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(normed[keep], grad_path[keep], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(normed[keep], want[keep], atol=1e-3)  # the norm acts
    restored = pickle.loads(pickle.dumps(encoder)).eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(x, src_key_padding_mask=padding)[keep], normed[keep])


PLAIN = {
    "sdpa": SeparateAttention,
    "eager": lambda: SeparateAttention(eager=True),
    "gqa": lambda: SeparateAttention(kv_heads=2),
    "gqa-eager": lambda: SeparateAttention(kv_heads=2, eager=True),
    "packed": PackedAttention,
}


@pytest.mark.parametrize("kind", list(PLAIN))
def test_plain_pytorch_decoder(kind: str) -> None:
    torch.manual_seed(0)
    attention = PLAIN[kind]()
    model = Decoder(attention)
    report = lightning_bn.prepare(model, _ids(), norm="qk", seed=0)
    assert len(report.qk_norms) == 1 and report.added_keys
    assert "qk-norm attn" in str(report) and report.to_dict()["qk_norms"][0]["head_dim"] == 8
    model(_ids()).sum().backward()
    # scale independence through the hooks: the normalized q of a scaled W_q is the same
    captured = []
    handle = model.get_submodule(report.qk_norms[0].query).qk_norm.register_forward_hook(
        lambda m, a, out: captured.append(out.detach().clone())
    )
    with torch.no_grad():
        model(_ids())
        proj = model.get_submodule(report.qk_norms[0].query)
        proj.weight *= 10
        proj.bias *= 10
        model(_ids())
    handle.remove()
    q = captured[0][..., : attention.heads * attention.hd]
    assert ((captured[1][..., : q.shape[-1]] - q).abs().max() / q.abs().max()) < 1e-4


def test_interleaved_packing_refused_model_unchanged() -> None:
    torch.manual_seed(0)
    model = Decoder(PackedAttention(interleaved=True))
    old = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="could not confirm that attn.qkv / attn.qkv give q and k"):
        insert_qk_norm(model, _ids())
    with pytest.raises(ValueError, match="could not confirm"):
        lightning_bn.prepare(model, _ids(), norm="qk")
    assert [type(m) for m in model.modules()] == modules
    assert all(torch.equal(v, old[k]) for k, v in model.state_dict().items()) and set(model.state_dict()) == set(old)
    assert not model.attn.qkv._forward_hooks


def test_bad_input_names_the_value_and_changes_nothing() -> None:
    model = Decoder(SeparateAttention())
    old = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="'batch'"):
        insert_qk_norm(model, _ids(), kind="batch")
    with pytest.raises(ValueError, match="-1"):
        insert_qk_norm(model, _ids(), eps=-1)
    with pytest.raises(TypeError, match="glob patterns"):
        insert_qk_norm(model, _ids(), exclude="attn")
    with pytest.raises(ValueError, match="'qk_layer'"):
        lightning_bn.prepare(model, _ids(), norm="qk_layer")
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    mlp_old = {k: v.clone() for k, v in mlp.state_dict().items()}
    with pytest.raises(ValueError, match="Found no attention in Sequential"):
        insert_qk_norm(mlp, torch.randn(4, 8))
    with pytest.raises(ValueError, match="Found no attention"):
        lightning_bn.prepare(mlp, torch.randn(4, 8), norm="qk")
    assert all(torch.equal(v, mlp_old[k]) for k, v in mlp.state_dict().items())
    assert all(torch.equal(v, old[k]) for k, v in model.state_dict().items()) and set(model.state_dict()) == set(old)
    with pytest.raises(ValueError, match="excluded"):  # every attention excluded: nothing to do is an error
        insert_qk_norm(model, _ids(), exclude=["attn*"])


def test_already_normalized_skipped_and_picklable() -> None:
    model = Decoder(SeparateAttention())
    insert_qk_norm(model, _ids())
    keys = set(model.state_dict())
    again = insert_qk_norm(model, _ids())
    assert not again.sites and again.skipped == [("attn", "already normalized (QK-norm inserted)")]
    assert set(model.state_dict()) == keys
    with torch.no_grad():
        want = model(_ids())
        torch.testing.assert_close(copy.deepcopy(model)(_ids()), want)
        torch.testing.assert_close(pickle.loads(pickle.dumps(model))(_ids()), want)
    # a model with its own q_norm / k_norm after q_proj / k_proj (Qwen3 style) counts as already normalized
    qwen_like = Decoder(QwenLikeAttention())
    report = insert_qk_norm(qwen_like, _ids())
    assert not report.sites and "already normalized" in report.skipped[0][1], report.skipped


def test_prepare_report_lines_and_init_defaults() -> None:
    case = _case("gpt2")
    reference = copy.deepcopy(case.model)
    plain = lightning_bn.prepare(reference, case.example_input, seed=0)
    report = lightning_bn.prepare(case.model, case.example_input, norm="qk", seed=0)
    assert [r.scheme for r in report.layers] == [r.scheme for r in plain.layers]  # init unchanged
    text = str(report)
    assert "qk-norm transformer.h.0.attn: LayerNorm over head_dim 16 on query transformer.h.0.attn.c_attn" in text
    assert "added key transformer.h.0.attn.c_attn.qk_norm.q.weight" in text
    assert any("QK-norm" in c and "none renamed" in c for c in report.changes)
    assert report.to_dict()["qk_norms"][0]["added_keys"] == [
        f"transformer.h.0.attn.c_attn.qk_norm.{r}.{p}" for r in "qk" for p in ("weight", "bias")
    ]
    assert not report.renamed_keys and not report.removed_keys


class SharedQK(nn.Module):
    """q and k from one Linear of width heads·head_dim (no split)."""

    def __init__(self) -> None:
        super().__init__()
        self.qk, self.v = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x: Tensor) -> Tensor:
        qk = self.qk(x).unflatten(-1, (4, 8)).transpose(1, 2)
        v = self.v(x).unflatten(-1, (4, 8)).transpose(1, 2)
        return F.scaled_dot_product_attention(qk, qk, v).transpose(1, 2).flatten(-2)


class ConvAttention(nn.Module):
    """A self-attention block over a feature map with 1x1 Conv2d projections (SAGAN / UNet style)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (p(x).flatten(2).transpose(1, 2)[:, None] for p in (self.q, self.k, self.v))
        return F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(x.shape)


@pytest.mark.parametrize(
    ("model", "example", "reason"),
    [
        (SharedQK(), torch.randn(2, 5, 32), "q and k both come from qk with no split known"),
        (ConvAttention(), torch.randn(2, 8, 4, 4), "the query layer q is a Conv2d, not a Linear / Conv1D"),
    ],
    ids=["shared-qk", "conv"],
)
def test_refused_with_the_reason(model: nn.Module, example: Tensor, reason: str) -> None:
    old = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=reason):
        insert_qk_norm(model, example)
    assert set(model.state_dict()) == set(old) and not any(m._forward_hooks for m in model.modules())
