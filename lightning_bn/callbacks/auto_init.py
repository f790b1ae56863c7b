"""AutoInit: initialize the LightningModule to match its activations, and optionally insert norms, when fitting starts.

Runs :func:`lightning_bn.prepare.prepare` in ``setup`` (before optimizers exist and before DDP wraps the model), or in
``on_fit_start`` for a model whose layers ``configure_model`` builds, and logs the report on rank zero: printed, and as
TensorBoard text ``lightning_bn/init_report`` when that logger is present.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_bn import writers
from lightning_bn.prepare import PrepareOptions, Report, has_layers, prepare

#: TensorBoard text tag of the report.
REPORT_TAG = "lightning_bn/init_report"


class AutoInit(Callback):
    r"""Initialize every Linear / Conv / Embedding / RNN layer for the activation that follows it, once, at fit start.

    With ``norm=...`` it also inserts a norm after every hidden Linear / Conv (see
    :func:`lightning_bn.norms.insert_norms`). This happens in ``setup``, before ``configure_optimizers`` runs, so the
    optimizer gets the new norms' parameters; on resume the same insertion runs again before the checkpoint (saved with
    the norms) is loaded, so its keys match.

    The activations are found by one traced forward pass on an example input (``example_input`` or the module's
    ``example_input_array``); see :func:`lightning_bn.prepare.prepare` for the schemes. Because ``setup`` runs before
    a checkpoint is restored, ``trainer.fit(ckpt_path=...)`` ends with the checkpoint's weights. All processes draw
    from a generator seeded identically (``seed``, else rank zero's ``torch.initial_seed()``), so under DDP every rank
    starts from the same weights.

    **Models built in** ``configure_model``: Lightning calls ``setup`` before ``configure_model``, so a LightningModule
    that has no layer yet at ``setup`` and overrides ``configure_model`` is initialized in ``on_fit_start`` instead,
    right after the model exists and the strategy has set it up (the optimizers then hold the same parameters, with no
    state yet, and are written in place). When resuming (``trainer.fit(ckpt_path=...)``) the checkpoint's weights
    stand: restored before ``on_fit_start``, the init is skipped; restored after it (strategies that restore after
    setup, such as ``ModelParallelStrategy``), they overwrite the init. Norms cannot be inserted then (the optimizers
    already exist): ``norm=...`` with such a model raises at ``setup``; build the model in ``__init__``, or call
    ``lightning_bn.prepare(model, example, norm=..., seed=...)`` yourself inside ``configure_model``.

    **Sharded models** (``ModelParallelStrategy``, FSDP2 ``fully_shard`` in ``configure_model``; parameters are
    ``DTensor``): the init is the same, value for value, as the unsharded init of the same model with the same seed.
    Each layer is drawn full-size (one layer at a time) and every rank keeps its own slice; the rescaling is measured
    by forward passes outside the init (writes inside FSDP2's ``forward`` would not reach the shards), so it costs one
    forward pass per rescaling step (:func:`lightning_bn.init.sharded_sequential_init_`). Every rank must see the same
    example input (the forward passes are collectives). Parameters replicated across ranks end identical. A model
    built (unsharded) in ``__init__`` and only sharded in ``configure_model`` is initialized in ``setup``, before
    sharding. The alternative, also for ``norm=...``: call ``lightning_bn.prepare(model, example, seed=...)`` inside
    ``configure_model`` before ``fully_shard``, with the same seed and example on every rank, and leave ``AutoInit``
    out.

    Args:
        init: ``"auto"``, ``"lsuv"``, ``"critical"`` (the mean-field critical point, χ₁ = 1) or a scheme
            (``"xavier"``, ``"kaiming"``, ``"lecun"``, ``"orthogonal"``, ``"numeric"``).
        norm: ``None`` (no insertion), ``"auto"``, ``"batch"``, ``"layer"``, ``"group"``, ``"rms"``, ``"instance"``,
            ``"sync_batch"``, a registered name, a norm class or a ``functools.partial``.
        example_input: a Tensor, tuple of args or dict of kwargs for ``forward``; default: ``example_input_array``.
        overrides: glob pattern on qualified layer names -> scheme or ``"skip"``.
        zero_init_residual: zero the weight of the last norm in each residual branch.
        distribution: ``"normal"``, ``"uniform"`` or ``"truncated_normal"``.
        mode: ``"fan_in"`` or ``"fan_out"``.
        seed: seed of the init's random draws; default: ``torch.initial_seed()`` of rank zero.
        position: ``"pre"`` (norm before the activation) or ``"post"`` (after an activation module).
        exclude: glob patterns on qualified layer names that get no norm.
        keep_bias: keep the biases a following BatchNorm makes redundant.

    Raises:
        MisconfigurationException: for a bad argument (at construction), or at fit start when there is no example
            input or :func:`~lightning_bn.prepare.prepare` rejects the model, or ``norm=...`` is asked of a model
            built in ``configure_model``.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_bn.callbacks.auto_init import AutoInit
        >>> trainer = Trainer(callbacks=[AutoInit(init="auto", norm="batch")])
    """

    def __init__(
        self,
        init: str = "auto",
        norm: Any = None,
        example_input: Any = None,
        overrides: dict[str, str] | None = None,
        zero_init_residual: bool = False,
        distribution: str = "normal",
        mode: str = "fan_in",
        seed: int | None = None,
        position: str = "pre",
        exclude: list[str] | None = None,
        keep_bias: bool = False,
    ) -> None:
        try:
            self.options = PrepareOptions(
                init, norm, overrides, position, exclude, keep_bias, distribution, mode, zero_init_residual,
                seed=seed,
            )  # fmt: skip
        except (TypeError, ValueError) as err:
            raise MisconfigurationException(f"`AutoInit`: {err}") from err
        self.example_input = example_input
        self.report: Report | None = None
        self._prepared: weakref.ref | None = None
        self._deferred: weakref.ref | None = None

    def __getattr__(self, name: str) -> Any:
        # `callback.init`, `callback.norm`, ...: the options, read through
        options = self.__dict__.get("options")
        if options is not None and name in PrepareOptions.names():
            return getattr(options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if has_layers(pl_module) or not is_overridden("configure_model", pl_module):
            self._prepare(trainer, pl_module)
            return
        # the layers come from `configure_model`, which Lightning calls after `setup`: initialize at fit start
        if self.options.norm is not None:
            raise MisconfigurationException(
                f"`AutoInit(norm={self.options.norm!r})` cannot insert norms into {type(pl_module).__name__}: its "
                "layers are built in `configure_model`, which runs after `setup`, so the model exists only once the "
                "optimizers are (about to be) created and sharded. Build the model in `__init__`, or call "
                "`lightning_bn.prepare(self.<model>, example, norm=..., seed=...)` yourself inside `configure_model` "
                "(before `fully_shard`, identically on every rank) and drop `AutoInit`, or use `AutoInit(norm=None)`"
            )
        self._deferred = weakref.ref(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        deferred = self._deferred() if self._deferred is not None else None
        self._deferred = None
        if deferred is not pl_module:
            return
        if trainer.ckpt_path is not None:  # restored already (or about to be): the checkpoint's weights stand
            self._prepared = weakref.ref(pl_module)
            rank_zero_info(f"AutoInit: resuming from {trainer.ckpt_path}; the checkpoint's weights are kept")
            return
        self._prepare(trainer, pl_module)

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        prepared = self._prepared() if self._prepared is not None else None
        if prepared is pl_module:
            return  # a second `fit` of the same model continues from its trained weights; a new model is prepared
        example = self.example_input
        if example is None:
            example = getattr(pl_module, "example_input_array", None)
        if example is None:
            raise MisconfigurationException(
                f"`AutoInit` needs an example input to trace {type(pl_module).__name__}: set "
                "`self.example_input_array = torch.randn(batch, ...)` in the LightningModule's `__init__`, or pass "
                "`AutoInit(example_input=...)` (a Tensor, a tuple of args or a dict of kwargs)"
            )
        seed = self.options.seed if self.options.seed is not None else trainer.strategy.broadcast(torch.initial_seed())
        try:
            self.report = prepare(pl_module, example, options=dataclasses.replace(self.options, seed=int(seed)))
        except (TypeError, ValueError) as err:
            raise MisconfigurationException(f"`AutoInit`: {err}") from err
        self._prepared = weakref.ref(pl_module)
        if trainer.is_global_zero:
            self._log(trainer, self.report)

    def _log(self, trainer: pl.Trainer, report: Report) -> None:
        rank_zero_info(f"AutoInit:\n{report}")
        # four leading spaces: TensorBoard renders text as Markdown, and this keeps the table's columns
        text = "\n".join(f"    {line}" for line in str(report).splitlines())
        writers.log_text(writers.tensorboard_writers(trainer.loggers), REPORT_TAG, text, step=0)
