"""The rows' figures against a float64 numpy reference in the regimes where raw power sums fail: a large mean next to
a small spread, values near the float32 overflow, more than 2^24 elements, constants, and rows combined across calls
and processes (issue #21). Kurtosis is Pearson's ``n m4 / m2^2``; std the sample std."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lightning_bn.monitoring.rows import combine, figures, fused_row, summarize
from tests.helpers import run_ddp_script


def _reference(t: torch.Tensor) -> dict[str, float]:
    x = t.detach().double().numpy().reshape(-1)
    d = x - x.mean()
    m2, m4 = (d**2).sum(), (d**4).sum()
    return {"mean": x.mean(), "std": x.std(ddof=1), "kurtosis": len(x) * m4 / m2**2}


def _figures(t: torch.Tensor, path: str = "eager") -> dict[str, float]:
    row, _ = fused_row(t, 1e-6, path=path)
    return figures(row.tolist())


CASES = {
    "1e4 + N(0,1) float32": lambda g: 1e4 + torch.randn(100_000, generator=g),
    "1e4 + N(0,1) float64": lambda g: 1e4 + torch.randn(100_000, generator=g, dtype=torch.float64),
    "1e2 + N(0,1) float16": lambda g: (1e2 + torch.randn(100_000, generator=g)).half(),
    "1e5 + N(0,1) float64": lambda g: 1e5 + torch.randn(100_000, generator=g, dtype=torch.float64),
    "sigmoid(N(13,1))": lambda g: torch.sigmoid(13 + torch.randn(100_000, generator=g, dtype=torch.float64)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_moments_match_numpy_where_raw_sums_cancel(case):
    """Kurtosis of 1e4 + N(0, 1) read -8.0 (Pearson's kurtosis is >= 1; truth 3) and 1e5 + N(0, 1) read 65 456 from
    raw sums; a sigmoid pinned near 1 read 1 574 286 against 85.5. Now within 1% of numpy on the same values."""
    t = CASES[case](torch.Generator().manual_seed(0))
    got, want = _figures(t), _reference(t)
    assert got["mean"] == pytest.approx(want["mean"], rel=1e-9)
    assert got["std"] == pytest.approx(want["std"], rel=1e-4)
    assert got["kurtosis"] == pytest.approx(want["kurtosis"], rel=0.01)
    if "N(0,1)" in case and "float16" not in case:
        assert got["kurtosis"] == pytest.approx(3.0, rel=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["1e4 + N(0,1) float32", "sigmoid(N(13,1))", "randn(1e6) * 1e9"])
def test_compiled_path_gives_the_same_moments(case):
    """The compiled fused pass (inductor) gives the same figures as numpy, the overflow case included."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(1_000_000, generator=g) * 1e9 if case == "randn(1e6) * 1e9" else CASES[case](g).float()
    got, want = _figures(t, "compiled"), _reference(t)
    assert got["nonfinite"] == 0 and math.isfinite(got["mean"])
    assert got["kurtosis"] == pytest.approx(want["kurtosis"], rel=0.01)
    assert got["std"] == pytest.approx(want["std"], rel=1e-4)


def test_a_finite_explosion_reads_finite():
    """randn(1e6) * 1e9 is finite: its fourth powers overflow float32 sums (mean and std read NaN); scaled by
    max |x - mean| they do not."""
    t = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0)) * 1e9
    got, want = _figures(t), _reference(t)
    assert got["nonfinite"] == 0
    assert got["mean"] == pytest.approx(want["mean"], rel=1e-6, abs=1e-6 * want["std"])
    assert got["std"] == pytest.approx(want["std"], rel=1e-6)
    assert got["kurtosis"] == pytest.approx(want["kurtosis"], rel=0.01)


def test_counts_beyond_2_to_the_24_are_exact():
    """2^24 + 3 elements: the count is exact and act_zero is a fraction >= 0 (float32 counts read -6e-8)."""
    n = (1 << 24) + 3
    t = torch.ones(n)
    t[:5] = 0.0
    row, _ = fused_row(t, 1e-6)
    got = figures(row.tolist())
    assert row[0].item() == n
    assert got["zero"] == pytest.approx(5 / n, rel=1e-9) and got["zero"] >= 0


def test_a_constant_has_std_zero():
    """A constant 0.7 read std 7.6e-9 and kurtosis -3.6e16."""
    got = _figures(torch.full((10_000,), 0.7))
    assert got["std"] == 0.0 and got["mean"] == pytest.approx(0.7, rel=1e-7) and math.isnan(got["kurtosis"])


def test_eight_rows_combine_to_the_concatenation():
    """Eight calls (or ranks) of 1e4 + N(0, 1): combined pairwise (Chan / Pébay) they equal one pass over all."""
    g = torch.Generator().manual_seed(0)
    parts = [1e4 + torch.randn(20_000, generator=g) for _ in range(8)]
    row = summarize(parts[0])
    for part in parts[1:]:
        row = combine(row, summarize(part))
    got, want = figures(row.tolist()), _reference(torch.cat(parts))
    assert got["mean"] == pytest.approx(want["mean"], rel=1e-6)
    assert got["std"] == pytest.approx(want["std"], rel=1e-6)
    assert got["kurtosis"] == pytest.approx(want["kurtosis"], rel=1e-3)


@pytest.mark.slow
def test_two_processes_combine_to_the_concatenation(tmp_path):
    """The same over 2 gloo processes: every rank ends with the figures of the whole tensor."""
    run_ddp_script("moments_ddp.py", str(tmp_path))
    x = 1e4 + torch.randn(2, 50_000, generator=torch.Generator().manual_seed(0))
    want = _reference(x)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["mean"] == pytest.approx(want["mean"], rel=1e-6)
        assert got["std"] == pytest.approx(want["std"], rel=1e-6)
        assert got["kurtosis"] == pytest.approx(want["kurtosis"], rel=1e-3)


def test_numpy_reference_is_itself_sane():
    x = np.random.default_rng(0).normal(size=200_000)
    assert _reference(torch.from_numpy(x))["kurtosis"] == pytest.approx(3.0, rel=0.02)
