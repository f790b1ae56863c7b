"""Checks for the classic normalization pitfalls, in plain PyTorch: each check returns findings, never mutates.

- *inference on batch statistics* (:mod:`~lightning_bn.guards.eval_mode`): BatchNorm-family modules left in training
  mode (:func:`find_train_mode_norms`), running statistics changed by evaluation data (:func:`running_stats_snapshot`,
  :func:`changed_running_stats`), and :func:`guard`, which warns live when a BatchNorm in training mode runs under
  ``torch.no_grad()`` / ``torch.inference_mode()`` (the forgotten ``model.eval()``).
- *tiny batches* (:mod:`~lightning_bn.guards.batch_size`): :class:`BatchSizeRecorder` + :func:`small_batch_norms`
  (samples per device: N of ``(N, C)`` and of ``(N, C, *spatial)``, not N × spatial).
- *uncalibrated running statistics* (:mod:`~lightning_bn.guards.calibration`): :func:`uncalibrated_norms`.
- *init mismatch* (:mod:`~lightning_bn.guards.init_check`): :func:`init_mismatches` (weight scale vs. what the
  activation needs, and the consequence in one forward and one backward pass: inf/NaN, gradients that explode or
  vanish toward the input, a vanishing or exploding signal).

Every warning has the category :class:`BatchNormWarning` and is one line: what is wrong, where, what to do.
Sharded models (FSDP2 ``fully_shard``, FSDP1, tensor parallelism) are read through :func:`full_parameters`; names
are reported without FSDP1's wrapper parts (:func:`clean_name`).
The guards build on :mod:`lightning_bn.tracing` (hooks, the calibration flag, the one data-flow trace) only.
"""

from __future__ import annotations

from lightning_bn.guards._common import (
    BatchNormWarning,
    batch_norms,
    clean_name,
    full_parameters,
    is_sharded,
    running_stat_norms,
)
from lightning_bn.guards.batch_size import (
    DEFAULT_MIN_VALUES_PER_CHANNEL,
    BatchSizeRecorder,
    small_batch_message,
    small_batch_norms,
    values_per_channel,
)
from lightning_bn.guards.calibration import uncalibrated_message, uncalibrated_norms
from lightning_bn.guards.eval_mode import (
    EvalModeGuard,
    changed_running_stats,
    find_train_mode_norms,
    guard,
    leak_message,
    running_stats_snapshot,
    train_mode_message,
)
from lightning_bn.guards.init_check import (
    DEFAULT_DEPTH_RATIO,
    DEFAULT_GRADIENT_RATIO,
    DEFAULT_INIT_FACTOR,
    DEFAULT_SATURATION_MARGIN,
    InitFinding,
    init_messages,
    init_mismatches,
    width_spread,
)

__all__ = [
    "DEFAULT_DEPTH_RATIO",
    "DEFAULT_GRADIENT_RATIO",
    "DEFAULT_INIT_FACTOR",
    "DEFAULT_SATURATION_MARGIN",
    "DEFAULT_MIN_VALUES_PER_CHANNEL",
    "BatchNormWarning",
    "BatchSizeRecorder",
    "EvalModeGuard",
    "InitFinding",
    "batch_norms",
    "changed_running_stats",
    "clean_name",
    "find_train_mode_norms",
    "full_parameters",
    "guard",
    "init_messages",
    "init_mismatches",
    "is_sharded",
    "leak_message",
    "running_stat_norms",
    "running_stats_snapshot",
    "small_batch_message",
    "small_batch_norms",
    "train_mode_message",
    "uncalibrated_message",
    "uncalibrated_norms",
    "values_per_channel",
    "width_spread",
]
