"""Real 2-process DDP (CPU, gloo): the monitors' figures are exact over the global batch."""

import csv
import json
from pathlib import Path

import pytest
import torch

from tests.helpers import run_ddp_script

pytestmark = pytest.mark.slow  # the quick loop is `pytest -m "not slow"`


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


def _exact(values: list, got: list) -> None:
    """``got`` = [running mean, running var] equals the mean and unbiased variance of ``values`` (rel. 1e-5)."""
    x = torch.tensor(values, dtype=torch.float64)
    mean, var = (torch.tensor(g, dtype=torch.float64) for g in got)
    assert torch.allclose(mean, x.mean(0), rtol=1e-5, atol=1e-7)
    assert torch.allclose(var, x.var(0), rtol=1e-5)


def test_recalibration_with_uneven_batches_per_rank_neither_hangs_nor_loses_data(tmp_path):
    """Rank 0 has 5 recalibration batches, rank 1 has 3 (or none): no collective waits for the other rank, and both
    ranks hold the exact statistics of every value either rank's BatchNorms saw. A SyncBatchNorm model runs 3 batches
    on both; a batch of one on rank 1 makes both ranks raise at once (rank 0 naming rank 1), their models untouched."""
    run_ddp_script("recalibrate_uneven_ddp.py", str(tmp_path), timeout=60)  # a hang fails here, after 60 s
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    callback = [r["callback"] for r in ranks]
    assert [len(c["inputs"]["1"]) for c in callback] == [5 * 8, 3 * 8]  # each rank used all of its own batches
    assert [c["tracked"] for c in callback] == [2 + 5, 2 + 3]  # training steps + own recalibration batches
    assert callback[0]["stats"] == callback[1]["stats"]
    for name, got in callback[0]["stats"].items():
        _exact(callback[0]["inputs"][name] + callback[1]["inputs"][name], got)
        assert callback[0]["shifts"][f"net.{name}"]["count"] == 64.0
        own = torch.tensor(callback[0]["inputs"][name], dtype=torch.float64)
        assert not torch.allclose(torch.tensor(got[1], dtype=torch.float64), own.var(0), rtol=1e-2)

    for scenario, counts in (("empty", [5 * 8, 0]), ("lockstep", [3 * 8, 3 * 8])):
        results = [r[scenario] for r in ranks]
        assert [r["error"] for r in results] == [None, None], scenario
        assert [len(r["inputs"].get("1", [])) for r in results] == counts, scenario
        assert results[0]["stats"] == results[1]["stats"], scenario
        for name, got in results[0]["stats"].items():
            _exact(results[0]["inputs"][name] + results[1]["inputs"].get(name, []), got)

    failure = [r["failure"] for r in ranks]
    assert failure[1]["error"]["type"] == "ValueError" and "more than 1 value" in failure[1]["error"]["message"]
    assert failure[0]["error"]["type"] == "RuntimeError" and "rank(s) [1]" in failure[0]["error"]["message"]
    for result in ranks:
        assert all(result[s]["hooks_left"] == 0 and result[s]["seconds"] < 10 for s in ("empty", "lockstep", "failure"))
        assert result["failure"]["unchanged"]
