"""Which layers ``prepare()`` re-initializes, which it keeps, and why: the default that respects deliberate inits.

``init="auto"`` re-initializes a layer only where its rule is well founded: the layer feeds a known activation
(logits included: the identity), a norm, or a residual branch, or it is recurrent. It keeps, and says why:

- tied parameters (GPT-2's ``lm_head.weight is transformer.wte.weight``): one row naming every alias;
- embeddings: their scale (e.g. 0.02) is the model's choice, and position and token embeddings are added together;
- weights that are all zero or constant (a zero-initialized classifier head, LayerScale-like gains);
- the query and key projections of attention (``softmax(q·kᵀ)``): their scale is the attention's temperature (T5
  folds its 1/√d into the query's init), and ``nn.MultiheadAttention`` (q, k, v packed inside);
- layers that feed nothing the registry knows (a value projection, the multiplier of a gated unit);
- a layer with a zero gain beside its weight and bias (timm's ``ScaledStdConv2d.gain`` at 0 in an NF-Net block's last
  conv): its output starts at zero, a zero-init residual branch;
- a head-init scale: a last layer drawn far below its scheme and far below the rest of the model
  (:data:`HEAD_SCALE_FACTOR`: timm's ``head_init_scale`` 0.001 of EVA-02 and BEiT, SqueezeNet's N(0, 0.01) final conv);
- deliberate biases, while the layer's weights are drawn: a bias that is no default draw of PyTorch
  (``U(±1/√fan_in)``; an RNN's ``U(±1/√hidden)``) — a constant (RetinaNet's prior -4.6), a constant gate chunk (an
  LSTM's forget gate at 1), or values beyond the default bound (Mamba's ``dt_proj`` bias, the inverse softplus of
  time steps in [0.001, 0.1]). The critical init draws its own biases (``N(0, σ_b²)`` is part of its fixed point).

An explicit scheme (``init="xavier"``, ``"lsuv"``, ...) or a matching ``overrides`` pattern forces any of these;
then a forced query or key layer is rescaled to its old output std on the example input (the logit scale stays),
and a tied tensor is drawn once. Two rules hold under every choice:

- frozen parameters (``requires_grad=False``: a pretrained backbone under a new head) are kept: a layer whose weight
  is frozen is kept whole; a frozen bias of a layer that is drawn stays as it is;
- uninitialized memory (:func:`uninitialized_memory`: a ``meta`` model after ``to_empty()``) is no deliberate init:
  the layers holding it are drawn, biases zeroed, with no keep (zero weights, tied, embeddings, attention; a frozen
  layer too: it holds no pretrained value), and the norms holding it are reset.
"""

from __future__ import annotations

import fnmatch
import math
import statistics
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from lightning_bn.activations import Activation, activation_of_module, get_activation
from lightning_bn.activations.meanfield import CriticalPoint, critical_point
from lightning_bn.layers import LayerKind, get_layer_kind, scheme_std
from lightning_bn.tracing.model_map import LayerTrace, ModelMap
from lightning_bn.tracing.types import NORM_TYPES

__all__ = [
    "ABSURD",
    "BOUNDED_CHAIN_KINDS",
    "HEAD_SCALE_FACTOR",
    "Kept",
    "LayerPlan",
    "Skipped",
    "Uninitialized",
    "plan_layers",
    "uninitialized_memory",
]

_FOUND = ("module", "function", "method", "numeric", "behaviour", "output", "composite", "residual")

#: Bounded activations for which ``init="auto"`` uses the mean-field critical init when they form a chain (their output
#: feeds the next layer; no norm in between; not a gate): the forward-preserving gain puts tanh in the chaotic phase
#: (χ₁ 1.18) and sigmoid deep in the ordered one (χ₁ 0.15).
BOUNDED_CHAIN_KINDS = frozenset({"tanh", "sigmoid", "hardtanh", "softsign", "hardsigmoid"})

#: A last layer (``LayerTrace.final``, no residual branch) whose weight std is below 1/5 of what ``init="auto"`` would
#: draw for it, and below 1/5 of the median such ratio over the model's other planned layers, is a deliberate
#: head-init scale: timm's ``head_init_scale`` (EVA-02, BEiT: trunc_normal(0.02) x 0.001, ~2e-4 of Xavier),
#: torchvision SqueezeNet's N(0, 0.01) final conv (0.16x He, its body at 1x). PyTorch's default draw of a head is at
#: least ~0.22x any scheme (``U(±1/√fan_in)`` against Xavier with sigmoid's gain 1.85), and a scale the model uses
#: everywhere is no head scale (BERT's 0.02: its classifier 0.12x Xavier at width 64, its body about as far below).
HEAD_SCALE_FACTOR = 5.0
#: A value whose magnitude exceeds this (or that is inf / NaN) in a layer's or a norm's parameters is no init of any
#: kind: uninitialized memory (the largest deliberate values of real models are O(10): Mamba's dt bias -6.9).
ABSURD = 1e6
#: A layer whose weights are all zero and whose bias is no constant and reaches this many times PyTorch's default bound
#: holds uninitialized memory (garbage after ``to_empty()``: a zero page for the weight, reused memory for the bias);
#: a deliberate bias beyond the bound stays within ~20x of it (Mamba's dt bias at rank 8: 6.9 against 0.35).
WILD_BIAS = 100.0
_MEMORY = "uninitialized memory (a meta -> to_empty model?)"


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
    keep_bias: bool = False  # the weights are drawn, the biases stay (deliberate or frozen: a Kept row says which)


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


def _plan(
    name: str, trace: LayerTrace, choice: str, aliases: list[str], model_map: ModelMap, branches: int
) -> LayerPlan:
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
    elif choice == "auto" and is_branch_end(trace) and not plan.lsuv:
        # the last layer of a residual branch: its output joins the stream with at most 1/sqrt(branches) of the
        # stream's std (GPT-2's 1/sqrt(2 n_layer); Fixup, T-Fixup, DeepNet), or the model's own smaller share
        share = min(trace.output_std / trace.shortcut_std, 1 / math.sqrt(max(branches, 1)))
        plan.role, plan.correct, plan.target_std = "branch", False, share * trace.shortcut_std
    return plan


def is_branch_end(trace: LayerTrace) -> bool:
    """The layer ends a residual branch: its output is added to a shortcut with no norm or nonlinearity in between
    (a pre-norm transformer's ``out_proj`` / ``fc2`` / ``down_proj``; not a ResNet conv, whose branch ends in a
    norm)."""
    return (
        trace.residual
        and trace.residual_norm is None
        and trace.activation.is_identity
        and not isinstance(trace.module, nn.RNNBase)
        and math.isfinite(trace.shortcut_std)
        and trace.shortcut_std > 0
        and math.isfinite(trace.output_std)
        and trace.output_std > 0
    )


def model_map_branches(model_map: ModelMap) -> int:
    """How many residual branches add into a stream: the layers that end one."""
    return sum(is_branch_end(t) for t in model_map.layers.values())


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
    model: nn.Module,
    model_map: ModelMap,
    init: str,
    overrides: Mapping[str, str],
    *,
    frozen: Collection[str] | None = None,
    values: bool = True,
) -> tuple[list[LayerPlan], list[Kept], list[Skipped]]:
    """Decide, per traced layer, the scheme or the reason to keep it; list what was not called.

    Args:
        frozen: qualified names of the parameters that do not require grad (default: read from ``model``; pass them
            where the parameters are stand-ins, as under :func:`lightning_bn.init.planning_view`).
        values: the parameters hold their values (False for stand-ins that only tell zero / constant / neither: then
            the rules that read magnitudes — head-init scale, deliberate biases, absurd values — are not applied).

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
    branches = model_map_branches(model_map)  # once: every branch end is scaled by 1/sqrt(branches)
    frozen = _frozen_names(model) if frozen is None else set(frozen)
    memory = uninitialized_memory(model, model_map, frozen, values=values)
    plans: list[LayerPlan] = []
    kept: list[Kept] = []
    skipped: list[Skipped] = []
    done: set[int] = set()
    auto: set[str] = set()  # planned by init="auto" with no override: the deliberate-init rules apply
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
        if memory is not None and name in memory.layers:  # garbage or zero memory: drawn, whatever it holds
            plans.append(_fresh(_plan(name, trace, choice, names, model_map, branches), memory.reason))
            continue
        held = _frozen_layer(name, trace.module, frozen)
        if held is not None:
            kept.append(Kept(name, held))
            continue
        if override is None and init == "auto":
            reason = _why_keep(trace, weight, names, attention) or _zero_gain(trace.module)
            if reason is not None:
                kept.append(Kept(name, reason))
                continue
            auto.add(name)
        plan = _plan(name, trace, choice, names, model_map, branches)
        if name in attention and math.isfinite(trace.output_std) and trace.output_std > 0:
            plan.target_std, plan.lsuv, plan.correct, plan.role = trace.output_std, False, False, "attention"
        plans.append(plan)
    if values and auto:
        plans, heads = _head_scales(plans, auto)
        kept += heads
    for plan in plans:
        if memory is None or plan.name not in memory.layers:  # memory's biases are zeroed, frozen or not
            kept += _biases(plan, frozen, deliberate=values and plan.name in auto and plan.scheme != "critical")
    covered = done
    for n, m in layers:
        if n in model_map.layers or any(n.startswith(f"{p}.") for p in model_map.layers):
            continue  # ran, or inside a layer that ran (nn.MultiheadAttention's out_proj)
        weight = get_layer_kind(m).weights(m)[0].tensor(m)
        if id(weight) in covered:
            continue  # tied to a layer that ran: named in that layer's row
        if n in model_map.functional:
            skipped.append(Skipped(n, "used functionally (its weight goes into a torch function in forward, e.g. "
                                      "F.linear(x, layer.weight)): left as it is"))  # fmt: skip
            continue
        skipped.append(Skipped(n, "not called by forward on the example input"))
    kept += _gains(model, layers, memory, frozen)
    return plans, kept, skipped


def _gains(
    model: nn.Module, layers: list[tuple[str, nn.Module]], memory: Uninitialized | None, frozen: Collection[str]
) -> list[Kept]:
    """Constant parameters outside layers and norms (LayerScale-like gains, zero skipinit / ReZero scalars): never
    touched, listed for the record; with uninitialized memory, every trainable one (no rule draws it)."""
    owned = {id(p) for _, m in layers for p in m.parameters()}
    owned |= {id(p) for m in model.modules() if activation_of_module(m) is not None for p in m.parameters()}  # PReLU
    owned |= {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters()}  # incl. T5LayerNorm, LlamaRMSNorm
    found = []
    for name, param in model.named_parameters():
        if id(param) in owned or param.numel() == 0:
            continue
        flat = param.detach().reshape(-1)
        if memory is not None and name not in frozen:
            found.append(Kept(name, f"{_MEMORY}: no rule draws a parameter outside layers and norms; left as it is "
                                    "(initialize it yourself)"))  # fmt: skip
        elif flat.numel() == 1:
            if not bool(flat.any()):
                found.append(Kept(name, "zero scalar gain (skipinit, ReZero): what it multiplies starts at zero, a "
                                        "zero-init residual branch; left as it is"))  # fmt: skip
        elif bool((flat == flat[0]).all()):  # at 0: a zero-init gain (NF-Net's per-channel skipinit) or bias table
            found.append(Kept(name, f"constant {flat[0].item():.3g}, not a layer weight (a LayerScale-like gain, a "
                                    "bias table): left as it is"))  # fmt: skip
    return found


# ---- frozen parameters, zero gains, head-init scales, deliberate biases -------------------------------------------


def _is_norm(module: nn.Module) -> bool:
    """A norm module: a torch norm (or subclass), or a leaf whose class name says norm (T5LayerNorm, LlamaRMSNorm;
    not timm's ``NormFreeBlock``, a container whose ``skipinit_gain`` is a gain)."""
    return isinstance(module, NORM_TYPES) or (
        "norm" in type(module).__name__.lower() and next(module.children(), None) is None
    )


def _frozen_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def _is_bias(kind: LayerKind, local: str) -> bool:
    """The parameters ``init_layer_`` zeroes (or draws, under the critical init) as biases."""
    return local in kind.bias_names or ("." not in local and local.startswith("bias"))


def _frozen_layer(name: str, module: nn.Module, frozen: Collection[str]) -> str | None:
    """Why a layer is kept for being frozen: any parameter but its biases does not require grad."""
    kind = get_layer_kind(module)
    held = [n for n, _ in module.named_parameters() if f"{name}.{n}" in frozen and not _is_bias(kind, n)]
    if not held:
        return None
    what = "weight" if held == ["weight"] else ", ".join(held)
    return f"frozen ({what}: requires_grad=False): kept under every init and override (unfreeze it to re-initialize)"


def _zero_gain(module: nn.Module) -> str | None:
    """A parameter of the layer beside its weights and biases that is all zero (timm's ``ScaledStdConv2d.gain`` at 0
    in an NF-Net block's last conv): the layer's output starts at zero."""
    kind = get_layer_kind(module)
    weights = {s.name for s in kind.weights(module)}
    for local, param in module.named_parameters():
        if local in weights or _is_bias(kind, local) or param.numel() == 0:
            continue
        if not bool(param.detach().any()):
            return (f"zero gain '{local}' (beside its weight and bias): the layer's output starts at zero, a zero-init "
                    "residual branch (NF-Net's skipinit): kept")  # fmt: skip
    return None


def weight_rms(weight: torch.Tensor) -> float:
    """Root mean square of a weight (its std for a zero-mean draw), as a float."""
    return float(torch.linalg.vector_norm(weight.detach().float())) / math.sqrt(max(weight.numel(), 1))


def _scale_ratio(plan: LayerPlan) -> tuple[float, float]:
    """``(weight std / the std init="auto" draws for it, that std)``, as the init check measures it."""
    spec = get_layer_kind(plan.module).weights(plan.module)[0]
    gain = plan.critical.gain if plan.critical is not None else 1.0 if plan.scheme == "lecun" else plan.activation.gain
    needed = scheme_std(plan.scheme, spec.fan_in, spec.fan_out, gain)
    return (weight_rms(spec.tensor(plan.module)) / needed if needed > 0 else math.nan), needed


def _head_scales(plans: list[LayerPlan], auto: set[str]) -> tuple[list[LayerPlan], list[Kept]]:
    """Plans minus the head-init scales (:data:`HEAD_SCALE_FACTOR`), and the rows keeping those."""
    ratios = {p.name: _scale_ratio(p) for p in plans}
    body = [r for p in plans if not p.trace.final for r in [ratios[p.name][0]] if math.isfinite(r) and r > 0]
    typical = statistics.median(body) if body else 1.0
    planned, kept = [], []
    for plan in plans:
        ratio, needed = ratios[plan.name]
        trace = plan.trace
        head = plan.name in auto and trace.final and not trace.residual and not isinstance(plan.module, nn.RNNBase)
        if head and math.isfinite(ratio) and 0 < ratio < min(1.0, typical) / HEAD_SCALE_FACTOR:
            kept.append(Kept(plan.name, (
                f"head init scale: weight std {ratio * needed:.3g} is {ratio:.2g}x the {needed:.3g} that {plan.scheme} "
                f"would draw (the model's other layers: {typical:.2g}x) on a last layer (timm's head_init_scale, a "
                "small-init classifier): kept")))  # fmt: skip
        else:
            planned.append(plan)
    return planned, kept


_GATES = ((nn.LSTM, ("input", "forget", "cell", "output")), (nn.GRU, ("reset", "update", "new")))


def _number(value: float) -> str:
    text = f"{value:.3g}"
    return text if any(c in text for c in ".en") else f"{text}.0"


def _default_bound(module: nn.Module, kind: LayerKind) -> float:
    """The bound of PyTorch's default bias draw ``U(±1/√fan_in)`` (an RNN's: ``1/√hidden_size``)."""
    if isinstance(module, nn.RNNBase):
        return 1 / math.sqrt(module.hidden_size)
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):  # as their reset_parameters computes it
        shape = module.weight.shape
        fan_in = shape[1] * math.prod(shape[2:]) if len(shape) >= 2 else 0
    else:
        fan_in = kind.weights(module)[0].fan_in
    return 1 / math.sqrt(fan_in) if fan_in > 0 else math.inf


def _deliberate(module: nn.Module, kind: LayerKind, bias: torch.Tensor) -> str | None:
    """Why ``bias`` is no default draw of PyTorch, or ``None``."""
    flat = bias.detach().reshape(-1).float()
    if flat.numel() == 0 or not bool(flat.any()):
        return None
    hidden = getattr(module, "hidden_size", 0) if isinstance(module, nn.RNNBase) else 0
    chunks = flat.numel() // hidden if hidden and flat.numel() % hidden == 0 else 1
    names = next((n for t, n in _GATES if isinstance(module, t)), ())
    found = []
    for i, chunk in enumerate(flat.chunk(chunks)):
        if chunk.numel() >= 2 and bool(chunk[0] != 0) and bool((chunk == chunk[0]).all()):
            label = f"{names[i]} gate" if len(names) == chunks else f"chunk {i}" if chunks > 1 else "constant"
            found.append(f"{label} {_number(chunk[0].item())}")
    if found:
        return ", ".join(found)
    bound = _default_bound(module, kind)
    low, high = flat.min().item(), flat.max().item()
    if max(-low, high) > bound * (1 + 1e-6):
        return f"values in [{low:.3g}, {high:.3g}], beyond PyTorch's default U(±{bound:.3g})"
    return None


def _biases(plan: LayerPlan, frozen: Collection[str], deliberate: bool) -> list[Kept]:
    """The biases of a planned layer that stay (frozen, always; deliberate, under ``init="auto"``): the plan keeps its
    biases, one row per bias that made it."""
    kind = get_layer_kind(plan.module)
    biases = [(n, p) for n, p in plan.module.named_parameters() if _is_bias(kind, n)]
    rows = []
    for local, param in biases:
        name = f"{plan.name}.{local}"
        if name in frozen:
            rows.append(Kept(name, "frozen bias (requires_grad=False): kept, the layer's weights drawn"))
        elif deliberate:
            why = _deliberate(plan.module, kind, param)
            if why is not None:
                rows.append(Kept(name, f"deliberate bias ({why}): kept, the layer's weights drawn"))
    if rows:
        plan.keep_bias = True
        named = {r.layer for r in rows}
        others = [f"{plan.name}.{n}" for n, _ in biases if f"{plan.name}.{n}" not in named]
        if others:
            last = rows[-1]
            rows[-1] = Kept(last.layer, f"{last.reason} (and with it {', '.join(others)})")
    return rows


# ---- uninitialized memory -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Uninitialized:
    """A model that holds uninitialized memory (a ``meta`` model after ``to_empty()``): what to draw and reset.

    Attributes:
        layers: the traced layers to draw whatever they hold (every trainable one; a frozen one holding garbage).
        norms: the norm modules that hold it too (zero or garbage), to reset (``reset_parameters()``).
        reason: the evidence, in words.
    """

    layers: frozenset[str]
    norms: tuple[str, ...]
    reason: str


def _extremes(tensors: list[torch.Tensor]) -> list[tuple[float, float, float]]:
    """``(max |x|, min, max)`` of each tensor (NaN where it holds one): no float copy, one transfer per device."""
    found: list[tuple[float, float, float]] = [(0.0, 0.0, 0.0)] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for indices in by_device.values():
        pairs = [torch.aminmax(tensors[i].detach()) for i in indices]  # no reshape: a stand-in is an expanded view
        rows = torch.stack([torch.stack([low.float(), high.float()]) for low, high in pairs]).cpu().tolist()
        for i, (low, high) in zip(indices, rows):
            top = math.nan if math.isnan(low) or math.isnan(high) else max(-low, high)
            found[i] = (top, low, high)
    return found


def _absurd(top: float) -> bool:
    return not top <= ABSURD  # NaN too


def uninitialized_memory(
    model: nn.Module, model_map: ModelMap, frozen: Collection[str] | None = None, *, values: bool = True
) -> Uninitialized | None:
    """The evidence that ``model`` holds uninitialized memory, or ``None``.

    A ``meta`` model after ``to_empty()`` holds zero pages or garbage. Either:

    - every traced layer (at least two, frozen ones included) has all-zero weights: a chain of zero layers gets no
      gradient, so no model is built that way on purpose (a zero head or a zero gain is one layer among drawn ones,
      a zero-initialized linear probe sits on a pretrained backbone); then every traced layer is drawn; or
    - a traced layer's parameters hold a non-finite value or one above :data:`ABSURD`, or all-zero weights beside a
      non-constant bias :data:`WILD_BIAS` times beyond PyTorch's default bound (a zero page beside reused memory):
      then every trainable traced layer is drawn, and a frozen one holding such values (no pretrained value).

    The norms holding zero (in the first case) or such values are reset too. With ``values=False`` (stand-ins that
    only tell zero / constant / neither) only the first case is judged.
    """
    frozen = _frozen_names(model) if frozen is None else set(frozen)
    layers = {name: trace.module for name, trace in model_map.layers.items()}
    params = {name: list(module.named_parameters(prefix=name)) for name, module in layers.items()}
    trainable = [n for n in layers if _frozen_layer(n, layers[n], frozen) is None]
    tensors = [(n, q, p) for n in layers for q, p in params[n] if p.numel() > 0]
    stats = dict(zip([(n, q) for n, q, _ in tensors], _extremes([p for _, _, p in tensors])))
    kinds = {n: get_layer_kind(m) for n, m in layers.items()}

    def zero_weights(n: str) -> bool:
        drawn = {f"{n}.{s.name}" for s in kinds[n].weights(layers[n])}
        return all(stats[(n, q)][0] == 0 for q, _ in params[n] if q in drawn and (n, q) in stats)

    garbage: dict[str, str] = {}
    if values:
        for n in layers:
            for q, _ in params[n]:
                top, low, high = stats.get((n, q), (0.0, 0.0, 0.0))
                if _absurd(top):
                    what = "non-finite values" if not math.isfinite(top) else f"values up to {top:.3g}"
                    garbage.setdefault(n, f"{q} holds {what}")
                elif (
                    _is_bias(kinds[n], q[len(n) + 1 :])
                    and low != high
                    and top > WILD_BIAS * _default_bound(layers[n], kinds[n])
                    and zero_weights(n)
                ):
                    garbage.setdefault(n, f"{q} reaches {top:.3g} beside all-zero weights")
    zero = len(layers) >= 2 and all(zero_weights(n) for n in layers)
    if not garbage and not zero:
        return None
    if zero:
        evidence = f"the weights of all {len(layers)} layers are zero"
        drawn = frozenset(layers)
    else:
        first = next(iter(garbage))
        more = f" (and {len(garbage) - 1} more layers)" if len(garbage) > 1 else ""
        evidence = f"{garbage[first]}{more}"
        drawn = frozenset(trainable) | frozenset(garbage)
    return Uninitialized(drawn, _memory_norms(model, zero, values), f"{_MEMORY}: {evidence}; every layer holding it "
                         "drawn, biases zeroed, nothing kept as deliberate")  # fmt: skip


def _memory_norms(model: nn.Module, zero: bool, values: bool) -> tuple[str, ...]:
    """The norms holding zero (when every layer does) or non-finite / absurd values."""
    found = []
    for name, module in model.named_modules():
        if not _is_norm(module):
            continue
        params = [p for p in module.parameters() if p.numel() > 0]
        if not params:
            continue
        buffers = [b for b in module.buffers() if b.is_floating_point() and b.numel() > 0]
        stats = _extremes(params + buffers)
        wild = values and any(_absurd(top) for top, _, _ in stats)
        if wild or (zero and all(top == 0 for top, _, _ in stats[: len(params)])):
            found.append(name)
    return tuple(found)


def _fresh(plan: LayerPlan, reason: str) -> LayerPlan:
    """A plan for a layer holding uninitialized memory: nothing measured on its old values (the attention logit scale,
    a residual branch's share of the stream) is a target."""
    if plan.role in ("attention", "branch"):
        plan.role, plan.target_std = "", None
        if not plan.lsuv:
            plan.correct = _auto(plan.activation)[2] if plan.scheme == plan.activation.kind.init else False
    plan.note = reason if plan.note is None else f"{plan.note}; {reason}"
    return plan
