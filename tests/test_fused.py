"""The fused pass (lightning_bn.monitoring.rows): compiled and eager paths give the same rows; auto falls back to
eager."""

from __future__ import annotations

import math

import pytest
import torch

import lightning_bn.monitoring.rows as fused
from lightning_bn.activations import get_activation
from lightning_bn.monitoring import rows as stats
from lightning_bn.monitoring.rows import backend, fused_row

COUNTS = [stats.FIELDS.index(f) for f in ("count", "near_zero", "nonfinite", "saturated", "units")]


def _cases() -> dict[str, tuple[torch.Tensor, str]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    nonfinite = x.clone()
    nonfinite[3, 4], nonfinite[7, 1], nonfinite[9, 9] = math.nan, math.inf, -math.inf
    return {
        "random": (x * 3 + 1, "tanh"),
        "nonfinite": (nonfinite, "relu"),
        "bf16": (torch.randn(16, 8, 12, generator=g).bfloat16(), "relu"),
        "channels_last": (torch.randn(8, 6, 5, 5, generator=g).to(memory_format=torch.channels_last), "sigmoid"),
        "empty": (torch.zeros(0, 16), "relu"),
    }


def _rows(x: torch.Tensor, kind: str, path: str) -> tuple[list[float], list[float]]:
    act = get_activation(kind)
    bounds = tuple(torch.tensor(v) for v in act.asymptotes)
    row, alive = fused_row(act(x.float()), 1e-6, x=x, bounds=bounds, unit_dim=1, path=path)
    return row.tolist(), alive.tolist()


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_cases()))
def test_compiled_equals_eager(case):
    """Same row on both paths: sums to 1e-6 relative, counts and liveness exactly, NaN where NaN."""
    x, kind = _cases()[case]
    eager, eager_alive = _rows(x, kind, "eager")
    compiled, compiled_alive = _rows(x, kind, "compiled")
    assert compiled_alive == eager_alive
    for i, (a, b) in enumerate(zip(compiled, eager)):
        if i in COUNTS or not math.isfinite(b):
            assert a == b or (math.isnan(a) and math.isnan(b)), (stats.FIELDS[i], a, b)
        else:
            assert a == pytest.approx(b, rel=1e-6, abs=1e-9), (stats.FIELDS[i], a, b)


def test_fused_row_equals_torch_and_kurtosis_combines_exactly():
    """Row figures equal torch's on the tensor; kurtosis of two rows combined equals that of the whole tensor."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, generator=g) ** 3  # heavy tails: kurtosis far above 3
    row, _ = fused_row(x, 1e-6)
    f = stats.figures(row.tolist())
    x64 = x.double()
    assert f["mean"] == pytest.approx(x64.mean().item(), rel=1e-5, abs=1e-6)
    assert f["std"] == pytest.approx(x64.std().item(), rel=1e-5)
    kurt = (((x64 - x64.mean()) ** 4).mean() / x64.var(unbiased=False) ** 2).item()
    assert f["kurtosis"] == pytest.approx(kurt, rel=1e-4) and f["kurtosis"] > 20
    halves = stats.combine(fused_row(x[:1000], 1e-6)[0], fused_row(x[1000:], 1e-6)[0])
    assert stats.figures(halves.tolist())["kurtosis"] == pytest.approx(kurt, rel=1e-4)
    gaussian = stats.figures(fused_row(torch.randn(200_000, generator=g), 1e-6)[0].tolist())["kurtosis"]
    assert gaussian == pytest.approx(3.0, abs=0.05)


def test_auto_falls_back_to_eager_when_compilation_is_unavailable(monkeypatch):
    """A compiler that fails: one warning, the eager row, and 'auto' is eager for the rest of the process."""

    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(fused, "_compiled", None)
    monkeypatch.setattr(fused, "_compile_failed", False)
    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.delenv("LIGHTNING_BN_FUSED", raising=False)
    assert backend("auto", "cuda") == "compiled" and backend("auto", "cpu") == "eager" and backend("auto") == "auto"
    x = torch.randn(8, 4)
    with pytest.warns(RuntimeWarning, match="compiling the fused summary failed.*no C\\+\\+ compiler"):
        row, _ = fused_row(x, 1e-6, path="compiled")
    assert row.tolist() == fused_row(x, 1e-6, path="eager")[0].tolist()
    assert backend("auto", "cuda") == "eager"  # compilation failed once: eager for the rest of the process
    monkeypatch.setenv("LIGHTNING_BN_FUSED", "eager")
    with pytest.raises(ValueError, match="'nope'"):
        backend("nope")
