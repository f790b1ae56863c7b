"""lightning-bn: weight initialization and normalization, monitored and fixed, for PyTorch Lightning.

The top level holds what a user writes: the Lightning callbacks, :class:`Monitor` for plain loops and Fabric,
:func:`prepare`, :func:`guard`, :func:`recalibrate`, :func:`convert_norms`, :func:`plot`, :func:`analyze` and the
registries' ``register_*``. Everything else lives in its package (``lightning_bn.monitoring``, ``lightning_bn.init``,
``lightning_bn.norms``, ``lightning_bn.tracing``, ``lightning_bn.activations``, ``lightning_bn.report``). The
plain-PyTorch core imports without Lightning; the callbacks are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_bn.activations import register_activation
from lightning_bn.guards import BatchNormWarning, guard
from lightning_bn.layers import register_layer
from lightning_bn.monitor import Monitor
from lightning_bn.norms import convert_norms, insert_qk_norm, register_norm
from lightning_bn.prepare import prepare
from lightning_bn.recalibration import recalibrate
from lightning_bn.report import analyze
from lightning_bn.report.plot import plot

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
    "ActivationMonitor",
    "AutoInit",
    "BatchNormGuard",
    "BatchNormRecalibration",
    "BatchNormWarning",
    "GradientMonitor",
    "HealthCheck",
    "Monitor",
    "analyze",
    "convert_norms",
    "guard",
    "insert_qk_norm",
    "plot",
    "prepare",
    "recalibrate",
    "register_activation",
    "register_layer",
    "register_norm",
]
