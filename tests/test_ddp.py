"""Real 2-process DDP (CPU, gloo): the monitors' figures are exact over the global batch."""

import csv
from pathlib import Path

import pytest

from tests.helpers import run_ddp_script


def _metrics(directory: Path) -> dict[str, float]:
    rows = list(csv.DictReader(open(next(directory.rglob("metrics.csv")))))
    return {k: float(v) for row in rows for k, v in row.items() if v not in ("", None) and "/" in k}


def test_ddp_activation_figures_equal_one_process_over_the_global_batch(tmp_path):
    """Two ranks with 16 samples each log what one process logs on the same 32 samples (dead units included)."""
    run_ddp_script("monitor_ddp.py", str(tmp_path / "single"), "single")
    run_ddp_script("monitor_ddp.py", str(tmp_path / "ddp"), "ddp")
    single, ddp = _metrics(tmp_path / "single"), _metrics(tmp_path / "ddp")
    assert set(single) == set(ddp) and "act_dead/net.1" in single
    for key, value in single.items():
        assert ddp[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert 0 < single["act_dead/net.1"] < 1


def test_autoinit_gives_every_rank_the_same_weights(tmp_path):
    """Ranks with different RNG states end AutoInit with identical weights (checked on every rank, in setup)."""
    run_ddp_script("autoinit_ddp.py", str(tmp_path))
    assert (tmp_path / "ok").read_text() == "identical"
