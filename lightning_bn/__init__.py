"""lightning-bn: weight initialization and normalization, monitored and fixed, for PyTorch Lightning."""

from lightning_bn.activations import (
    Activation,
    ActivationKind,
    available_activations,
    get_activation,
    register_activation,
)
from lightning_bn.callbacks import ActivationMonitor, GradientMonitor
from lightning_bn.probes import ActivationProbe, select_modules
from lightning_bn.stats import figures, summarize

__version__ = "0.1.0"

__all__ = [
    "Activation",
    "ActivationKind",
    "ActivationMonitor",
    "ActivationProbe",
    "GradientMonitor",
    "available_activations",
    "figures",
    "get_activation",
    "register_activation",
    "select_modules",
    "summarize",
]
