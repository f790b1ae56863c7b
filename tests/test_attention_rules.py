"""The report's attention and output-logit flags (``attention_logit_growth``, ``attention_entropy_collapse``,
``output_logit_divergence``) on synthetic series: each fires at the right first step, near misses stay quiet; the
rows they live on; the text, Markdown and JSON reports, ``--rules`` / ``--fail-on``, ``HealthCheck(stop_on=...)`` and
the TensorBoard tab's strips."""

from __future__ import annotations

import json
import math
from collections import deque

import pytest
from torch.utils.tensorboard import SummaryWriter

from lightning_bn import HealthCheck
from lightning_bn.cli import EXIT_FLAGGED, EXIT_OK, main
from lightning_bn.report import FLAGS, Thresholds, analyze
from lightning_bn.report.formatting import format_markdown, format_rules, format_table
from lightning_bn.report.health import ADVICE, ATTENTION_FLAGS
from lightning_bn.tags import ATTENTION_STATISTICS, LAYERS_TAG, OUTPUT_STATISTICS

LOGIT_MAX, ENTROPY, ENTROPY_MIN = (ATTENTION_STATISTICS[k] for k in ("logit_max", "entropy", "entropy_min"))
LOG_Z = OUTPUT_STATISTICS["log_z"]
SITE, HEAD = "transformer.h.0.attn", "lm_head"
TABLE = [
    {"name": "transformer.h.0.ln_1", "module_type": "LayerNorm", "activation": None, "hook": "module"},
    {"name": SITE, "module_type": "GPT2Attention", "activation": None, "hook": "attention", "heads": 4},
    {"name": "transformer.h.0.mlp.act", "module_type": "NewGELUActivation", "activation": "gelu", "hook": "module"},
    {"name": HEAD, "module_type": "Linear", "activation": None, "hook": "module"},
]


def series(values, every=10):
    return [(i * every, float(v)) for i, v in enumerate(values)]


def flags_of(scalars, name=SITE, **thresholds):
    run = analyze(scalars, "synthetic", Thresholds(**thresholds), TABLE)
    return next(layer for layer in run.layers if layer.name == name).flags


# ------------------------------------------------------------------------------------------ attention_logit_growth
def test_logit_bound_fires_at_the_first_step_beyond_it():
    """Logits creeping up by 5% a step: no growth of 10x within 5 logged steps, but past 100 at step 480."""
    values = [5 * 1.05**i for i in range(80)]  # 5 .. 234
    first = next(i for i, v in enumerate(values) if v > 100)
    flag = flags_of({f"{LOGIT_MAX}/{SITE}": series(values)})["attention_logit_growth"]
    assert flag.first_step == first * 10 and flag.active
    assert "> 100" in flag.reason and f"{values[first]:.3g}" in flag.reason


def test_logit_growth_by_a_factor_fires_below_the_bound():
    """From ~2 to 40 within 4 logged steps (a runaway): flagged at 40, the first value beyond the floor of 30, though
    under the bound of 100."""
    values = [2.0, 2.1, 2.0, 1.9, 2.0, 2.2, 6.0, 12.0, 25.0, 40.0]
    flag = flags_of({f"{LOGIT_MAX}/{SITE}": series(values)})["attention_logit_growth"]
    assert flag.first_step == 90
    assert "x its 2 at step 40" in flag.reason and "within 5 logged steps" in flag.reason


@pytest.mark.parametrize(
    "values",
    [
        [5 + 10 * (0.5 + 0.5 * math.sin(i / 7)) for i in range(100)],  # stable 5..15 over 1000 steps
        [0.1 * 1.5**i for i in range(7)],  # a tiny init growing 0.1 -> 1.1: a large factor, under the floor
        [1.0 + 0.3 * i for i in range(100)],  # learning: 1 -> 30.7 over 100 logged steps, slowly
        [80.0] * 50,  # large but steady, under the bound
    ],
    ids=["stable", "tiny_init", "slow_growth", "steady_80"],
)
def test_logit_near_misses_stay_quiet(values):
    assert "attention_logit_growth" not in flags_of({f"{LOGIT_MAX}/{SITE}": series(values)})


def test_logit_growth_thresholds_are_options():
    values = [5 + 10 * (0.5 + 0.5 * math.sin(i / 7)) for i in range(100)]
    assert "attention_logit_growth" in flags_of({f"{LOGIT_MAX}/{SITE}": series(values)}, max_attention_logit=12)
    runaway = {f"{LOGIT_MAX}/{SITE}": series([2.0, 2.0, 25.0])}
    assert "attention_logit_growth" not in flags_of(runaway, attention_logit_growth=20)
    assert "attention_logit_growth" in flags_of(runaway, attention_logit_floor=10)
    assert "attention_logit_growth" not in flags_of(runaway)  # 25 is under the default floor of 30


def test_logit_spike_that_clears_is_not_active():
    values = [5.0] * 10 + [300.0, 150.0] + [5.0] * 10
    flag = flags_of({f"{LOGIT_MAX}/{SITE}": series(values)})["attention_logit_growth"]
    assert (flag.first_step, flag.last_step, flag.active) == (100, 110, False)
    assert flag.describe() == "attention_logit_growth at steps 100-110 (cleared)"


def test_infinite_logit_is_beyond_the_bound_and_nan_is_not_judged():
    assert flags_of({f"{LOGIT_MAX}/{SITE}": series([3.0, math.inf])})["attention_logit_growth"].first_step == 10
    assert not flags_of({f"{LOGIT_MAX}/{SITE}": series([3.0, math.nan, 3.0])})


# -------------------------------------------------------------------------------------- attention_entropy_collapse
def test_entropy_collapse_fires_where_both_conditions_first_hold():
    """From log(128) ~ 4.85 nats: 0.45 is below 0.1 x 4.85 and below 0.5 nats; the lowest head is quoted."""
    values = [4.85, 4.5, 3.0, 1.5, 0.6, 0.45, 0.2, 0.1]
    flag = flags_of({f"{ENTROPY}/{SITE}": series(values), f"{ENTROPY_MIN}/{SITE}": series([v / 3 for v in values])})
    flag = flag["attention_entropy_collapse"]
    assert flag.first_step == 50 and flag.active
    assert "0.45 nats" in flag.reason and "at step 0" in flag.reason and "lowest head 0.15 nats" in flag.reason


@pytest.mark.parametrize(
    "values",
    [
        [4.85 * (1 - 0.3 * i / 99) for i in range(100)],  # falls by 30%
        [0.4, 0.35, 0.3, 0.3],  # low from the start (a few keys): 0.75 of its start
        [4.85, 3.0, 0.49],  # under 0.5 nats, not under 0.1 x 4.85
        [8.0, 3.0, 0.55],  # under 0.1 x 8, not under 0.5 nats
    ],
    ids=["fall_30pc", "low_from_start", "above_fraction", "above_floor"],
)
def test_entropy_near_misses_stay_quiet(values):
    assert "attention_entropy_collapse" not in flags_of({f"{ENTROPY}/{SITE}": series(values)})


def test_entropy_min_over_heads_alone_is_not_judged():
    """One head attending to a single key (a previous-token head) is healthy: only the mean over heads is judged."""
    scalars = {f"{ENTROPY}/{SITE}": series([4.0, 3.0, 2.5]), f"{ENTROPY_MIN}/{SITE}": series([4.0, 0.01, 0.0])}
    assert not flags_of(scalars)


# ----------------------------------------------------------------------------------------- output_logit_divergence
def test_log_z_divergence_fires_at_the_first_step_beyond_both_bounds():
    """From log V = log 50257 ~ 10.8 downwards by 1 a logged step: |log Z| > 20 from -21 (moved 31.8)."""
    values = [10.8 - i for i in range(40)]
    flag = flags_of({f"{LOG_Z}/{HEAD}": series(values)}, name=HEAD)["output_logit_divergence"]
    first = next(i for i, v in enumerate(values) if abs(v) > 20)
    assert flag.first_step == first * 10 and "from 10.8 at step 0" in flag.reason


@pytest.mark.parametrize(
    "values",
    [
        [math.log(50257)] * 100,  # at log V, constant
        [math.log(2e9)] * 30,  # a vocabulary so large that log V > 20 at init: no drift
        [10.8 - 0.1 * i for i in range(109)] + [0.0] * 10,  # towards 0 (a z-loss at work)
        [25.0, 30.0, 33.0],  # a pretrained model at rest far from 0, moving less than 10
    ],
    ids=["log_v", "huge_vocab", "to_zero", "pretrained"],
)
def test_log_z_near_misses_stay_quiet(values):
    assert "output_logit_divergence" not in flags_of({f"{LOG_Z}/{HEAD}": series(values)}, name=HEAD)


# ---------------------------------------------------------------------------------------------------------- rows
def _run(every_flag=True):
    logits = [3.0, 3.0, 3.0, 40.0, 150.0] if every_flag else [3.0] * 5
    entropy = [4.0, 3.0, 0.3, 0.2, 0.2] if every_flag else [4.0] * 5
    log_z = [10.8, 0.0, -15.0, -25.0, -30.0] if every_flag else [10.8] * 5
    return {
        "act_std/transformer.h.0.ln_1": series([1.0] * 5),
        f"{LOGIT_MAX}/{SITE}": series(logits),
        f"{ATTENTION_STATISTICS['logit_rms']}/{SITE}": series([1.0] * 5),
        f"{ENTROPY}/{SITE}": series(entropy),
        f"{ENTROPY_MIN}/{SITE}": series([e / 2 for e in entropy]),
        "act_std/transformer.h.0.mlp.act": series([0.5] * 5),
        "act_saturation/transformer.h.0.mlp.act": series([0.1] * 5),
        "act_transmission/transformer.h.0.mlp.act": series([0.5] * 5),
        "act_std/lm_head": series([1.0] * 5),
        f"{OUTPUT_STATISTICS['logit_max']}/{HEAD}": series([3.0] * 5),
        f"{LOG_Z}/{HEAD}": series(log_z),
        "grad_norm/lm_head.weight": series([1.0] * 5),
        "weight_norm/lm_head.weight": series([10.0] * 5),
    }


def test_attention_rows_in_forward_order_with_their_own_kind():
    run = analyze(_run(), "run", layers=TABLE)
    assert [layer.name for layer in run.layers] == [e["name"] for e in TABLE]
    site = run.layers[1]
    assert (site.kind, site.layer_type, site.depth) == ("attention", "GPT2Attention", 1)
    assert (site.std, site.std_ratio, site.saturation, site.grad_norm) == (None, None, None, None)
    assert (site.logit_max, site.worst_logit_max, site.entropy, site.lowest_entropy, site.entropy_min) == (
        150.0, 150.0, 0.2, 0.2, 0.1,
    )  # fmt: skip
    assert list(site.flags) == ["attention_logit_growth", "attention_entropy_collapse"]
    assert site.flags["attention_logit_growth"].first_step == 30
    assert site.flags["attention_entropy_collapse"].first_step == 20
    head = run.layers[3]
    assert (head.kind, head.log_z, head.worst_log_z) == ("layer", -30.0, -30.0)
    assert list(head.flags) == ["output_logit_divergence"] and head.flags["output_logit_divergence"].first_step == 30
    for layer in (run.layers[0], run.layers[2]):  # non-attention rows never get them
        assert not set(layer.flags) & set(ATTENTION_FLAGS)
    assert run.steps == [0, 10, 20, 30, 40]
    assert {name: found["first_step"] for name, found in run.problems().items()} == {
        "attention_logit_growth": 30, "attention_entropy_collapse": 20, "output_logit_divergence": 30,
    }  # fmt: skip


def test_attention_rows_without_a_table_and_output_only_rows():
    """Without the layers table the rows come in the order first logged; a row with out_* figures only is an
    output row; the attention figures never go to a parameters row."""
    scalars = {f"{LOGIT_MAX}/{SITE}": series([3.0]), f"{LOG_Z}/{HEAD}": series([5.0])}
    run = analyze(scalars)
    assert [(layer.name, layer.kind, layer.layer_type) for layer in run.layers] == [
        (SITE, "attention", "attention"), (HEAD, "output", "output logits"),
    ]  # fmt: skip


def test_an_attention_module_with_parameters_keeps_its_gradient_rules():
    """nn.MultiheadAttention's in_proj_weight belongs to the site's row: one row with both kinds of figures."""
    site = "encoder.layers.0.self_attn"
    scalars = {
        f"{LOGIT_MAX}/{site}": series([3.0, 500.0]),
        f"grad_norm/{site}.in_proj_weight": series([1.0, math.nan]),
        f"weight_norm/{site}.in_proj_weight": series([1.0, 1.0]),
    }
    (layer,) = analyze(scalars).layers
    assert layer.kind == "attention" and layer.grad_norm is not None
    assert list(layer.flags) == ["nonfinite", "attention_logit_growth"]


# ------------------------------------------------------------------------------------------------------- thresholds
@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attention_logit": 0},
        {"attention_logit_growth": 0.5},
        {"attention_logit_window": 2.5},
        {"attention_logit_window": 0},
        {"attention_logit_floor": -1},
        {"min_entropy_fraction": 1.5},
        {"min_attention_entropy": math.nan},
        {"max_log_z": -1},
        {"max_log_z_drift": math.inf},
    ],
)
def test_bad_thresholds_name_the_field(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Thresholds(**kwargs)


# ----------------------------------------------------------------------------------------------------------- reports
def test_text_and_markdown_reports_carry_the_figures_and_advice():
    run = analyze(_run(), "run", layers=TABLE)
    text = format_table([run], [], Thresholds())
    header = next(line for line in text.splitlines() if line.startswith("layer"))
    assert header.split()[-6:] == ["max", "logit", "entropy", "log", "Z", "flags"]
    assert "attention_logit_growth since step 30" in text
    assert "try: the attention logits grow until the softmax is one-hot" in text
    assert 'lightning_bn.prepare(model, x, norm="qk")' in text and "z-loss 1e-4" in text
    for flag in ATTENTION_FLAGS:
        assert f"{flag}: 1 layer, first at step" in text
    markdown = format_markdown([run], [], Thresholds())
    assert "| max logit | entropy | log Z | flags |" in markdown and "output_logit_divergence since step 30" in markdown
    quiet = format_table([analyze(_run(every_flag=False), "run", layers=TABLE)], [], Thresholds())
    assert "no problems" in quiet and "max logit 3" in quiet and "entropy 4" in quiet and "log Z 10.8" in quiet


def test_runs_without_attention_figures_keep_their_columns():
    scalars = {"act_std/net.0": series([1.0]), "act_saturation/net.0": series([0.9])}
    text = format_table([analyze(scalars, "run")], [], Thresholds())
    assert "max logit" not in text and "log Z" not in text


def test_rules_list_the_new_flags_with_their_thresholds():
    rules = format_rules(Thresholds(max_attention_logit=50, min_attention_entropy=0.25, max_log_z=30))
    assert "attention_logit_growth: (attention rows) max attention logit rising past 50, or > 30 and >= 10 x" in rules
    assert (
        "attention_entropy_collapse: (attention rows) mean attention entropy < 0.1 x" in rules and "0.25 nats" in rules
    )
    assert "output_logit_divergence: (output-logit row) |mean log Z| > 30" in rules
    assert set(ATTENTION_FLAGS) <= set(FLAGS) and set(ATTENTION_FLAGS) <= set(ADVICE)


def _write(path, scalars, table=TABLE):
    writer = SummaryWriter(str(path))
    if table is not None:
        writer.add_text(LAYERS_TAG, json.dumps(table), 0)
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()
    return path


def test_cli_reports_fails_on_and_writes_json(tmp_path, capsys):
    logs = tmp_path / "logs"
    _write(logs / "unstable", _run())
    _write(logs / "stable", _run(every_flag=False))
    assert main(["report", str(logs / "stable"), "--fail-on", "all"]) == EXIT_OK
    capsys.readouterr()
    for flag in ATTENTION_FLAGS:
        assert main(["report", str(logs), "--fail-on", flag]) == EXIT_FLAGGED
        assert f"failing on {flag}" in capsys.readouterr().err
    assert main(["report", str(logs / "unstable"), "--max-attention-logit", "1000", "--attention-logit-growth",
                 "100", "--min-attention-entropy", "0.1", "--max-log-z", "40",
                 "--fail-on", ",".join(ATTENTION_FLAGS)]) == EXIT_OK  # fmt: skip
    capsys.readouterr()
    assert main(["report", str(logs / "unstable"), "--format", "json"]) == EXIT_OK
    document = json.loads(capsys.readouterr().out)
    (run,) = document["runs"].values()
    site = run["layers"][SITE]
    assert site["kind"] == "attention"
    assert site["attention"] == {
        "logit_max": {"latest": 150.0, "worst": 150.0},
        "entropy": {"latest": pytest.approx(0.2), "lowest": pytest.approx(0.2), "min_head": pytest.approx(0.1)},
    }
    assert site["flags"]["attention_logit_growth"]["first_step"] == 30
    assert run["layers"][HEAD]["output"] == {"log_z": {"latest": -30.0, "worst": -30.0}}
    assert run["problems"]["output_logit_divergence"]["first_layer"] == HEAD
    assert document["thresholds"]["max_attention_logit"] == 100.0


def test_cli_rejects_unknown_flags_and_bad_values(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["report", "--rules", "--attention-logit-window", "2.5"])
    assert exited.value.code == 2 and "attention_logit_window" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", "--rules", "--fail-on", "attention_logit"])


# ------------------------------------------------------------------------------------------------------ HealthCheck
def test_health_check_accepts_the_names():
    assert HealthCheck(stop_on=ATTENTION_FLAGS).stop_on == ATTENTION_FLAGS
    assert set(ATTENTION_FLAGS) <= set(HealthCheck(stop_on="all").stop_on)


class _Figures:
    """What HealthCheck reads from a monitor: its bounded history of figures."""

    def __init__(self, history):
        self.figures = {tag: deque(maxlen=history) for tag in _run()}
        self.layers = TABLE


def test_health_check_judges_a_window_with_the_starting_values_kept():
    """The entropy and log Z are judged against their first logged values, kept by HealthCheck though the judged
    window (and even the monitor's history) no longer holds them; the logit growth on the window itself."""
    check = HealthCheck(stop_on="all", summary=False)
    monitor = _Figures(history=3)
    check._monitors = [monitor]
    logits = [3.0] * 10 + [3.0, 3.0, 40.0]
    entropy = [4.0] * 10 + [3.0, 1.0, 0.3]
    log_z = [10.8] * 10 + [0.0, -10.0, -25.0]
    found = []
    for i in range(13):
        for tag, values in (
            (f"{LOGIT_MAX}/{SITE}", logits),
            (f"{ENTROPY}/{SITE}", entropy),
            (f"{LOG_Z}/{HEAD}", log_z),
        ):
            monitor.figures[tag].append((i, values[i]))
        found.append(check._judge(i))
    assert found[:12] == [None] * 12
    step, flag, layer, reason = found[12]
    assert (step, flag, layer) == (12, "attention_logit_growth", SITE)
    health = check.health
    site = next(layer for layer in health.layers if layer.name == SITE)
    assert site.flags["attention_entropy_collapse"].reason.endswith("x its 4 at step 0 (< 0.1 x and < 0.5 nats)")
    head = next(layer for layer in health.layers if layer.name == HEAD)
    assert "from 10.8 at step 0" in head.flags["output_logit_divergence"].reason


def test_health_check_stops_a_trainer_on_attention_logit_growth(tmp_path):
    """A Trainer whose monitor logs a runaway max attention logit is stopped at that logging step."""
    import torch
    from lightning.pytorch.callbacks import Callback
    from torch import nn

    from lightning_bn.callbacks._periodic import MonitorCallback
    from tests.helpers import BoringClassifier, random_data, trainer

    class Scripted(MonitorCallback):
        """A monitor whose figures are scripted: the max attention logit x10 every step from step 3."""

        def __init__(self):  # no engine: only what HealthCheck reads
            self._figures = {f"{LOGIT_MAX}/{SITE}": deque()}
            self._last = -1

        figures = property(lambda self: self._figures)
        layers = property(lambda self: TABLE)
        last_logged_step = property(lambda self: self._last)
        every_n_steps = property(lambda self: 1)
        state_key = property(lambda self: "Scripted")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step - 1
            self._figures[f"{LOGIT_MAX}/{SITE}"].append((step, 2.0 * 10 ** max(0, step - 2)))
            self._last = step

    for hook, value in vars(MonitorCallback).items():  # the engine's hooks off: Callback's no-ops
        if callable(value) and not hook.startswith("_") and hook not in vars(Scripted):
            setattr(Scripted, hook, getattr(Callback, hook))

    torch.manual_seed(0)
    check = HealthCheck(stop_on=("attention_logit_growth",), summary=False)
    data = random_data(8 * 20, features=4, classes=2)
    model = BoringClassifier(nn.Sequential(nn.Linear(4, 2)), lr=0.1, batch_size=8, data=data)
    t = trainer(tmp_path, logger=False, max_steps=20, callbacks=[Scripted(), check])
    # 2, 2, 2, 20, 200: 20 is under the growth rule's floor (30); 200 rises past the bound (100) at step 4
    with pytest.warns(RuntimeWarning, match=rf"stopping training at step 4: {SITE} is attention_logit_growth"):
        t.fit(model)
    assert check.stopped[:3] == (4, "attention_logit_growth", SITE) and t.global_step == 5
    assert "normalize queries and keys" in ADVICE["attention_logit_growth"]


# --------------------------------------------------------------------------------------------------------------- tab
def test_tab_draws_the_attention_strips(tmp_path):
    from lightning_bn.tb_plugin.data import FIGURES, run_data

    run = _write(tmp_path / "run", _run())
    data = run_data(run, "run")
    rows = [layer["name"] for layer in data["layers"]]
    assert rows == [e["name"] for e in TABLE]
    site, head = rows.index(SITE), rows.index(HEAD)
    assert data["layers"][site]["kind"] == "attention"
    flags = [f["name"] for f in data["layers"][site]["flags"]]
    assert flags == ["attention_entropy_collapse", "attention_logit_growth"]
    figures = data["figures"]
    assert {key: figures[key]["scale"] for key in ("attn_logit_max", "attn_entropy", "out_log_z")} == {
        key: FIGURES[key][1] for key in ("attn_logit_max", "attn_entropy", "out_log_z")
    }
    assert figures["attn_logit_max"]["values"][site] == [3.0, 3.0, 3.0, 40.0, 150.0]
    assert figures["attn_entropy"]["values"][site] == [1.0, 0.75, 0.075, 0.05, 0.05]  # over its value at the start
    assert figures["out_log_z"]["values"][head] == [10.8, 0.0, -15.0, -25.0, -30.0]
    assert figures["attn_logit_max"]["values"][0] == [None] * 5  # rows without the figure stay blank
    assert figures["std_ratio"]["values"][site] == [None] * 5
    plain = run_data(_write(tmp_path / "plain", {"act_std/net.0": series([1.0, 1.0])}, table=None), "plain")
    assert not {"attn_logit_max", "attn_entropy", "out_log_z"} & set(plain["figures"])


# -------------------------------------------------------------------------------------- with the monitor's figures
def test_report_flags_a_monitored_runaway():
    """Monitor's own attention and output-logit figures of a tiny attention model whose query and key weights are
    scaled up 1.8x a step from step 5 (logits x3.2 a step) and whose head bias falls by 4 a step: each flag fires."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from lightning_bn import Monitor

    class Attention(nn.Module):
        def __init__(self, dim=16, heads=2):
            super().__init__()
            self.heads = heads
            self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))

        def forward(self, x):
            q, k, v = (f(x).unflatten(-1, (self.heads, -1)).transpose(1, 2) for f in (self.q, self.k, self.v))
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)

    class Net(nn.Module):
        def __init__(self, dim=16):
            super().__init__()
            self.embed, self.attn, self.head = nn.Linear(8, dim), Attention(dim), nn.Linear(dim, 5)

        def forward(self, x):
            return self.head(self.attn(self.embed(x)))

    torch.manual_seed(0)
    net = Net()
    x, y = torch.randn(4, 12, 8), torch.randint(0, 5, (4, 12))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with Monitor(net, every_n_steps=1, example_input=x, gradients=False) as monitor:
        for step in range(14):
            opt.zero_grad()
            F.cross_entropy(net(x).flatten(0, 1), y.flatten()).backward()
            opt.step()
            if step >= 5:
                with torch.no_grad():
                    net.attn.q.weight.mul_(1.8), net.attn.k.weight.mul_(1.8), net.head.bias.sub_(4.0)
            monitor.step()
        figures, layers = {tag: list(values) for tag, values in monitor.figures.items()}, monitor.layers
    run = analyze(figures, "runaway", layers=layers)
    rows = {layer.name: layer for layer in run.layers}
    assert rows["attn"].kind == "attention"
    first = {name: flag.first_step for layer in run.layers for name, flag in layer.flags.items()}
    assert {name: first.get(name) for name in ATTENTION_FLAGS} == {
        "attention_logit_growth": 9,  # 1.09 at step 5 -> 29 at step 8 (under the floor of 30) -> ~95 at step 9
        "attention_entropy_collapse": 10,
        "output_logit_divergence": 11,
    }
    assert set(rows["attn"].flags) == {"attention_logit_growth", "attention_entropy_collapse"}
    assert set(rows["head"].flags) == {"output_logit_divergence"}
    quiet = analyze({tag: values[:5] for tag, values in figures.items()}, "before", layers=layers)
    assert not quiet.raised
