"""BatchNormGuard: warn about the classic normalization pitfalls while a Trainer runs.

Inference on batch statistics, tiny batches, uncalibrated running statistics and init mismatches; each check can be
switched off and warns once per cause with one line naming the modules, the problem and the fix.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import move_data_to_device
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.nn import SyncBatchNorm
from typing_extensions import override

from lightning_bn import checks, guards
from lightning_bn.callbacks._periodic import checked


def _strategy_is(trainer: pl.Trainer, name: str) -> bool:
    return any(cls.__name__ == name for cls in type(trainer.strategy).__mro__)


def _data_parallel_size(trainer: pl.Trainer) -> int:
    """How many replicas see different samples: the world size, less the tensor-parallel ranks that share a batch."""
    try:
        kwargs = trainer.strategy.distributed_sampler_kwargs  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):  # a single-device strategy, or no mesh yet
        return trainer.world_size
    return int((kwargs or {}).get("num_replicas", trainer.world_size))


def _sync_hint(trainer: pl.Trainer) -> str:
    if _strategy_is(trainer, "ModelParallelStrategy"):
        return (
            f"{type(trainer.strategy).__name__} ignores `Trainer(sync_batchnorm=True)`: convert with "
            "`torch.nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group="
            'self.device_mesh["data_parallel"].get_group())` in `configure_model`, before `fully_shard`; GPU/XPU only'
        )
    return "`Trainer(sync_batchnorm=True)`"


def _fsdp1_wrapper(trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.nn.Module | None:
    """FSDPStrategy's FSDP1 wrapper around the LightningModule itself: its weights exist only inside its forward (or
    ``summon_full_params``), so a check that runs the model or reads weights goes through it."""
    wrapper = trainer.strategy.model
    if wrapper is None or wrapper is pl_module or not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    return wrapper if isinstance(wrapper, FullyShardedDataParallel) else None


class BatchNormGuard(Callback):
    r"""Warn (category :class:`~lightning_bn.guards.BatchNormWarning`) about normalization pitfalls during a run.

    - ``check_eval_mode``: during validation / test / predict, a BatchNorm-family module with running statistics
      (incl. SyncBatchNorm, InstanceNorm with ``track_running_stats``) found in training mode after a batch, or
      running statistics (or ``num_batches_tracked``) changed by the loop — evaluation data leaked into them.
      With ``strict=True`` these raise ``RuntimeError`` instead.
    - ``check_batch_size``: during the first ``check_steps`` training steps, a BatchNorm that normalizes fewer than
      ``min_values_per_channel`` samples on this device (N, also for ``(N, C, H, W)``: not N·H·W; for ``(N, C)``
      features the values per channel, also N); suggests GroupNorm/LayerNorm,
      or SyncBatchNorm with the global figure under DDP (Wu & He 2018).
    - ``check_calibration``: when evaluation starts (not the sanity check), running statistics never estimated.
    - ``check_init``: at fit start, :func:`~lightning_bn.guards.init_mismatches` on ``example_input_array`` (one
      forward pass, then one forward and backward pass of a random projection of the output; parameters' ``.grad``,
      buffers, modes and RNG state restored): inf/NaN in the first forward pass, activations pinned in saturation,
      gradients that grow or vanish toward the input by more than 10x between the first and the last layer feeding
      an activation (``gradient_exploding`` / ``gradient_vanishing``: the mean-field chaotic / ordered phase, e.g.
      tanh at its forward-preserving gain), a pre-activation signal that vanishes/explodes by more than
      ``depth_ratio`` with depth while the gradients do too (both tolerances widened by the spread finite width
      alone gives), or a weight more than ``init_factor`` from what ``prepare()`` would draw (layers it keeps on
      purpose — embeddings, tied, zero-init, attention — are never flagged).

    Under sharding (``docs/distributed.md``) every check works as under DDP and judges this rank's modules (rank zero
    warns): under ``ModelParallelStrategy`` the layers built in ``configure_model`` are looked at when they exist
    (fit start, the first training steps, each evaluation); the init check reads FSDP2 / tensor-parallel (DTensor)
    and FSDP1 weights whole (:func:`~lightning_bn.guards.full_parameters`: every rank gathers each weight once, into
    host memory, at fit start; ``check_init=False`` skips that) and runs the forward through FSDPStrategy's wrapper
    (its backward pass, the gradient findings, is skipped for sharded models: FSDP's gradient hooks expect a full
    backward); the tiny-batch check counts the data-parallel replicas and says how to get SyncBatchNorm where
    ``Trainer(sync_batchnorm=True)`` is ignored (``ModelParallelStrategy``; there the guard also warns at fit start
    when that flag is set).

    Args:
        check_eval_mode: see above.
        check_batch_size: see above.
        check_calibration: see above.
        check_init: see above.
        strict: raise instead of warning for the evaluation-mode checks.
        min_values_per_channel: fewer values per channel than this is a tiny batch.
        check_steps: how many first training steps the batch-size check watches.
        init_factor: allowed factor between a weight's std and the one ``prepare()`` would draw.
        depth_ratio: allowed factor between the input std of the last and the first activation (before the
            finite-width widening, :func:`~lightning_bn.guards.width_spread`).

    Raises:
        MisconfigurationException: for a non-boolean switch, a non-positive count, or a factor not above 1.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_bn.callbacks.norm_guard import BatchNormGuard
        >>> trainer = Trainer(callbacks=[BatchNormGuard(strict=True)])
    """

    def __init__(
        self,
        check_eval_mode: bool = True,
        check_batch_size: bool = True,
        check_calibration: bool = True,
        check_init: bool = True,
        strict: bool = False,
        min_values_per_channel: int = guards.DEFAULT_MIN_VALUES_PER_CHANNEL,
        check_steps: int = 3,
        init_factor: float = guards.DEFAULT_INIT_FACTOR,
        depth_ratio: float = guards.DEFAULT_DEPTH_RATIO,
    ) -> None:
        self.check_eval_mode = checked(checks.boolean, "check_eval_mode", check_eval_mode)
        self.check_batch_size = checked(checks.boolean, "check_batch_size", check_batch_size)
        self.check_calibration = checked(checks.boolean, "check_calibration", check_calibration)
        self.check_init = checked(checks.boolean, "check_init", check_init)
        self.strict = checked(checks.boolean, "strict", strict)
        self.min_values_per_channel = checked(checks.integer, "min_values_per_channel", min_values_per_channel)
        self.check_steps = checked(checks.integer, "check_steps", check_steps)
        self.init_factor = checked(checks.number, "init_factor", init_factor, 1.0)
        self.depth_ratio = checked(checks.number, "depth_ratio", depth_ratio, 1.0)
        self._warned: set[str] = set()
        self._recorder: guards.BatchSizeRecorder | None = None
        self._steps_seen = 0
        self._snapshot: dict[str, Any] | None = None
        self._eval_norms: list[tuple[str, Any]] = []

    # ---- hooks -------------------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # what belongs to one fit; a resumed fit gets its own back from the checkpoint after this
            self._release()
            self._warned, self._steps_seen, self._snapshot, self._eval_norms = set(), 0, None, []

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()

    def _release(self) -> None:
        if self._recorder is not None:
            self._recorder.detach()
            self._recorder = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_ignored_sync(trainer, pl_module)
        self._check_init(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._start_batch_size_check(pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._finish_batch_size_check(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish_batch_size_check(trainer, pl_module, final=True)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_evaluation(trainer, pl_module, "validation")

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_evaluation(trainer, pl_module, "test")

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_evaluation(trainer, pl_module, "predict")

    @override
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, **kw: Any
    ) -> None:
        self._check_train_mode(pl_module, "validation")

    @override
    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, **kw: Any
    ) -> None:
        self._check_train_mode(pl_module, "test")

    @override
    def on_predict_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, **kw: Any
    ) -> None:
        self._check_train_mode(pl_module, "predict")

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_evaluation(pl_module, "validation")

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_evaluation(pl_module, "test")

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_evaluation(pl_module, "predict")

    # ---- work --------------------------------------------------------------------------------------------------

    def _warn(self, cause: str, names: list[str], message: str, strict: bool = False) -> None:
        key = f"{cause}:{','.join(names)}"
        if key in self._warned:
            return
        self._warned.add(key)
        if strict:
            raise RuntimeError(message)
        rank_zero_warn(message, category=guards.BatchNormWarning)

    def _check_init(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.check_init:
            return
        example = pl_module.example_input_array
        if example is not None:  # on the module's device and in its precision (bf16-true: bf16 inputs)
            example = trainer.precision_plugin.convert_input(move_data_to_device(example, pl_module.device))
        # every rank runs it: under FSDP/tensor parallelism the forward and the reading of whole weights gather
        model = _fsdp1_wrapper(trainer, pl_module) or pl_module
        with trainer.precision_plugin.forward_context():
            findings = guards.init_mismatches(model, example, self.init_factor, self.depth_ratio)
        for problem, message in guards.init_messages(findings).items():
            self._warn(f"init_{problem}", [f.name for f in findings if f.problem == problem], message)

    def _check_ignored_sync(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``Trainer(sync_batchnorm=True)`` does nothing under ModelParallelStrategy: say so once the model exists."""
        if not self.check_batch_size or not _strategy_is(trainer, "ModelParallelStrategy"):
            return
        if getattr(trainer.strategy, "_layer_sync", None) is None:
            return
        names = [n for n, m in guards.batch_norms(pl_module) if not isinstance(m, SyncBatchNorm)]
        if names:
            shown = ", ".join(f"'{n}'" for n in names[:6]) + (f" (+{len(names) - 6} more)" if len(names) > 6 else "")
            self._warn(
                "sync_ignored",
                names,
                f"`Trainer(sync_batchnorm=True)` has no effect under {type(trainer.strategy).__name__}: BatchNorm "
                f"modules {shown} normalize over this device's batch only. Convert them with "
                "`torch.nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group="
                'self.device_mesh["data_parallel"].get_group())` in `configure_model`, before `fully_shard` (GPU/XPU '
                "only), or use GroupNorm/LayerNorm (`lightning_bn.convert_norms`).",
            )

    def _start_batch_size_check(self, pl_module: pl.LightningModule) -> None:
        if not self.check_batch_size or self._steps_seen >= self.check_steps:
            return
        if self._recorder is None:
            self._recorder = guards.BatchSizeRecorder(pl_module)
        self._recorder.attach()

    def _finish_batch_size_check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, final: bool = False) -> None:
        if self._recorder is None:
            return
        self._recorder.detach()
        if not final:
            self._steps_seen += 1
            if self._steps_seen < self.check_steps:
                return
        recorder, self._recorder = self._recorder, None
        self._steps_seen = self.check_steps
        modules = dict(guards.batch_norms(pl_module))
        world = _data_parallel_size(trainer)
        # SyncBatchNorm normalizes over every device's values
        values = {
            name: count * (world if isinstance(modules.get(name), SyncBatchNorm) else 1)
            for name, count in recorder.values.items()
        }
        names = guards.small_batch_norms(values, self.min_values_per_channel)
        for unit in sorted({recorder.units[n] for n in names}):
            group = [n for n in names if recorder.units[n] == unit]
            synced = all(isinstance(modules.get(n), SyncBatchNorm) for n in group)
            message = guards.small_batch_message(
                group, values, self.min_values_per_channel, world, synced, unit, _sync_hint(trainer)
            )
            self._warn("small_batch", group, message)

    def _start_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.check_calibration and not trainer.sanity_checking:
            names = guards.uncalibrated_norms(pl_module)
            if names:
                self._warn("uncalibrated", names, guards.uncalibrated_message(names, f"when {stage} starts"))
        if self.check_eval_mode:
            self._eval_norms = guards.running_stat_norms(pl_module)
            self._check_train_mode(pl_module, stage)
            self._snapshot = guards.running_stats_snapshot(pl_module)

    def _check_train_mode(self, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.check_eval_mode:
            return
        names = [name for name, module in self._eval_norms if module.training]
        if names:
            self._warn("train_mode", names, guards.train_mode_message(names, f"during {stage}"), self.strict)

    def _end_evaluation(self, pl_module: pl.LightningModule, stage: str) -> None:
        if self._snapshot is None:
            return
        snapshot, self._snapshot = self._snapshot, None
        names = guards.changed_running_stats(pl_module, snapshot)
        if names:
            self._warn("leak", names, guards.leak_message(names, f"during {stage}"), self.strict)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            check_eval_mode=self.check_eval_mode, check_batch_size=self.check_batch_size,
            check_calibration=self.check_calibration, check_init=self.check_init, strict=self.strict,
        )  # fmt: skip

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"warned": sorted(self._warned), "steps_seen": self._steps_seen}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._warned = set(state_dict.get("warned", []))
        self._steps_seen = state_dict.get("steps_seen", 0)
