"""``prepare(model, ...)`` and its options (:class:`PrepareOptions`, shared with :class:`~lightning_bn.AutoInit`):
detect the activations, validate the plan, initialize, insert norms, and report.

Every change is planned and checked before the model is touched: a bad argument, an example input that fails in
``forward``, a model with nothing to initialize, an override that matches no layer or a norm that does not fit a
layer's output raises with the model's ``state_dict`` and module tree unchanged.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

import torch
from torch import nn

from lightning_bn import checks
from lightning_bn.activations import Activation
from lightning_bn.activations.meanfield import chi1, fixed_point
from lightning_bn.init import (
    SCHEMES,
    LayerStep,
    init_layer_,
    is_sharded,
    planning_view,
    reshard,
    sequential_init_,
    sharded_sequential_init_,
    unsharded_params,
    zero_init_residual_,
)
from lightning_bn.init.check import WeightCheck, check_weights, weight_samples
from lightning_bn.layers import fixed_scale, get_layer_kind
from lightning_bn.norms import POSITIONS, NormInsertion, get_norm_layer, plan_insertions
from lightning_bn.norms.qk import QKNormSite, plan_qk_norm
from lightning_bn.tracing import LayerTrace, trace_model
from lightning_bn.tracing.policy import Kept, LayerPlan, Skipped, plan_layers, uninitialized_memory

__all__ = [
    "INIT_CHOICES",
    "InitChoice",
    "OVERRIDE_CHOICES",
    "Kept",
    "LayerReport",
    "PrepareOptions",
    "Report",
    "QK_NORMS",
    "Skipped",
    "has_layers",
    "prepare",
    "validate_options",
]


InitChoice = Literal["auto", "lsuv", "critical", "xavier", "kaiming", "lecun", "orthogonal", "numeric"]
Distribution = Literal["normal", "uniform", "truncated_normal"]
FanMode = Literal["fan_in", "fan_out"]
Position = Literal["pre", "post"]

#: What ``init=`` accepts: ``"auto"`` (per layer, from the activation), ``"lsuv"``, or one scheme for every layer.
INIT_CHOICES: tuple[str, ...] = get_args(InitChoice)
#: What an ``overrides`` value accepts: any ``init`` choice, or ``"skip"`` to leave the layer as it is.
OVERRIDE_CHOICES: tuple[str, ...] = (*INIT_CHOICES, "skip")
assert set(SCHEMES) <= set(INIT_CHOICES)
#: ``norm=`` values that put a norm over the head dimension on attention queries and keys (QK-norm) instead of after
#: layers: ``"qk"`` a LayerNorm, ``"qk_rms"`` an RMSNorm (:func:`lightning_bn.norms.insert_qk_norm`).
QK_NORMS: dict[str, str] = {"qk": "layer", "qk_rms": "rms"}


@dataclass(frozen=True)
class PrepareOptions:
    """What to do to a model: the init scheme, the norms to insert, and how to draw and rescale.

    Args:
        init: ``"auto"``, ``"lsuv"`` or a scheme of :data:`lightning_bn.init.SCHEMES`.
        norm: ``None`` (no insertion), ``"auto"``, a registered norm name, a norm class or a ``functools.partial``.
        overrides: glob pattern on qualified layer names -> ``init`` choice or ``"skip"``; the first match wins.
        position: ``"pre"`` (norm between layer and activation) or ``"post"`` (after an activation module).
        exclude: glob patterns on qualified layer names that get no norm.
        keep_bias: keep the biases a following BatchNorm / InstanceNorm makes redundant.
        distribution: ``"normal"``, ``"uniform"`` or ``"truncated_normal"``.
        mode: ``"fan_in"`` or ``"fan_out"``.
        zero_init_residual: zero the weight of the last norm in each residual branch.
        tol: tolerance (> 0) on the unit output variance of the data-driven rescaling.
        max_iters: rescaling iterations per layer (>= 1).
        seed: seed of a private generator for the random draws; ``None`` draws from the global one.

    Raises:
        ValueError: naming the bad value and the values allowed.
        TypeError: for ``overrides`` that is not a dict of patterns, an ``exclude`` that is not a list of patterns.

    Example::

        >>> PrepareOptions(init="lsuv", norm="batch").norm
        'batch'
        >>> try:
        ...     PrepareOptions(init="glorot")
        ... except ValueError as err:
        ...     print(str(err).split(" but ")[1])
        got 'glorot'
    """

    init: InitChoice = "auto"
    norm: Any = None
    overrides: Mapping[str, str] = field(default_factory=dict)
    position: Position = "pre"
    exclude: tuple[str, ...] = ()
    keep_bias: bool = False
    distribution: Distribution = "normal"
    mode: FanMode = "fan_in"
    zero_init_residual: bool = False
    tol: float = 0.1
    max_iters: int = 10
    seed: int | None = None

    def __post_init__(self) -> None:
        checks.choice("init", self.init, INIT_CHOICES)
        qk = isinstance(self.norm, str) and self.norm in QK_NORMS
        if self.norm is not None and self.norm != "auto" and not qk and get_norm_layer(self.norm) is None:
            raise ValueError(f"Expected `norm` to be a norm, 'auto', 'qk', 'qk_rms' or None but got {self.norm!r}")
        checks.choice("position", self.position, tuple(POSITIONS))
        exclude = self.exclude
        if exclude is None:
            exclude = ()
        if isinstance(exclude, str) or not all(isinstance(p, str) for p in exclude):
            raise TypeError(f"Expected `exclude` to be a list of glob patterns (str) but got {exclude!r}")
        object.__setattr__(self, "exclude", tuple(exclude))
        checks.choice("distribution", self.distribution, get_args(Distribution))
        checks.choice("mode", self.mode, get_args(FanMode))
        overrides = {} if self.overrides is None else self.overrides
        if not isinstance(overrides, Mapping):
            raise TypeError(f"Expected `overrides` to be a dict of glob pattern -> scheme but got {overrides!r}")
        for pattern, scheme in overrides.items():
            if not isinstance(pattern, str):
                raise TypeError(f"Expected each `overrides` key to be a glob pattern (str) but got {pattern!r}")
            if scheme not in OVERRIDE_CHOICES:
                raise ValueError(
                    f"Expected `overrides[{pattern!r}]` to be one of {list(OVERRIDE_CHOICES)} but got {scheme!r}"
                )
        object.__setattr__(self, "overrides", dict(overrides))
        for name in ("keep_bias", "zero_init_residual"):
            checks.boolean(name, getattr(self, name))
        checks.number("tol", self.tol)
        checks.integer("max_iters", self.max_iters)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"Expected `seed` to be an integer or None but got {self.seed!r}")

    @classmethod
    def names(cls) -> list[str]:
        """The option names, in order (the keyword arguments of ``prepare`` and ``AutoInit``)."""
        return [f.name for f in fields(cls)]


@dataclass
class LayerReport:
    """One row of the report: what was found for a layer and what was done to it.

    prepare() checks its own outcome: ``reached`` is False, with the reason in ``missed``, where a layer did not get
    what its row claims: a rescaled row (``corrected``, LSUV, critical, gated value, residual branch, attention) whose
    output std before any planned norm is not within 1.5x of its target ``output_target`` (NaN for a row not
    rescaled), or any row whose effective weight (what forward uses: a weight norm's ``g·v/‖v‖``, a standardized
    convolution's weight) did not change, or, not rescaled, whose RMS ``weight_std`` is not within 1.2x of
    ``weight_target``, the std the scheme draws. ``weight_form`` says how the weight acts
    (:attr:`lightning_bn.layers.WeightSpec.form`: ``"plain"``, ``"weight norm ..."``, ...).
    """

    layer: str
    type: str
    shape: tuple[int, ...]
    activation: str
    how: str
    scheme: str
    gain: float
    std_before: float
    std_after: float
    through: list[str] = field(default_factory=list)
    corrected: bool = False
    aliases: list[str] = field(default_factory=list)
    bias_std: float = 0.0
    note: str | None = None
    role: str = ""
    weight_std: float = math.nan
    weight_target: float = math.nan
    output_target: float = math.nan
    reached: bool = True
    missed: str | None = None
    weight_form: str = "plain"


#: How the scheme column shows a row whose output was rescaled to a target for its role (see ``Report.changes``).
_ROLE_SUFFIX = {"branch": "+stream share", "value": "+gated", "attention": "+logit scale"}


@dataclass
class Report:
    """What :func:`prepare` found and did: per-layer rows, skipped layers, and the changes in words.

    ``std_before``/``std_after`` are the standard deviation of the layer's output (before its activation) on the
    example input, in eval mode.

    Example::

        >>> net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
        >>> report = prepare(net, torch.randn(64, 8))
        >>> [(row.layer, row.activation, row.scheme) for row in report.layers]
        [('0', 'relu', 'kaiming'), ('2', 'identity', 'xavier')]
        >>> print(str(report).splitlines()[0])  # doctest: +NORMALIZE_WHITESPACE
        layer  type    output shape  activation (found by)  scheme   gain   std before -> after
    """

    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    kept: list[Kept] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    insertions: list[NormInsertion] = field(default_factory=list)
    renamed_keys: dict[str, str] = field(default_factory=dict)
    removed_keys: list[str] = field(default_factory=list)
    qk_norms: list[QKNormSite] = field(default_factory=list)
    added_keys: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [asdict(row) for row in self.layers],
            "skipped": [s._asdict() for s in self.skipped],
            "kept": [k._asdict() for k in self.kept],
            "changes": list(self.changes),
            "insertions": [asdict(i) for i in self.insertions],
            "renamed_keys": dict(self.renamed_keys),
            "removed_keys": list(self.removed_keys),
            "qk_norms": [asdict(q) for q in self.qk_norms],
            "added_keys": list(self.added_keys),
        }

    def __str__(self) -> str:
        header = ("layer", "type", "output shape", "activation (found by)", "scheme", "gain", "std before -> after")
        rows = [
            (
                r.layer,
                r.type,
                "x".join(map(str, r.shape)),
                f"{r.activation} ({r.how})",
                r.scheme + ("+rescaled" if r.corrected else _ROLE_SUFFIX.get(r.role, "")),
                f"{r.gain:.3f}",
                f"{r.std_before:.3g} -> {r.std_after:.3g}",
            )
            for r in self.layers
        ]
        widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [header, *rows]]
        lines += [f"tied {r.layer}: also {', '.join(a for a in r.aliases if not a.startswith(r.layer + '.'))}"
                  for r in self.layers if len(r.aliases) > 1]  # fmt: skip
        lines += [f"weight {r.layer}: {r.weight_form}" for r in self.layers if r.weight_form != "plain"]
        lines += [f"not reached {r.layer}: {r.missed}" for r in self.layers if not r.reached]
        kept: dict[str, list[str]] = {}  # one line per reason, its layers in report order
        for k in self.kept:
            kept.setdefault(k.reason, []).append(k.layer)
        lines += [f"kept ({reason}): {', '.join(layers)}" for reason, layers in kept.items()]
        lines += [f"skipped {s.layer}: {s.reason}" for s in self.skipped]
        lines += [f"- {change}" for change in self.changes]
        lines += [
            f"inserted {i.module} as {i.norm} after {i.layer} ({i.position}-activation)"
            + ("; bias removed" if i.bias_removed else "")
            for i in self.insertions
        ]
        lines += [
            f"qk-norm {q.attention or '(model)'}: {q.norm} over head_dim {q.head_dim} on query {q.query} ({q.heads} "
            f"heads) and key {q.key} ({q.kv_heads} heads){' (packed)' if q.packed else ''}"
            for q in self.qk_norms
        ]
        lines += [f"renamed key {old} -> {new}" for old, new in self.renamed_keys.items()]
        lines += [f"removed key {key}" for key in self.removed_keys]
        lines += [f"added key {key}" for key in self.added_keys]
        return "\n".join(lines)


def validate_options(
    init: Any,
    norm: Any = None,
    overrides: Any = None,
    distribution: Any = "normal",
    mode: Any = "fan_in",
    position: Any = "pre",
    exclude: Any = None,
) -> None:
    """Check ``prepare``'s options without a model (kept for compatibility: :class:`PrepareOptions` does the checks).

    Raises:
        ValueError: naming the bad value and the values allowed.
        TypeError: for an ``overrides`` that is not a mapping of patterns to schemes, or an ``exclude`` that is not a
            list of patterns.
    """
    PrepareOptions(init, norm, overrides, position, exclude, distribution=distribution, mode=mode)


def has_layers(model: nn.Module) -> bool:
    """True if ``model`` holds a layer :func:`prepare` can initialize (False for a model built in ``configure_model``
    before that hook has run)."""
    return any(get_layer_kind(m) is not None for m in model.modules())


def _example_input(model: nn.Module, example_input: Any) -> Any:
    if example_input is not None:
        return example_input
    found = getattr(model, "example_input_array", None)
    if found is None:
        raise ValueError(
            f"`prepare` needs an example input to run {type(model).__name__} once: pass `example_input=` (a Tensor, "
            "a tuple of args or a dict of kwargs), or set `self.example_input_array` in the LightningModule"
        )
    return found


def _generators(model: nn.Module, seed: int | None) -> dict[torch.device, torch.Generator]:
    if seed is None:
        return {}
    devices = {p.device for p in model.parameters()}
    return {d: torch.Generator(device=d).manual_seed(seed) for d in devices}


def prepare(
    model: nn.Module,
    example_input: Any = None,
    init: str = "auto",
    norm: Any = None,
    overrides: dict[str, str] | None = None,
    *,
    position: str = "pre",
    exclude: list[str] | None = None,
    keep_bias: bool = False,
    distribution: str = "normal",
    mode: str = "fan_in",
    zero_init_residual: bool = False,
    tol: float = 0.1,
    max_iters: int = 10,
    seed: int | None = None,
    options: PrepareOptions | None = None,
) -> Report:
    """Initialize ``model`` in place to match the activation after each layer, optionally insert norms, and report.

    Steps: validate the options (:class:`~lightning_bn.prepare.PrepareOptions`) -> trace the model once
    (:func:`~lightning_bn.tracing.trace_model`) -> plan a scheme per layer -> plan and build the norms
    (:func:`~lightning_bn.norms.plan_insertions`, no forward pass) -> one forward pass in which each layer is
    initialized, rescaled where planned and measured inside its own hook, with the planned norms applied
    (:func:`~lightning_bn.init.sequential_init_`) -> insert the norms -> :class:`Report`. The model runs exactly twice.
    Nothing is changed until every check has passed, and a failure while changing restores the ``state_dict`` and
    module tree. The init runs before the insertion, on the traced structure, so each layer still gets the gain of
    the activation after it.

    ``init="auto"`` asks the registry per layer: He for the ReLU family, LeCun for SELU, Xavier for identity (logits)
    and for tanh / sigmoid used as gates or before a norm, and the numeric gain otherwise (GELU, SiLU, Mish, ELU,
    user-registered kinds); since no fixed gain holds the variance at depth for activations that are not positively
    homogeneous, those layers are then rescaled in forward order to unit output variance on the example input (one
    LSUV-style pass; ``+rescaled`` in the report). A bounded activation in a chain (tanh, sigmoid, hardtanh, softsign,
    hard sigmoid whose output feeds the next layer) gets the mean-field critical init instead (``"critical"``: the
    forward-preserving Xavier gain puts tanh in the chaotic phase and sigmoid deep in the ordered one, so gradients
    explode or vanish with depth). The value branch ``b`` of a gated unit ``φ(a)·b`` (GLU, SwiGLU) is drawn so the
    product has unit second moment. ``init="critical"`` applies the critical init to every layer whose activation has
    a stable critical point (Poole et al. 2016; Schoenholz et al. 2017: ``χ₁ = 1``; biases drawn from ``N(0, σ_b²)``)
    and keeps ``auto``'s rescaled init, with the reason, where it is unstable (GELU, SiLU, Mish). Critical layers are
    rescaled to the variance ``q*`` of the fixed point on the example input (the first layer of a chain gets the data,
    not the activation, as input). ``init="lsuv"`` is full LSUV (Mishkin & Matas 2016); a scheme name applies that
    scheme to every layer with the detected activation's gain. Biases are zeroed except under ``"critical"`` and,
    with the reason in ``Report.kept``, where they are frozen or (``"auto"``) no PyTorch default draw (an LSTM's
    forget gate at 1). Frozen layers are kept under every choice; a model holding uninitialized memory (``meta`` ->
    ``to_empty()``) is drawn whole (:mod:`lightning_bn.tracing.policy`).

    A model with sharded parameters (``DTensor``: FSDP2 ``fully_shard``) gets the same weights as the unsharded model
    for the same ``seed``: each layer is drawn full-size, one at a time, and every rank keeps its slice; the layers are
    changed between forward passes instead of inside one (FSDP2 drops writes made inside ``forward``), one pass per
    rescaling step (:func:`~lightning_bn.init.sharded_sequential_init_`). Call it on every rank with the same example
    input and seed (the passes are collectives). Norms cannot be inserted into a sharded model.

    Args:
        model: an ``nn.Module`` or LightningModule.
        example_input: a Tensor, tuple of args or dict of kwargs for ``forward``; default:
            ``model.example_input_array``.
        init: ``"auto"``, ``"lsuv"``, ``"critical"`` or a scheme of :data:`lightning_bn.init.SCHEMES`.
        norm: ``None`` (no insertion), ``"auto"``, ``"batch"``, ``"layer"``, ``"group"``, ``"rms"``, ``"instance"``,
            ``"sync_batch"``, any registered name, a norm class or a ``functools.partial``: a norm after every hidden
            Linear / Conv (never after the output layer, nor where a norm already follows); see
            :func:`lightning_bn.norms.insert_norms` for the shape rules. With a norm before the activation,
            ``std_after`` is measured at the norm's output (in eval mode, so with its running statistics).
        overrides: glob pattern on qualified layer names -> ``init`` choice or ``"skip"``; the first match wins.
        position: ``"pre"`` (norm between layer and activation) or ``"post"`` (after an activation module).
        exclude: glob patterns on qualified layer names that get no norm.
        keep_bias: keep the biases a following BatchNorm / InstanceNorm makes redundant (removed by default).
        distribution: ``"normal"``, ``"uniform"`` or ``"truncated_normal"``.
        mode: ``"fan_in"`` or ``"fan_out"``.
        zero_init_residual: zero the weight of the last norm in each residual branch found by the trace.
        tol: tolerance on the unit output variance of the data-driven rescaling.
        max_iters: rescaling passes per layer.
        seed: seed a private generator for the random draws (same seed, same weights on every process);
            ``None`` draws from the global generator.
        options: all of the above as one :class:`~lightning_bn.prepare.PrepareOptions` (then the keyword arguments
            are ignored).

    Returns:
        a :class:`Report`.

    Raises:
        ValueError: for an unknown scheme / distribution / mode / norm / position, no example input, an example input
            that fails in ``forward``, a model without a layer to initialize, an override pattern matching no layer,
            ``position="post"`` where the activation is a function, a layer output the norm cannot normalize (the
            message names the layer), or ``norm`` with sharded parameters.
        TypeError: for ``overrides`` that is not a dict of patterns.

    Example::

        >>> net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
        >>> report = prepare(net, torch.randn(128, 16), overrides={"4": "lecun"})
        >>> [row.scheme for row in report.layers]
        ['critical', 'critical', 'lecun']
    """
    if options is None:
        options = PrepareOptions(
            init, norm, overrides, position, exclude, keep_bias, distribution, mode, zero_init_residual, tol,
            max_iters, seed,
        )  # fmt: skip
    return _prepare(model, example_input, options)


def _prepare(model: nn.Module, example_input: Any, o: PrepareOptions) -> Report:
    _refuse_scripted(model)
    if not has_layers(model):
        raise ValueError(
            f"Found no layer to initialize in {type(model).__name__}: expected a Linear, Conv, ConvTranspose, "
            "Embedding or RNN module"
        )
    example_input = _example_input(model, example_input)
    reshard(model)  # FSDP2 keeps the root's parameters unsharded after a forward pass
    sharded = is_sharded(model)
    if sharded and o.norm is not None:
        raise ValueError(
            f"Cannot insert norms (norm={o.norm!r}) into {type(model).__name__}: its parameters are sharded "
            "(DTensor, FSDP2 `fully_shard`). Insert them before sharding: call `lightning_bn.prepare(model, example, "
            "norm=..., seed=...)` where the model is built (in `configure_model`, before `fully_shard`), identically "
            "on every rank"
        )
    model_map = trace_model(model, example_input, batch_stats=True)
    traces = model_map.layers
    reshard(model)
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}  # before stand-ins
    with planning_view(model) if sharded else contextlib.nullcontext():
        plans, kept, skipped = plan_layers(model, model_map, o.init, o.overrides, frozen=frozen, values=not sharded)
        memory = uninitialized_memory(model, model_map, frozen, values=not sharded)
    if not plans and not kept:
        raise ValueError(
            f"Found no layer to initialize in {type(model).__name__}: none ran on the example input or all were "
            f"skipped ({[s.layer for s in skipped]})"
        )
    plans = _without_fixed_scale(plans, o, kept, skipped)
    insertion = qk_plan = None
    if isinstance(o.norm, str) and o.norm in QK_NORMS:
        qk_plan = plan_qk_norm(model, example_input, QK_NORMS[o.norm], exclude=o.exclude, model_map=model_map)
    elif o.norm is not None:
        insertion = plan_insertions(model, example_input, traces, o.norm, o.position, o.exclude, o.keep_bias)
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        after = {site.target: site.norm for site in insertion.sites} if insertion is not None else {}
        reset = _reset_norms(model, memory.norms) if memory is not None else None
        changes, outcomes = _apply(model, example_input, plans, traces, o, after)
        changes += [reset] if reset else []
        inserted = insertion.apply(model) if insertion is not None else None
        qk_inserted = qk_plan.apply(model) if qk_plan is not None else None
    except BaseException:
        model.load_state_dict(snapshot)
        raise
    report = Report(layers=[_row(p, outcomes[p.name]) for p in plans], skipped=skipped, kept=kept, changes=changes)
    if inserted is not None:
        report.skipped += [Skipped(name, reason) for name, reason in inserted.skipped]
        report.insertions, report.renamed_keys = inserted.insertions, inserted.renamed_keys
        report.removed_keys = inserted.removed_keys
        report.changes.append(_insertion_summary(inserted.insertions, len(inserted.renamed_keys)))
    if qk_inserted is not None:
        report.skipped += [Skipped(name, reason) for name, reason in qk_inserted.skipped]
        report.qk_norms, report.added_keys = qk_inserted.sites, qk_inserted.added_keys
        norm = "RMSNorm" if o.norm == "qk_rms" else "LayerNorm"
        report.changes.append(
            f"inserted a QK-norm ({norm} over the head dimension on queries and keys) into {len(qk_inserted.sites)} "
            f"attention{'' if len(qk_inserted.sites) == 1 else 's'}; added {len(qk_inserted.added_keys)} state_dict "
            "keys, none renamed (see Report.added_keys)"
        )
    return report


def _without_fixed_scale(
    plans: list[LayerPlan], o: PrepareOptions, kept: list[Kept], skipped: list[Skipped]
) -> list[LayerPlan]:
    """Layers whose weight's scale cannot change the output (weight standardized, spectral norm: see
    :func:`lightning_bn.layers.fixed_scale`) leave the plan: kept with the reason under ``init="auto"``, skipped with
    it where an init was forced (no scheme can reach them)."""
    planned = []
    for plan in plans:
        reason = fixed_scale(plan.module)
        if reason is None:
            planned.append(plan)
        elif o.init == "auto" and not any(fnmatch.fnmatchcase(plan.name, p) for p in o.overrides):
            kept.append(Kept(plan.name, reason))
        else:
            skipped.append(Skipped(plan.name, reason))
    return planned


def _refuse_scripted(model: nn.Module) -> None:
    """A TorchScript module takes no forward hooks, and the trace hooks every module: name the scripted ones."""
    scripted: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule) and not any(name.startswith(f"{s}.") for s in scripted):
            scripted.append(name)
    if scripted:
        named = ", ".join(repr(n) if n else f"the model itself ({type(model).__name__})" for n in scripted)
        raise ValueError(
            f"Cannot prepare {type(model).__name__}: {named} {'is a' if len(scripted) == 1 else 'are'} TorchScript "
            f"module{'' if len(scripted) == 1 else 's'} (torch.jit.script / torch.jit.trace), which takes no forward "
            "hooks, and prepare() traces the model with a hook on every module. Call prepare() on the model before "
            "scripting it (script the prepared model), or leave the scripted part out of the module you prepare"
        )


def _reset_norms(model: nn.Module, names: tuple[str, ...]) -> str | None:
    """Norms holding uninitialized memory back to their own init (``reset_parameters()``); the change in words."""
    modules = dict(model.named_modules())
    done = [n for n in names if callable(getattr(modules[n], "reset_parameters", None))]
    for name in done:
        with unsharded_params(modules[name]):
            modules[name].reset_parameters()
    missing = [n for n in names if n not in done]
    if not names:
        return None
    text = f"reset {len(done)} norm{'' if len(done) == 1 else 's'} holding uninitialized memory ({', '.join(done[:4])}"
    text += f"{', ...' if len(done) > 4 else ''}) with their own reset_parameters()"
    return text + (f"; no reset_parameters(), left as they are: {missing}" if missing else "")


def _insertion_summary(insertions: list[NormInsertion], renamed: int) -> str:
    counts = Counter(i.module for i in insertions)
    kinds = ", ".join(m if c == 1 else f"{m} x{c}" for m, c in counts.items())
    text = f"inserted {len(insertions)} norms ({kinds or 'none'})"
    removed = sum(i.bias_removed for i in insertions)
    if removed:
        text += f"; removed {removed} bias{'es' if removed > 1 else ''} made redundant by the norm"
    return text + f"; renamed {renamed} state_dict keys (see Report.renamed_keys)"


def _layers(count: int) -> str:
    return f"{count} layer" if count == 1 else f"{count} layers"


def _apply(
    model: nn.Module,
    example_input: Any,
    plans: list[LayerPlan],
    traces: dict[str, LayerTrace],
    o: PrepareOptions,
    after: dict[str, nn.Module],
) -> tuple[list[str], dict[str, _Outcome]]:
    """Initialize, rescale and measure every planned layer in one forward pass, then check the outcome; the changes
    in words (counting only what was done) and each layer's outcome."""
    generators = _generators(model, o.seed)

    def initializer(plan: LayerPlan) -> Callable[[nn.Module], None]:
        def initialize(module: nn.Module) -> None:
            generator = generators.get(next(module.parameters()).device)
            gain = 1.0 if plan.lsuv else None
            with unsharded_params(module), _attention_scale_kept(module):
                plan.gain = init_layer_(module, plan.scheme, plan.activation, o.distribution, o.mode, gain, generator,
                                        keep_bias=plan.keep_bias)  # fmt: skip

        return initialize

    changes = []
    if o.zero_init_residual:
        zeroed = zero_init_residual_(model, traces)
    steps = [LayerStep(p.name, initializer(p), rescale=p.lsuv or p.correct, target_std=p.target_std) for p in plans]
    before = {p.name: weight_samples(p.module) for p in plans}  # the weights forward uses, to check the outcome
    if is_sharded(model):  # no write inside forward reaches the shards: the same init, layer by layer, outside it
        results = sharded_sequential_init_(
            model, example_input, steps, tol=o.tol, max_iters=o.max_iters, batch_stats=True
        )
    else:
        results = sequential_init_(
            model, example_input, steps, after=after, tol=o.tol, max_iters=o.max_iters, batch_stats=True
        )
    for plan, step in zip(plans, steps):
        if plan.name not in results:  # did not run this time: initialized without data
            step.initialize(plan.module)
    outcomes = {p.name: _outcome(p, results.get(p.name), before[p.name], o) for p in plans}
    done = [p for p in plans if outcomes[p.name].weight.changed]  # the summary counts what was really done
    reached = [p for p in plans if outcomes[p.name].missed is None]
    schemes = sorted({p.scheme for p in done})
    if done:
        drawn = " except the critical layers' (drawn from N(0, σ_b²))" if "critical" in schemes else ""
        spared = sum(p.keep_bias for p in done)
        drawn += f"; the biases of {_layers(spared)} kept (deliberate or frozen: see kept)" if spared else ""
        changes.append(f"initialized {_layers(len(done))} ({', '.join(schemes)}); biases zeroed{drawn}")
    critical = [p for p in reached if p.critical is not None]
    for kind in sorted({p.activation.name for p in critical}):
        group = [p for p in critical if p.activation.name == kind]
        point = group[0].critical
        xavier = _xavier_chi1(point.activation)
        why = (f" (the forward-preserving Xavier gain would give χ₁ {xavier:.3g}: gradients "
               f"{'explode' if xavier > 1 else 'vanish'} with depth)"
               if all(p.role == "chain" for p in group) else "")  # fmt: skip
        changes.append(
            f"critical init (mean-field, χ₁ = 1) for {_layers(len(group))} before {kind}{why}: {point.describe()}; "
            f"each rescaled to the fixed point's std √q* = {math.sqrt(point.q):.3g} on the example input"
        )
    for note in sorted({p.note for p in plans if p.note}):
        named = [p.name for p in plans if p.note == note]
        changes.append(f"{_layers(len(named))} ({', '.join(named[:4])}{', ...' if len(named) > 4 else ''}): {note}")
    value = [p for p in reached if p.role == "value" and p.target_std is not None]
    if value:
        changes.append(
            f"scaled {_layers(len(value))} on the value side of a gated unit φ(a)·b to output std 1/√E[φ(z)²] "
            f"({', '.join(f'{p.name} {p.target_std:.3g}' for p in value[:4])}): the product has unit second moment"
        )
    branches = [p for p in reached if p.role == "branch"]
    if branches:
        shares = [p.target_std / p.trace.shortcut_std for p in branches]
        changes.append(
            f"scaled {_layers(len(branches))} ending a residual branch so each adds at most 1/√{len(branches)} "
            f"= {1 / math.sqrt(len(branches)):.3g} of the residual stream's std, or the model's own smaller share "
            f"(GPT-2's 1/√(2·n_layer), Fixup, DeepNet): shares {min(shares):.3g}–{max(shares):.3g}; the stream stays "
            "near the identity"
        )
    attention = [p.name for p in reached if p.role == "attention"]
    if attention:
        changes.append(
            f"rescaled {_layers(len(attention))} feeding attention to their old output std (logit scale kept)"
        )
    if o.zero_init_residual:
        changes.append(f"zeroed the weight of the last norm in {len(zeroed)} residual branches: {zeroed}")
    lsuv = [p.name for p in reached if p.lsuv]
    corrected = [p.name for p in reached if p.correct]
    if lsuv:
        changes.append(f"LSUV: rescaled {_layers(len(lsuv))} to unit output variance on the example input")
    if corrected:
        kinds = sorted({p.activation.name for p in reached if p.correct})
        changes.append(
            f"rescaled {_layers(len(corrected))} before {', '.join(kinds)} to unit output variance on the example "
            "input (not positively homogeneous: no fixed gain holds the variance at depth)"
        )
    missed = [p.name for p in plans if outcomes[p.name].missed is not None]
    if missed:
        changes.append(
            f"not reached for {_layers(len(missed))} ({', '.join(missed[:4])}{', ...' if len(missed) > 4 else ''}): "
            "the layer did not get what its row claims (see 'not reached' above)"
        )
    return changes, outcomes


@dataclass
class _Outcome:
    """What the init pass did to one layer, as checked afterwards."""

    std: float  # the output std measured in the init pass (after a planned norm)
    target: float  # the output std it was rescaled to (NaN: not rescaled)
    weight: WeightCheck
    form: str
    missed: str | None


#: a rescaled layer's output std must be within this factor of its target; a drawn weight's std within 1.2x
_RESCALE_TOLERANCE = 1.5


def _outcome(plan: LayerPlan, result: Any, before: list[torch.Tensor], o: PrepareOptions) -> _Outcome:
    """Did the layer get what its row will claim? The effective weight changed and, unless rescaled, has the
    scheme's std; a rescaled layer's output (before a planned norm) has its target std within 1.5x."""
    rescaled = plan.lsuv or plan.correct or plan.target_std is not None
    kept = {"in_proj_weight": (0, 1)} if isinstance(plan.module, nn.MultiheadAttention) else None  # logit scale
    weight = check_weights(plan.module, before, plan.scheme, plan.gain, o.mode, kept_chunks=kept, scaled=rescaled)
    missed = weight.missed
    target = (1.0 if plan.target_std is None else plan.target_std) if rescaled else math.nan
    if missed is None and rescaled:
        variance = math.nan if result is None else result.variance
        if result is None:
            missed = "not called on the example input: drawn without data, not rescaled"
        elif not (math.isfinite(variance) and variance > 0):
            missed = f"its output variance is {variance:.3g}: not rescaled"
        elif not 1 / _RESCALE_TOLERANCE <= math.sqrt(variance) / target <= _RESCALE_TOLERANCE:
            missed = f"output std {math.sqrt(variance):.3g} after rescaling, target {target:.3g}"
    form = ", ".join(dict.fromkeys(s.form for s in get_layer_kind(plan.module).weights(plan.module)))
    return _Outcome(math.nan if result is None else result.std, target, weight, form, missed)


@contextlib.contextmanager
def _attention_scale_kept(module: nn.Module) -> Iterator[None]:
    """For ``nn.MultiheadAttention``: the query and key blocks of ``in_proj_weight`` keep their RMS (logit scale)."""
    weight = getattr(module, "in_proj_weight", None) if isinstance(module, nn.MultiheadAttention) else None
    if weight is None:
        yield
        return
    before = [chunk.detach().pow(2).mean().sqrt() for chunk in weight.chunk(3)[:2]]
    yield
    with torch.no_grad():
        for chunk, rms in zip(weight.chunk(3)[:2], before):
            chunk.mul_(rms / chunk.pow(2).mean().sqrt().clamp_min(1e-12))


def _xavier_chi1(activation: Activation) -> float:
    """χ₁ of a chain drawn with the forward-preserving gain (``σ_w² = 1/E[φ(z)²]``, ``σ_b = 0``)."""
    weight_variance = activation.gain**2
    return chi1(activation, weight_variance, fixed_point(activation, weight_variance))


def _row(plan: LayerPlan, outcome: _Outcome) -> LayerReport:
    trace = plan.trace
    return LayerReport(
        layer=plan.name,
        type=type(plan.module).__name__,
        shape=trace.output_shape,
        activation=trace.activation.describe(),
        how=trace.how,
        scheme="lsuv" if plan.lsuv else plan.scheme,
        gain=plan.gain,
        std_before=trace.output_std,
        std_after=outcome.std,
        through=list(trace.through),
        corrected=plan.correct,
        aliases=list(plan.aliases),
        bias_std=math.sqrt(plan.critical.bias_variance) if plan.critical is not None else 0.0,
        note=plan.note,
        role=plan.role,
        weight_std=outcome.weight.std,
        weight_target=outcome.weight.target,
        output_target=outcome.target,
        reached=outcome.missed is None,
        missed=outcome.missed,
        weight_form=outcome.form,
    )
