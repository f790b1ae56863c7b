"""HealthCheck in a real Trainer: fail-fast on the report's flags, silence on healthy runs, the fit-end summary."""

import logging
import math
import warnings

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_bn import ActivationMonitor, GradientMonitor, HealthCheck
from lightning_bn.report import Thresholds
from tests.helpers import BoringClassifier, mlp, random_data, trainer


def _he_relu() -> nn.Sequential:
    net = mlp(4, 32, nn.ReLU)
    for layer in net:
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    return net


def _fit(tmp_path, net, callbacks, steps=8, **kwargs):
    model = BoringClassifier(net, lr=0.1, batch_size=32, data=random_data(32 * steps))
    t = trainer(tmp_path, logger=TensorBoardLogger(tmp_path), max_steps=steps, callbacks=callbacks, **kwargs)
    t.fit(model)
    return t


def _monitors(every=1):
    return [ActivationMonitor(every_n_steps=every, histograms=False, heatmap=False), GradientMonitor(every)]


@pytest.mark.parametrize("check_first", [False, True])
def test_stops_at_the_first_nonfinite_gradient(tmp_path, check_first):
    """A NaN gradient in net.4 from step 0: training stops at once (one step later when HealthCheck comes before
    the monitors), with a warning naming the layer, the flag and what to try."""
    torch.manual_seed(0)
    net = _he_relu()
    net[4].weight.register_hook(lambda g: torch.full_like(g, math.nan))
    check = HealthCheck(stop_on=("nonfinite",), summary=False)
    callbacks = [check, *_monitors()] if check_first else [*_monitors(), check]
    with pytest.warns(RuntimeWarning, match=r"HealthCheck: stopping training at step 0: net\.4 is nonfinite"):
        t = _fit(tmp_path, net, callbacks, steps=20)
    assert t.global_step == (2 if check_first else 1)
    assert check.stopped[:3] == (0, "nonfinite", "net.4")


def test_healthy_run_is_not_stopped_and_stays_quiet(tmp_path):
    """A He-initialized ReLU MLP with stop_on='all' trains every step and raises no HealthCheck warning."""
    torch.manual_seed(0)
    check = HealthCheck(stop_on="all", summary=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = _fit(tmp_path, _he_relu(), [*_monitors(), check], steps=8)
    assert t.global_step == 8 and check.stopped is None
    assert not [w for w in caught if "HealthCheck" in str(w.message)]


def test_saturated_sigmoid_stops_on_its_transmission(tmp_path):
    """A 6-layer sigmoid net of width 1024 with N(0, 1) weights passes back ~0.07 of a healthy layer's gradient
    power: stopped as saturated at the first logging step; with min_transmission=0.01 it is not."""

    def sigmoid_normal():
        torch.manual_seed(0)
        net = mlp(6, 1024, nn.Sigmoid)
        for layer in net:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, 0.0, 1.0)
        return net

    check = HealthCheck(stop_on="saturated", summary=False)
    with pytest.warns(RuntimeWarning, match=r"is saturated \(transmission 0\.0\d+ < 0\.1"):
        t = _fit(tmp_path / "a", sigmoid_normal(), [*_monitors(), check], steps=8)
    assert t.global_step == 1
    lenient = HealthCheck(stop_on="saturated", summary=False, thresholds=Thresholds(min_transmission=0.01))
    t = _fit(tmp_path / "b", sigmoid_normal(), [*_monitors(), lenient], steps=4)
    assert t.global_step == 4 and lenient.stopped is None


def test_fit_end_summary_lists_the_flagged_layers(tmp_path, caplog):
    """At fit end, rank zero prints the report of the fit: the dead ReLUs with the step they started and advice."""
    torch.manual_seed(0)
    net = _he_relu()
    for layer in net:
        if isinstance(layer, nn.Linear):
            nn.init.constant_(layer.bias, -10.0)
    check = HealthCheck()
    with caplog.at_level(logging.INFO):
        _fit(tmp_path, net, [*_monitors(every=2), check], steps=4)
    text = caplog.text
    assert "lightning-bn health at fit end" in text
    assert "dead since step 0" in text and "try: units that never activate" in text
    dead = [layer.name for layer in check.health.layers if "dead" in layer.flags]
    assert dead == ["net.1", "net.3", "net.5", "net.7"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stop_on": ("nonfinite", "sleepy")}, "'sleepy'"),
        ({"stop_on": "everything"}, "'everything'"),
        ({"summary": "yes"}, "'yes'"),
        ({"thresholds": {"max_dead": 0.1}}, "max_dead"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        HealthCheck(**kwargs)


def test_warns_without_monitors(tmp_path):
    with pytest.warns(RuntimeWarning, match="found no ActivationMonitor or GradientMonitor"):
        _fit(tmp_path, _he_relu(), [HealthCheck(stop_on="all")], steps=2)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["nan", "healthy"])
def test_ddp_ranks_stop_together(tmp_path, mode):
    """Under DDP (2 processes) rank zero decides and broadcasts at the start of the step after a logging step, and both
    ranks stop at the same step (NaN loss from step 2, logging every 2 steps: judged at step 3's start, so the fit ends
    after step 3, one step later than on one process); a healthy run trains all 8 steps."""
    import json

    from tests.helpers import run_ddp_script

    run_ddp_script("healthcheck_ddp.py", str(tmp_path), mode, timeout=600)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    steps = {r["global_step"] for r in ranks}
    assert len(steps) == 1  # the same step on both ranks
    if mode == "nan":
        assert steps == {4} and ranks[0]["stopped"][:2] == [2, "nonfinite"]
        assert ranks[1]["stopped"][:3] == ranks[0]["stopped"][:3]  # rank one got rank zero's decision
    else:
        assert steps == {8} and ranks[0]["stopped"] is None
