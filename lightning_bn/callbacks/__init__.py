"""Thin Lightning adapters over the plain-PyTorch core, one callback per file."""

from lightning_bn.callbacks.activation_monitor import ActivationMonitor
from lightning_bn.callbacks.auto_init import AutoInit
from lightning_bn.callbacks.gradient_monitor import GradientMonitor
from lightning_bn.callbacks.health_check import HealthCheck
from lightning_bn.callbacks.norm_guard import BatchNormGuard
from lightning_bn.callbacks.recalibrate import BatchNormRecalibration

__all__ = [
    "ActivationMonitor",
    "AutoInit",
    "BatchNormGuard",
    "BatchNormRecalibration",
    "GradientMonitor",
    "HealthCheck",
]
