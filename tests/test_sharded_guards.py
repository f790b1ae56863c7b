"""BatchNormGuard and BatchNormRecalibration under sharding: FSDP2 and tensor parallelism through Lightning's
ModelParallelStrategy, FSDP1 through plain ``FullyShardedDataParallel`` (Lightning's FSDPStrategy needs a GPU).

One 2-process gloo run (tests/ddp_scripts/guards_sharded.py) does every scenario; this file checks what it wrote,
redoing each recalibration in this single process over the same batches and weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lightning_bn import guards
from lightning_bn.recalibration import recalibrate
from tests.ddp_scripts.guards_sharded import Holder, build
from tests.helpers import run_ddp_script

pytestmark = pytest.mark.slow  # the quick loop is `pytest -m "not slow"`


def one_process(weights: dict[str, torch.Tensor] | None, batches: list[torch.Tensor]) -> tuple[dict, dict]:
    """Single-process recalibration of the unsharded model over ``batches`` (every rank's, in rank order)."""
    model = Holder(build(bad_init=weights is None))
    if weights is not None:
        model.load_state_dict(weights)
    shifts = recalibrate(model, [(b,) for b in batches], num_batches=len(batches))
    stats = {
        name: [m.running_mean.tolist(), m.running_var.tolist()]
        for name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm1d)
    }
    return stats, shifts


def assert_same_stats(got: dict, expected: dict, what: str) -> None:
    assert got.keys() == expected.keys(), what
    for name in expected:
        for got_part, expected_part in zip(got[name], expected[name]):
            torch.testing.assert_close(
                torch.tensor(got_part, dtype=torch.float64),
                torch.tensor(expected_part, dtype=torch.float64),
                rtol=1e-5,
                atol=1e-5,
                msg=lambda m, name=name: f"{what}, {name}: {m}",
            )


def test_guard_and_recalibration_under_sharding(tmp_path):
    run_ddp_script("guards_sharded.py", str(tmp_path), timeout=600)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    first = ranks[0]

    # -- the guard under FSDP2: every bad case warns (once, on rank zero), the good run stays silent --------------
    bad = first["guard_bad"]["warnings"]
    assert len(bad) == 5, bad
    init = next(m for m in bad if m.startswith("Init mismatch"))
    # judged on the whole weight, as one process judges the unsharded model (a shard's norm gave 21x, not 30x)
    assert init == first["guard_bad"]["reference_init"]["weight_scale"]
    assert "'net.3'" in init and "30x" in init
    assert any("are in training mode during validation" in m and "'net.1', 'net.4'" in m for m in bad), bad
    assert any(m.startswith("Running statistics of 'net.1', 'net.4' changed during validation") for m in bad), bad
    small = next(m for m in bad if "normalize only 4 values per channel" in m)
    assert "ModelParallelStrategy ignores `Trainer(sync_batchnorm=True)`" in small
    assert "global batch of 8 values per channel across 2 devices" in small
    assert any(m.startswith("`Trainer(sync_batchnorm=True)` has no effect under ModelParallelStrategy") for m in bad)
    uncalibrated = first["guard_uncalibrated"]["warnings"]
    assert len(uncalibrated) == 1 and "'net.1', 'net.4' have uncalibrated running statistics" in uncalibrated[0]
    assert first["guard_good"]["warnings"] == []
    assert all(not r[k]["warnings"] for r in ranks[1:] for k in ("guard_bad", "guard_uncalibrated", "guard_good"))

    # -- recalibration: every rank ends with the statistics one process computes over all ranks' batches ----------
    for scenario, batches in (("recal_fsdp2", 8), ("uneven_fsdp2", 6), ("recal_tp", 4), ("fsdp1", 6)):
        saved = torch.load(tmp_path / f"{scenario}.pt")
        assert len(saved["batches"]) == batches, scenario
        expected_stats, expected_shifts = one_process(saved.get("weights"), saved["batches"])
        for rank, result in enumerate(ranks):
            assert_same_stats(result[scenario]["stats"], expected_stats, f"{scenario} rank {rank}")
            for name, figures in expected_shifts.items():
                assert result[scenario]["shifts"][name]["count"] == figures["count"], (scenario, name)
    # uneven batches under FSDP2 (5 and 3): both ranks ran 3, in lockstep with the weights' all-gathers, no timeout
    assert first["uneven_fsdp2"]["shifts"]["net.1"]["count"] == 6 * 8
    assert first["uneven_fsdp2"]["seconds"] < 20
    # tensor parallelism: both ranks saw the same 4 batches; pooled over the data-parallel group they count once
    assert first["recal_tp"]["shifts"]["net.1"]["count"] == 4 * 8
    (tp_warning,) = first["recal_tp"]["warnings"]  # the tiny batch only: no init finding on the TP-sharded weights
    assert "normalize only 8 values per channel" in tp_warning and "SyncBatchNorm" not in tp_warning  # dp size 1

    # a BatchNorm inside the tensor-parallel plan (DTensor running statistics): refused at fit start, on every rank
    for result in ranks:
        error = result["refuse_tp_bn"]["error"]
        assert error.startswith("`BatchNormRecalibration` cannot recalibrate under ModelParallelStrategy"), error
        assert "'net.1'" in error and result["refuse_tp_bn"]["trained"] == 0

    # -- FSDP1 (plain FullyShardedDataParallel on CPU) ------------------------------------------------------------
    fsdp1 = first["fsdp1"]
    assert [f[:2] for f in fsdp1["findings"]] == [f[:2] for f in fsdp1["reference"]] == [["net.3", "weight_scale"]]
    assert fsdp1["findings"][0][2] == pytest.approx(fsdp1["reference"][0][2], rel=1e-5)
    assert fsdp1["default_shifts"]["net.1"]["count"] == 2 * 2 * 8  # the default forward through the wrapper


def test_group_needs_torch_distributed():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="`group` only under an initialized torch.distributed"):
        recalibrate(net, [torch.randn(8, 4)], group=object())


def test_full_parameters_and_clean_name_leave_plain_models_alone():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    before = list(net.parameters())
    with guards.full_parameters(net):
        assert list(net.parameters()) == before
    assert not guards.is_sharded(net)
    assert [name for name, _ in guards.batch_norms(net)] == ["1"]
    assert guards.clean_name("_fsdp_wrapped_module.net._checkpoint_wrapped_module.4") == "net.4"
