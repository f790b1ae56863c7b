"""GradientMonitor: per-parameter gradient norm, weight norm and update-to-weight ratio on optimizer steps.

Logs ``grad_norm/<param>``, ``weight_norm/<param>``, ``update_ratio/<param>`` and ``grad_norm/total``; warns once,
naming the first layer in forward order, when a gradient is non-finite.
"""

from __future__ import annotations

from lightning_bn import checks
from lightning_bn.callbacks._periodic import MonitorCallback, checked, options


class GradientMonitor(MonitorCallback):
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
        per_layer_scalars: ``False`` (default): TensorBoard gets each logging step's per-layer figures as one
            compact record (``lightning_bn/rows``, see :mod:`lightning_bn.writers`; the lightning-bn tab, the report,
            ``analyze`` and ``plot`` read it) and scalars for the model-wide figures only; ``True``: a TensorBoard
            scalar per figure and layer as well. Other loggers (CSV, W&B, ...) always get every scalar.

    Raises:
        MisconfigurationException: naming the bad value (the checks of
            :class:`~lightning_bn.monitoring.MonitorOptions`, shared with :class:`~lightning_bn.Monitor`).

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
        per_layer_scalars: bool = False,
    ) -> None:
        checked(checks.boolean, "histograms", histograms)  # named as the user wrote it
        super().__init__(
            options(every_n_steps=every_n_steps, activations=False, gradients=True, gradient_histograms=histograms,
                    histogram_bins=histogram_bins, norm_type=norm_type, update_ratio=update_ratio,
                    update_ratio_budget=update_ratio_budget, nonfinite_every_step=nonfinite_every_step,
                    per_layer_scalars=per_layer_scalars)  # fmt: skip
        )
        self.norm_type, self.histograms, self.histogram_bins = self.options.norm_type, histograms, histogram_bins
        self.update_ratio, self.update_ratio_budget = update_ratio, self.options.update_ratio_budget
        self.nonfinite_every_step = nonfinite_every_step
        self.per_layer_scalars = per_layer_scalars
