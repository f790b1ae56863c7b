"""lightning-bn: weight initialization and normalization, monitored and fixed, for PyTorch Lightning.

The plain-PyTorch core (statistics, activations, tracing, init, norms, guards, recalibration) imports without
Lightning; the Lightning callbacks are imported on first use (``lightning_bn.ActivationMonitor``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_bn.activations import (
    Activation,
    ActivationKind,
    available_activations,
    get_activation,
    register_activation,
)
from lightning_bn.guards import BatchNormWarning, guard
from lightning_bn.init import init_layer_, lsuv_, zero_init_residual_
from lightning_bn.monitor import Monitor
from lightning_bn.norms import (
    ChannelsFirst,
    ChannelsLast,
    convert_norms,
    create_norm_layer,
    get_norm_layer,
    insert_norms,
    register_norm,
)
from lightning_bn.options import PrepareOptions
from lightning_bn.probes import ActivationProbe, select_modules, watch_targets
from lightning_bn.recalibration import recalibrate
from lightning_bn.report.plot import plot
from lightning_bn.stats import figures, summarize
from lightning_bn.tracing import LayerTrace, ModelMap, recognize, trace_activations, trace_model
from lightning_bn.wrapper import Report, prepare

if TYPE_CHECKING:
    from lightning_bn.callbacks import (
        ActivationMonitor,
        AutoInit,
        BatchNormGuard,
        BatchNormRecalibration,
        GradientMonitor,
        HealthCheck,
    )

_CALLBACKS = {
    "ActivationMonitor",
    "AutoInit",
    "BatchNormGuard",
    "BatchNormRecalibration",
    "GradientMonitor",
    "HealthCheck",
}


def __getattr__(name: str) -> Any:
    if name in _CALLBACKS:  # imported on first use: the core works where Lightning is not installed
        return getattr(importlib.import_module("lightning_bn.callbacks"), name)
    raise AttributeError(f"module 'lightning_bn' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "Activation",
    "ChannelsFirst",
    "ChannelsLast",
    "ActivationKind",
    "ActivationMonitor",
    "ActivationProbe",
    "AutoInit",
    "BatchNormGuard",
    "BatchNormRecalibration",
    "BatchNormWarning",
    "GradientMonitor",
    "HealthCheck",
    "LayerTrace",
    "ModelMap",
    "Monitor",
    "PrepareOptions",
    "Report",
    "available_activations",
    "plot",
    "convert_norms",
    "create_norm_layer",
    "figures",
    "get_activation",
    "get_norm_layer",
    "guard",
    "init_layer_",
    "insert_norms",
    "lsuv_",
    "prepare",
    "recalibrate",
    "recognize",
    "register_activation",
    "register_norm",
    "select_modules",
    "summarize",
    "trace_activations",
    "trace_model",
    "watch_targets",
    "zero_init_residual_",
]
