"""lightning-bn: weight initialization and normalization, monitored and fixed, for PyTorch Lightning."""

from lightning_bn.activations import (
    Activation,
    ActivationKind,
    available_activations,
    get_activation,
    register_activation,
)
from lightning_bn.callbacks import (
    ActivationMonitor,
    AutoInit,
    BatchNormGuard,
    BatchNormRecalibration,
    GradientMonitor,
)
from lightning_bn.guards import BatchNormWarning, guard
from lightning_bn.init import LayerTrace, init_layer_, lsuv_, trace_activations, zero_init_residual_
from lightning_bn.probes import ActivationProbe, select_modules
from lightning_bn.recalibration import recalibrate
from lightning_bn.stats import figures, summarize
from lightning_bn.wrapper import Report, prepare

__version__ = "0.1.0"

__all__ = [
    "Activation",
    "ActivationKind",
    "ActivationMonitor",
    "ActivationProbe",
    "AutoInit",
    "BatchNormGuard",
    "BatchNormRecalibration",
    "BatchNormWarning",
    "GradientMonitor",
    "LayerTrace",
    "Report",
    "available_activations",
    "figures",
    "get_activation",
    "guard",
    "init_layer_",
    "lsuv_",
    "prepare",
    "recalibrate",
    "register_activation",
    "select_modules",
    "summarize",
    "trace_activations",
    "zero_init_residual_",
]
