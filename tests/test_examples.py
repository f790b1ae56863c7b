"""The example scripts reproduce their classic results in ``--fast`` mode: each writes a PNG and a JSON summary."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the quick loop is `pytest -m "not slow"`

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, out: Path) -> dict:
    """Run ``examples/<name>.py --fast --out <out>``; return its ``<out>/<name>.json`` after checking the PNG exists."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), "--fast", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard, not a speed check: --fast takes 10-60 s alone, more on a loaded CI box
        cwd=out,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / f"{name}.png").stat().st_size > 0
    return json.loads((out / f"{name}.json").read_text())


def test_sigmoid_top_layer_driven_towards_zero(tmp_path: Path) -> None:
    """Glorot & Bengio's Figure 2: under the standard init the top sigmoid layer's act_mean falls from 0.5 to ~0 while
    the lower layers stay near or above 0.5, and its act_saturation is clearly higher than under Xavier: > 0.9 over
    the second half of the run against Xavier's <= standard - 0.08 (seeds 0-2 of --fast: 0.96/0.95/1.00 vs
    0.84/0.74/0.80; averaged over the whole run 0.86/0.84/0.96 vs 0.78/0.68/0.76)."""
    summary = run_example("sigmoid_saturation", tmp_path)
    standard, xavier = summary["standard"], summary["xavier"]
    top = standard["top_layer"]
    lower = [layer for layer in standard["mean_at_end"] if layer != top]
    assert standard["mean_at_init"][top] == pytest.approx(0.5, abs=0.05)
    assert standard["mean_at_end"][top] < 0.01
    assert all(standard["mean_at_end"][layer] > 0.45 for layer in lower), standard["mean_at_end"]
    assert standard["top_saturation_late"] > 0.9, standard
    assert xavier["top_saturation_late"] < standard["top_saturation_late"] - 0.08, (standard, xavier)
    assert xavier["top_saturation_avg"] < standard["top_saturation_avg"] - 0.04, (standard, xavier)
    assert summary["standard_saturates_more"]


def test_deep_relu_xavier_vanishes_he_and_autoinit_hold(tmp_path: Path) -> None:
    """He et al. 2015: at init Xavier's deepest ReLU std is < 1/100 of the first layer's and its loss stays at
    ln 10, while He and AutoInit keep every layer's std within [0.5, 2] of the first and their loss falls."""
    summary = run_example("deep_relu_init", tmp_path)
    assert summary["xavier"]["std_ratio_last_to_first"] < 1e-2
    assert summary["xavier"]["loss_last"] == pytest.approx(math.log(10), abs=0.05)
    for init in ("he", "autoinit"):
        assert 0.5 <= summary[init]["std_ratio_min"] <= summary[init]["std_ratio_max"] <= 2.0, summary[init]
        assert summary[init]["loss_last"] < summary["xavier"]["loss_last"] - 0.5


def test_critical_init_trains_the_deep_sigmoid_net_and_balances_the_tanh_gradients(tmp_path: Path) -> None:
    """Poole et al. 2016 / Schoenholz et al. 2017, --fast (seeds 0-2): the 10-layer sigmoid net trained 150 steps and
    the 100-layer tanh net at init. The critical init (prepare's auto, reported as "critical") keeps the first/last
    gradient ratio of the loss within [0.1, 10] (measured 0.62-1.75 sigmoid, 0.75-2.16 tanh) where the previous auto
    (Xavier with the forward-preserving gain) vanishes under sigmoid (2e-4) and explodes under tanh (4.7e3-5.2e3);
    the init check flags those two with gradient_vanishing / gradient_exploding on every seed and the critical init
    with no gradient finding; the sigmoid net reaches > 0.8 validation accuracy from the critical init (measured
    0.91-0.92) and stays at chance (< 0.2) from the other three inits (0.08-0.10)."""
    summary = run_example("critical_init", tmp_path)
    sigmoid, tanh = summary["nets"]["sigmoid"]["arms"], summary["nets"]["tanh"]["arms"]
    for arms in (sigmoid, tanh):
        assert arms["critical"]["schemes"] == ["critical", "xavier"]  # hidden layers critical, logits Xavier
        ratio = arms["critical"]["gradient_ratio"]
        assert 0.1 <= ratio["min"] <= ratio["max"] <= 10, ratio
        assert not any(p.startswith("gradient_") for found in arms["critical"]["findings"] for p in found), arms
    assert sigmoid["previous_auto"]["gradient_ratio"]["max"] < 1e-2
    assert all("gradient_vanishing" in found for found in sigmoid["previous_auto"]["findings"])
    assert tanh["previous_auto"]["gradient_ratio"]["min"] > 100
    assert all("gradient_exploding" in found for found in tanh["previous_auto"]["findings"])
    assert sigmoid["critical"]["accuracy"]["min"] > 0.8, sigmoid["critical"]["accuracy"]
    for arm in ("default", "xavier", "previous_auto"):
        assert sigmoid[arm]["accuracy"]["max"] < 0.2, (arm, sigmoid[arm]["accuracy"])


def test_bn_scale_invariance_identities(tmp_path: Path) -> None:
    """BN((aW)u) = BN(Wu) and grad(aW) = grad(W)/a hold to 1e-5 (relative, float64) for a in 0.1, 10, 100, and
    GradientMonitor's update_ratio at step 0 is 1/a^2 = 100 times smaller for weights scaled by 10."""
    summary = run_example("bn_scale_invariance", tmp_path)
    assert set(summary["identities"]) == {"0.1", "10", "100"}
    assert summary["max_relative_error"] < 1e-5
    for layer, figures in summary["update_ratio"].items():
        assert figures["step0_quotient"] == pytest.approx(100.0, rel=0.01), layer
        assert figures["average"][1] < figures["average"][0] / 10, layer


def test_eval_mode_pitfall_train_mode_loses_accuracy_and_guards_warn(tmp_path: Path) -> None:
    """Inference in train mode on batches of 4 loses accuracy against eval mode; guard() and BatchNormGuard warn."""
    summary = run_example("eval_mode_pitfall", tmp_path)
    assert summary["eval_accuracy"] > 0.85
    assert summary["train_mode_accuracy"]["4"] < summary["eval_accuracy"] - 0.05
    assert summary["guard_warned"]
    assert any("training mode" in m for m in summary["guard_messages"])
    assert summary["callback_warned"]
    assert any("training mode during validation" in m for m in summary["callback_messages"])


def test_bn_learning_rate_batchnorm_widens_trainable_range(tmp_path: Path) -> None:
    """Ioffe & Szegedy 2015 / Bjorck et al. 2018: the range of learning rates that train (eval-mode validation accuracy
    >= 0.8 after 150 SGD steps) is wider with BN than without, and BN's largest trainable learning rate is at least
    10x the largest without (measured 30x vs 100-300x range, max 3 vs 0.3, on seeds 0, 1, 2)."""
    summary = run_example("bn_learning_rate", tmp_path)
    plain, bn = summary["plain"]["range"], summary["batchnorm"]["range"]
    assert plain["count"] >= 2 and bn["count"] >= 2, (plain, bn)
    assert bn["factor"] > plain["factor"], (plain, bn)
    assert bn["max_lr"] >= 10 * plain["max_lr"], (plain, bn)
    lrs = summary["learning_rates"]
    assert max(lrs) / min(lrs) >= 1000
    assert min(summary["plain"]["accuracy"]) < 0.2  # the largest learning rates diverge without BN


def test_small_batch_conv_batchnorm_at_batch_2_is_not_worse(tmp_path: Path) -> None:
    """Wu & He 2018's small-batch gap does not appear on this CNN once only the convolutions' norm differs (no norm
    after the Linear): BatchNorm2d at batch 2 is not below GroupNorm, LayerNorm or its own batch-32 run. --fast, seed
    0, 2 epochs: batch 2 0.939 / 0.861 / 0.831 (BN / GN / LN), batch 32 0.856 / 0.853 / 0.819; the full run (3 seeds,
    6 epochs) 0.962 / 0.933 / 0.958 and 0.956 / 0.938 / 0.938. BatchNormGuard still warns about the tiny batch, naming
    GroupNorm/LayerNorm, for the BatchNorm run at batch 2 only."""
    summary = run_example("small_batch", tmp_path)
    results = summary["results"]
    norms = ("batch", "group", "layer")
    acc = {b: {norm: results[norm][b]["accuracy"]["mean"] for norm in norms} for b in ("2", "32")}
    assert min(min(figures.values()) for figures in acc.values()) > 0.75, acc  # every arm trains
    assert acc["2"]["batch"] >= max(acc["2"]["group"], acc["2"]["layer"]) - 0.03, acc
    assert acc["2"]["batch"] >= acc["32"]["batch"] - 0.03, acc
    assert summary["guard_small_batch_warned"]
    assert any("GroupNorm or LayerNorm" in m for m in summary["guard_messages"])
    assert results["batch"]["2"]["guard_warned"]
    assert not results["batch"]["32"]["guard_warned"]
    assert not any(results[norm][b]["guard_warned"] for norm in ("group", "layer") for b in ("2", "32"))


def test_sharded_example_figures_equal_one_process(tmp_path: Path) -> None:
    """examples/sharded.py --fast: ModelParallelStrategy (FSDP2, 2 CPU processes) logs every figure of the
    single-process run over the same global batch, each within 1e-5 relative."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "sharded.py"), "--fast", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "sharded.png").stat().st_size > 0
    summary = json.loads((tmp_path / "sharded.json").read_text())
    assert summary["figures_compared"] >= 40 and summary["missing_in_sharded"] == []
    assert summary["max_relative_difference"] <= 1e-5, summary["where"]


def test_attention_logit_growth_qk_norm_trains_where_the_baseline_collapses(tmp_path: Path) -> None:
    """Wortsman et al. 2023, --fast (seed 0, 100 steps, a 2-block width-128 byte-level LM): at lr 0.1 the baseline's
    largest attention logit runs away (measured ~1.3e4, its least entropic head ~0 nats) while the QK-norm arm's
    (inserted by ``insert_qk_norm``) stays below 50 (~16), and the QK-norm arm ends at a lower loss (2.68 vs 2.78);
    at lr 3e-3 the two arms train alike (2.29 vs 2.30, logits < 50). The report flags ``attention_logit_growth`` on
    the baseline's run at lr 0.1 (first logged step, 10) and no attention finding on the QK-norm arm's at either lr."""
    summary = run_example("attention_logit_growth", tmp_path)
    high, low = summary["by_lr"]["0.1"], summary["by_lr"]["0.003"]
    base, qk = high["baseline"], high["qk_norm"]
    assert base["max_logit"]["min"] > 1000, base["max_logit"]
    assert qk["max_logit"]["max"] < 50, qk["max_logit"]
    assert base["max_logit"]["min"] > 20 * qk["max_logit"]["max"]
    assert base["min_entropy"]["max"] < 0.1 < qk["min_entropy"]["min"] - 0.5, (base["min_entropy"], qk["min_entropy"])
    assert qk["final_loss"]["max"] < base["final_loss"]["min"] - 0.03, (qk["final_loss"], base["final_loss"])
    assert abs(low["qk_norm"]["final_loss"]["mean"] - low["baseline"]["final_loss"]["mean"]) < 0.05, low
    assert all(low[arm]["max_logit"]["max"] < 50 for arm in ("baseline", "qk_norm")), low
    assert all("attention_logit_growth" in flags for flags in base["flags"]), base["flags"]
    attention = ("attention_logit_growth", "attention_entropy_collapse", "output_logit_divergence")
    # at lr 3e-3 neither arm is flagged: the baseline's logits grow from ~1.5 into the tens while it trains as well
    # as the QK-norm arm (the growth rule's floor, 30, leaves that to learning)
    for figures in (qk, low["qk_norm"], low["baseline"]):
        assert not any(p in flags for flags in figures["flags"] for p in attention), figures["flags"]
