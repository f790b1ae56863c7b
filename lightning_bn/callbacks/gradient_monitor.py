"""GradientMonitor: per-parameter gradient norm, weight norm and update-to-weight ratio on optimizer steps.

Logs ``grad_norm/<param>``, ``weight_norm/<param>``, ``update_ratio/<param>`` and ``grad_norm/total``; warns once,
naming the first layer in forward order, when a gradient is non-finite.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_bn import writers
from lightning_bn.callbacks._periodic import PeriodicMonitor, check_positive_int
from lightning_bn.probes import ForwardOrder
from lightning_bn.probes.gradients import GradientProbe, local


class GradientMonitor(PeriodicMonitor):
    r"""Log gradient and update statistics per parameter, on optimizer steps that are multiples of ``every_n_steps``.

    Norms are computed on the device in one fused call per optimizer step and leave it in one transfer after the
    step. The update ratio ``‖Δw‖ / ‖w‖`` compares the weights before and after the optimizer step, so it needs a
    copy of the weights on logging steps. By default each parameter is copied on an evenly strided sample of at most
    ``update_ratio_budget`` (a quarter) of its elements — small parameters (under 4096 elements) whole — so the extra
    memory of a logging step stays near a quarter of the parameters' bytes and every parameter gets its ratio on every
    logging step: exact for the small ones, the ratio of the same sample of ``Δw`` and ``w`` for the large ones (a
    1-in-4 sample of thousands of elements, within a few percent). ``update_ratio="all"`` copies everything (exact),
    ``update_ratio=False`` nothing. About 1e-3 is the classic healthy value. With gradient accumulation the figures
    are those of the accumulated gradient; frozen parameters and parameters without a gradient are skipped.

    Args:
        every_n_steps: log on optimizer steps that are multiples of this.
        norm_type: the p of the p-norm (``float("inf")`` allowed).
        histograms: also write a histogram of each gradient (TensorBoard only).
        histogram_bins: bins per histogram.
        update_ratio: ``True`` (sampled within ``update_ratio_budget``), ``"all"`` (exact, copies every parameter) or
            ``False``.
        update_ratio_budget: fraction of each large parameter's elements copied on a logging step.
        nonfinite_every_step: watch every step for non-finite gradients (one fused norm over the gradients per step,
            on the device, no host sync: ~1-4% of a CPU step, nothing on a GPU); ``False``: on logging steps only.

    Raises:
        MisconfigurationException: for a non-positive ``every_n_steps``/``histogram_bins`` or ``norm_type`` <= 0.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_bn import GradientMonitor
        >>> trainer = Trainer(callbacks=[GradientMonitor(every_n_steps=50)])
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        norm_type: float = 2.0,
        histograms: bool = False,
        histogram_bins: int = 64,
        update_ratio: bool | str = True,
        update_ratio_budget: float = 0.25,
        nonfinite_every_step: bool = True,
    ) -> None:
        super().__init__(every_n_steps)
        if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)) or not norm_type > 0:
            raise MisconfigurationException(f"Expected `norm_type` to be a positive number but got {norm_type!r}")
        self.norm_type = float(norm_type)
        self.histograms = histograms
        self.histogram_bins = check_positive_int("histogram_bins", histogram_bins)
        if update_ratio not in (True, False, "all"):
            raise MisconfigurationException(
                f"Expected `update_ratio` to be True, False or 'all' but got {update_ratio!r}"
            )
        budget = update_ratio_budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
            raise MisconfigurationException(f"Expected `update_ratio_budget` in (0, 1] but got {budget!r}")
        self.update_ratio = update_ratio
        self.update_ratio_budget = float(budget)
        if not isinstance(nonfinite_every_step, bool):
            raise MisconfigurationException(
                f"Expected `nonfinite_every_step` to be True or False but got {nonfinite_every_step!r}"
            )
        self.nonfinite_every_step = nonfinite_every_step
        self._module_rank: dict[str, int] = {}
        self._order: ForwardOrder | None = None
        self._probe: GradientProbe | None = None
        self._warned_nonfinite = False
        self._watched = []  # every parameter, in forward order: the non-finite watch
        self._bad = None  # on the device: (first bad step, index in _watched, parameters affected), or -1s
        self._index = None

    @override
    def _reset(self) -> None:
        super()._reset()
        self._warned_nonfinite = False
        self._watched: list[Tensor] = []
        self._bad: Tensor | None = None
        self._index: tuple[tuple[int, ...], Tensor] | None = None

    @override
    def _release(self) -> None:
        if self._order is not None:
            self._order.detach()
            self._order = None
        if self._probe is not None:
            self._probe.reset()  # drops the parameter copies of an unfinished logging step

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        bins = self.histogram_bins if self.histograms and writers.tensorboard_writers(trainer.loggers) else 0
        self._probe = GradientProbe(
            pl_module.named_parameters(),
            self.norm_type,
            self.update_ratio,
            self.update_ratio_budget,
            histogram_bins=bins,
        )
        self._module_rank = {}
        self._order = ForwardOrder(pl_module)
        if trainer.is_global_zero:
            writers.write_layout(
                writers.tensorboard_writers(trainer.loggers),
                "lightning-bn: gradients",
                ["grad_norm", "update_ratio", "weight_norm"],
            )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._order is not None:
            self._order.attach()  # first batch of the fit only: learn the forward order of layers

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if self.nonfinite_every_step or (self._probe is not None and self._probe.pending) or self._due(trainer):
            self._watch_nonfinite(trainer)
        self._measure_gradients(trainer, optimizer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._order is not None:
            self._order.detach()
            self._module_rank = {name: i for i, name in enumerate(self._order.names)}
            self._order = None  # recorded: no hook on any later step, even if no leaf module ran
        self._flush(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report_nonfinite(self._bad.tolist() if self._bad is not None else None)  # one read per epoch

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report_nonfinite(self._bad.tolist() if self._bad is not None else None)

    def _watch_nonfinite(self, trainer: pl.Trainer) -> None:
        """Every step, on the device, no host sync: keep the first step with a non-finite gradient and the first
        parameter in forward order that has one; read with the next logging transfer or at epoch end."""
        if not trainer.is_global_zero or self._warned_nonfinite:
            return  # DDP: gradients are identical on every rank; sharded: rank zero's shards (a non-finite value in
            # another rank's shard reaches every rank's activations and gradients at the next step)
        if not self._watched:
            rank = {name: i for i, name in enumerate(self._order.names if self._order is not None else [])}
            rank = rank or self._module_rank
            named = sorted(self._probe.names.items(), key=lambda item: rank.get(item[1].rpartition(".")[0], len(rank)))
            self._watched = [p for p, _ in named]
        present = tuple(i for i, p in enumerate(self._watched) if p.grad is not None)
        if not present:
            return
        grads = [local(self._watched[i].grad) for i in present]
        if self._index is None or self._index[0] != present:  # built once: no host-to-device copy per step
            self._index = (present, torch.tensor(present, device=grads[0].device))
        index = self._index[1]
        bad = ~torch.isfinite(torch.stack(torch._foreach_norm(grads)))
        found = torch.stack([index[torch.argmax(bad.int())], bad.sum()])
        here = torch.cat([torch.full((1,), trainer.global_step, device=found.device), found])
        if self._bad is None:
            self._bad = torch.full((3,), -1, dtype=torch.long, device=found.device)
        self._bad = torch.where((self._bad[0] < 0) & bad.any(), here, self._bad)

    def _report_nonfinite(self, bad: list[int] | None) -> None:
        if bad is None or bad[0] < 0 or self._warned_nonfinite:
            return
        self._warned_nonfinite = True
        step, index, count = bad
        name = self._probe.names[self._watched[index]]
        rank_zero_warn(
            f"GradientMonitor: non-finite gradient at step {step}; the first layer in forward order with a non-finite "
            f"gradient is '{name.rpartition('.')[0] or name}' (parameter '{name}'); {count} of {len(self._watched)} "
            "parameters affected. Lower the learning rate, check the init (lightning_bn.prepare), or clip gradients.",
            category=RuntimeWarning,
        )

    def _measure_gradients(self, trainer: pl.Trainer, optimizer: Optimizer) -> None:
        if self._probe is None or (not trainer.is_global_zero and not self._probe.sharded):
            return  # plain parameters are identical on every rank after DDP's all-reduce: rank zero measures
        if not self._probe.pending and not self._due(trainer):
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self._probe.measure(trainer.global_step, params)

    def _flush(self, trainer: pl.Trainer) -> None:
        if self._probe is None or not self._probe.pending:
            return
        extra = [self._bad.double()] if self._bad is not None and trainer.is_global_zero else []
        result = self._probe.collect(extra)
        if result is None:
            return
        self._last_logged_step = result.step
        if not trainer.is_global_zero or not result.metrics:
            return
        if extra:
            self._report_nonfinite([int(v) for v in result.extra[-3:]])
        writers.log_scalars(trainer.loggers, result.metrics, result.step)
        self._remember(result.metrics, result.step)
        if result.histograms:
            writers.log_histograms(writers.tensorboard_writers(trainer.loggers), "grad_hist", result.histograms,
                                   result.step)  # fmt: skip

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "warned_nonfinite": self._warned_nonfinite}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._warned_nonfinite = state_dict.get("warned_nonfinite", False)
