"""The layer below everything that inspects a model: hook lifecycle, model state, the one data-flow trace.

``init``, ``norms``, ``guards``, ``monitoring`` and ``recalibration`` build on this package and import nothing from each
other; see ``docs/architecture.md``.
"""

from lightning_bn.tracing.hooks import (
    HookSet,
    StopForward,
    as_call,
    calibrating,
    is_calibrating,
    model_state,
    run_forward,
)
from lightning_bn.tracing.measure import module_order_activations, output_stds
from lightning_bn.tracing.model_map import ActivationSite, AttentionSite, LayerTrace, Layout, ModelMap
from lightning_bn.tracing.recognize import Recognition, recognize
from lightning_bn.tracing.trace import LAYER_TYPES, NORM_TYPES, PASS_TYPES, trace_activations, trace_call, trace_model

__all__ = [
    "LAYER_TYPES",
    "NORM_TYPES",
    "PASS_TYPES",
    "ActivationSite",
    "AttentionSite",
    "HookSet",
    "LayerTrace",
    "Layout",
    "ModelMap",
    "Recognition",
    "StopForward",
    "as_call",
    "calibrating",
    "is_calibrating",
    "model_state",
    "module_order_activations",
    "output_stds",
    "recognize",
    "run_forward",
    "trace_activations",
    "trace_call",
    "trace_model",
]
