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
from lightning_bn.norms import (
    ChannelsFirst,
    ChannelsLast,
    convert_norms,
    create_norm_layer,
    get_norm_layer,
    insert_norms,
    register_norm,
)
from lightning_bn.probes import ActivationProbe, select_modules
from lightning_bn.recalibration import recalibrate
from lightning_bn.stats import figures, summarize
from lightning_bn.wrapper import Report, prepare

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
    "LayerTrace",
    "Report",
    "available_activations",
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
    "register_activation",
    "register_norm",
    "select_modules",
    "summarize",
    "trace_activations",
    "zero_init_residual_",
]
