"""What the report finds: the thresholds it judges by, and the health of each layer and of the run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lightning_bn import checks

__all__ = [
    "ADVICE", "ATTENTION_FLAGS", "FLAGS", "MIN_DEAD_SAMPLES", "UNKNOWN_BASELINE", "Flag", "LayerHealth", "RunHealth",
    "Thresholds",
]  # fmt: skip

#: Every problem the report can flag, in the order it lists them.
FLAGS = (
    "saturated", "dead", "nonfinite", "vanishing", "exploding", "vanishing_gradient", "exploding_gradient", "stalled",
    "attention_logit_growth", "attention_entropy_collapse", "output_logit_divergence",
)  # fmt: skip

#: The flags judged on attention rows (``attn_*`` figures) and on the output-logit row (``out_*`` figures).
ATTENTION_FLAGS = ("attention_logit_growth", "attention_entropy_collapse", "output_logit_divergence")

#: How to try QK normalization, in the advice lines.
_QK_NORM = 'normalize queries and keys (lightning_bn.prepare(model, x, norm="qk"))'

#: The saturation baseline of a layer whose activation kind is unknown (no layers table, or a table without it):
#: a ReLU's, the highest of the common kinds, so that no healthy layer is flagged for want of its kind.
UNKNOWN_BASELINE = 0.5

#: ``dead`` is not judged on fewer observations per unit than this (batch x positions; ``act_samples``): a unit is
#: "dead" when saturated on every one of them, which a healthy ReLU unit is on one sample half the time, on 16 with
#: probability 2^-16.
MIN_DEAD_SAMPLES = 16

#: One line per flag: what usually causes it and what to try. The report prints it under each flagged layer.
ADVICE: dict[str, str] = {
    "saturated": "inputs sit on the activation's flat ends, so gradients vanish there: use the init made for this "
    "activation (lightning_bn.prepare: Xavier for tanh/sigmoid, He for ReLU), put a norm before it, or lower the "
    "learning rate",
    "dead": "units that never activate learn nothing: He init (lightning_bn.prepare), a lower learning rate, a norm "
    "before the activation, or a leaky kind (LeakyReLU, GELU)",
    "nonfinite": "inf/NaN: lower the learning rate, clip gradients, check the init gain and, under mixed precision, "
    "the loss scaling",
    "vanishing": "the signal shrinks with depth: use the init matching the activation (He for ReLU, Xavier for tanh) "
    "or add normalization (lightning_bn.prepare(norm=...))",
    "exploding": "the signal or the updates grow: lower the learning rate, check the init gain, add normalization or "
    "gradient clipping",
    "vanishing_gradient": "almost no gradient reaches this layer: look for saturated activations or a detached path "
    "after it, or add residual connections / normalization",
    "exploding_gradient": "gradients grow towards the input, layer after layer: the init is in the chaotic phase "
    "for this activation (lower the weight scale: lightning_bn.prepare), add normalization, or clip gradients",
    "stalled": "the weights barely move and the loss does not improve: converged, or starved; if the loss is still "
    "high, raise the learning rate (for this parameter group), or check weight decay and "
    "the optimizer's state",
    "attention_logit_growth": "the attention logits grow until the softmax is one-hot and training diverges (Dehghani "
    f"et al. 2023; Wortsman et al. 2023): {_QK_NORM}, lower the learning rate or lengthen the warm-up",
    "attention_entropy_collapse": "the attention concentrates on single keys, which precedes instability (Zhai et al. "
    f"2023): {_QK_NORM}, lower the learning rate or lengthen the warm-up",
    "output_logit_divergence": "the output logits drift as a whole, away from log Z = 0 (Wortsman et al. 2023): add "
    "the z-loss 1e-4 * logsumexp(logits, -1).square().mean() to the loss (PaLM's), or lower the learning rate",
}


@dataclass(frozen=True)
class Thresholds:
    """When a layer is flagged, judged at every logged step: the health rules of the report and of the callbacks'
    fit-end summary and fail-fast (:class:`lightning_bn.HealthCheck`), in one place.

    Args:
        min_transmission: ``saturated`` when the layer's gradient transmission ``act_transmission`` (the mean of
            ``f'(x)^2`` over its inputs, relative to a healthy N(0, 1) input: the factor it puts on the gradient's
            power going back, the local part of mean-field chi_1) falls below this. It catches Glorot & Bengio's top
            sigmoid layer at mean 0.03 (transmission ~0.02, while no element is within 1% of sigma's maximum slope:
            ``act_saturation`` reads 0) and leaves a N(0, 1)-weight sigmoid net of width 128 alone (~0.15: it trains,
            slowly). Runs that did not log ``act_transmission`` are judged by ``act_saturation`` below.
        saturation_margin: (runs without ``act_transmission``) ``saturated`` when ``act_saturation`` exceeds what is
            healthy *for the layer's activation
            kind* by more than this. The healthy value is the fraction a unit-variance input ``N(0, 1)`` saturates
            (:attr:`lightning_bn.activations.Activation.healthy_saturation`, written by ``ActivationMonitor`` into the
            run's layers table): 0.5 for ReLU (its negative half has zero slope by construction), ~0.003 for tanh and
            sigmoid, so a sigmoid layer 20% pinned at its asymptotes is flagged and a ReLU layer at 55% is not. A kind
            the run did not record counts as :data:`UNKNOWN_BASELINE` (0.5).
        max_saturation: an absolute limit for every kind instead (``None``: the per-kind rule above). A sigmoid net
            with N(0, 1) weights reaches ~0.8 (Glorot & Bengio 2010).
        max_dead: ``dead`` when more than this fraction of the units is saturated on every sample of the batch ...
        min_dead_samples: ... judged only at steps where each unit was seen at least this many times (``act_samples``:
            batch x positions; :data:`MIN_DEAD_SAMPLES`): on one sample "dead" is saturation, ~0.5 for a healthy ReLU
            (``stop_on="dead"`` stopped healthy runs at batch size 1). Runs logged without ``act_samples`` are judged
            at every step.
        min_std_ratio: ``vanishing`` when a layer's output std falls below this times the std of the first layer of
            the same type: with the run's layers table, the same module type (a LayerNorm with the first LayerNorm)
            or, for activations, the same activation function (a ReLU with the first ReLU); the first layer of each
            type, and every layer without the table, with the first layer of the same kind (activation outputs with
            activation outputs, other layers with other layers). Xavier under ReLU
            halves the variance per layer, so 30 layers end near 3e-5 (He et al. 2015). A deliberately
            zero-initialized layer (see :func:`analyze`) is judged only once its ratio has reached this.
        max_std_ratio: ``exploding`` when that ratio exceeds this.
        max_update_ratio: also ``exploding`` when one optimizer step moves a layer's parameters by more than this
            times their norm (``update_ratio``; ~1e-3 is healthy, a zero-initialized layer reads exactly 1 once).
        min_grad_ratio: ``vanishing_gradient`` when a layer's relative gradient ``||g|| / ||w||`` (over its
            parameters) is below this times the top decile (P90) of the layers at the same step, or its gradient is
            exactly 0 while its weights are not. Relative, because healthy layers of real models differ in gradient
            norm by 1e-4 to 1e-6 (ConvNeXt's LayerScale branches, Swin, BERT's attention) but in relative gradient by
            under 1e-2; against the top decile, not the median, because when most of a deep stack is starved the
            median layer is starved too.
        max_gradient_decades: the depth rule: ``log10(||g|| / ||w||)`` is fitted against forward depth over the
            layers; when the fit spans more than this many decades over the stack, gradients vanish (or explode)
            layer after layer, with the per-layer factor on gradient power ``chi = 10^(-2 slope)`` in the message
            (mean-field theory's chi_1: 1 at criticality; Schoenholz et al. 2017) ...
        trend_grad_ratio: ... and then a layer below this times the top decile is ``vanishing_gradient`` (above the
            bottom decile divided by this: ``exploding_gradient``).
        max_weight_ratio: a starved layer whose weight norm is above this times the median layer's is said to be
            starved by its weight scale (``||g|| / ||w||`` is small because ``||w||`` is huge), not by saturation.
        min_update_ratio: ``stalled`` when ``update_ratio`` stays below this (~1e-3 is healthy) ...
        stalled_steps: ... on at least this many consecutive logged steps ...
        min_loss_improvement: ... while the training loss (``GradientMonitor`` logs it, tag
            :data:`lightning_bn.tags.LOSS_TAG`) falls by less than this fraction of itself ...
        converged_loss: ... and stays above this: a net at a loss this low has converged (its updates are small
            because its gradients are). Without a logged loss, the update ratio alone decides and the report says it
            could not tell converged from starved.
        max_attention_logit: ``attention_logit_growth`` when an attention row's largest pre-softmax logit
            (``attn_logit_max``) rises past this (a row already beyond it at its first logged step is judged by the
            growth rule only: Lightning's demo ``nn.Transformer`` on N(0, 1) embeddings starts at ~150). A logit 100
            above the others gets all but e^-100 of the weight: the softmax is one-hot whatever the number of keys, and
            its gradient vanishes. The figure is a maximum, not the gap between a query's logits, so the bound leaves
            room above the tens that healthy trained models reach (attention sinks included); the runs that diverge from
            attention-logit growth run on to 1e3-1e4 (Dehghani et al. 2023, ViT-22B; Wortsman et al. 2023, small-scale
            proxies at high learning rates), and their growth is exponential: the bound costs a few steps of warning ...
        attention_logit_growth: ... as does the growth rule: also flagged when the max logit is at least this many
            times its smallest value over the ``attention_logit_window`` logged steps before ...
        attention_logit_window: ... (a runaway, not the slow growth of learning) ...
        attention_logit_floor: ... once beyond this: logits growing from near 0 at init to the tens of a working
            sharpness are learning, not a runaway (a 2-block byte-level LM at lr 3e-3 goes 1.5 -> 15-28 in 40 steps
            and trains as well as with QK-norm: ``examples/attention_logit_growth.py``).
        min_entropy_fraction: ``attention_entropy_collapse`` when an attention row's mean entropy (``attn_entropy``,
            over batch, heads and queries) falls below this fraction of its value at the row's first logged step
            (about log(keys) at init: 4.9 nats for 128 keys) ...
        min_attention_entropy: ... and below this many nats: e^0.5 ~ 1.6 keys attended per query, on average over
            every head, which healthy trained models stay well above (heads attending to one token, such as
            previous-token heads, are a few among many; the smallest head, ``attn_entropy_min``, is quoted, not
            judged). Zhai et al. 2023 see this collapse precede the divergence.
        max_log_z: ``output_logit_divergence`` when the mean log-partition of the output logits (``out_log_z``,
            ``logsumexp`` over classes) is further than this from 0 ...
        max_log_z_drift: ... and has moved more than this from its value at the first logged step. A cross-entropy
            is blind to a shift of all logits, so they can drift as a whole (Wortsman et al. 2023: very negative,
            then divergence; PaLM's z-loss keeps log Z near 0); at 20 a bf16 logit is rounded by ~0.06, its
            probability by ~6%. The drift condition keeps a large vocabulary's log Z at init (log V, 10.8 for GPT-2's
            50257 tokens) and a pretrained model's resting value from being flagged.

    Example::

        >>> t = Thresholds()
        >>> t.saturation_limit(0.5), round(t.saturation_limit(0.003), 3), t.saturation_limit(None)
        (0.7, 0.203, 0.7)
        >>> Thresholds(max_saturation=0.9).saturation_limit(0.0)
        0.9
    """

    min_transmission: float = 0.1
    saturation_margin: float = 0.2
    max_saturation: float | None = None
    max_dead: float = 0.5
    min_dead_samples: int = MIN_DEAD_SAMPLES
    min_std_ratio: float = 0.01
    max_std_ratio: float = 100.0
    max_update_ratio: float = 1.0
    min_grad_ratio: float = 1e-4
    max_gradient_decades: float = 4.0
    trend_grad_ratio: float = 1e-2
    max_weight_ratio: float = 1e3
    min_update_ratio: float = 1e-5
    stalled_steps: int = 5
    min_loss_improvement: float = 0.01
    converged_loss: float = 1e-3
    max_attention_logit: float = 100.0
    attention_logit_growth: float = 10.0
    attention_logit_window: int = 5
    attention_logit_floor: float = 30.0
    min_entropy_fraction: float = 0.1
    min_attention_entropy: float = 0.5
    max_log_z: float = 20.0
    max_log_z_drift: float = 10.0

    def __post_init__(self) -> None:
        for name in ("min_transmission", "saturation_margin", "max_dead"):
            object.__setattr__(self, name, checks.fraction(name, getattr(self, name)))
        if self.max_saturation is not None:
            object.__setattr__(self, "max_saturation", checks.fraction("max_saturation", self.max_saturation))
        for name in ("min_std_ratio", "max_std_ratio", "max_update_ratio", "min_grad_ratio", "min_update_ratio",
                     "max_gradient_decades", "trend_grad_ratio", "max_weight_ratio"):  # fmt: skip
            object.__setattr__(self, name, checks.number(name, getattr(self, name)))
        checks.integer("stalled_steps", self.stalled_steps)
        checks.integer("min_dead_samples", self.min_dead_samples)
        object.__setattr__(self, "min_loss_improvement", checks.fraction("min_loss_improvement",
                                                                         self.min_loss_improvement))  # fmt: skip
        object.__setattr__(self, "converged_loss", checks.number("converged_loss", self.converged_loss, 0.0,
                                                                 strict=False))  # fmt: skip
        for name in ("max_attention_logit", "attention_logit_floor", "min_attention_entropy", "max_log_z",
                     "max_log_z_drift"):  # fmt: skip
            object.__setattr__(self, name, checks.number(name, getattr(self, name)))
        object.__setattr__(self, "attention_logit_growth",
                           checks.number("attention_logit_growth", self.attention_logit_growth, 1.0))  # fmt: skip
        checks.integer("attention_logit_window", self.attention_logit_window)
        object.__setattr__(self, "min_entropy_fraction", checks.fraction("min_entropy_fraction",
                                                                         self.min_entropy_fraction))  # fmt: skip

    def saturation_limit(self, healthy: float | None) -> float:
        """The saturation above which a layer whose kind saturates ``healthy`` at a N(0, 1) input is flagged."""
        if self.max_saturation is not None:
            return self.max_saturation
        return (UNKNOWN_BASELINE if healthy is None else healthy) + self.saturation_margin


@dataclass
class Flag:
    """One problem of one layer: the first and last logged step where it held, and whether it holds at the end."""

    name: str
    first_step: int
    last_step: int
    active: bool
    reason: str

    def describe(self) -> str:
        """``"saturated since step 0"`` or, once cleared, ``"dead at steps 0-40 (cleared)"``."""
        if self.active:
            return f"{self.name} since step {self.first_step}"
        steps = f"step {self.first_step}" if self.first_step == self.last_step else f"steps {self.first_step}-"
        steps += "" if self.first_step == self.last_step else str(self.last_step)
        return f"{self.name} at {steps} (cleared)"

    def to_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in ("first_step", "last_step", "active", "reason")}


@dataclass
class LayerHealth:
    """The figures of one layer (``None`` where not logged) and its flags.

    ``kind`` is ``"activation"`` (has saturation), ``"layer"`` (other watched outputs: Linear, Conv, norms),
    ``"attention"`` (an attention call site: ``attn_*`` figures, no output figures), ``"output"`` (the output logits
    of a cross-entropy: ``out_*`` figures only) or ``"parameters"`` (only gradients were logged). ``logit_max``
    and ``entropy`` (the latest ``attn_logit_max`` and ``attn_entropy``; ``worst_logit_max`` the largest,
    ``lowest_entropy`` the smallest, ``entropy_min`` the latest smallest head's), ``log_z`` (the latest
    ``out_log_z``, ``worst_log_z`` the one furthest from 0) are ``None`` on rows without them. The gradient norm is
    the 2-norm over the layer's parameters; the update ratio is ``‖Δθ‖ / ‖θ‖`` over them. ``module_type`` comes from
    the layers table (``None`` without it);
    ``std_ratio`` is relative to the layer ``std_reference``; ``zero_init`` marks a deliberately zero-initialized
    layer (see :func:`analyze`).
    """

    name: str
    depth: int
    kind: str
    saturation: float | None = None
    worst_saturation: float | None = None
    dead: float | None = None
    worst_dead: float | None = None
    std: float | None = None
    std_ratio: float | None = None
    grad_norm: float | None = None
    update_ratio: float | None = None
    worst_update_ratio: float | None = None
    nonfinite: float | None = None
    worst_nonfinite: float | None = None
    nonfinite_gradient: bool = False
    flags: dict[str, Flag] = field(default_factory=dict)
    module_type: str | None = None
    std_reference: str | None = None
    zero_init: bool = False
    activation: str | None = None
    healthy_saturation: float | None = None
    saturation_limit: float | None = None
    transmission: float | None = None
    worst_transmission: float | None = None
    logit_max: float | None = None
    worst_logit_max: float | None = None
    entropy: float | None = None
    lowest_entropy: float | None = None
    entropy_min: float | None = None
    log_z: float | None = None
    worst_log_z: float | None = None

    @property
    def layer_type(self) -> str:
        """What the layer is, for the report's type column: ``"relu"``, ``"Linear"``, ``"LayerNorm"``, ..."""
        if self.activation:
            return self.activation
        kinds = {"activation": "activation", "parameters": "(parameters)", "attention": "attention",
                 "output": "output logits"}  # fmt: skip
        return self.module_type or kinds.get(self.kind, "layer")

    def to_dict(self) -> dict[str, Any]:
        figures = {
            "depth": self.depth,
            "kind": self.kind,
            "module_type": self.module_type,
            "activation": self.activation,
            "zero_init": self.zero_init,
            "saturation": {
                "latest": self.saturation,
                "worst": self.worst_saturation,
                "healthy": self.healthy_saturation,
                "limit": self.saturation_limit,
            },
            "dead": {"latest": self.dead, "worst": self.worst_dead},
            "transmission": {"latest": self.transmission, "worst": self.worst_transmission},
            "std": self.std,
            "std_ratio": self.std_ratio,
            "std_reference": self.std_reference,
            "grad_norm": self.grad_norm,
            "update_ratio": {"latest": self.update_ratio, "worst": self.worst_update_ratio},
            "nonfinite": {"latest": self.nonfinite, "worst": self.worst_nonfinite, "gradient": self.nonfinite_gradient},
        }
        if self.logit_max is not None or self.entropy is not None or self.entropy_min is not None:
            figures["attention"] = {
                "logit_max": {"latest": self.logit_max, "worst": self.worst_logit_max},
                "entropy": {"latest": self.entropy, "lowest": self.lowest_entropy, "min_head": self.entropy_min},
            }
        if self.log_z is not None:
            figures["output"] = {"log_z": {"latest": self.log_z, "worst": self.worst_log_z}}
        return {**figures, "flags": {name: flag.to_dict() for name, flag in self.flags.items()}}


@dataclass
class RunHealth:
    """The layers of one run in depth order, the logged steps, and per flag where it first appeared.

    ``forward_order``: the run logged its layers table, so the layers are in forward order (the order they first
    ran) and each ``std_ratio`` is relative to the first layer of the same module type or activation function.
    ``unwatched``: activations the monitor found and could not watch (the layers table's ``hook="unwatched"`` rows).
    """

    name: str
    steps: list[int]
    layers: list[LayerHealth]
    forward_order: bool = False
    unwatched: list[str] = field(default_factory=list)

    @property
    def zero_init(self) -> list[str]:
        """The deliberately zero-initialized layers, in depth order."""
        return [layer.name for layer in self.layers if layer.zero_init]

    @property
    def raised(self) -> set[str]:
        """Every flag raised on some layer."""
        return {name for layer in self.layers for name in layer.flags}

    def problems(self) -> dict[str, dict[str, Any]]:
        """Per raised flag: the first step, the shallowest layer flagged at that step, and every flagged layer."""
        out = {}
        for name in FLAGS:
            flagged = [layer for layer in self.layers if name in layer.flags]
            hits = [(layer.flags[name].first_step, layer.depth, layer.name) for layer in flagged]
            if hits:
                step, _, first = min(hits)
                out[name] = {"first_step": step, "first_layer": first, "layers": [hit[2] for hit in hits]}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "forward_order": self.forward_order,
            "layers": {layer.name: layer.to_dict() for layer in self.layers},
            "problems": self.problems(),
            "zero_init": self.zero_init,
        }
