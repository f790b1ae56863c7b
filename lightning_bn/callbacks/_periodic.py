"""The Lightning driver of the monitoring engine: one callback class that says when a step begins and ends and where
its figures go; :class:`~lightning_bn.ActivationMonitor` and :class:`~lightning_bn.GradientMonitor` only choose
options."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import move_data_to_device
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_bn.monitoring import MonitorEngine, MonitorOptions
from lightning_bn.report.plot import saturation_heatmap
from lightning_bn.tags import HEATMAP_TAG
from lightning_bn.tracing import ModelMap
from lightning_bn.writers import Destination

T = TypeVar("T")


def checked(check: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one of the shared argument checks (:mod:`lightning_bn.checks`, :class:`MonitorOptions`); a bad value is
    raised as Lightning's ``MisconfigurationException`` with the same message."""
    try:
        return check(*args, **kwargs)
    except ValueError as err:
        raise MisconfigurationException(str(err)) from err


def options(**kwargs: Any) -> MonitorOptions:
    """:class:`MonitorOptions` for a callback (see :func:`checked`)."""
    return checked(MonitorOptions, **kwargs)


class MonitorCallback(Callback):
    """A callback driving one :class:`~lightning_bn.monitoring.MonitorEngine`: hooks on for the training forward
    passes of a logging step (every micro-batch under gradient accumulation), gradients measured before the optimizer
    step, everything collected after it in one transfer and written to every logger.

    Public for :class:`~lightning_bn.HealthCheck`, which reads :attr:`figures`, :attr:`layers` and
    :attr:`last_logged_step`. The last logged step is saved in checkpoints (under :attr:`state_key`, so two
    instances resume independently): a resumed run neither repeats nor skips a logging step.
    """

    def __init__(self, options: MonitorOptions) -> None:
        self.options = options
        self.engine = self._engine()
        self._destination: Destination | None = None
        self._layers_written = False

    def _engine(self) -> MonitorEngine:
        return MonitorEngine(self.options, type(self).__name__, warn=self._warn, info=rank_zero_info)

    @staticmethod
    def _warn(message: str) -> None:
        rank_zero_warn(message, category=RuntimeWarning)

    @property
    def every_n_steps(self) -> int:
        return self.options.every_n_steps

    @property
    def figures(self) -> dict[str, deque[tuple[int, float]]]:
        """Every figure this fit logged: tag -> ``[(step, value)]``, the latest logged steps."""
        return self.engine.figures

    @property
    def layers(self) -> list[dict[str, Any]] | None:
        """The watched layers in forward order (the layers table the report reads), once known."""
        return self.engine.layers

    @property
    def model_map(self) -> ModelMap | None:
        """The trace of the model, once known."""
        return self.engine.model_map

    @property
    def last_logged_step(self) -> int:
        """The last step whose figures were logged (-1: none yet)."""
        return self.engine.last_logged_step

    @property
    @override
    def state_key(self) -> str:
        # Lightning reads it at every hook call (its profiler's names): made once, the options are frozen
        if getattr(self, "_state_key", None) is None:
            # per_layer_scalars only when not the default: checkpoints written before it existed keep their key
            state = {k: repr(v) for k, v in vars(self.options).items() if k != "per_layer_scalars" or v}
            self._state_key = self._generate_state_key(**state)
        return self._state_key

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.engine.release()
        self.engine = self._engine()  # a second fit starts afresh (a checkpoint is restored after this)
        self._layers_written = False
        if not trainer.loggers:
            rank_zero_warn(
                f"`{type(self).__name__}` found no logger in the Trainer; its figures go nowhere. "
                "Pass a logger such as `TensorBoardLogger` to the Trainer.",
                category=RuntimeWarning,
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._destination = Destination.of_loggers(trainer.loggers, self.options.per_layer_scalars)
        example = pl_module.example_input_array
        if example is not None:
            example = trainer.precision_plugin.convert_input(move_data_to_device(example, pl_module.device))
        try:
            self.engine.start(
                pl_module,
                example,
                tensorboard=bool(self._destination.tensorboard),
                entries=("", *(name for name, _ in pl_module.named_children())),  # training_step may call a part
                context=trainer.precision_plugin.forward_context,
            )
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err
        if trainer.is_global_zero:
            self._destination.register(self.engine.layout())

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.engine.begin(trainer.global_step)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, opt: Optimizer) -> None:
        self.engine.watch_nonfinite(trainer.global_step)
        self.engine.measure_gradients(trainer.global_step, [p for g in opt.param_groups for p in g["params"]],
                                      getattr(opt, "optimizer", opt))  # fmt: skip  (Lightning's wrapper holds it)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        pending = self.engine.pending
        if pending is not None and trainer.global_step > pending:  # the optimizer stepped: the step is complete
            self._flush(trainer, outputs.get("loss") if isinstance(outputs, Mapping) else outputs)

    def _flush(self, trainer: pl.Trainer, loss: Any = None) -> None:
        result = self.engine.end(loss if isinstance(loss, Tensor) else None)
        if result is None or not trainer.is_global_zero or self._destination is None:
            return
        if not self._layers_written and self.engine.layers is not None:
            self._destination.write_layers(self.engine.layers)
            self._layers_written = True
        self._destination.publish(result.metrics, result.histograms, result.step)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.engine.pending is not None:
            self._flush(trainer)  # the last, incomplete step of an epoch
        self.engine.check_nonfinite()  # one read per epoch
        grid = self.engine.heatmap()
        if grid is not None and trainer.is_global_zero and self._destination and self._destination.tensorboard:
            self._destination.image(HEATMAP_TAG, saturation_heatmap(*grid), grid[1][-1])

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.engine.check_nonfinite()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.engine.release()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.engine.release()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.engine.release()

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.engine.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.engine.load_state_dict(state_dict)
