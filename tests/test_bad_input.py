"""Bad input across the public API: the right error type, a message naming the bad value, and no half-modified model."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_bn
from lightning_bn import init as lbn_init
from lightning_bn.activations import ActivationKind
from lightning_bn.callbacks import (
    ActivationMonitor,
    AutoInit,
    BatchNormGuard,
    BatchNormRecalibration,
    GradientMonitor,
)


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


X = torch.randn(32, 8)

# (id, callable taking a fresh model, expected error type, regex the message must match)
MODEL_CASES: list[tuple[str, Callable[[nn.Module], object], type[Exception], str]] = [
    ("unknown init scheme", lambda m: lightning_bn.prepare(m, X, init="glorot"), ValueError, "'glorot'"),
    ("unknown distribution", lambda m: lightning_bn.prepare(m, X, distribution="cauchy"), ValueError, "'cauchy'"),
    ("unknown fan mode", lambda m: lightning_bn.prepare(m, X, mode="fan_avg"), ValueError, "'fan_avg'"),
    (
        "override matching nothing",
        lambda m: lightning_bn.prepare(m, X, overrides={"encoder.*": "xavier"}),
        ValueError,
        r"'encoder\.\*'",
    ),
    ("override with unknown scheme", lambda m: lightning_bn.prepare(m, X, overrides={"0": "he"}), ValueError, "'he'"),
    ("overrides not a dict", lambda m: lightning_bn.prepare(m, X, overrides=["0"]), TypeError, r"\['0'\]"),
    (
        "example input failing in forward",
        lambda m: lightning_bn.prepare(m, torch.randn(32, 5)),
        ValueError,
        "mat1 and mat2|shapes",
    ),
    ("no example input for a plain module", lambda m: lightning_bn.prepare(m), ValueError, "example_input"),
    ("unknown scheme for one layer", lambda m: lbn_init.init_layer_(m[0], "glorot"), ValueError, "'glorot'"),
    ("init of a non-layer", lambda m: lbn_init.init_layer_(m[2], "kaiming"), TypeError, "ReLU"),
    ("LSUV on a layer that is not there", lambda m: lightning_bn.lsuv_(m, X, layers=["9"]), ValueError, "'9'"),
    ("unknown norm", lambda m: lightning_bn.prepare(m, X, norm="batchy"), ValueError, "'batchy'"),
    ("unknown norm position", lambda m: lightning_bn.prepare(m, X, norm="layer", position="mid"), ValueError, "'mid'"),
    ("convert to an unknown norm", lambda m: lightning_bn.convert_norms(m, "nonsense"), ValueError, "'nonsense'"),
    (
        "convert with groups not dividing",
        lambda m: lightning_bn.convert_norms(m, "group", num_groups=5),
        ValueError,
        "'1'.*5",
    ),
    (
        "recalibrate zero batches",
        lambda m: lightning_bn.recalibrate(m, DataLoader(TensorDataset(X), batch_size=8), num_batches=0),
        ValueError,
        "num_batches.*0",
    ),
]


@pytest.mark.parametrize(("case", "call", "error", "match"), MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_input_leaves_the_model_untouched(case, call, error, match):
    """The error names the value; state_dict is bit-identical and the module tree the same."""
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tree = str(model)
    with pytest.raises(error, match=match):
        call(model)
    after = model.state_dict()
    assert str(model) == tree
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_model_without_layers_to_initialize_names_the_model():
    """A model with nothing to initialize is refused, naming its class; nothing changes."""
    model = nn.Sequential(nn.ReLU(), nn.Dropout())
    with pytest.raises(ValueError, match="Sequential"):
        lightning_bn.prepare(model, X)


CONSTRUCTOR_CASES: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    ("unknown activation name", lambda: lightning_bn.get_activation("swishy"), ValueError, "'swishy'"),
    (
        "activation registered twice",
        lambda: lightning_bn.register_activation(ActivationKind("relu", torch.relu)),
        ValueError,
        "'relu'",
    ),
    ("monitor cadence zero", lambda: ActivationMonitor(every_n_steps=0), MisconfigurationException, "every_n_steps.*0"),
    ("monitor cadence not an int", lambda: GradientMonitor(every_n_steps="10"), MisconfigurationException, "'10'"),
    ("modules entry of a wrong type", lambda: ActivationMonitor(modules=[3.5]), MisconfigurationException, "3.5"),
    (
        "module pattern matching nothing",
        lambda: lightning_bn.select_modules(net(), ["encoder.*"]),
        ValueError,
        r"'encoder\.\*'",
    ),
    ("negative norm type", lambda: GradientMonitor(norm_type=-2), MisconfigurationException, "-2"),
    ("AutoInit unknown scheme", lambda: AutoInit(init="glorot"), MisconfigurationException, "'glorot'"),
    ("guard switch not a bool", lambda: BatchNormGuard(strict="yes"), MisconfigurationException, "'yes'"),
    ("guard threshold zero", lambda: BatchNormGuard(min_values_per_channel=0), MisconfigurationException, "0"),
    ("guard factor below one", lambda: BatchNormGuard(init_factor=0.5), MisconfigurationException, "0.5"),
    (
        "recalibration trigger unknown",
        lambda: BatchNormRecalibration(when="never"),
        MisconfigurationException,
        "'never'",
    ),
    ("recalibration zero batches", lambda: BatchNormRecalibration(num_batches=0), MisconfigurationException, "0"),
]


@pytest.mark.parametrize(("case", "call", "error", "match"), CONSTRUCTOR_CASES, ids=[c[0] for c in CONSTRUCTOR_CASES])
def test_bad_argument_names_the_value(case, call, error, match):
    """Arguments are checked where they are given, and the message contains the value received."""
    with pytest.raises(error, match=match):
        call()
