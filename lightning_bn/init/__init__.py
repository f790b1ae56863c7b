"""Initialization matched to the activation after each layer: initializers, and the one-pass data-driven rescaling.

The trace that finds the activations moved to :mod:`lightning_bn.tracing`; its names still resolve here for this
release, with a ``DeprecationWarning``.
"""

from __future__ import annotations

import warnings
from typing import Any

from lightning_bn.init.initializers import LAYER_TYPES, SCHEMES, init_layer_, layer_fans, zero_init_residual_
from lightning_bn.init.sequential import (
    LayerStep,
    lsuv_,
    rescale_to_unit_variance_,
    sequential_init_,
    sharded_sequential_init_,
)
from lightning_bn.init.sharded import is_sharded, planning_view, reshard, unsharded_params

__all__ = [
    "LAYER_TYPES",
    "SCHEMES",
    "LayerStep",
    "init_layer_",
    "is_sharded",
    "layer_fans",
    "lsuv_",
    "planning_view",
    "rescale_to_unit_variance_",
    "reshard",
    "sequential_init_",
    "sharded_sequential_init_",
    "unsharded_params",
    "zero_init_residual_",
]

_MOVED = {"trace_activations", "LayerTrace", "as_call", "output_stds"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(
            f"`lightning_bn.init.{name}` moved to `lightning_bn.tracing.{name}`; the old path goes away in the next "
            "release",
            DeprecationWarning,
            stacklevel=2,
        )
        import lightning_bn.tracing

        return getattr(lightning_bn.tracing, name)
    raise AttributeError(f"module 'lightning_bn.init' has no attribute {name!r}")
