"""`lightning-bn report`: flags the right layers of real bad runs and nothing on good ones; formats; exit codes."""

import contextlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from lightning_bn import ActivationMonitor, GradientMonitor, __version__
from lightning_bn.cli import EXIT_FLAGGED, EXIT_NO_LOGS, EXIT_OK, main
from lightning_bn.report import FLAGS, Thresholds, analyze
from tests.helpers import BoringClassifier, mlp, random_data, trainer

STEPS = 3


def _init(net: nn.Sequential, weight, bias: float | None = None) -> nn.Sequential:
    for layer in net:
        if isinstance(layer, nn.Linear):
            weight(layer.weight)
            if bias is not None:
                nn.init.constant_(layer.bias, bias)
    return net


def _he(w):
    return nn.init.kaiming_normal_(w, nonlinearity="relu")


def _nan_gradient_at_net4(net: nn.Sequential) -> nn.Sequential:
    net[4].weight.register_hook(lambda g: torch.full_like(g, math.nan))
    return net


def _zero_gradients(net: nn.Sequential, count: int) -> nn.Sequential:
    linears = [layer for layer in net if isinstance(layer, nn.Linear)][:count]
    for layer in linears:
        for p in layer.parameters():
            p.register_hook(torch.zeros_like)
    return net


#: run name -> (model, batch size, lr): the classic good and bad set-ups, as small as still shows the effect
RUNS = {
    "he_relu": lambda: (_init(mlp(6, 64, nn.ReLU), _he), 32, 0.1),
    "xavier_tanh": lambda: (_init(mlp(6, 64, nn.Tanh), nn.init.xavier_normal_), 32, 0.1),
    # Glorot & Bengio 2010: sigmoid with N(0, 1) weights pins deep units at an asymptote
    "sigmoid_normal": lambda: (_init(mlp(10, 1024, nn.Sigmoid), lambda w: nn.init.normal_(w, 0.0, 1.0)), 16, 0.1),
    # He et al. 2015: Xavier under ReLU halves the variance per layer; after 30 layers the signal is gone
    "xavier_relu30": lambda: (_init(mlp(30, 64, nn.ReLU), nn.init.xavier_normal_, bias=0.0), 32, 0.01),
    "dead_relu": lambda: (_init(mlp(4, 32, nn.ReLU), _he, bias=-10.0), 32, 0.1),
    "nan_gradient": lambda: (_nan_gradient_at_net4(_init(mlp(4, 32, nn.ReLU), _he)), 32, 0.1),
    # the case: 10 sigmoid layers 256 wide, N(0, 1) weights; ~55-60% of each sigmoid layer saturated
    "sigmoid_normal256": lambda: (_init(mlp(10, 256, nn.Sigmoid), lambda w: nn.init.normal_(w, 0.0, 1.0)), 32, 0.1),
    # gradients of the first five Linears replaced by exact zeros (weights stay non-zero)
    "zero_gradients": lambda: (_zero_gradients(_init(mlp(6, 32, nn.ReLU), _he), 5), 32, 0.1),
}


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    """One log directory holding every run of RUNS as ``<name>/version_0``, logged at every step."""
    root = tmp_path_factory.mktemp("logs")
    for name, build in RUNS.items():
        torch.manual_seed(0)
        net, batch_size, lr = build()
        model = BoringClassifier(net, lr=lr, batch_size=batch_size, data=random_data(batch_size * STEPS))
        monitors = [ActivationMonitor(every_n_steps=1, histograms=False, heatmap=False), GradientMonitor(1)]
        t = trainer(root, logger=TensorBoardLogger(root, name=name), max_steps=STEPS, callbacks=monitors)
        with pytest.warns(RuntimeWarning) if name == "nan_gradient" else contextlib.nullcontext():
            t.fit(model)
    return root


@pytest.fixture(scope="module")
def report(logs) -> dict:
    """The JSON report of every run under ``logs`` (one read of all event files)."""
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_bn.cli", "report", str(logs), "--format", "json", "--fail-on", "all"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == EXIT_FLAGGED, proc.stderr
    assert "failing on saturated, dead, nonfinite, vanishing" in proc.stderr
    return json.loads(proc.stdout)


def _flagged(report: dict, run: str, flag: str) -> list[str]:
    return [name for name, layer in report["runs"][f"{run}/version_0"]["layers"].items() if flag in layer["flags"]]


def test_every_run_is_reported_separately_in_depth_order(report):
    """Each version directory is its own run, named by its path; layers come in depth order (net.2 before net.10)."""
    assert set(report["runs"]) == {f"{name}/version_0" for name in RUNS}
    layers = list(report["runs"]["he_relu/version_0"]["layers"])
    assert layers == [f"net.{i}" for i in range(13)]
    assert report["runs"]["he_relu/version_0"]["steps"] == list(range(STEPS))


@pytest.mark.parametrize("run", ["he_relu", "xavier_tanh"])
def test_good_runs_flag_nothing(report, run):
    """He-initialized ReLU and Xavier-initialized tanh MLPs raise no flag on any layer."""
    assert report["runs"][f"{run}/version_0"]["problems"] == {}
    assert all(not layer["flags"] for layer in report["runs"][f"{run}/version_0"]["layers"].values())


def test_sigmoid_with_normal_weights_is_saturated_at_deep_layers(report):
    """Width 1024, N(0, 1) weights: from the second sigmoid on the pre-activation std is ~17 and each layer passes
    ~0.07 of a healthy layer's gradient power (transmission < 0.1): flagged saturated from step 0, the flag saying so
    beside the per-element figure (~0.78 of elements on the flat ends). The first sigmoid, fed by the data, passes
    ~0.18 while ~45% of its elements sit on the flat ends: both figures shown, not flagged. No Linear is flagged."""
    assert _flagged(report, "sigmoid_normal", "saturated") == [f"net.{i}" for i in range(3, 20, 2)]
    run = report["runs"]["sigmoid_normal/version_0"]
    first, deep = run["layers"]["net.1"], run["layers"]["net.9"]
    assert 0.3 < first["saturation"]["latest"] < 0.7 and 0.1 < first["transmission"]["latest"] < 0.3
    assert deep["transmission"]["latest"] < 0.1 and deep["saturation"]["latest"] > 0.7
    reason = deep["flags"]["saturated"]["reason"]
    assert "transmission" in reason and "saturation" in reason
    assert run["problems"]["saturated"]["first_step"] == 0
    assert not _flagged(report, "sigmoid_normal", "vanishing") + _flagged(report, "sigmoid_normal", "exploding")


def test_xavier_relu_30_layers_vanishes_at_depth_only(report):
    """The deep layers of a 30-layer Xavier ReLU net are flagged vanishing; the first ten layers are not."""
    vanishing = _flagged(report, "xavier_relu30", "vanishing")
    assert {f"net.{i}" for i in range(50, 61)} <= set(vanishing)
    assert not {f"net.{i}" for i in range(10)} & set(vanishing)
    problem = report["runs"]["xavier_relu30/version_0"]["problems"]["vanishing"]
    assert problem["first_step"] == 0 and int(problem["first_layer"].split(".")[1]) > 20


def test_relu_with_negative_bias_is_dead(report):
    """Bias -10 kills every ReLU layer from step 0; the Linears after them are flagged vanishing, not dead."""
    assert _flagged(report, "dead_relu", "dead") == ["net.1", "net.3", "net.5", "net.7"]
    layer = report["runs"]["dead_relu/version_0"]["layers"]["net.3"]
    assert layer["dead"] == {"latest": 1.0, "worst": 1.0}
    assert layer["flags"]["dead"] == {"first_step": 0, "last_step": 2, "active": True, "reason": "dead fraction 1"}
    assert _flagged(report, "dead_relu", "vanishing") == ["net.2", "net.4", "net.6", "net.8"]


def test_nonfinite_is_traced_to_the_layer_and_step_it_started(report):
    """A NaN gradient in net.4 at step 0 is flagged there first; it reaches every parameter at step 1 and the
    activations before net.4 at step 2; NaN activations are not also called saturated or dead."""
    run = report["runs"]["nan_gradient/version_0"]
    assert run["problems"]["nonfinite"]["first_step"] == 0
    assert run["problems"]["nonfinite"]["first_layer"] == "net.4"
    firsts = {name: layer["flags"]["nonfinite"]["first_step"] for name, layer in run["layers"].items()}
    assert firsts == {f"net.{i}": 0 if i == 4 else 2 if i in (1, 3) else 1 for i in range(9)}
    assert list(run["problems"]) == ["nonfinite"]
    assert run["layers"]["net.4"]["grad_norm"] == "nan"  # strict JSON: non-finite figures are strings
    assert run["layers"]["net.5"]["nonfinite"] == {"latest": 32 * 32, "worst": 32 * 32, "gradient": False}


def test_json_is_strict_and_complete(logs, capsys):
    """JSON output parses without NaN/Infinity constants and carries thresholds, runs, layers, figures and flags."""
    assert main(["report", str(logs / "nan_gradient"), "--format", "json"]) == EXIT_OK
    out = capsys.readouterr().out

    def reject(constant):
        raise ValueError(constant)

    document = json.loads(out, parse_constant=reject)
    assert document["thresholds"] == {
        "min_transmission": 0.1,
        "saturation_margin": 0.2,
        "max_saturation": None,
        "max_dead": 0.5,
        "min_dead_samples": 16,
        "min_std_ratio": 0.01,
        "max_std_ratio": 100.0,
        "max_update_ratio": 1.0,
        "min_grad_ratio": 1e-4,
        "max_gradient_decades": 4.0,
        "trend_grad_ratio": 1e-2,
        "max_weight_ratio": 1e3,
        "min_update_ratio": 1e-5,
        "stalled_steps": 5,
        "min_loss_improvement": 0.01,
        "converged_loss": 1e-3,
        "max_attention_logit": 100.0,
        "attention_logit_growth": 10.0,
        "attention_logit_window": 5,
        "attention_logit_floor": 30.0,
        "min_entropy_fraction": 0.1,
        "min_attention_entropy": 0.5,
        "max_log_z": 20.0,
        "max_log_z_drift": 10.0,
    }
    assert document["flags"] == ["nonfinite"]
    layer = document["runs"]["version_0"]["layers"]["net.1"]
    assert {"depth", "kind", "saturation", "dead", "std", "std_ratio", "grad_norm", "update_ratio", "nonfinite"} <= set(
        layer
    )
    assert layer["kind"] == "activation" and document["runs"]["version_0"]["layers"]["net.0"]["kind"] == "layer"
    # from the layers table: module type, the layer std/first is relative to; no deliberate zeros in this MLP
    assert (layer["module_type"], layer["std_reference"], layer["zero_init"]) == ("ReLU", "net.1", False)
    assert document["runs"]["version_0"]["layers"]["net.2"]["std_reference"] == "net.0"
    assert document["runs"]["version_0"]["forward_order"] is True and document["runs"]["version_0"]["zero_init"] == []


@pytest.mark.parametrize(
    ("run", "fail_on", "code"),
    [
        ("dead_relu", "dead", EXIT_FLAGGED),
        ("dead_relu", "saturated,nonfinite", EXIT_FLAGGED),
        ("dead_relu", "nonfinite,exploding", EXIT_OK),
        ("sigmoid_normal", "saturated", EXIT_FLAGGED),
        ("xavier_relu30", "vanishing", EXIT_FLAGGED),
        ("he_relu", "all", EXIT_OK),
        ("xavier_tanh", "saturated,dead,nonfinite,vanishing,exploding", EXIT_OK),
    ],
)
def test_fail_on_exit_codes(logs, capsys, run, fail_on, code):
    """--fail-on exits 1 when a listed flag is raised in the run, 0 otherwise."""
    assert main(["report", str(logs / run), "--fail-on", fail_on]) == code
    assert ("failing on" in capsys.readouterr().err) == (code == EXIT_FLAGGED)


def test_without_fail_on_flags_do_not_fail(logs):
    """Flags alone only inform: the exit status is 0 unless --fail-on names them."""
    assert main(["report", str(logs / "dead_relu")]) == EXIT_OK


def test_thresholds_are_options(logs, capsys):
    """Lowering --min-transmission / raising --max-dead past what the sigmoid run reaches clears those flags, and
    --rules prints the rules with those thresholds (no LOGDIR needed) where a report prints one short pointer."""
    args = ["report", str(logs / "sigmoid_normal"), "--fail-on", "saturated,dead"]
    assert main(args) == EXIT_FLAGGED
    assert main([*args, "--min-transmission", "0.01", "--max-dead", "0.99"]) == EXIT_OK
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert last == "rules behind each flag: lightning-bn report --rules"
    assert main(["report", "--rules", "--min-transmission", "0.01", "--max-dead", "0.99"]) == EXIT_OK
    rules = capsys.readouterr().out.splitlines()
    assert "  saturated: gradient transmission < 0.01 of a healthy layer's" in rules[1]
    assert "  dead: dead fraction > 0.99" in rules
    with pytest.raises(SystemExit) as exc:
        main(["report"])
    assert exc.value.code == 2 and "LOGDIR" in capsys.readouterr().err


def test_table_is_aligned_and_says_since_when(logs, capsys):
    """The table has one aligned row per layer, flags with the step they started, and a problem summary."""
    main(["report", str(logs / "dead_relu"), "--all"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("layer "))
    rows = lines[header : header + 10]
    assert [row.split()[0] for row in rows[1:]] == [f"net.{i}" for i in range(9)]
    assert len({row.index(row.split()[1]) for row in rows[1:]}) == 1  # second column starts at the same offset
    assert "saturated since step 0, dead since step 0" in rows[4]
    dead = next(line for line in lines if line.startswith("  dead: "))
    assert dead.startswith("  dead: 4 layers, first at step 0 in net.1 (dead fraction 1); try: ")
    assert "He init" in dead  # one line of advice per flag


def test_markdown_is_a_pipe_table(logs, capsys):
    """Markdown output: a heading per run and a pipe table with the same number of cells on every row."""
    main(["report", str(logs), "--format", "markdown"])
    out = capsys.readouterr().out
    assert "### `dead_relu/version_0`" in out and "### `he_relu/version_0`" in out
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert table[1].startswith("|---") and len({line.count(" | ") for line in table if "---" not in line}) == 1
    assert "- dead: 4 layers, first at step 0 in net.1 (dead fraction 1)" in out
    lines = out.splitlines()  # the healthy layers by type: nested bullets under their own bullet
    folded = lines.index("- healthy layers (13; --all lists them):")
    assert [line.split(":")[0] for line in lines[folded + 1 : folded + 3]] == ["  - Linear", "  - relu"]


def test_unknown_fail_on_name_is_a_usage_error(capsys):
    """An unknown --fail-on name exits 2 with argparse's message naming the value and the allowed names."""
    with pytest.raises(SystemExit) as exc:
        main(["report", ".", "--fail-on", "dead,sleepy"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "'sleepy'" in err and "saturated, dead, nonfinite, vanishing, exploding" in err


@pytest.mark.parametrize("option", ["--max-dead=1.5", "--min-std-ratio=0", "--max-update-ratio=x"])
def test_bad_threshold_is_a_usage_error(capsys, option):
    """Thresholds out of range exit 2 naming the option and the value, with the message Thresholds gives in Python."""
    flag, _, text = option.partition("=")
    with pytest.raises(SystemExit) as exc:
        main(["report", ".", option])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and text in err
    if text != "x":
        name = flag[2:].replace("-", "_")
        with pytest.raises(ValueError) as python:
            Thresholds(**{name: float(text) if "." in text else int(text)})
        assert str(python.value) in err and f"`{name}`" in err


def test_missing_directory_or_no_monitor_logs_exit_2(tmp_path, capsys):
    """A missing LOGDIR, one without event files, one whose events hold no lightning-bn scalars: exit 2, saying so."""
    assert main(["report", str(tmp_path / "nope")]) == EXIT_NO_LOGS
    assert "does not exist" in capsys.readouterr().err
    model = BoringClassifier(mlp(1, 8))
    trainer(tmp_path / "csv", logger=CSVLogger(tmp_path / "csv"), max_steps=1).fit(model)
    assert main(["report", str(tmp_path / "csv")]) == EXIT_NO_LOGS
    assert "no TensorBoard event files" in capsys.readouterr().err
    trainer(tmp_path / "tb", logger=TensorBoardLogger(tmp_path / "tb"), max_steps=1).fit(model)
    assert main(["report", str(tmp_path / "tb"), "--fail-on", "all"]) == EXIT_NO_LOGS
    err = capsys.readouterr().err
    assert "none holds lightning-bn scalars" in err and "ActivationMonitor" in err


def test_version_and_no_command(capsys):
    """--version prints the version and exits 0; no command prints the usage and returns 2."""
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and __version__ in capsys.readouterr().out
    assert main([]) == 2 and "report" in capsys.readouterr().err


def test_analyze_orders_layers_and_combines_parameters():
    """Layers follow first appearance; parameter-only layers slot in by parameter order; figures combine per layer."""
    scalars = {
        "act_std/enc.1": [(0, 1.0)],
        "act_saturation/enc.1": [(0, 0.5)],
        "act_std/dec.1": [(0, 1.0)],
        "act_saturation/dec.1": [(0, 0.5)],
        "grad_norm/enc.0.weight": [(0, 3.0)],
        "grad_norm/enc.0.bias": [(0, 4.0)],
        "weight_norm/enc.0.weight": [(0, 3.0)],
        "weight_norm/enc.0.bias": [(0, 0.0)],
        "update_ratio/enc.0.weight": [(0, 0.01)],
        "update_ratio/enc.0.bias": [(0, math.nan)],
        "grad_norm/dec.0.weight": [(0, 1.0)],
        "grad_norm/total": [(0, 5.1)],
        "train_loss": [(0, 2.3)],
    }
    run = analyze(scalars)
    assert [layer.name for layer in run.layers] == ["enc.0", "enc.1", "dec.0", "dec.1"]
    enc0 = run.layers[0]
    assert enc0.kind == "parameters" and enc0.grad_norm == 5.0  # 2-norm over the layer's parameters
    assert enc0.update_ratio == pytest.approx(0.01)  # the bias with zero weights says nothing about the update
    assert run.problems() == {}


def test_depth_flags_compare_like_with_like():
    """Vanishing/exploding compare activations with the first activation and other layers with the first layer."""
    linear_std = {f"act_std/l{i}": [(0, s)] for i, s in enumerate([10.0, 5.0, 0.05])}
    act = {f"act_std/a{i}": [(0, s)] for i, s in enumerate([0.5, 0.4, 60.0])}
    sat = {f"act_saturation/a{i}": [(0, 0.1)] for i in range(3)}
    run = analyze({**linear_std, **act, **sat})
    flags = {layer.name: set(layer.flags) for layer in run.layers}
    assert flags == {"l0": set(), "l1": set(), "l2": {"vanishing"}, "a0": set(), "a1": set(), "a2": {"exploding"}}
    assert run.layers[2].flags["vanishing"].reason == "std 0.005 x that of l0"


def test_flags_record_first_and_last_step_and_clearing():
    """A flag keeps its first and last step; one that no longer holds at the latest step is reported cleared."""
    scalars = {"act_dead/a": [(0, 0.9), (10, 0.8), (20, 0.1)], "update_ratio/l.weight": [(0, 0.5), (10, 3.0)]}
    scalars["weight_norm/l.weight"] = [(0, 1.0), (10, 1.0)]
    run = analyze(scalars, thresholds=Thresholds(max_update_ratio=2.0))
    dead = run.layers[0].flags["dead"]
    assert (dead.first_step, dead.last_step, dead.active) == (0, 10, False)
    assert dead.describe() == "dead at steps 0-10 (cleared)"
    assert run.layers[1].flags["exploding"].describe() == "exploding since step 10"
    assert set(FLAGS) >= run.raised == {"dead", "exploding"}


def test_sigmoid_256_with_normal_weights_transmits_enough(report):
    """The issue's case: ~55-60% of each sigmoid's elements sit beyond the asymptote bound (act_saturation, shown),
    yet each layer passes ~0.13 of a healthy layer's gradient power: not flagged saturated (it trains, slowly). The
    old per-kind rule on act_saturation would have flagged all ten."""
    run = report["runs"]["sigmoid_normal256/version_0"]
    sigmoids = [f"net.{i}" for i in range(1, 20, 2)]
    assert not _flagged(report, "sigmoid_normal256", "saturated")
    for name in sigmoids[1:]:
        layer = run["layers"][name]
        assert 0.5 < layer["saturation"]["latest"] < 0.7 and 0.1 < layer["transmission"]["latest"] < 0.2
    relu = report["runs"]["he_relu/version_0"]["layers"]["net.1"]
    assert relu["saturation"]["healthy"] == pytest.approx(0.5, abs=1e-3)
    assert relu["transmission"]["latest"] == pytest.approx(1.0, abs=0.25)


def test_zero_gradients_are_flagged_vanishing(report):
    """Five Linears whose gradients are exactly 0 (weights non-zero) are flagged vanishing_gradient from step 0;
    the sixth Linear and the activations are not."""
    flagged = _flagged(report, "zero_gradients", "vanishing_gradient")
    assert flagged == [f"net.{i}" for i in range(0, 10, 2)]
    layer = report["runs"]["zero_gradients/version_0"]["layers"]["net.0"]
    assert layer["grad_norm"] == 0.0
    assert layer["flags"]["vanishing_gradient"]["first_step"] == 0


@pytest.mark.parametrize(
    ("run", "fail_on", "code"),
    [
        ("zero_gradients", "vanishing_gradient", EXIT_FLAGGED),
        ("he_relu", "vanishing_gradient,saturated,stalled", EXIT_OK),
        ("sigmoid_normal256", "saturated", EXIT_OK),
        ("sigmoid_normal", "saturated", EXIT_FLAGGED),
        ("sigmoid_normal256", "nonfinite", EXIT_OK),
    ],
)
def test_fail_on_follows_the_new_flags(logs, run, fail_on, code):
    assert main(["report", str(logs / run), "--fail-on", fail_on]) == code


def test_stalled_updates_need_a_run_of_steps():
    """``stalled``: update ratio below min_update_ratio on stalled_steps consecutive logged steps; a shorter run or
    a NaN in between does not count."""
    weight = {"weight_norm": {s: 1.0 for s in range(8)}}
    tiny = {s: 1e-7 for s in range(8)}
    scalars = {f"{k}/net.0.weight": list(v.items()) for k, v in {**weight, "update_ratio": tiny}.items()}
    scalars["grad_norm/net.0.weight"] = [(s, 1.0) for s in range(8)]
    flag = analyze(scalars).layers[0].flags["stalled"]
    assert (flag.first_step, flag.last_step, flag.active) == (0, 7, True)
    short = dict(scalars, **{"update_ratio/net.0.weight": [(s, 1e-7 if s != 4 else math.nan) for s in range(8)]})
    assert "stalled" not in analyze(short).layers[0].flags
    assert "stalled" in analyze(short, thresholds=Thresholds(stalled_steps=4)).layers[0].flags


def test_default_report_folds_healthy_layers(logs, capsys):
    """Without --all a healthy run prints no table, one line per layer type, and 'no problems'."""
    assert main(["report", str(logs / "he_relu")]) == EXIT_OK
    out = capsys.readouterr().out
    assert not [line for line in out.splitlines() if line.startswith("net.")]
    assert "healthy layers (13; --all lists them):" in out
    assert [line.split(":")[0].strip() for line in out.splitlines() if line.startswith("    ")] == ["Linear", "relu"]
    assert "no problems" in out
