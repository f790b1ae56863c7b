"""Which layers ``prepare()`` re-initializes, which it keeps, and why: the default that respects deliberate inits.

``init="auto"`` re-initializes a layer only where its rule is well founded: the layer feeds a known activation
(logits included: the identity), a norm, or a residual branch, or it is recurrent. It keeps, and says why:

- tied parameters (GPT-2's ``lm_head.weight is transformer.wte.weight``): one row naming every alias;
- embeddings: their scale (e.g. 0.02) is the model's choice, and position and token embeddings are added together;
- weights that are all zero or constant (a zero-initialized classifier head, LayerScale-like gains);
- the query and key projections of attention (``softmax(q·kᵀ)``): their scale is the attention's temperature (T5
  folds its 1/√d into the query's init), and ``nn.MultiheadAttention`` (q, k, v packed inside);
- layers that feed nothing the registry knows (a value projection, the multiplier of a gated unit).

An explicit scheme (``init="xavier"``, ``"lsuv"``, ...) or a matching ``overrides`` pattern forces any of these;
then a forced query or key layer is rescaled to its old output std on the example input (the logit scale stays),
and a tied tensor is drawn once.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from lightning_bn.activations import Activation, activation_of_module, get_activation
from lightning_bn.activations.meanfield import CriticalPoint, critical_point
from lightning_bn.layers import get_layer_kind
from lightning_bn.tracing.model_map import LayerTrace, ModelMap
from lightning_bn.tracing.types import NORM_TYPES

__all__ = ["BOUNDED_CHAIN_KINDS", "Kept", "LayerPlan", "Skipped", "plan_layers"]

_FOUND = ("module", "function", "method", "numeric", "behaviour", "output", "composite")

#: Bounded activations for which ``init="auto"`` uses the mean-field critical init when they form a chain (their output
#: feeds the next layer; no norm in between; not a gate): the forward-preserving gain puts tanh in the chaotic phase
#: (χ₁ 1.18) and sigmoid deep in the ordered one (χ₁ 0.15).
BOUNDED_CHAIN_KINDS = frozenset({"tanh", "sigmoid", "hardtanh", "softsign", "hardsigmoid"})


class Skipped(NamedTuple):
    """A layer ``prepare`` left as it was because it could not act on it (not called, override 'skip')."""

    layer: str
    reason: str


class Kept(NamedTuple):
    """Parameters ``prepare`` kept on purpose, and why (``init="auto"``; an explicit init or override forces them)."""

    layer: str
    reason: str


@dataclass
class LayerPlan:
    """What happens to one layer."""

    name: str
    module: nn.Module
    trace: LayerTrace
    scheme: str
    activation: Activation
    lsuv: bool = False
    correct: bool = False
    gain: float = math.nan
    target_std: float | None = None  # rescale the output to this std (attention query/key, critical, gated value)
    aliases: list[str] = field(default_factory=list)
    critical: CriticalPoint | None = None  # the mean-field point drawn from (scheme "critical")
    role: str = ""  # why this rule: "chain" (auto's critical init), "gate", "value" (of a gated unit), "unknown"
    note: str | None = None  # what the report says about a rule that differs from the one asked for


def _init_activation(trace: LayerTrace) -> Activation:
    """The activation whose gain initializes the layer: an RNN's own nonlinearity, else the one found after it."""
    if isinstance(trace.module, nn.RNNBase):
        return get_activation(getattr(trace.module, "nonlinearity", None))
    return trace.activation


def _auto(activation: Activation) -> tuple[str, bool, bool]:
    scheme = activation.kind.init
    return scheme, False, scheme == "numeric" and not activation.kind.homogeneous


def is_chain(trace: LayerTrace) -> bool:
    """The layer's bounded activation feeds the next layer as a signal (not a gate, not the model's output, no norm
    before it): where the critical init applies."""
    return (
        trace.activation.name in BOUNDED_CHAIN_KINDS
        and not trace.gate
        and not trace.final
        and trace.norm_after is None
        and not isinstance(trace.module, nn.RNNBase)
    )


def _plan(name: str, trace: LayerTrace, choice: str, aliases: list[str], model_map: ModelMap) -> LayerPlan:
    """The rule for one layer the policy does not keep."""
    gated_by = trace.gated_by
    activation = _init_activation(trace)
    plan = LayerPlan(name, trace.module, trace, "", activation, aliases=aliases)
    recurrent = isinstance(trace.module, nn.RNNBase)
    if choice == "lsuv":
        plan.scheme, plan.lsuv = "orthogonal", not recurrent
    elif choice == "auto" and gated_by in model_map.layers and gated_by != name and trace.activation.is_identity:
        # the value branch b of a gated unit φ(a)·b: E[(φ(a)·b)²] = E[φ(a)²]·E[b²] is 1 when b's std is
        # 1/√E[φ(z)²] (the gate's pre-activation a at unit variance)
        plan.activation, plan.role = get_activation(None), "value"
        plan.scheme = "lecun"
        plan.target_std = model_map.layers[gated_by].activation.gain
    elif choice == "auto" and is_chain(trace):
        plan.scheme, plan.role = "critical", "chain"
    elif choice == "auto":
        plan.scheme, plan.lsuv, plan.correct = _auto(activation)
        plan.role = "gate" if trace.gate else ""
    elif choice == "critical" and recurrent:
        plan.scheme, plan.note = activation.kind.init, "recurrent: its recurrence is no feed-forward chain"
    elif choice == "critical":
        point = critical_point(activation)
        if point.stable:
            plan.scheme = "critical"
        else:
            plan.scheme, plan.lsuv, plan.correct = _auto(activation)
            plan.note = point.reason
    elif choice == "kaiming" and trace.how == "none" and activation.is_identity:
        plan.scheme, plan.activation, plan.role = "kaiming", get_activation("relu"), "unknown"
        plan.note = "feeds no known activation: the ReLU gain √2 (torch's kaiming_normal_ default)"
    else:
        plan.scheme = choice
    if plan.scheme == "critical":
        plan.critical = critical_point(plan.activation)
        plan.target_std = math.sqrt(plan.critical.q)
    return plan


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        found.setdefault(id(param), []).append(name)
    return found


def _constant(weight: torch.Tensor) -> str | None:
    flat = weight.detach().reshape(-1)
    if flat.numel() == 0:
        return None
    if not bool((flat == 0).all()):
        return f"constant ({flat[0].item():.3g}): a deliberate init" if bool((flat == flat[0]).all()) else None
    return "all zero: a deliberate zero init"


def _why_keep(trace: LayerTrace, weight: torch.Tensor, aliases: list[str], attention: set[str]) -> str | None:
    """The reason ``init="auto"`` keeps this layer, or ``None`` to re-initialize it."""
    kind = get_layer_kind(trace.module)
    if len(aliases) > 1:
        return f"tied parameter ({' = '.join(aliases)}): its scale serves every alias"
    if kind is not None and kind.name == "embedding":
        return "embedding: its scale is the model's choice, shared with what it is added to"
    constant = _constant(weight)
    if constant is not None:
        return constant
    if isinstance(trace.module, nn.MultiheadAttention):
        return "attention (q, k, v packed inside): kept to preserve the pre-softmax logit scale"
    if trace.name in attention:
        return "feeds attention (q·kᵀ): kept to preserve the pre-softmax logit scale"
    if kind is not None and kind.recurrent:
        return None
    if trace.how in _FOUND or trace.final or trace.norm_after is not None or trace.residual:
        return None
    if trace.gated_by is not None:
        return None  # the value branch of a gated unit: scaled for the gate (see _plan)
    return "feeds no known activation, norm or residual: no well-founded rule"


def plan_layers(
    model: nn.Module, model_map: ModelMap, init: str, overrides: Mapping[str, str]
) -> tuple[list[LayerPlan], list[Kept], list[Skipped]]:
    """Decide, per traced layer, the scheme or the reason to keep it; list what was not called.

    Raises:
        ValueError: for an ``overrides`` pattern that matches no layer.
    """
    layers = [(n, m) for n, m in model.named_modules() if n and get_layer_kind(m) is not None]
    for pattern in overrides:
        if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in layers):
            raise ValueError(
                f"Expected `overrides` pattern {pattern!r} to match a layer of {type(model).__name__}, but it matches "
                f"none of {[n for n, _ in layers]}"
            )
    aliases = _aliases(model)
    attention = {name for pair in model_map.attention for name in pair}
    plans: list[LayerPlan] = []
    kept: list[Kept] = []
    skipped: list[Skipped] = []
    done: set[int] = set()
    for name, trace in model_map.layers.items():
        weight = get_layer_kind(trace.module).weights(trace.module)[0].tensor(trace.module)
        if id(weight) in done:
            continue  # a tied tensor: its row already names this alias
        done.add(id(weight))
        names = aliases.get(id(weight), [])
        override = next((s for p, s in overrides.items() if fnmatch.fnmatchcase(name, p)), None)
        choice = override or init
        if choice == "skip":
            skipped.append(Skipped(name, "override 'skip'"))
            continue
        if override is None and init == "auto":
            reason = _why_keep(trace, weight, names, attention)
            if reason is not None:
                kept.append(Kept(name, reason))
                continue
        plan = _plan(name, trace, choice, names, model_map)
        if name in attention and math.isfinite(trace.output_std) and trace.output_std > 0:
            plan.target_std, plan.lsuv, plan.correct, plan.role = trace.output_std, False, False, "attention"
        plans.append(plan)
    covered = done
    for n, m in layers:
        if n in model_map.layers or any(n.startswith(f"{p}.") for p in model_map.layers):
            continue  # ran, or inside a layer that ran (nn.MultiheadAttention's out_proj)
        weight = get_layer_kind(m).weights(m)[0].tensor(m)
        if id(weight) in covered:
            continue  # tied to a layer that ran: named in that layer's row
        skipped.append(Skipped(n, "not called by forward on the example input"))
    kept += _gains(model, layers)
    return plans, kept, skipped


def _gains(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> list[Kept]:
    """Constant parameters outside layers and norms (LayerScale-like gains): never touched, listed for the record."""
    owned = {id(p) for _, m in layers for p in m.parameters()}
    owned |= {id(p) for m in model.modules() if activation_of_module(m) is not None for p in m.parameters()}  # PReLU
    norms = [m for m in model.modules() if isinstance(m, NORM_TYPES) or "norm" in type(m).__name__.lower()]
    owned |= {id(p) for m in norms for p in m.parameters()}  # incl. T5LayerNorm, LlamaRMSNorm
    found = []
    for name, param in model.named_parameters():
        if id(param) in owned or param.numel() < 2:
            continue
        flat = param.detach().reshape(-1)
        if bool((flat == flat[0]).all()):
            found.append(Kept(name, f"constant {flat[0].item():.3g}, not a layer weight (a LayerScale-like gain, a "
                                    "bias table): left as it is"))  # fmt: skip
    return found
