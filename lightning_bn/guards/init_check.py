"""Init mismatch: weight scale vs. what the activation needs, and the consequence in one forward pass.

Built on the one data-flow trace (:func:`lightning_bn.tracing.trace_model`): with an example input a single forward
pass in training mode gives each layer's activation, output std and count of inf/NaN values; without one the
activations come from module order (:func:`lightning_bn.tracing.module_order_activations`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from lightning_bn.activations import Activation, get_activation
from lightning_bn.tracing import LayerTrace, module_order_activations, trace_model

__all__ = ["DEFAULT_DEPTH_RATIO", "DEFAULT_INIT_FACTOR", "InitFinding", "init_messages", "init_mismatches"]

#: A layer's weight std may differ from ``gain / sqrt(fan_in)`` by at most this factor.
DEFAULT_INIT_FACTOR = 3.0
#: The output std of the last hidden layer may differ from the first's by at most this factor (one forward pass).
DEFAULT_DEPTH_RATIO = 10.0

_WEIGHTED = (nn.Linear, _ConvNd)

Problem = Literal["weight_scale", "nonfinite", "vanishing", "exploding"]


@dataclass(frozen=True)
class InitFinding:
    """One init problem.

    Attributes:
        name: the layer (for ``vanishing``/``exploding``: ``"first -> last"`` hidden layer).
        problem: ``"weight_scale"``, ``"nonfinite"``, ``"vanishing"`` or ``"exploding"``.
        value: ``weight_scale``: weight std / the std the activation needs; ``vanishing``/``exploding``: output std
            of the last hidden layer / that of the first; ``nonfinite``: count of non-finite outputs.
        detail: the figures behind it, in words.
    """

    name: str
    problem: Problem
    value: float
    detail: str


def _traced_layers(model: nn.Module, example_input: Any) -> list[LayerTrace]:
    """Every layer that ran in one training-mode forward pass, in execution order; ``[]`` if ``forward`` fails."""
    if example_input is None:
        return []
    try:
        traced = trace_model(model, example_input, train=True)
    except Exception:  # best effort: without a forward pass there is no consequence check, module order still answers
        return []
    return list(traced.layers.values())


def _weight_scale(
    model: nn.Module, activations: dict[str, Activation], output_std: dict[str, float], factor: float
) -> list[InitFinding]:
    findings: list[InitFinding] = []
    for name, module in model.named_modules():
        if not isinstance(module, _WEIGHTED) or isinstance(module.weight, nn.parameter.UninitializedParameter):
            continue
        weight = module.weight.detach()
        rms = float(torch.linalg.vector_norm(weight)) / math.sqrt(weight.numel())
        if rms == 0.0:
            continue
        activation = activations.get(name, get_activation(None))
        needed = activation.gain / math.sqrt(weight[0].numel())
        ratio = rms / needed
        if 1 / factor <= ratio <= factor:
            continue
        detail = f"weight std {rms:.3g} is {ratio:.3g}x the {needed:.3g} that {activation.describe()} needs"
        if name in output_std:
            detail += f"; output std {output_std[name]:.3g} in the first forward pass"
        findings.append(InitFinding(name, "weight_scale", ratio, detail))
    return findings


def _nonfinite(layers: list[LayerTrace]) -> InitFinding | None:
    index = next((i for i, t in enumerate(layers) if t.nonfinite), None)
    if index is None:
        return None
    layer = layers[index]
    detail = f"first forward pass overflows: {layer.nonfinite} inf/NaN values out of '{layer.name}'"
    if index > 0:
        before = layers[index - 1]
        detail += f" (output std of '{before.name}' just before: {before.output_std:.3g})"
    return InitFinding(layer.name, "nonfinite", float(layer.nonfinite), detail)


def _depth(weighted: list[LayerTrace], depth_ratio: float) -> InitFinding | None:
    hidden = [t for t in weighted[:-1] if math.isfinite(t.output_std) and t.output_std > 0]  # the last is the logits
    if len(hidden) < 2:
        return None
    first, last = hidden[0], hidden[-1]
    ratio = last.output_std / first.output_std
    if 1 / depth_ratio <= ratio <= depth_ratio:
        return None
    problem: Problem = "vanishing" if ratio < 1 else "exploding"
    detail = (
        f"output std falls from {first.output_std:.3g} to {last.output_std:.3g} over {len(hidden)} hidden layers"
        if ratio < 1
        else f"output std grows from {first.output_std:.3g} to {last.output_std:.3g} over {len(hidden)} hidden layers"
    )
    return InitFinding(f"{first.name} -> {last.name}", problem, ratio, detail)


def init_mismatches(
    model: nn.Module,
    example_input: Any = None,
    factor: float = DEFAULT_INIT_FACTOR,
    depth_ratio: float = DEFAULT_DEPTH_RATIO,
) -> list[InitFinding]:
    """Layers whose initialization does not fit their activation, and what that does to the first forward pass.

    Two rules (He et al. 2015; Glorot & Bengio 2010; BACKGROUND.md):

    1. *weight scale*: the weight RMS of each Linear/Conv must be within ``factor`` of ``gain / sqrt(fan_in)``, the
       std its activation needs (``gain`` from :mod:`lightning_bn.activations`; the activation is found by
       :func:`lightning_bn.tracing.trace_model` with ``example_input``, else by module order; identity for the
       logits). All-zero weights (a deliberate zero init) are skipped.
    2. *consequence*, with ``example_input``: the same single forward pass, in training mode (no gradients; buffers,
       modes and RNG restored), measures each layer's output std. Any inf/NaN output is ``nonfinite``
       (normalization after it cannot help); the last hidden Linear/Conv's std over the first's outside
       ``[1/depth_ratio, depth_ratio]`` is ``vanishing``/``exploding`` (a per-layer error of √2, as Xavier under
       ReLU, compounds over 30 layers). If ``forward`` fails on ``example_input`` this rule is skipped.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> _ = nn.init.normal_(net[0].weight, std=10.0)
        >>> [(f.name, f.problem, f.value > 50) for f in init_mismatches(net)]  # std 10 vs sqrt(2 / 64)
        [('0', 'weight_scale', True)]
    """
    if factor <= 1:
        raise ValueError(f"Expected `factor` > 1 but got {factor!r}")
    if depth_ratio <= 1:
        raise ValueError(f"Expected `depth_ratio` > 1 but got {depth_ratio!r}")
    layers = _traced_layers(model, example_input)  # runs first: lazy layers are materialized by it
    weighted = [t for t in layers if isinstance(t.module, _WEIGHTED)]
    activations = module_order_activations(model, _WEIGHTED)  # layers that did not run keep the module-order guess
    activations.update({t.name: t.activation for t in weighted})
    findings = _weight_scale(model, activations, {t.name: t.output_std for t in weighted}, factor)
    overflow = _nonfinite(layers)
    if overflow is not None:
        findings.append(overflow)
    else:
        depth = _depth(weighted, depth_ratio)
        if depth is not None:
            findings.append(depth)
    return findings


_ADVICE: dict[str, str] = {
    "weight_scale": "re-initialize with the scheme the activation needs (std = gain / sqrt(fan_in)); a norm layer "
    "after it does not fix this: it divides the layer's gradients by the same factor",
    "nonfinite": "normalization cannot rescue an init that overflows before it: re-initialize with the scheme the "
    "activation needs",
    "vanishing": "the signal vanishes with depth: re-initialize with the scheme the activation needs, or add "
    "normalization layers",
    "exploding": "the signal explodes with depth: re-initialize with the scheme the activation needs, or add "
    "normalization layers",
}


def init_messages(findings: Sequence[InitFinding]) -> dict[str, str]:
    """One line per problem kind, naming every layer that has it and what to do.

    Example::

        >>> finding = InitFinding("fc", "nonfinite", 3.0, "first forward pass overflows")
        >>> print(init_messages([finding])["nonfinite"].split(" Fix:")[0])
        Init mismatch (nonfinite): 'fc': first forward pass overflows.
    """
    out = {}
    for problem, advice in _ADVICE.items():
        group = [f for f in findings if f.problem == problem]
        if group:
            shown = "; ".join(f"'{f.name}': {f.detail}" for f in group[:4])
            more = f"; (+{len(group) - 4} more)" if len(group) > 4 else ""
            out[problem] = f"Init mismatch ({problem}): {shown}{more}. Fix: {advice}."
    return out
