"""BatchNormRecalibration: recompute BatchNorm running statistics exactly over training batches (PreciseBN).

Logs ``bn_mean_shift/<module>`` and ``bn_var_shift/<module>``: how far each BatchNorm's running statistics moved.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_bn import checks, writers
from lightning_bn.callbacks._periodic import checked
from lightning_bn.recalibration import recalibrate, resolve_forward, sharded_statistics
from lightning_bn.tags import tag

_WHEN = ("fit_end", "epoch_end")


def _fsdp1_wrapper(trainer: pl.Trainer, pl_module: pl.LightningModule) -> nn.Module | None:
    """FSDPStrategy's FSDP1 wrapper around the LightningModule itself (no ``configure_model`` wrapping): the module's
    weights exist only inside the wrapper's forward, so the recalibration forward must go through it."""
    wrapper = trainer.strategy.model
    if wrapper is None or wrapper is pl_module or not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    return wrapper if isinstance(wrapper, FullyShardedDataParallel) else None


def _through(
    wrapper: nn.Module, pl_module: pl.LightningModule, forward: Callable[[nn.Module, Any], Any]
) -> Callable[[nn.Module, Any], Any]:
    """``forward(pl_module, batch)`` run inside ``wrapper``'s forward (its pre-forward gathers the weights), as
    Lightning runs ``training_step`` under FSDP: the LightningModule's ``forward`` is patched for one call."""

    def run(_: nn.Module, batch: Any) -> Any:
        patched = "forward" in pl_module.__dict__
        original = pl_module.__dict__.get("forward")

        def restore() -> None:
            if patched:
                pl_module.__dict__["forward"] = original
            else:
                pl_module.__dict__.pop("forward", None)

        def inner(*args: Any, **kwargs: Any) -> Any:
            restore()  # the real forward again, for the user's code inside
            return forward(pl_module, batch)

        pl_module.__dict__["forward"] = inner
        try:
            return wrapper()
        finally:
            restore()

    return run


def _pooling_group(trainer: pl.Trainer) -> Any:
    """The data-parallel process group under ModelParallelStrategy with tensor parallelism (its ranks share batches,
    each value must count once), else ``None`` (all ranks)."""
    try:
        mesh = trainer.strategy.device_mesh  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):  # no mesh: DDP, FSDPStrategy (its HSDP mesh is data-parallel throughout)
        return None
    names = getattr(mesh, "mesh_dim_names", None) or ()
    if mesh is None or "data_parallel" not in names or mesh["data_parallel"].size() == mesh.size():
        return None
    return mesh["data_parallel"].get_group()


def shift_metrics(shifts: dict[str, dict[str, float]]) -> dict[str, float]:
    """The logged keys of a recalibration result: ``bn_mean_shift/<name>`` and ``bn_var_shift/<name>``.

    Example::

        >>> shift_metrics({"net.1": {"mean_shift": 0.5, "var_shift": 0.25, "count": 64.0}})
        {'bn_mean_shift/net.1': 0.5, 'bn_var_shift/net.1': 0.25}
    """
    return {
        tag(f"bn_{figure}", name): value
        for name, figures in shifts.items()
        for figure, value in figures.items()
        if figure in ("mean_shift", "var_shift")
    }


class BatchNormRecalibration(Callback):
    r"""Replace BatchNorm running statistics with their exact values over ``num_batches`` training batches.

    The EMA kept during training lags the weights (and follows only the last few batches with a high momentum);
    PreciseBN (Wu & Johnson 2021) recomputes the population statistics, like fvcore's ``PreciseBN`` hook and
    ``torch.optim.swa_utils.update_bn``. The module runs in training mode without gradients; momentum and modes
    are restored; under DDP each rank uses its own shard of the training data and the statistics are pooled over
    all ranks exactly, in one collective that every rank reaches however many batches its loader has (a failure on
    one rank makes every rank raise rather than wait). See :func:`lightning_bn.recalibrate`.

    Sharded training works the same way (``docs/distributed.md``): under ``ModelParallelStrategy`` (FSDP2
    ``fully_shard`` in ``configure_model``) and ``FSDPStrategy`` (FSDP1; its wrapper's forward is used) each forward
    gathers the weights, so the ranks run their batches in lockstep (as many as the rank with the fewest); with
    tensor parallelism the statistics are pooled over the data-parallel ranks only (tensor-parallel ranks share a
    batch). BatchNorm buffers are not sharded: afterwards every rank holds the same, exact statistics (during
    training FSDP leaves each rank its own running estimate).

    The epoch last recalibrated is saved in checkpoints (a resumed fit does not recalibrate an epoch twice) and
    forgotten in ``setup``, before a checkpoint is restored, so the same instance recalibrates again in a second
    ``Trainer.fit``. Nothing is attached to the model between recalibrations: each one removes its hooks and puts
    momentum, modes and buffers back itself, also when it fails.

    Args:
        num_batches: training batches per rank to average over.
        when: ``"fit_end"`` (once, when training ends: the model in memory, used by a following
            ``trainer.test``/``predict``) or ``"epoch_end"`` (after the last training batch of every epoch, so the
            end-of-epoch validation and checkpoint see the refreshed statistics).
        forward: ``forward(pl_module, batch)`` for one batch; default (``None``): the module called on the first
            element of a tuple/list batch, on the keywords of a dict batch, or on the batch.

    Raises:
        MisconfigurationException: for a non-positive ``num_batches``, an unknown ``when`` or a ``forward`` that is
            not ``None`` or a callable taking ``(model, batch)``; at fit start, naming the strategy, for BatchNorms
            whose running statistics a tensor-parallel plan turned into DTensors.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_bn.callbacks.recalibrate import BatchNormRecalibration
        >>> trainer = Trainer(callbacks=[BatchNormRecalibration(num_batches=100, when="epoch_end")])
    """

    def __init__(
        self,
        num_batches: int = 100,
        when: Literal["fit_end", "epoch_end"] = "fit_end",
        forward: Callable[[nn.Module, Any], Any] | None = None,
    ) -> None:
        self.num_batches = checked(checks.integer, "num_batches", num_batches)
        self.when = checked(checks.choice, "when", when, _WHEN)
        try:
            self.forward = resolve_forward(forward)
        except TypeError as err:
            raise MisconfigurationException(str(err)) from None
        self.shifts: dict[str, dict[str, float]] = {}
        self._last_epoch = -1

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # a new fit; a resumed one gets `_last_epoch` back from its checkpoint after this
            self.shifts = {}
            self._last_epoch = -1

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after `configure_model`: the layers exist now; refuse before training rather than after it
        sharded = sharded_statistics(pl_module)
        if sharded:
            raise MisconfigurationException(
                f"`BatchNormRecalibration` cannot recalibrate under {type(trainer.strategy).__name__}: BatchNorm "
                f"modules {sharded} hold DTensor running statistics (a tensor-parallel plan or `distribute_module` "
                "took them in). Leave BatchNorm out of the parallelize plan in `configure_model`: its buffers then "
                "stay plain tensors, pooled exactly over the data-parallel ranks; or remove the callback."
            )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.when == "epoch_end" and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._recalibrate(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "epoch_end":  # an epoch cut short (max_steps, limit_train_batches) has no last batch
            self._recalibrate(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "fit_end":
            self._recalibrate(trainer, pl_module)

    def _batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loader: Any) -> Generator[Any, None, None]:
        for batch in loader:
            batch = trainer.precision_plugin.convert_input(batch)
            batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=0)
            yield trainer.strategy.batch_to_device(batch, dataloader_idx=0)

    def _recalibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "epoch_end" and self._last_epoch == trainer.current_epoch:
            return
        self._last_epoch = trainer.current_epoch
        loader = trainer.train_dataloader
        if loader is None:
            rank_zero_warn(
                "`BatchNormRecalibration` found no training dataloader; running statistics were not recalibrated.",
                category=RuntimeWarning,
            )
            return
        model, forward = pl_module, self.forward
        wrapper = _fsdp1_wrapper(trainer, pl_module)
        if wrapper is not None:
            model, forward = wrapper, _through(wrapper, pl_module, self.forward)
        batches = self._batches(trainer, pl_module, loader)
        try:
            self.shifts = recalibrate(
                model,
                batches,
                self.num_batches,
                forward=forward,
                device=pl_module.device,
                group=_pooling_group(trainer),
            )
        finally:
            batches.close()  # ends the loader's iterator (and its workers) now, also after an error
        if trainer.is_global_zero:
            writers.log_scalars(trainer.loggers, shift_metrics(self.shifts), trainer.global_step)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(num_batches=self.num_batches, when=self.when)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self._last_epoch}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_epoch = state_dict.get("last_epoch", -1)
