"""Wortsman et al. (2023), "Small-scale proxies for large-scale Transformer training instabilities": attention logit
growth at high learning rates, and QK-norm.

Without a norm on the queries and keys, the attention logits ``q·k / sqrt(d)`` of a transformer trained at a high
learning rate grow without bound (they are quadratic in the q/k weights, which Adam moves by ~lr per step): the
softmax collapses onto one key per query (attention entropy -> 0) and the loss ends higher than at a moderate learning
rate. A LayerNorm on the queries and keys of every head (QK-norm, inserted here by ``lightning_bn``) bounds the logits
and keeps the final loss nearly flat over a much wider range of learning rates.

This script trains a small decoder-only transformer (2 pre-LN blocks, width 128, 4 heads of 32, GELU MLP, no biases,
learned positions, untied output) as a byte-level language model on Python's own standard-library sources (on disk:
nothing is downloaded), with the paper's optimizer: AdamW β=(0.9, 0.95), eps 1e-8, independent weight decay 1e-4
(``weight_decay = 1e-4 / lr``), linear warm-up then cosine decay to 0. Two arms share the init and the batches of a
seed: the baseline and the same model with QK-norm. It sweeps the learning rate (3 seeds), logs each run with
``lightning_bn.Monitor`` to a TensorBoard directory, and reads back what the library logged and reports: per attention
site ``attn_logit_max`` (the largest pre-softmax logit) and ``attn_entropy_min`` (the least entropic head's mean
entropy), the output logits' ``out_logit_max`` / ``out_log_z``, and the findings of ``lightning_bn.report.analyze``
(``attention_logit_growth``, ``attention_entropy_collapse``, ``output_logit_divergence``, with their first steps). It
measures the final loss (mean of the last 10% of steps), the step at which the baseline's largest logit passes
``GROWTH_LOGIT`` and the step from which its loss stays above the QK-norm arm's by ``SEPARATION``; it plots them,
prints tables and writes ``attention_logit_growth.{png,json}`` to ``--out`` (runs under
``<out>/attention_logit_growth/<arm>/lr<lr>/seed<seed>``: ``lightning-bn report`` reads them).

Run::

    python examples/attention_logit_growth.py          # 5 learning rates x 2 arms x 3 seeds, 200 steps each
    python examples/attention_logit_growth.py --fast   # lr 3e-3 and 1e-1, one seed, 100 steps (for the tests)
"""

from __future__ import annotations

import math
import multiprocessing
import sysconfig
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import common
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.tensorboard import SummaryWriter

import lightning_bn
from lightning_bn.norms import insert_qk_norm
from lightning_bn.report import analyze
from lightning_bn.report.reading import read_scalars

NAME = "attention_logit_growth"
ARMS = ("baseline", "qk_norm")
LABELS = {"baseline": "baseline", "qk_norm": "QK-norm (lightning_bn)"}
VOCAB, WIDTH, HEADS, DEPTH, SEQ, BATCH = 128, 128, 4, 2, 64, 16
BETAS, EPS, WEIGHT_DECAY, WARMUP = (0.9, 0.95), 1e-8, 1e-4, 10
LRS, STEPS = (3e-3, 1e-2, 3e-2, 1e-1, 3e-1), 200
FAST_LRS, FAST_STEPS = (3e-3, 1e-1), 100
LOG_EVERY = 10  # the Monitor's logging period (each logging step costs about as much as 3 training steps here)
GROWTH_LOGIT = 50.0  # "the logits have grown": the largest attention logit passes this (it starts at ~1-5)
SEPARATION = 0.05  # the baseline's loss "has diverged" from the QK-norm arm's when above it by this much, for good
SOURCES = ("argparse", "textwrap", "dataclasses", "inspect", "typing", "functools", "enum", "difflib")


def corpus() -> torch.Tensor:
    """Python's own standard-library sources as ASCII bytes (non-ASCII -> '?'): ~600k tokens, vocabulary 128."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = [lib / f"{name}.py" for name in SOURCES]
    text = "".join(path.read_text(encoding="utf-8") for path in files if path.exists())
    return torch.tensor(list(text.encode("ascii", "replace")), dtype=torch.long)


class Attention(nn.Module):
    """Causal multi-head self-attention, eager: ``softmax(q k^T / sqrt(d_head))`` (separate q/k/v projections)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.out_proj = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, width = x.shape
        q, k, v = (p(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # fmt: skip
        logits = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        weights = logits.masked_fill(~causal, float("-inf")).softmax(-1)
        return self.out_proj((weights @ v).transpose(1, 2).reshape(b, t, width))


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, bias=False)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, bias=False)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width, bias=False), nn.GELU(),
                                 nn.Linear(4 * width, width, bias=False))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class DecoderLM(nn.Module):
    """A pre-LN decoder-only transformer: token + learned position embeddings, blocks, final LayerNorm, logits."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Parameter(0.02 * torch.randn(SEQ, WIDTH))
        self.blocks = nn.ModuleList(Block(WIDTH, HEADS) for _ in range(DEPTH))
        self.ln_f = nn.LayerNorm(WIDTH, bias=False)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))


def add_qk_norm(model: DecoderLM, example: torch.Tensor) -> None:
    """QK-norm: a LayerNorm over each head's query and key, inserted by the library (the init is left as it is)."""
    report = insert_qk_norm(model, example, kind="layer")
    if len(report.sites) != DEPTH:
        raise RuntimeError(f"expected QK-norm at {DEPTH} attention sites, the report says:\n{report}")


def batches(data: torch.Tensor, seed: int):
    """Random windows of ``SEQ + 1`` tokens, the same sequence for both arms of a seed."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(0, len(data) - SEQ - 1, (BATCH,), generator=generator)
        window = torch.stack([data[i : i + SEQ + 1] for i in start.tolist()])
        yield window[:, :-1], window[:, 1:]


def schedule(steps: int):
    """Linear warm-up over ``WARMUP`` steps, then cosine decay to 0."""
    return lambda s: (s + 1) / WARMUP if s < WARMUP else 0.5 * (1 + math.cos(math.pi * (s - WARMUP) / (steps - WARMUP)))


def run(arm: str, lr: float, seed: int, steps: int, out: str) -> dict:
    """Train one arm at one learning rate and seed; return its figures (and its run directory, for the report)."""
    common.quiet()
    data = corpus()
    torch.manual_seed(seed)
    model = DecoderLM()
    feed = batches(data, seed)
    example, _ = next(batches(data, seed))
    if arm == "qk_norm":
        add_qk_norm(model, example)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY / lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(steps))
    run_dir = Path(out) / NAME / arm / f"lr{lr:g}" / f"seed{seed}"
    writer = SummaryWriter(str(run_dir))
    losses = []
    with lightning_bn.Monitor(model, every_n_steps=LOG_EVERY, writer=writer, optimizer=opt, histograms=False,
                              heatmap=False) as monitor:  # fmt: skip
        for _ in range(steps):
            x, y = next(feed)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            monitor.step(loss.detach())
            losses.append(loss.item())
    writer.close()
    tail = losses[-max(1, steps // 10) :]
    result = {"arm": arm, "lr": lr, "seed": seed, "run_dir": str(run_dir), "loss": losses,
              "final_loss": sum(tail) / len(tail) if all(map(math.isfinite, tail)) else math.inf}  # fmt: skip
    return result | read_back(run_dir)


def read_back(run_dir: Path) -> dict:
    """What the library logged and reports: the attention figures of the run (``attn_logit_max``, max over the
    attention sites; ``attn_entropy_min``, min over them: the least entropic head), ``out_logit_max`` / ``out_log_z``
    of the output logits, and the report's findings (flag -> first step)."""
    scalars = read_scalars(run_dir)
    out: dict = {}
    for stat, pick in (("attn_logit_max", max), ("attn_entropy_min", min), ("out_logit_max", max), ("out_log_z", max)):
        sites = [dict(v) for tag, v in scalars.items() if tag.startswith(stat + "/")]
        if not sites:
            raise RuntimeError(f"{run_dir}: the Monitor logged no {stat}")
        out[stat] = [(s, pick(site[s] for site in sites if s in site)) for s in sorted(set().union(*sites))]
    out["max_logit"] = max(v for _, v in out["attn_logit_max"])
    out["min_entropy"] = min(v for _, v in out["attn_entropy_min"])
    out["max_out_logit"] = max(v for _, v in out["out_logit_max"])
    [health] = analyze(str(run_dir))
    out["flags"] = {name: found["first_step"] for name, found in health.problems().items()}
    return out


def first_step(series: list[tuple[int, float]], above: float) -> int | None:
    return next((s for s, v in series if v > above), None)


def separation_step(baseline: list[float], qk: list[float], window: int = 10) -> int | None:
    """The step from which the baseline's loss (moving average) stays above the QK-norm arm's by ``SEPARATION``."""
    gap = [b - q if math.isfinite(b) else math.inf for b, q in zip(smooth(baseline, window), smooth(qk, window))]
    if gap[-1] <= SEPARATION:
        return None
    last_below = max((i for i, g in enumerate(gap) if g <= SEPARATION), default=-1)
    return last_below + 1


def spread(values: list[float]) -> dict:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "seeds": values}


def summarize(results: list[dict], lrs: tuple[float, ...], seeds: list[int]) -> dict:
    by = {(r["arm"], r["lr"], r["seed"]): r for r in results}
    out: dict = {}
    for lr in lrs:
        row: dict = {}
        for arm in ARMS:
            runs = [by[arm, lr, seed] for seed in seeds]
            row[arm] = {
                "final_loss": spread([r["final_loss"] for r in runs]),
                "max_logit": spread([r["max_logit"] for r in runs]),
                "min_entropy": spread([r["min_entropy"] for r in runs]),
                "max_out_logit": spread([r["max_out_logit"] for r in runs]),
                "flags": [r["flags"] for r in runs],
                "run_dirs": [r["run_dir"] for r in runs],
            }
        base = [by["baseline", lr, seed] for seed in seeds]
        qk = [by["qk_norm", lr, seed] for seed in seeds]
        row["growth_step"] = [first_step(r["attn_logit_max"], GROWTH_LOGIT) for r in base]
        row["separation_step"] = [separation_step(b["loss"], q["loss"]) for b, q in zip(base, qk)]
        out[f"{lr:g}"] = row
    return out


def smooth(values: list[float], window: int = 10) -> list[float]:
    """Trailing moving average over ``window`` steps (fewer at the start)."""
    return [sum(values[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def plot(results: list[dict], summary: dict, lrs: tuple[float, ...], high: float, args) -> None:
    fig, axes = common.plt.subplots(2, 2, figsize=(11, 8))
    ax_loss, ax_logit, ax_entropy, ax_curve = axes.flat
    first_seed = min(r["seed"] for r in results)
    for i, arm in enumerate(ARMS):
        figures = [summary[f"{lr:g}"][arm]["final_loss"] for lr in lrs]
        mean, low, top = ([f[k] for f in figures] for k in ("mean", "min", "max"))
        ax_loss.plot(lrs, mean, "o-", color=f"C{i}", label=LABELS[arm])
        ax_loss.fill_between(lrs, low, top, color=f"C{i}", alpha=0.2)
        for r in (r for r in results if r["arm"] == arm):
            ax_loss.scatter([r["lr"]], [r["final_loss"]], color=f"C{i}", s=8)
            if r["lr"] != high:
                continue
            style = {"color": f"C{i}", "alpha": 0.8, "linewidth": 1}
            label = LABELS[arm] if r["seed"] == first_seed else None
            ax_logit.plot(*zip(*r["attn_logit_max"]), label=label, **style)
            ax_entropy.plot(*zip(*r["attn_entropy_min"]), label=label, **style)
            ax_curve.plot(range(len(r["loss"])), smooth(r["loss"]), label=label, **style)
    row = summary[f"{high:g}"]
    flagged = [f.get("attention_logit_growth") for f in row["baseline"]["flags"]]
    separated = [s for s in row["separation_step"] if s is not None]
    for ax in (ax_logit, ax_entropy, ax_curve):
        for j, step in enumerate(s for s in flagged if s is not None):
            ax.axvline(step, color="C3", linestyle="--", linewidth=0.8,
                       label="report: attention_logit_growth (baseline)" if j == 0 else None)  # fmt: skip
        for j, step in enumerate(separated):
            ax.axvline(step, color="gray", linestyle=":", linewidth=0.8,
                       label=f"baseline loss > QK-norm's + {SEPARATION:g} from here" if j == 0 else None)  # fmt: skip
    seeds = len({r["seed"] for r in results})
    ax_loss.set(xscale="log", xlabel="peak learning rate", ylabel=f"final loss (last 10% of steps; {seeds} seeds)",
                title="final loss vs learning rate (mean, min–max, seeds)")  # fmt: skip
    ax_logit.set(yscale="log", xlabel="step", ylabel="max attention logit (over heads and layers)",
                 title=f"attention logits at lr {high:g} (Monitor: attn_logit_max)")  # fmt: skip
    ax_entropy.set(xlabel="step", ylabel="smallest per-head mean entropy (nats)",
                   title=f"attention entropy at lr {high:g} (Monitor: attn_entropy_min)")  # fmt: skip
    ax_curve.set(xlabel="step", ylabel="training loss (10-step moving average)", title=f"loss at lr {high:g}")
    for ax in axes.flat:
        ax.legend(fontsize=7)
        ax.title.set_fontsize(10)
    common.save_figure(fig, args.out, NAME)


def interval(f: dict, spec: str = ".3f") -> str:
    return f"{f['mean']:{spec}} [{f['min']:{spec}}–{f['max']:{spec}}]"


def main(argv: list[str] | None = None) -> None:
    args = common.parse_args(__doc__, argv)
    common.quiet()
    start = time.perf_counter()
    lrs, steps = (FAST_LRS, FAST_STEPS) if args.fast else (LRS, STEPS)
    seeds = [args.seed] if args.fast else [args.seed + i for i in range(3)]
    jobs = [(arm, lr, seed, steps, str(args.out)) for lr in lrs for seed in seeds for arm in ARMS]
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:  # the runs are single-threaded
        results = list(pool.map(run, *zip(*jobs)))
    summary = summarize(results, lrs, seeds)
    high = 0.1 if 0.1 in lrs else max(lrs)
    plot(results, summary, lrs, high, args)

    print(f"byte-level LM on stdlib sources: {DEPTH} pre-LN blocks, width {WIDTH}, {HEADS} heads, seq {SEQ}, batch "
          f"{BATCH}, {steps} steps (warm-up {WARMUP}, cosine), AdamW {BETAS} eps {EPS:g}, independent wd "
          f"{WEIGHT_DECAY:g}; {len(seeds)} seed(s): mean [min-max]")  # fmt: skip
    headers = ["lr", "baseline final loss", "QK-norm final loss", "baseline max logit", "QK-norm max logit",
               "baseline min entropy", "QK-norm min entropy"]  # fmt: skip
    rows = [[lr, interval(row["baseline"]["final_loss"]), interval(row["qk_norm"]["final_loss"]),
             interval(row["baseline"]["max_logit"], ".3g"), interval(row["qk_norm"]["max_logit"], ".3g"),
             interval(row["baseline"]["min_entropy"], ".2f"), interval(row["qk_norm"]["min_entropy"], ".2f")]
            for lr, row in summary.items()]  # fmt: skip
    common.print_table(headers, rows)
    print(f"\nper seed: baseline logits > {GROWTH_LOGIT:g} at step / its loss above QK-norm's (+{SEPARATION}) from "
          "step; the report's findings (flag: first step)")  # fmt: skip
    headers = ["lr", "seed", "logit growth step", "loss separation step", "baseline flags", "QK-norm flags"]
    rows = [[lr, seed, row["growth_step"][i], row["separation_step"][i], row["baseline"]["flags"][i] or "-",
             row["qk_norm"]["flags"][i] or "-"]
            for lr, row in summary.items() for i, seed in enumerate(seeds)]  # fmt: skip
    common.print_table(headers, rows)
    seconds = time.perf_counter() - start
    out = {"lrs": list(lrs), "steps": steps, "seeds": seeds, "high_lr": f"{high:g}", "fast": args.fast,
           "by_lr": summary, "seconds": seconds}  # fmt: skip
    print(f"wrote {args.out / (NAME + '.png')} and {NAME}.json in {seconds:.1f} s")
    common.write_summary(args.out, NAME, out)


if __name__ == "__main__":
    main()
