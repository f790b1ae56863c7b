"""Judge the health of a run from its logged monitor scalars: saturated, dead, non-finite, vanishing, exploding layers.

A pure function over ``{tag: [(step, value)]}`` (what :class:`~lightning_bn.ActivationMonitor` and
:class:`~lightning_bn.GradientMonitor` log) and, when the run has it, the table of watched layers that
:class:`~lightning_bn.ActivationMonitor` writes as TensorBoard text :data:`LAYERS_TAG` (forward order, module type,
activation); testable without event files. ``lightning-bn report`` (:mod:`lightning_bn.cli`) reads the files.
"""

from lightning_bn.tags import LAYERS_TAG, is_monitor_tag

from .analysis import analyze
from .health import FLAGS, Flag, LayerHealth, RunHealth, Thresholds

__all__ = ["FLAGS", "LAYERS_TAG", "Flag", "LayerHealth", "RunHealth", "Thresholds", "analyze", "is_monitor_tag"]
