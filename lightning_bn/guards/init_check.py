"""Init check: does the signal of the first forward pass propagate, and is any layer far from what prepare() picks?

Built on the one data-flow trace (:func:`lightning_bn.tracing.trace_model`, one forward pass in training mode on an
example input): it judges *propagation* — inf/NaN, activations pinned in saturation, a pre-activation signal that
vanishes or explodes with depth — and flags a weight only when it is far (``factor``, 20x by default) from what
``prepare()`` would choose for it, with the same deliberate-init policy (:mod:`lightning_bn.tracing.policy`): kept
layers (embeddings, tied weights, zero or constant weights, attention queries and keys, layers with no well-founded
rule) are never flagged for their scale. Stock architectures (0.02-normal transformers, zero-init residual gains)
give no finding; Xavier under ReLU at depth 30 and N(0, 1) weights under sigmoid do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn

from lightning_bn import checks
from lightning_bn.guards._common import clean_name, full_parameters
from lightning_bn.layers import get_layer_kind, scheme_std
from lightning_bn.tracing import ModelMap, module_order_activations, trace_model
from lightning_bn.tracing.policy import plan_layers

__all__ = [
    "DEFAULT_DEPTH_RATIO",
    "DEFAULT_INIT_FACTOR",
    "DEFAULT_SATURATION_MARGIN",
    "InitFinding",
    "init_messages",
    "init_mismatches",
]

#: A weight's std may differ from what ``prepare()`` would draw for it by at most this factor. Stock small configs sit
#: within ~13x (GPT-2's 0.02 / sqrt(2 n_layer) against Xavier at width 64); a wild init (N(0, 10²)) is 50x off.
DEFAULT_INIT_FACTOR = 20.0
#: The pre-activation std of the last activation may differ from the first's by at most this factor.
DEFAULT_DEPTH_RATIO = 10.0
#: An activation is saturating when its saturated fraction exceeds the healthy one (unit-variance input) by this.
DEFAULT_SATURATION_MARGIN = 0.3

Problem = Literal["weight_scale", "nonfinite", "saturating", "vanishing", "exploding"]


@dataclass(frozen=True)
class InitFinding:
    """One init problem.

    Attributes:
        name: the layer (for ``vanishing``/``exploding``: ``"first -> last"`` layer feeding an activation).
        problem: ``"weight_scale"``, ``"nonfinite"``, ``"saturating"``, ``"vanishing"`` or ``"exploding"``.
        value: ``weight_scale``: weight std / the std ``prepare()`` would draw; ``vanishing``/``exploding``:
            pre-activation std of the last activation / that of the first; ``saturating``: saturated fraction;
            ``nonfinite``: count of non-finite outputs.
        detail: the figures behind it, in words.
    """

    name: str
    problem: Problem
    value: float
    detail: str


def _trace(model: nn.Module, example_input: Any) -> ModelMap | None:
    """One training-mode forward pass (buffers, modes and RNG restored); ``None`` without input or if it fails."""
    if example_input is None:
        return None
    try:
        return trace_model(model, example_input, train=True)
    except Exception:  # best effort: without a forward pass only the module-order weight check answers
        return None


def _rms(weight: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(weight.detach().float())) / math.sqrt(max(weight.numel(), 1))


def _scale_finding(name: str, ratio: float, what: str, factor: float) -> InitFinding | None:
    if not math.isfinite(ratio) or ratio == 0 or 1 / factor <= ratio <= factor:
        return None
    return InitFinding(name, "weight_scale", ratio, what)


def _weight_scale(model: nn.Module, found: ModelMap | None, factor: float) -> list[InitFinding]:
    """Layers far from what prepare() would choose; kept layers (the deliberate-init policy) are never judged."""
    findings = []
    if found is None:  # no forward pass: module order, Linear/Conv only, the registry's scheme
        activations = module_order_activations(model, (nn.Linear, nn.modules.conv._ConvNd))
        for name, activation in activations.items():
            module = model.get_submodule(name)
            if isinstance(getattr(module, "weight", None), nn.parameter.UninitializedParameter):
                continue
            fans = get_layer_kind(module).weights(module)[0]
            needed = scheme_std(activation.kind.init, fans.fan_in, fans.fan_out, activation.gain)
            rms = _rms(module.weight)
            what = f"weight std {rms:.3g} is {rms / needed:.3g}x the {needed:.3g} that {activation.describe()} needs"
            finding = _scale_finding(name, rms / needed, what, factor)
            findings += [finding] if finding is not None and rms > 0 else []
        return findings
    plans, _, _ = plan_layers(model, found, "auto", {})
    for plan in plans:
        trace = plan.trace
        spec = get_layer_kind(plan.module).weights(plan.module)[0]
        gain = 1.0 if plan.scheme == "lecun" else plan.activation.gain
        needed = scheme_std(plan.scheme, spec.fan_in, spec.fan_out, gain)
        rms = _rms(spec.tensor(plan.module))
        ratio = rms / needed
        what = (f"weight std {rms:.3g} is {ratio:.3g}x the {needed:.3g} that prepare() would draw "
                f"({plan.scheme} for {plan.activation.describe()}); output std {trace.output_std:.3g}")  # fmt: skip
        if (plan.correct or plan.lsuv) and 1 / factor <= trace.output_std <= factor:
            continue  # prepare() would rescale it to unit output variance: a weight that gives about that is its choice
        if trace.norm_after is not None and ratio < 1:
            continue  # small weights before a norm (stock 0.02 inits): the norm restores the signal's scale
        finding = _scale_finding(plan.name, ratio, what, factor)
        if finding is not None:
            findings.append(finding)
    return findings


def _nonfinite(found: ModelMap) -> InitFinding | None:
    layers = list(found.layers.values())
    index = next((i for i, t in enumerate(layers) if t.nonfinite), None)
    if index is None:
        return None
    layer = layers[index]
    detail = f"first forward pass overflows: {layer.nonfinite} inf/NaN values out of '{layer.name}'"
    if index > 0:
        before = layers[index - 1]
        detail += f" (output std of '{before.name}' just before: {before.output_std:.3g})"
    return InitFinding(layer.name, "nonfinite", float(layer.nonfinite), detail)


def _saturating(found: ModelMap, margin: float) -> list[InitFinding]:
    findings = []
    for site in found.sites:
        healthy = site.activation.healthy_saturation
        if math.isfinite(site.saturation) and site.saturation > healthy + margin:
            name = site.producer or site.name
            detail = (
                f"{site.saturation:.0%} of the inputs of {site.activation.describe()} at '{site.name}' are saturated "
                f"(healthy: {healthy:.0%}); its input std is {site.input_std:.3g}"
            )
            findings.append(InitFinding(name, "saturating", site.saturation, detail))
    return findings


def _depth(found: ModelMap, depth_ratio: float) -> InitFinding | None:
    """First vs last pre-activation std along the activations that ran (the signal the nonlinearities see)."""
    hidden = [s for s in found.sites if not s.activation.is_identity and math.isfinite(s.input_std) and s.input_std > 0]
    if len(hidden) < 2:
        return None
    first, last = hidden[0], hidden[-1]
    ratio = last.input_std / first.input_std
    if 1 / depth_ratio <= ratio <= depth_ratio:
        return None
    problem: Problem = "vanishing" if ratio < 1 else "exploding"
    verb = "falls" if ratio < 1 else "grows"
    detail = (
        f"the input std of the activations {verb} from {first.input_std:.3g} to {last.input_std:.3g} over "
        f"{len(hidden)} activations"
    )
    return InitFinding(f"{first.producer or first.name} -> {last.producer or last.name}", problem, ratio, detail)


def init_mismatches(
    model: nn.Module,
    example_input: Any = None,
    factor: float = DEFAULT_INIT_FACTOR,
    depth_ratio: float = DEFAULT_DEPTH_RATIO,
    saturation_margin: float = DEFAULT_SATURATION_MARGIN,
) -> list[InitFinding]:
    """What is wrong with an initialization, judged by how the first forward pass propagates.

    With ``example_input``, one forward pass in training mode (no gradients; buffers, modes and RNG restored):

    1. *nonfinite*: the first layer whose output holds inf/NaN (normalization after it cannot help).
    2. *saturating*: an activation whose saturated fraction exceeds its healthy one (at unit-variance input: 50%
       for ReLU, ~0 for sigmoid/tanh) by more than ``saturation_margin`` (Glorot & Bengio 2010).
    3. *vanishing* / *exploding*: the input std of the last activation over the first's outside
       ``[1/depth_ratio, depth_ratio]`` (a per-layer error of √2, as Xavier under ReLU, compounds over 30 layers;
       He et al. 2015). Not judged when 1. fires.
    4. *weight_scale*: a layer ``prepare()`` would re-initialize whose weight std is more than ``factor`` away from
       what it would draw (for a layer it rescales on data: and whose output std is more than ``factor`` from 1);
       layers ``prepare()`` keeps
       (embeddings, tied, zero or constant, attention queries/keys, no well-founded rule) are never flagged, nor are
       small weights before a norm (the norm restores the scale; large ones shrink the layer's gradients).

    Without an example input only 4. runs, on Linear/Conv layers, with the activation found by module order.

    Sharded models work as they are (every rank must call it then, as in a Lightning hook): the forward pass runs
    the sharded forward (FSDP gathers each weight there), and the weights are read whole
    (:func:`~lightning_bn.guards.full_parameters`) — DTensor parameters of FSDP2 ``fully_shard`` or tensor
    parallelism, FSDP1 units. Pass an FSDP1 wrapper itself (not the module inside it, whose weights it frees);
    names are reported without FSDP1's ``_fsdp_wrapped_module`` parts.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> _ = nn.init.normal_(net[0].weight, std=10.0)
        >>> [(f.name, f.problem, f.value > 50) for f in init_mismatches(net)]  # std 10 vs sqrt(2 / 64)
        [('0', 'weight_scale', True)]
    """
    checks.number("factor", factor, 1.0)
    checks.number("depth_ratio", depth_ratio, 1.0)
    if not 0 < saturation_margin < 1:
        raise ValueError(f"Expected `saturation_margin` in (0, 1) but got {saturation_margin!r}")
    found = _trace(model, example_input)  # runs first: lazy layers are materialized by it
    with full_parameters(model):  # sharded weights (FSDP1/2, tensor parallel) read whole, as prepare() would see them
        findings = _weight_scale(model, found, factor)
    if found is not None:
        overflow = _nonfinite(found)
        if overflow is not None:
            findings.append(overflow)
        else:
            findings += _saturating(found, saturation_margin)
            depth = _depth(found, depth_ratio)
            findings += [depth] if depth is not None else []
    return [replace(f, name=" -> ".join(clean_name(part) for part in f.name.split(" -> "))) for f in findings]


_ADVICE: dict[str, str] = {
    "weight_scale": "re-initialize with the scheme the activation needs (`lightning_bn.prepare`); a norm layer after "
    "it does not fix this: it divides the layer's gradients by the same factor",
    "saturating": "the activation's input is pinned where its slope is flat: re-initialize with the scheme the "
    "activation needs (`lightning_bn.prepare`), or add normalization before it",
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
