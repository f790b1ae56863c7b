"""The functional core: rows equal torch's own figures, combine exactly, and judge saturation and dead units."""

import math

import pytest
import torch
from torch import nn

from lightning_bn.activations import get_activation
from lightning_bn.monitoring import ActivationProbe, select_modules
from lightning_bn.monitoring import rows as stats
from tests.helpers import mlp


@pytest.mark.parametrize("shape", [(64, 32), (8, 5, 16), (4, 3, 7, 7)])
@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_figures_equal_torch(shape, offset):
    """mean / std / min / max of a row equal torch's figures on the same tensor (rel 1e-5), even far from 0."""
    t = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.01 + offset
    f = stats.figures(stats.summarize(t).tolist())
    for key, expected in {"mean": t.mean(), "std": t.std(), "min": t.min(), "max": t.max()}.items():
        assert f[key] == pytest.approx(expected.item(), rel=1e-5), key


def test_rows_combine_exactly():
    """Summarizing two halves and combining gives the row of the whole tensor."""
    t = torch.randn(100, 20, dtype=torch.float64)  # float64 in, so any error would be the combination's
    act = get_activation("tanh")
    whole = stats.summarize(t, act)
    parts = stats.combine(stats.summarize(t[:37], act), stats.summarize(t[37:], act))
    for field, a, b in zip(stats.FIELDS, whole.tolist(), parts.tolist()):
        if field not in ("units", "dead_units"):  # units are per call; the probe combines alive flags instead
            assert a == pytest.approx(b, rel=1e-12), field


def test_nonfinite_values_are_counted_and_shown():
    """inf/NaN are counted exactly and show in mean/std (NaN) rather than being hidden; no error."""
    t = torch.tensor([1.0, 2.0, 3.0, float("nan"), float("inf"), float("-inf"), 0.0])
    f = stats.figures(stats.summarize(t, get_activation("tanh")).tolist())
    assert f["nonfinite"] == 3
    assert math.isnan(f["mean"]) and math.isnan(f["std"])
    inf_only = stats.figures(stats.summarize(torch.tensor([1.0, float("inf")])).tolist())
    assert inf_only["nonfinite"] == 1 and inf_only["max"] == math.inf


def test_dead_units_and_saturation():
    """A unit is dead when saturated for every sample; saturation counts elements."""
    pre = torch.tensor([[-1.0, 2.0, -3.0], [-4.0, -5.0, -6.0]])
    f = stats.figures(stats.summarize(torch.relu(pre), get_activation("relu"), pre_activation=pre).tolist())
    assert f["saturation"] == pytest.approx(5 / 6)
    assert f["dead"] == pytest.approx(2 / 3)
    assert f["zero"] == pytest.approx(5 / 6)


def test_summary_stays_on_the_tensor_device_and_dtype_float64():
    """Rows are float64 on the input's device (no host transfer inside summarize)."""
    row = stats.summarize(torch.randn(10, 4, dtype=torch.bfloat16), get_activation("relu"))
    assert row.dtype == torch.float64 and row.device.type == "cpu" and row.shape == (len(stats.FIELDS),)


def test_histogram_counts_every_finite_value():
    """On-device histogram: counts sum to the number of finite elements and respect the bin edges."""
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0, float("nan")])
    counts = stats.histogram(t, torch.tensor(0.0), torch.tensor(1.0), 2)
    assert counts.tolist() == [2.0, 3.0]


def _init(net, weight, bias=0.0):
    for m in net:
        if isinstance(m, nn.Linear):
            weight(m.weight)
            nn.init.constant_(m.bias, bias)
    return net


def _figures(net, kind, x):
    probe = ActivationProbe(select_modules(net, [kind]))
    with probe, torch.no_grad():
        net(x)
    return probe.collect().figures


def test_sigmoid_with_unit_normal_weights_saturates():
    """10 x 256 sigmoid MLP, N(0,1) weights: deep layers > 0.5 saturated; Xavier + tanh stays below 0.05."""
    torch.manual_seed(0)
    x = torch.randn(128, 64)
    sigmoid = _figures(_init(mlp(10, 256, nn.Sigmoid), lambda w: nn.init.normal_(w, 0, 1)), nn.Sigmoid, x)
    assert all(f["saturation"] > 0.5 for f in sigmoid[3:])
    tanh = _figures(_init(mlp(10, 256, nn.Tanh), nn.init.xavier_normal_), nn.Tanh, x)
    assert all(f["saturation"] < 0.05 for f in tanh)


def test_relu_with_negative_bias_is_dead_and_he_init_is_not():
    """Bias -10 kills every ReLU unit (dead = 1.0); a He-initialized 5-layer ReLU net has (almost) none dead."""
    torch.manual_seed(0)
    x = torch.randn(128, 64)
    he = lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu")  # noqa: E731
    dead = _figures(_init(mlp(5, 256, nn.ReLU), he, bias=-10.0), nn.ReLU, x)
    assert [f["dead"] for f in dead] == [1.0] * 5
    alive = _figures(_init(mlp(5, 256, nn.ReLU), he), nn.ReLU, x)
    # depth correlates samples, so a few units of the deepest layers go quiet on a whole batch (measured ~0.03-0.07)
    assert max(f["dead"] for f in alive) <= 0.1
    assert sum(f["dead"] for f in alive) / len(alive) <= 0.05


def test_histogram_paths_agree():
    """The CPU path (one histc kernel) and the kernels-only path (CUDA) give the same counts, NaN/inf left out."""
    torch.manual_seed(0)
    t = torch.randn(20000)
    t[::997] = float("nan")
    t[5::1009] = float("inf")
    finite = t[torch.isfinite(t)]
    low, high = finite.min().double(), finite.max().double()
    fast = stats.histogram(t, low, high, 64)
    sample = t[:: -(-t.numel() // stats.HISTOGRAM_SAMPLE)]
    kernels = stats._bin_counts(sample, low, high, 64)
    assert fast.sum().item() == kernels.sum().item() == torch.isfinite(sample).sum().item()
    assert (fast - kernels).abs().max().item() <= 1.0  # a value on a bin edge may round to either side
    assert (fast - kernels).abs().sum().item() <= 2.0
