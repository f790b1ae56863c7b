"""Initialization matched to the activation after each layer: initializers, and the one-pass data-driven rescaling.
"""

from __future__ import annotations

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
