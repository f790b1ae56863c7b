"""ActivationMonitor: per-layer activation statistics, logged every ``every_n_steps`` optimizer steps.

Logs ``act_mean``, ``act_std``, ``act_kurtosis``, ``act_min``, ``act_max``, ``act_zero``, ``act_nonfinite`` for every
watched module, ``act_saturation`` and ``act_dead`` for activations; with TensorBoard also histograms and a
saturation heatmap.
"""

from __future__ import annotations

from lightning_bn.callbacks._periodic import MonitorCallback, options
from lightning_bn.monitoring import ModuleFilter
from lightning_bn.monitoring.rows import DEFAULT_ZERO_TOL


class ActivationMonitor(MonitorCallback):
    r"""Log per-layer activation statistics: where signals vanish, explode, saturate or die.

    What is watched comes from one trace per fit (:func:`~lightning_bn.tracing.trace_model` on
    ``example_input_array``, else the first training call of ``forward`` — or of a top-level submodule that
    ``training_step`` calls — traced as it runs, once): every activation, whether a module (``nn.ReLU``,
    transformers' ``NewGELUActivation``, found by what it computes), a call in ``forward`` (``F.relu``,
    ``torch.tanh``, ``x.sigmoid()``: logged as ``<producing layer>.<kind>``, e.g. ``fc1.relu``) or inside a norm-act
    layer, and every leaf layer with a weight. Placeholders (``nn.Identity``, dropout, drop-path) are not
    activations. The map is kept as :attr:`model_map`; names carry no wrapper prefix (``_orig_mod.`` of
    ``torch.compile``).

    On a logging step, forward hooks on the watched modules reduce each output of the training forward passes (every
    micro-batch under gradient accumulation; not evaluation passes under ``no_grad``, not the recomputation of a
    checkpointed segment) to a few numbers on the device; after the optimizer step all of them leave the device in
    one transfer (all-reduced first under DDP, so the figures are exact over the global batch). On other steps
    nothing is hooked.

    Saturation follows :mod:`lightning_bn.activations`: an element is saturated where the activation's derivative
    is below 1% of its maximum (sigmoid/tanh at an asymptote, ReLU below zero); a unit is dead when it is saturated
    for every sample of the batch (Glorot & Bengio 2010; He et al. 2015).

    Args:
        every_n_steps: log on optimizer steps that are multiples of this (step 0 included, i.e. the init).
        modules: which modules to watch: module types, glob patterns on qualified names (``"encoder.*"``), or a
            predicate ``(name, module) -> bool``; patterns also match activation site names (``"fc1.relu"``).
            Default: every activation and every leaf layer with weights.
        histograms: also write a histogram per module (TensorBoard only; rank-local under DDP).
        histogram_bins: bins per histogram.
        heatmap: write an image of saturation per activation layer over the logged steps at each epoch end
            (TensorBoard only).
        zero_tol: ``|x|`` at or below this counts towards ``act_zero``.
        fused: how the one fused pass per watched tensor runs: ``"auto"`` (compiled with ``torch.compile`` on CUDA,
            eager on CPU; ``LIGHTNING_BN_FUSED`` overrides), ``"compiled"`` or ``"eager"``. Both give the same figures.
        per_layer_scalars: ``False`` (default): TensorBoard gets each logging step's per-layer figures as one
            compact record (``lightning_bn/rows``, see :mod:`lightning_bn.writers`; the lightning-bn tab, the report,
            ``analyze`` and ``plot`` read it) and scalars for the model-wide figures only; ``True``: a TensorBoard
            scalar per figure and layer as well. Other loggers (CSV, W&B, ...) always get every scalar.
        attention: also log, on logging steps, figures of every attention call the trace found (one row per
            attention layer: ``attn_logit_max`` and ``attn_logit_rms`` of the pre-softmax logits, ``attn_entropy``
            and ``attn_entropy_min`` of the attention rows; eager softmax attention, ``scaled_dot_product_attention``
            and ``nn.MultiheadAttention``) and of the output logits where the loss is a cross-entropy
            (``out_logit_max``, ``out_log_z``, under the final layer's name). Exact under DDP; nothing on other
            steps.

    Raises:
        MisconfigurationException: naming the bad value (the checks of
            :class:`~lightning_bn.monitoring.MonitorOptions`, shared with :class:`~lightning_bn.Monitor`), or (at fit
            start) a ``modules`` entry that matches no module.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_bn import ActivationMonitor
        >>> trainer = Trainer(callbacks=[ActivationMonitor(every_n_steps=50)])
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        modules: ModuleFilter = None,
        histograms: bool = True,
        histogram_bins: int = 64,
        heatmap: bool = True,
        zero_tol: float = DEFAULT_ZERO_TOL,
        fused: str = "auto",
        per_layer_scalars: bool = False,
        attention: bool = True,
    ) -> None:
        super().__init__(
            options(every_n_steps=every_n_steps, activations=True, gradients=False, modules=modules,
                    histograms=histograms, histogram_bins=histogram_bins, heatmap=heatmap, zero_tol=zero_tol,
                    fused=fused, per_layer_scalars=per_layer_scalars, attention=attention)  # fmt: skip
        )
        self.modules, self.histograms, self.histogram_bins = modules, histograms, histogram_bins
        self.heatmap, self.zero_tol, self.fused = heatmap, self.options.zero_tol, fused
        self.per_layer_scalars = per_layer_scalars
        self.attention = attention
