"""AutoInit on models built in ``configure_model``: initialized at fit start, sharded (FSDP2, 2 processes, gloo, CPU)
with the same weights as one process for the same seed, DDP ranks identical, norms refused, checkpoints kept."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_bn import prepare
from lightning_bn.callbacks.auto_init import AutoInit
from tests.ddp_scripts.autoinit_sharded import SEED, LazyNet, build
from tests.helpers import run_ddp_script, trainer

pytestmark = pytest.mark.slow  # the quick loop is `pytest -m "not slow"`


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _reference() -> dict[str, torch.Tensor]:
    """``prepare`` on the unsharded model, in this process, with AutoInit's seed and example."""
    module = LazyNet(shard=False)
    module.configure_model()
    prepare(module, module.example_input_array, seed=SEED)
    return {k: v.detach() for k, v in module.named_parameters()}


def _assert_prepared(weights: dict[str, torch.Tensor], unprepared: dict[str, torch.Tensor]) -> None:
    """Every weight was redrawn and every bias zeroed, but the tanh layer's (its critical init draws the bias from
    N(0, 0.151)): the weights are not the ones the model was built with."""
    for name, value in weights.items():
        if name.endswith("weight"):
            assert not torch.allclose(value, unprepared[name]), name
        elif name == "net.2.bias":  # Linear(32, 30) -> Tanh: critical
            assert not torch.allclose(value, unprepared[name]) and 0.2 < value.std().item() < 0.6, name
        else:
            assert not value.any() and unprepared[name].any(), name


def test_autoinit_on_a_sharded_model_equals_one_process(tmp_path):
    """2 processes under ModelParallelStrategy (FSDP2 over 2 ranks, 30 and 5 rows split unevenly, GELU and SiLU layers
    rescaled from measured stds) end AutoInit with exactly the weights one process gets for the same seed (the next
    tests show one process's AutoInit gives ``prepare``'s weights), gathered and shard by shard; and those are not the
    weights the model was built with."""
    run_ddp_script("autoinit_sharded.py", str(tmp_path), "fsdp2", timeout=600)
    ranks = [_load(tmp_path / f"fsdp2_rank{r}.pt") for r in (0, 1)]
    gathered, reference = ranks[0]["full"], _reference()
    assert set(gathered) == set(reference) and len(reference) == 8
    for name, value in reference.items():
        assert torch.equal(gathered[name], value), name
        # each rank's own shard is its slice of the single-process tensor (what training steps with)
        for rank in ranks:
            start, local = rank["offsets"][name][0], rank["local"][name]
            assert 0 < local.shape[0] < value.shape[0]
            assert torch.equal(local, value[start : start + local.shape[0]]), name
    _assert_prepared(gathered, {f"net.{k}": v for k, v in build().state_dict().items()})
    # norms cannot go into sharded parameters: `prepare` says so (on every rank, before any collective)
    assert all("sharded" in r["norm_error"] and "before `fully_shard`" in r["norm_error"] for r in ranks)


def test_autoinit_on_a_lazily_built_ddp_model_gives_every_rank_the_same_weights(tmp_path):
    """DDP with the model built in ``configure_model``: ranks with different RNG states end identical, with the
    weights ``prepare`` gives the unsharded model for the same seed."""
    run_ddp_script("autoinit_sharded.py", str(tmp_path), "ddp", timeout=600)
    reference = _reference()
    for rank in (0, 1):
        weights = _load(tmp_path / f"ddp_rank{rank}.pt")["local"]
        assert set(weights) == set(reference)
        for name, value in reference.items():
            assert torch.equal(weights[name], value), (rank, name)


class _Recorder(Callback):
    def on_train_start(self, trainer, pl_module):
        self.weights = {k: v.detach().clone() for k, v in pl_module.named_parameters()}


def test_autoinit_on_a_model_built_in_configure_model_in_one_process(tmp_path):
    """No layer at ``setup``: AutoInit waits for ``configure_model`` and initializes at fit start, as ``prepare`` does
    the built model (the script's ``single`` mode, in this process)."""
    from tests.ddp_scripts.autoinit_sharded import DivergeRng

    recorder = _Recorder()
    callback = AutoInit(seed=SEED)
    trainer(tmp_path, max_steps=1, callbacks=[DivergeRng(), callback, recorder], logger=False).fit(LazyNet(False))
    assert callback.report is not None and [row.layer for row in callback.report.layers] == [f"net.{i}" for i in
                                                                                             (0, 2, 4, 6)]  # fmt: skip
    reference = _reference()
    assert set(recorder.weights) == set(reference)
    assert all(torch.equal(recorder.weights[k], v) for k, v in reference.items())
    _assert_prepared(recorder.weights, {f"net.{k}": v for k, v in build().state_dict().items()})


def test_norm_insertion_with_configure_model_is_refused_clearly(tmp_path):
    """Norms cannot go into a model that only exists once the optimizers do: the error names the cause and the fix."""
    module = LazyNet(shard=False)
    with pytest.raises(MisconfigurationException, match=r"configure_model.*lightning_bn\.prepare"):
        trainer(tmp_path, max_steps=1, callbacks=[AutoInit(norm="batch")], logger=False).fit(module)
    assert module.net is None  # refused in `setup`, before anything was built


def test_resuming_keeps_the_checkpoint_weights(tmp_path):
    """``fit(ckpt_path=...)`` of a model built in ``configure_model``: the checkpoint's weights, not a new init."""
    first = LazyNet(shard=False)
    fit = trainer(tmp_path, max_steps=2, callbacks=[AutoInit(seed=SEED)], logger=False)
    fit.fit(first)
    fit.save_checkpoint(tmp_path / "last.ckpt")
    saved = {k: v.detach().clone() for k, v in first.named_parameters()}
    assert not all(torch.equal(saved[k], v) for k, v in _reference().items())  # trained away from the init
    recorder = _Recorder()
    resumed = trainer(tmp_path, max_steps=3, callbacks=[AutoInit(seed=SEED), recorder], logger=False)
    resumed.fit(LazyNet(shard=False), ckpt_path=tmp_path / "last.ckpt")
    assert all(torch.equal(recorder.weights[k], v) for k, v in saved.items())
