"""The monitoring engine, free of Lightning: what to watch (:mod:`~lightning_bn.monitoring.select`), the rows that
summarize a tensor on the device (:mod:`~lightning_bn.monitoring.rows`), the activation and gradient probes, and
:class:`MonitorEngine`, which owns everything a driver does (targets, the first-call trace, attach/collect, the
non-finite watch, history, layout, the heatmap grid) under one validated :class:`MonitorOptions`.

:class:`~lightning_bn.Monitor` (plain loops, Fabric), :class:`~lightning_bn.ActivationMonitor` and
:class:`~lightning_bn.GradientMonitor` are thin drivers of one engine each.
"""

from lightning_bn.monitoring.activation import ActivationProbe, ProbeResult, layer_entry
from lightning_bn.monitoring.attention import AttentionProbe
from lightning_bn.monitoring.engine import MonitorEngine, MonitorOptions, StepResult, is_rank_zero
from lightning_bn.monitoring.gradients import GradientProbe, GradientResult
from lightning_bn.monitoring.rows import figures, summarize
from lightning_bn.monitoring.select import (
    ForwardOrder,
    ModuleFilter,
    WatchTarget,
    default_module_filter,
    plain_names,
    select_modules,
    validate_module_filter,
    watch_targets,
)

__all__ = [
    "ActivationProbe",
    "AttentionProbe",
    "ForwardOrder",
    "GradientProbe",
    "GradientResult",
    "ModuleFilter",
    "MonitorEngine",
    "MonitorOptions",
    "ProbeResult",
    "StepResult",
    "WatchTarget",
    "default_module_filter",
    "figures",
    "is_rank_zero",
    "layer_entry",
    "plain_names",
    "select_modules",
    "summarize",
    "validate_module_filter",
    "watch_targets",
]
