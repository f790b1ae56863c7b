"""The quickstart example runs end to end, learns, and writes activation and gradient figures to TensorBoard."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import read_scalars

pytestmark = pytest.mark.slow  # the quick loop is `pytest -m "not slow"`

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"

# The fast run (12 Adam steps of 64 digits, seed 0) reaches 0.72 validation accuracy; the untrained network scores
# 0.11, chance is 0.10. 0.5 leaves a wide margin for other torch versions and still means "it learned".
MIN_FAST_ACCURACY = 0.5


def test_quickstart_fast_writes_monitor_scalars(tmp_path: Path) -> None:
    """`quickstart.py --fast` exits 0 and prints a validation accuracy far above chance (>= 0.5 for 10 classes), the
    one it logged; the monitors log every figure at steps 0 and 10 (every_n_steps=10 over 12 steps), all finite and
    consistent: the first layer's std at init is the one PyTorch's default init predicts, ReLU outputs have min 0, the
    max and at most the std of their input, about half of them saturated; the total gradient norm is the 2-norm of
    the per-parameter norms."""
    logdir = tmp_path / "tmp"
    proc = subprocess.run(
        [sys.executable, str(QUICKSTART), "--fast", "--logdir", str(logdir)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"tensorboard --logdir {logdir}" in proc.stdout

    match = re.search(r"val accuracy: ([0-9.]+)", proc.stdout)
    assert match, proc.stdout
    accuracy = float(match.group(1))
    assert MIN_FAST_ACCURACY <= accuracy <= 1.0, proc.stdout

    scalars = read_scalars(logdir)
    assert [value for _, value in scalars["val_acc"]] == [pytest.approx(accuracy, abs=5e-5)]

    layers = ["net.0", "net.1", "net.2", "net.3", "net.4"]  # Linear, ReLU, Linear, ReLU, Linear (logits)
    params = [f"net.{i}.{kind}" for i in (0, 2, 4) for kind in ("weight", "bias")]
    expected = {f"act_{stat}/{name}" for stat in ("mean", "std", "min", "max", "nonfinite") for name in layers}
    expected |= {f"act_saturation/{name}" for name in ("net.1", "net.3")}
    expected |= {f"{figure}/{name}" for figure in ("grad_norm", "weight_norm", "update_ratio") for name in params}
    expected |= {"grad_norm/total"}
    assert expected <= set(scalars), sorted(expected - set(scalars))
    for tag in expected:
        assert [step for step, _ in scalars[tag]] == [0, 10], tag
        assert all(math.isfinite(value) for _, value in scalars[tag]), tag

    def at(tag: str, step: int) -> float:
        return dict(scalars[tag])[step]

    # At step 0 the first Linear has PyTorch's default init, weights ~ U(-1/8, 1/8) (variance 1/192), on standardized
    # digits whose 64 pixel variances sum to ~60 (a few pixels are constant): its output std is ~sqrt(60 / 192) = 0.56
    assert at("act_std/net.0", 0) == pytest.approx(math.sqrt(60 / 192), rel=0.25)
    for step in (0, 10):
        for name in layers:
            assert at(f"act_nonfinite/{name}", step) == 0.0
            assert 1e-3 < at(f"act_std/{name}", step) < 10.0, name
            assert at(f"act_min/{name}", step) <= at(f"act_mean/{name}", step) <= at(f"act_max/{name}", step), name
        for linear, relu in (("net.0", "net.1"), ("net.2", "net.3")):
            assert at(f"act_min/{relu}", step) == 0.0
            assert at(f"act_max/{relu}", step) == pytest.approx(max(at(f"act_max/{linear}", step), 0.0), rel=1e-6)
            # ReLU is 1-Lipschitz, so its output's variance is at most its input's
            assert at(f"act_std/{relu}", step) <= at(f"act_std/{linear}", step) * (1 + 1e-6)
            assert 0.2 < at(f"act_saturation/{relu}", step) < 0.8  # ~half of a ReLU's inputs are below 0
        norms = [at(f"grad_norm/{p}", step) for p in params]
        assert all(norm > 0 for norm in norms)
        assert at("grad_norm/total", step) == pytest.approx(math.sqrt(sum(n * n for n in norms)), rel=1e-4)
        assert all(0 < at(f"update_ratio/{p}", step) < 1 for p in params)
