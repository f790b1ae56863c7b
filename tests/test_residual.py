"""prepare() on residual streams: the last layer of each residual branch adds a bounded share of the stream, so a
stock transformers LM's near-identity stream is not turned into one dominated by random branches (#23)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_bn import prepare

transformers = pytest.importorskip("transformers")


def _gpt2() -> tuple[torch.nn.Module, str]:
    config = transformers.GPT2Config(n_layer=6, n_embd=64, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0,
                                     eos_token_id=0)  # fmt: skip
    return transformers.GPT2LMHeadModel(config), "transformer.ln_f"


def _opt() -> tuple[torch.nn.Module, str]:
    config = transformers.OPTConfig(num_hidden_layers=6, hidden_size=64, num_attention_heads=4, ffn_dim=256,
                                    vocab_size=128, max_position_embeddings=64, word_embed_proj_dim=64,
                                    bos_token_id=0, eos_token_id=0, pad_token_id=1)  # fmt: skip
    return transformers.OPTForCausalLM(config), "model.decoder.final_layer_norm"


def _stream_std(model: torch.nn.Module, ids: torch.Tensor, final_norm: str) -> float:
    """The residual stream's std where it enters the final norm."""
    seen: list[float] = []
    handle = model.get_submodule(final_norm).register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().std().item())
    )
    try:
        with torch.no_grad():
            model.eval()
            model(ids)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("build", [_gpt2, _opt], ids=["gpt2", "opt"])
def test_prepare_keeps_a_transformer_lm_residual_stream_near_stock(build):
    """Before: plain Xavier on every branch output took the final stream std of a 6-layer GPT-2 from 0.035 to 2.07
    and OPT's from 0.096 to 3.04 (measured at commit 0398e15). Now it stays within 2x of stock."""
    torch.manual_seed(0)
    model, final_norm = build()
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    stock = _stream_std(model, ids, final_norm)
    report = prepare(model, ids, seed=0)
    after = _stream_std(model, ids, final_norm)
    assert 0.5 <= after / stock <= 2, (stock, after)
    branches = [r for r in report.layers if r.layer.endswith(("c_proj", "out_proj", "fc2"))]
    assert len(branches) == 12
    change = next(c for c in report.changes if "ending a residual branch" in c)
    assert f"1/√12 = {1 / math.sqrt(12):.3g}" in change


def test_gpt2_keeps_its_own_depth_scaled_share():
    """GPT-2 draws its residual output projections at 0.02/sqrt(2 n_layer): a share of the stream below 1/sqrt(12);
    prepare() keeps that share (the rescaled output std over the stream's is the stock ratio)."""
    torch.manual_seed(0)
    model, _ = _gpt2()
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    from lightning_bn.tracing import trace_model

    stock = trace_model(model, ids).layers
    report = prepare(model, ids, seed=0)
    for row in report.layers:
        trace = stock[row.layer]
        if row.layer.endswith("c_proj") and trace.residual:
            share = min(trace.output_std / trace.shortcut_std, 1 / math.sqrt(12))
            assert row.std_after == pytest.approx(share * trace.shortcut_std, rel=0.12), row.layer


def test_a_layer_used_through_its_weight_is_reported_as_used_functionally():
    """timm EVA/BEiT and torchvision Swin call F.linear(x, self.qkv.weight, bias): the layer never runs as a module."""

    class Attention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.proj, self.unused = torch.nn.Linear(16, 48), torch.nn.Linear(16, 16), torch.nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = torch.nn.functional.linear(x, self.qkv.weight, self.qkv.bias).chunk(3, -1)
            return self.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v))

    report = prepare(Attention(), torch.randn(2, 8, 16))
    reasons = {s.layer: s.reason for s in report.skipped}
    assert reasons["qkv"].startswith("used functionally") and reasons["unused"].startswith("not called")


def test_an_encoder_s_last_residual_branch_is_labelled_residual_not_output():
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.norm = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8), torch.nn.LayerNorm(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(x + self.fc2(torch.relu(self.fc1(x))))  # post-norm: the add reaches the output

    report = prepare(Block(), torch.randn(16, 8))
    assert [(r.layer, r.activation, r.how) for r in report.layers] == [("fc1", "relu", "function"),
                                                                      ("fc2", "identity", "residual")]  # fmt: skip
