"""Initialization matched to the activation after each layer: initializers, and the one-pass data-driven rescaling.
"""

from __future__ import annotations

from lightning_bn.init.check import WeightCheck, check_weights, drawn_stds, weight_samples
from lightning_bn.init.initializers import (
    LAYER_TYPES,
    SCHEMES,
    init_layer_,
    layer_fans,
    match_scale_,
    zero_init_residual_,
)
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
    "WeightCheck",
    "check_weights",
    "drawn_stds",
    "init_layer_",
    "is_sharded",
    "layer_fans",
    "lsuv_",
    "match_scale_",
    "planning_view",
    "rescale_to_unit_variance_",
    "reshard",
    "sequential_init_",
    "sharded_sequential_init_",
    "unsharded_params",
    "weight_samples",
    "zero_init_residual_",
]
