"""The monitors under sharding: ModelParallelStrategy (FSDP2 ``fully_shard``, DTensor parameters) with 2 CPU
processes over gloo logs the same figures as one process over the same global batch."""

import csv
import math
from pathlib import Path

import pytest

from lightning_bn.tags import LOSS_TAG
from tests.helpers import run_ddp_script

pytestmark = pytest.mark.slow  # the quick loop is `pytest -m "not slow"`

STEPS = 3


def _figures(out: Path) -> dict[tuple[str, int], float]:
    found = {}
    for row in csv.DictReader(open(out / "metrics.csv")):
        step = int(row["step"])
        for key, value in row.items():
            if key != "step" and value != "":
                found[(key, step)] = float(value)
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict[tuple[str, int], float]]:
    root = tmp_path_factory.mktemp("sharded")
    out = {}
    for mode in ("single", "fsdp2"):
        run_ddp_script("sharded_monitors.py", str(root / mode), mode, str(STEPS), timeout=600)
        out[mode] = _figures(root / mode)
    return out


def test_fsdp2_figures_equal_one_process(runs):
    """Every figure of every step (activations: mean/std/min/max/zero/saturation/dead/kurtosis; parameters:
    grad_norm, weight_norm, exact update_ratio; grad_norm/total) equals the single-process run to 1e-5, although
    each rank holds half of every parameter (one unevenly: 31 rows as 16 + 15) and half of the batch."""
    single, sharded = runs["single"], runs["fsdp2"]
    assert set(sharded) == set(single)
    keys = {key for key, _ in single}
    for family in ("act_std/net.1", "act_dead/net.1", "act_kurtosis/net.3", "grad_norm/total",
                   "grad_norm/net.2.weight", "weight_norm/net.2.weight", "update_ratio/net.4.bias"):  # fmt: skip
        assert family in keys
    assert len(single) >= 150
    for key, value in single.items():
        if key[0] == LOSS_TAG:  # the training loss is rank zero's own (for `stalled`), not a global-batch figure
            continue
        other = sharded[key]
        assert other == pytest.approx(value, rel=1e-5, abs=1e-9) or (math.isnan(value) and math.isnan(other)), key
    # the dead fraction is judged over the global batch: units dead on one rank's half but alive on the other count
    # as alive (the bias of -1.5 makes some units alive on few samples)
    assert 0 <= single[("act_dead/net.1", 0)] < 1


def test_uneven_batches_do_not_hang(tmp_path):
    """Ranks with different last-batch sizes (4 and 2 samples) finish the fit, within the timeout, and log
    finite figures at every step."""
    run_ddp_script("sharded_monitors.py", str(tmp_path), "fsdp2_uneven", "4", timeout=600)
    figures = _figures(tmp_path)
    assert {step for _, step in figures} == {0, 1, 2, 3}
    assert all(math.isfinite(figures[(tag, 3)]) for tag in ("act_std/net.1", "grad_norm/total"))
