"""The tag vocabulary of lightning-bn, and the one order of layers: pure Python, shared by the writers, the monitoring
engine, the report and the pictures.

A monitor figure is logged as ``<statistic>/<layer or parameter>`` (``act_std/encoder.0``, ``grad_norm/fc.weight``),
so TensorBoard groups one statistic of every layer together; ``grad_norm/total`` is the norm of all gradients. The
table of watched layers (forward order, module type, activation) is a TensorBoard text under :data:`LAYERS_TAG`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "ACT_DEAD",
    "ACT_NONFINITE",
    "ACT_SAMPLES",
    "ACT_SATURATION",
    "ACT_STD",
    "ACT_TRANSMISSION",
    "GRAD_NORM",
    "GRAD_RMS_EPS",
    "UPDATE_RATIO",
    "WEIGHT_NORM",
    "ACTIVATION_HISTOGRAMS",
    "ACTIVATION_STATISTICS",
    "ACTIVATION_SECTION",
    "ATTENTION_STATISTICS",
    "GRADIENT_HISTOGRAMS",
    "GRADIENT_SECTION",
    "GRADIENT_STATISTICS",
    "HEATMAP_TAG",
    "LAYERS_TAG",
    "LOSS_TAG",
    "LAYOUT_STATISTICS",
    "NONFINITE_LAYERS_TAG",
    "NONFINITE_PARAMETERS_TAG",
    "OUTPUT_STATISTICS",
    "ROWS_PLUGIN",
    "ROWS_TAG",
    "SKIPPED_STEPS_TAG",
    "TOTAL_GRADIENT_TAG",
    "is_monitor_tag",
    "is_row_tag",
    "layer_order",
    "merge_orders",
    "natural_key",
    "split_tag",
    "tag",
]

#: figure of an activation row -> the statistic its logged tag starts with
ACTIVATION_STATISTICS: dict[str, str] = {
    "mean": "act_mean",
    "std": "act_std",
    "kurtosis": "act_kurtosis",
    "min": "act_min",
    "max": "act_max",
    "zero": "act_zero",
    "saturation": "act_saturation",
    "dead": "act_dead",
    "nonfinite": "act_nonfinite",
    "transmission": "act_transmission",
    "samples": "act_samples",
}
ACT_STD, ACT_SATURATION, ACT_DEAD, ACT_NONFINITE, ACT_TRANSMISSION, ACT_SAMPLES = (
    ACTIVATION_STATISTICS[k] for k in ("std", "saturation", "dead", "nonfinite", "transmission", "samples")
)
#: figure of an attention row (one per attention call site, named after the module whose ``forward`` made the call)
#: -> the statistic its logged tag starts with: the largest and the RMS pre-softmax logit (masked entries left out),
#: the mean attention entropy in nats (over batch, heads and queries) and the smallest per-head mean entropy
ATTENTION_STATISTICS: dict[str, str] = {
    "logit_max": "attn_logit_max",
    "logit_rms": "attn_logit_rms",
    "entropy": "attn_entropy",
    "entropy_min": "attn_entropy_min",
}
#: figure of the output-logit row (the model's final layer, where the loss is a cross-entropy) -> its statistic:
#: the largest output logit and the mean log-partition ``logsumexp`` over classes
OUTPUT_STATISTICS: dict[str, str] = {"logit_max": "out_logit_max", "log_z": "out_log_z"}
#: the statistics of a parameter
GRAD_NORM, UPDATE_RATIO, WEIGHT_NORM = "grad_norm", "update_ratio", "weight_norm"
#: a parameter's per-element RMS gradient over its Adam-type optimizer's eps (logged only for those)
GRAD_RMS_EPS = "grad_rms_eps"
GRADIENT_STATISTICS: tuple[str, ...] = (GRAD_NORM, UPDATE_RATIO, WEIGHT_NORM, GRAD_RMS_EPS)
#: the norm of every gradient together
TOTAL_GRADIENT_TAG = f"{GRAD_NORM}/total"
#: histogram tag prefixes
ACTIVATION_HISTOGRAMS, GRADIENT_HISTOGRAMS = "act_hist", "grad_hist"
#: the saturation heatmap image
HEATMAP_TAG = "act_saturation_heatmap"
#: TensorBoard text tag of the watched layers, written at step 0: a JSON list, in forward order, of
#: ``{"name", "module_type", "activation", "hook"}``
LAYERS_TAG = "lightning_bn/layers"
#: the training loss of each logging step (``GradientMonitor``, ``Monitor.step(loss)``): what ``stalled`` checks
LOSS_TAG = "lightning_bn/loss"
#: optimizer steps not taken so far (gradients non-finite, weights still finite: a mixed-precision ``GradScaler``
#: skipping an overflow step while its scale calibrates), logged once there is one; no per-layer figure (the report
#: does not judge it)
SKIPPED_STEPS_TAG = "lightning_bn/skipped_steps"
#: the compact record of a logging step's per-layer figures (``per_layer_scalars=False``, TensorBoard only): one
#: tensor summary, a float32 matrix rows x figures, with plugin name :data:`ROWS_PLUGIN`; the format is documented in
#: :mod:`lightning_bn.writers` (``write_rows``)
ROWS_TAG = "lightning_bn/rows"
ROWS_PLUGIN = "lightning_bn"
#: with the compact record: how many activation rows (layers), parameter rows of the step hold a non-finite figure
#: or non-finite activations (``act_nonfinite`` > 0); not read by the report (it reads the rows)
NONFINITE_LAYERS_TAG = "lightning_bn/nonfinite_layers"
NONFINITE_PARAMETERS_TAG = "lightning_bn/nonfinite_parameters"
#: Custom Scalars sections (in this order) and the statistics charted in each
ACTIVATION_SECTION, GRADIENT_SECTION = "lightning-bn: activations", "lightning-bn: gradients"
LAYOUT_STATISTICS: dict[str, tuple[str, ...]] = {
    ACTIVATION_SECTION: tuple(
        ACTIVATION_STATISTICS[k]
        for k in ("std", "mean", "transmission", "saturation", "dead", "zero", "max", "min", "nonfinite")
    ),
    GRADIENT_SECTION: GRADIENT_STATISTICS,
}
_MONITOR_STATISTICS = (
    frozenset(ACTIVATION_STATISTICS.values())
    | frozenset(GRADIENT_STATISTICS)
    | frozenset(ATTENTION_STATISTICS.values())
    | frozenset(OUTPUT_STATISTICS.values())
)


def tag(statistic: str, name: str) -> str:
    """The logged tag of one statistic of one layer or parameter.

    Example::

        >>> tag("act_std", "encoder.0")
        'act_std/encoder.0'
    """
    return f"{statistic}/{name}"


def split_tag(logged: str) -> tuple[str, str]:
    """``(statistic, layer or parameter)`` of a logged tag.

    Example::

        >>> split_tag("act_std/encoder.0")
        ('act_std', 'encoder.0')
    """
    statistic, _, name = logged.partition("/")
    return statistic, name


def is_monitor_tag(logged: str) -> bool:
    """Whether a scalar tag was written by a lightning-bn monitor.

    Example::

        >>> is_monitor_tag("act_std/net.0"), is_monitor_tag("grad_norm/total"), is_monitor_tag("train_loss")
        (True, True, False)
        >>> is_monitor_tag("attn_entropy/encoder.layers.0.self_attn"), is_monitor_tag("out_log_z/head")
        (True, True)
    """
    statistic, name = split_tag(logged)
    return logged == LOSS_TAG or (bool(name) and statistic in _MONITOR_STATISTICS)


def is_row_tag(logged: str) -> bool:
    """Whether a monitor tag is a per-layer figure: what the compact record (:data:`ROWS_TAG`) holds instead of a
    scalar; the model-wide ``grad_norm/total`` and the loss stay scalars.

    Example::

        >>> is_row_tag("act_std/net.0"), is_row_tag("grad_norm/total"), is_row_tag(LOSS_TAG)
        (True, False, False)
        >>> is_row_tag("attn_logit_max/h.0.attn"), is_row_tag("out_logit_max/lm_head")
        (True, True)
    """
    return logged not in (LOSS_TAG, TOTAL_GRADIENT_TAG) and is_monitor_tag(logged)


def natural_key(name: str) -> list[tuple[int, int | str]]:
    """Sort key that puts ``net.2`` before ``net.10``.

    Example::

        >>> sorted(["net.10", "net.2"], key=natural_key)
        ['net.2', 'net.10']
    """
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.findall(r"\d+|\D+", name)]


def merge_orders(primary: Sequence[str], secondary: Iterable[str], siblings: bool = True) -> list[str]:
    """``primary``, with each name found only in ``secondary`` placed among its siblings (same parent module) by
    natural order (with ``siblings``), or else right after the name preceding it in ``secondary``.

    Example::

        >>> merge_orders(["net.0", "net.2", "head"], ["net.10", "net.1"])
        ['net.0', 'net.1', 'net.2', 'net.10', 'head']
    """
    merged = list(primary)
    cursor = -1
    for name in secondary:
        if name in merged:
            cursor = merged.index(name)
            continue
        parent = name.rpartition(".")[0]
        found = [i for i, other in enumerate(merged) if other.rpartition(".")[0] == parent] if siblings else []
        if found:
            later = [i for i in found if natural_key(merged[i]) > natural_key(name)]
            cursor = later[0] if later else found[-1] + 1
        else:
            cursor += 1
        merged.insert(cursor, name)
    return merged


def layer_order(
    names: Iterable[str], layers: Sequence[Mapping[str, Any]] | None = None, parameter_layers: Iterable[str] = ()
) -> list[str]:
    """The one order of layers of the report, ``lightning_bn.plot`` and the TensorBoard pictures.

    ``names`` are the layers with activation figures, in the order they were logged (the monitors log in forward
    order); with the run's layers table they go in its (forward) order, a name the table lacks right after the name
    logged before it. ``parameter_layers`` (layers seen through their parameters only) then go among their siblings
    (same parent module) by natural order (``net.2`` before ``net.10``), else after the layer before them.

    Example::

        >>> layer_order(["head", "net.10", "net.2"], [{"name": "net.2"}, {"name": "net.10"}, {"name": "head"}])
        ['net.2', 'net.10', 'head']
        >>> layer_order(["net.0", "net.2"], None, ["net.1", "net.3"])
        ['net.0', 'net.1', 'net.2', 'net.3']
    """
    logged = list(dict.fromkeys(names))
    if layers:
        position: dict[str, int] = {}
        for entry in layers:
            if isinstance(entry, Mapping) and isinstance(entry.get("name"), str):
                position.setdefault(entry["name"], len(position))
        known = sorted((n for n in logged if n in position), key=position.__getitem__)
        logged = merge_orders(known, logged, siblings=False)
    return merge_orders(logged, dict.fromkeys(parameter_layers))
