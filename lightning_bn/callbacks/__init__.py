"""Thin Lightning adapters over the plain-PyTorch core, one callback per file."""

from lightning_bn.callbacks.activation_monitor import ActivationMonitor
from lightning_bn.callbacks.auto_init import AutoInit
from lightning_bn.callbacks.gradient_monitor import GradientMonitor

__all__ = ["ActivationMonitor", "AutoInit", "GradientMonitor"]
