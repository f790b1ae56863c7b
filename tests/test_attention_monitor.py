"""Attention figures (``attn_*``) and output-logit figures (``out_*``) of the monitoring engine, against hand
computations; cost on non-logging steps; transformers models in a Trainer; DDP exactness."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_bn.monitoring.attention as attention_module
from lightning_bn import Monitor
from lightning_bn.monitoring.attention import _Capture
from lightning_bn.tags import ATTENTION_STATISTICS, OUTPUT_STATISTICS, is_monitor_tag, is_row_tag
from tests.helpers import run_ddp_script

TOL = 1e-5


# ------------------------------------------------------------------------------------------------ hand computations
def hand(logits: torch.Tensor, valid: torch.Tensor | None = None, probs: torch.Tensor | None = None) -> dict:
    """The attention figures of ``logits`` (B, H, T, S), computed directly: masked entries (``valid`` False, -inf,
    or <= float32 min / 2) left out; entropy from ``probs`` when given (the model's own softmax)."""
    z = logits.detach().double()
    ok = z > torch.finfo(torch.float32).min / 2
    if valid is not None:
        ok = ok & torch.broadcast_to(valid, z.shape)
    kept = z[ok]
    p = torch.softmax(z.masked_fill(~ok, -math.inf), dim=-1) if probs is None else probs.detach().double()
    rows = ok.any(-1)
    plogp = torch.where(p > 0, p * torch.log(p.clamp_min(1e-300)), torch.zeros_like(p))
    entropy = -plogp.sum(-1)  # (B, H, T)
    per_head = [entropy[:, h][rows[:, h]].mean().item() for h in range(z.shape[1])]
    return {
        "logit_max": kept.max().item(),
        "logit_rms": kept.pow(2).mean().sqrt().item(),
        "entropy": entropy[rows].mean().item(),
        "entropy_min": min(per_head),
    }


def assert_figures(figures: dict, site: str, expected: dict) -> None:
    for key, value in expected.items():
        tag = f"{ATTENTION_STATISTICS[key]}/{site}"
        assert tag in figures, (tag, sorted(figures))
        assert figures[tag] == pytest.approx(value, abs=TOL, rel=TOL), tag


def heads_of(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


# ------------------------------------------------------------------------------------------------------- the models
class EagerAttention(nn.Module):
    """q·kᵀ/√d, a causal mask of -inf, softmax: the probabilities kept for the hand computation."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.probs: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (heads_of(f(x), self.heads) for f in (self.q, self.k, self.v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        T = x.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, -math.inf)
        probs = scores.softmax(dim=-1)
        self.logits, self.probs = scores.detach(), probs.detach()
        return self.o((probs @ v).transpose(1, 2).flatten(2))


class SdpaAttention(nn.Module):
    """``scaled_dot_product_attention`` with ``is_causal``, or an additive float mask, or grouped-query heads."""

    def __init__(self, dim: int = 16, heads: int = 4, kv_heads: int = 4, causal: bool = False) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.causal = heads, kv_heads, causal
        head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, kv_heads * head_dim)
        self.v = nn.Linear(dim, kv_heads * head_dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q = heads_of(self.q(x), self.heads)
        k, v = heads_of(self.k(x), self.kv_heads), heads_of(self.v(x), self.kv_heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal,
                                             enable_gqa=self.kv_heads != self.heads)  # fmt: skip
        return self.o(out.transpose(1, 2).flatten(2))

    def hand_logits(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            q, k = heads_of(self.q(x), self.heads), heads_of(self.k(x), self.kv_heads)
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            z = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            T = x.shape[1]
            valid = torch.ones(T, T, dtype=torch.bool).tril() if self.causal else torch.ones(T, T, dtype=torch.bool)
            return (z + mask if mask is not None else z), valid


class Net(nn.Module):
    def __init__(self, attn: nn.Module, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.attn = attn
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(self.embed(x), *extra))


def run_steps(net: nn.Module, inputs: list, hand_of, every: int = 1, example: bool = True, **options):
    """Train a few steps with :class:`Monitor`; at logging steps compare with ``hand_of(inputs)`` taken before the
    optimizer step. Returns the monitor's figures of every step. ``example=False``: traced on the first call."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    out = []
    example_input = inputs[0] if example else None
    with Monitor(net, every_n_steps=every, example_input=example_input, gradients=False, **options) as monitor:
        for args in inputs:
            opt.zero_grad()
            net(*args).pow(2).mean().backward()
            expected = hand_of(args)
            opt.step()
            out.append((monitor.step(), expected))
    return out


# ------------------------------------------------------------------------------------------------------ the tests
def test_tags_are_monitor_row_tags():
    for statistic in [*ATTENTION_STATISTICS.values(), *OUTPUT_STATISTICS.values()]:
        assert is_monitor_tag(f"{statistic}/a.b") and is_row_tag(f"{statistic}/a.b")


@pytest.mark.parametrize("example", [True, False], ids=["example-input", "first-call"])
def test_eager_attention_figures_equal_a_hand_computation(example):
    torch.manual_seed(0)
    net = Net(EagerAttention())
    inputs = [(torch.randn(3, 6, 8),) for _ in range(3)]

    def expected(args):
        return hand(net.attn.logits, probs=net.attn.probs)

    results = run_steps(net, inputs, expected, example=example)
    for figures, want in results:
        assert_figures(figures, "attn", want)
    assert not any(isinstance(m, _Capture) for m in torch.overrides._get_current_function_mode_stack())


@pytest.mark.parametrize(
    "causal,kv_heads,masked,example",
    [
        (True, 4, False, True),
        (False, 4, True, True),
        (False, 2, False, True),
        (True, 1, True, True),
        (False, 4, True, False),
    ],
)
def test_sdpa_figures_equal_a_hand_computation(causal, kv_heads, masked, example):
    torch.manual_seed(1)
    net = Net(SdpaAttention(kv_heads=kv_heads, causal=causal))
    B, T = 3, 6
    inputs = []
    for _ in range(2):
        x = torch.randn(B, T, 8)
        if masked:  # an additive float mask: padding as HF builds it (finfo.min) and a soft bias
            mask = 0.3 * torch.randn(B, 1, T, T)
            mask[:, :, :, -2:] = torch.finfo(torch.float32).min
            mask[0, :, :, :] = torch.where(torch.rand(T, T) < 0.3, -math.inf, mask[0, :, :, :])
            mask[0, :, :, 0] = 0.0  # no row fully masked in a causal call
            inputs.append((x, mask))
        else:
            inputs.append((x,))

    def expected(args):
        z, valid = net.attn.hand_logits(net.embed(args[0]), *args[1:])
        return hand(z, valid)

    for figures, want in run_steps(net, inputs, expected, example=example):
        assert_figures(figures, "attn", want)


@pytest.mark.parametrize("batch_first,example", [(True, True), (False, True), (True, False)])
def test_multihead_attention_figures_equal_a_hand_computation(batch_first, example):
    torch.manual_seed(2)
    B, T, E, H = 3, 5, 16, 4

    class MHANet(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(8, E)
            self.mha = nn.MultiheadAttention(E, H, batch_first=batch_first)
            self.head = nn.Linear(E, 2)

        def forward(self, x, padding):
            h = self.embed(x)
            h = h if batch_first else h.transpose(0, 1)
            out = self.mha(h, h, h, key_padding_mask=padding, need_weights=False)[0]
            return self.head(out)

    net = MHANet()
    padding = torch.zeros(B, T, dtype=torch.bool)
    padding[1, -2:] = True
    padding[2, -1] = True
    inputs = [(torch.randn(B, T, 8), padding) for _ in range(2)]

    def expected(args):
        with torch.no_grad():
            h = net.embed(args[0])
            h = h if batch_first else h.transpose(0, 1)
            _, probs = net.mha(h, h, h, key_padding_mask=args[1], need_weights=True, average_attn_weights=False)
            w, b = net.mha.in_proj_weight, net.mha.in_proj_bias
            hb = h if batch_first else h.transpose(0, 1)
            q, k = heads_of(F.linear(hb, w[:E], b[:E]), H), heads_of(F.linear(hb, w[E : 2 * E], b[E : 2 * E]), H)
            z = q @ k.transpose(-2, -1) / math.sqrt(E // H)
            return hand(z, ~args[1][:, None, None, :], probs=probs)

    for figures, want in run_steps(net, inputs, expected, example=example):
        assert_figures(figures, "mha", want)


def test_output_logits_of_a_cross_entropy_loss_equal_a_hand_computation():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 7))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(20, 8), torch.randint(0, 7, (20,))
    y[:4] = -100  # ignored targets: their rows are left out
    with Monitor(net, every_n_steps=1, example_input=x) as monitor:
        for _ in range(2):
            opt.zero_grad()
            logits = net(x)
            F.cross_entropy(logits, y).backward()
            kept = logits.detach().double()[y != -100]
            opt.step()
            figures = monitor.step()
            assert figures["out_logit_max/2"] == pytest.approx(kept.max().item(), abs=TOL)
            assert figures["out_log_z/2"] == pytest.approx(torch.logsumexp(kept, 1).mean().item(), abs=TOL)
    assert not any(tag.startswith("attn_") for tag in figures)


def test_nothing_runs_on_steps_that_do_not_log(monkeypatch):
    """No hook, no mode, no attention tensor computed between logging steps; off with attention=False."""
    calls: list[int] = []
    real = attention_module.logit_summary
    step = [0]

    def counting(*args, **kwargs):
        calls.append(step[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_module, "logit_summary", counting)
    torch.manual_seed(4)
    net = Net(SdpaAttention(causal=True))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(2, 5, 8)
    with Monitor(net, every_n_steps=3, example_input=x, gradients=False) as monitor:
        for s in range(7):
            step[0] = s
            logging = s % 3 == 0
            stack = torch.overrides._get_current_function_mode_stack()
            assert not any(isinstance(m, _Capture) for m in stack)  # pushed by the model's forward, if at all
            assert bool(net.attn._forward_pre_hooks) == logging
            opt.zero_grad()
            out = net(x)
            stack = torch.overrides._get_current_function_mode_stack()
            assert any(isinstance(m, _Capture) for m in stack) == logging
            out.pow(2).mean().backward()
            opt.step()
            monitor.step()
    assert sorted(set(calls)) == [0, 3, 6] and len(calls) == 3
    assert [s for s, _ in monitor.figures["attn_entropy/attn"]] == [0, 3, 6]
    with Monitor(net, every_n_steps=1, example_input=x, gradients=False, attention=False) as monitor:
        net(x).sum().backward()
        figures = monitor.step()
    assert not any(tag.startswith(("attn_", "out_")) for tag in figures)


def test_layers_table_lists_attention_rows_in_forward_order():
    net = Net(SdpaAttention(causal=True))
    with Monitor(net, every_n_steps=1, example_input=torch.randn(2, 5, 8), gradients=False) as monitor:
        layers = monitor.layers
    names = [entry["name"] for entry in layers]
    entry = next(e for e in layers if e["hook"] == "attention")
    assert entry == {"name": "attn", "module_type": "SdpaAttention", "activation": None, "hook": "attention",
                     "heads": 4}  # fmt: skip
    assert names.index("attn.k") < names.index("attn") < names.index("attn.o")


def test_two_calls_and_micro_batches_combine_exactly():
    """A step of two micro-batches logs the figures of both together (sums and maxima, not an average)."""
    torch.manual_seed(5)
    net = Net(EagerAttention())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    a, b = torch.randn(2, 6, 8), torch.randn(4, 6, 8)
    with Monitor(net, every_n_steps=1, example_input=a, gradients=False) as monitor:
        logits, probs = [], []
        for x in (a, b):
            net(x).pow(2).mean().backward()
            logits.append(net.attn.logits)
            probs.append(net.attn.probs)
        opt.step()
        figures = monitor.step()
    assert_figures(figures, "attn", hand(torch.cat(logits), probs=torch.cat(probs)))


# --------------------------------------------------------------------------------------------- transformers models
@pytest.mark.parametrize("example", [True, False], ids=["example-input", "first-call"])
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_transformers_models_get_attention_rows_in_a_trainer(name, example, tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader

    from lightning_bn import ActivationMonitor
    from lightning_bn.report.reading import read_run
    from tests.zoo import ZOO, main_output, run_model

    case = ZOO[name]()
    sites: list[str] = []
    seen: list[tuple[int, int]] = []  # (step, calls of logit_summary so far)
    calls = [0]
    real = attention_module.logit_summary

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = case.model
            self.example_input_array = case.example_input if example else None

        def forward(self, **batch):  # the example input (a dict of kwargs) is traced at fit start: step 0 logs
            return self.model(**batch)

        def training_step(self, batch, batch_idx):
            before = calls[0]
            out = main_output(run_model(self.model, batch))
            if not any(isinstance(m, _Capture) for m in torch.overrides._get_current_function_mode_stack()):
                assert self.trainer.global_step % 2 == 1
            seen.append((self.trainer.global_step, calls[0] - before))
            return out.float().pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

        def train_dataloader(self):
            return DataLoader([case.example_input] * 5, batch_size=None)

    attention_module.logit_summary, saved = counting, attention_module.logit_summary
    try:
        module = Module()
        monitor = ActivationMonitor(every_n_steps=2, histograms=False, heatmap=False)
        trainer = pl.Trainer(max_steps=5, logger=TensorBoardLogger(tmp_path, name="", version=""),
                             callbacks=[monitor], enable_progress_bar=False, enable_checkpointing=False,
                             enable_model_summary=False, accelerator="cpu")  # fmt: skip
        trainer.fit(module)
    finally:
        attention_module.logit_summary = saved
    sites = [e["name"] for e in monitor.layers if e["hook"] == "attention"]
    assert len(sites) == 2, monitor.layers
    odd = [n for step, n in seen if step % 2]
    assert odd and all(n == 0 for n in odd)  # no attention tensor computed on a step that does not log
    scalars, layers = read_run(tmp_path)
    assert [e["name"] for e in layers if e["hook"] == "attention"] == sites
    for site in sites:
        for statistic in ATTENTION_STATISTICS.values():
            steps = [s for s, _ in scalars[f"{statistic}/{site}"]]
            assert steps == [0, 2, 4], (statistic, site, steps)
    for statistic in ATTENTION_STATISTICS.values():
        assert all(math.isfinite(v) for site in sites for _, v in scalars[f"{statistic}/{site}"])


# ------------------------------------------------------------------------------------------------------------ DDP
def _metrics(run: Path) -> dict[str, float]:
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {k: float(v) for row in rows for k, v in row.items() if v not in ("", None) and "/" in k}


@pytest.mark.slow
def test_ddp_attention_figures_equal_one_process_over_the_global_batch(tmp_path):
    run_ddp_script("attention_ddp.py", str(tmp_path / "single"), "single")
    run_ddp_script("attention_ddp.py", str(tmp_path / "ddp"), "ddp")
    single, ddp = _metrics(tmp_path / "single"), _metrics(tmp_path / "ddp")
    wanted = [k for k in single if k.startswith(("attn_", "out_"))]
    assert len(wanted) == 2 * 4 + 2, sorted(single)
    for key in wanted:
        assert ddp[key] == pytest.approx(single[key], rel=TOL, abs=TOL), key
