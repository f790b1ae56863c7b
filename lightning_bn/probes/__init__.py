"""Hook lifecycle of the monitors: what to watch (:mod:`~lightning_bn.probes.select`), the activation probe that
summarizes it on the device (:mod:`~lightning_bn.probes.activation`), the gradient probe
(:mod:`~lightning_bn.probes.gradients`: norms and update ratios, exact under sharding), and the forward order of
modules."""

from __future__ import annotations

import warnings
from typing import Any

from lightning_bn.probes.activation import ActivationProbe, ProbeResult
from lightning_bn.probes.gradients import GradientProbe, GradientResult
from lightning_bn.probes.order import ForwardOrder
from lightning_bn.probes.select import (
    ModuleFilter,
    WatchTarget,
    default_module_filter,
    select_modules,
    validate_module_filter,
    watch_targets,
)
from lightning_bn.tracing import HookSet as _HookSet

__all__ = [
    "ActivationProbe",
    "ForwardOrder",
    "GradientProbe",
    "GradientResult",
    "ModuleFilter",
    "ProbeResult",
    "WatchTarget",
    "default_module_filter",
    "select_modules",
    "validate_module_filter",
    "watch_targets",
]


def __getattr__(name: str) -> Any:
    if name == "HookSet":
        warnings.warn(
            "`lightning_bn.probes.HookSet` moved to `lightning_bn.tracing.HookSet`; the old path goes away in the next "
            "release",
            DeprecationWarning,
            stacklevel=2,
        )
        return _HookSet
    raise AttributeError(f"module 'lightning_bn.probes' has no attribute {name!r}")
