"""Synthetic monitor logs for the report and tab benchmarks: the tags a logging step writes, and the layers table."""

from __future__ import annotations

from collections.abc import Sequence


def monitor_tags(names: Sequence[str], parameters: Sequence[str] = ("weight",)) -> tuple[list[str], list[str]]:
    """``(activation tags, gradient tags)`` of one logging step for layers ``names``: every activation statistic per
    layer, and grad norm / update ratio / weight norm per parameter of each layer (``<name>.<parameter>``)."""
    from lightning_bn.tags import ACTIVATION_STATISTICS, GRAD_NORM, UPDATE_RATIO, WEIGHT_NORM, tag

    activations = [tag(statistic, name) for name in names for statistic in ACTIVATION_STATISTICS.values()]
    gradients = [
        tag(statistic, f"{name}.{parameter}")
        for name in names
        for parameter in parameters
        for statistic in (GRAD_NORM, UPDATE_RATIO, WEIGHT_NORM)
    ]
    return activations, gradients


def layers_table(names: Sequence[str], activation: str) -> list[dict[str, str]]:
    """The monitors' layers table for Linear layers ``names``, each followed by ``activation``."""
    return [{"name": name, "module_type": "Linear", "activation": activation, "hook": "output"} for name in names]
