"""Init check: does the signal of the first forward pass propagate, do its gradients, and is any layer far from what
prepare() picks?

Built on the one data-flow trace (:func:`lightning_bn.tracing.trace_model`, one forward pass in training mode on an
example input) and one backward pass of a fixed random projection of the output: it judges *propagation* — inf/NaN,
activations pinned in saturation, gradients that grow or vanish toward the input (the mean-field chaotic and ordered
phases, Poole et al. 2016; Schoenholz et al. 2017), a pre-activation signal that vanishes or explodes with depth — and
flags a weight only when it is far (``factor``, 20x by default) from what ``prepare()`` would choose for it, with the
same deliberate-init policy (:mod:`lightning_bn.tracing.policy`): kept layers (embeddings, tied weights, zero or
constant weights, attention queries and keys, layers with no well-founded rule) are never flagged for their scale.
Stock architectures (0.02-normal transformers, zero-init residual gains) give no finding; Xavier under ReLU at depth 30,
N(0, 1) weights under sigmoid, tanh at its forward-preserving gain at depth 100 and Xavier-gain sigmoid at depth 10
do.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_bn import checks
from lightning_bn.guards._common import clean_name, full_parameters, is_sharded
from lightning_bn.layers import get_layer_kind, scheme_std
from lightning_bn.tracing import (
    HookSet,
    LayerTrace,
    ModelMap,
    as_call,
    model_state,
    module_order_activations,
    run_forward,
    trace_model,
)
from lightning_bn.tracing.policy import plan_layers, weight_rms

__all__ = [
    "DEFAULT_DEPTH_RATIO",
    "DEFAULT_GRADIENT_RATIO",
    "DEFAULT_INIT_FACTOR",
    "DEFAULT_SATURATION_MARGIN",
    "MIN_TRANSMISSION",
    "WIDTH_SIGMAS",
    "InitFinding",
    "init_messages",
    "init_mismatches",
    "width_spread",
]

#: A weight's std may differ from what ``prepare()`` would draw for it by at most this factor. Stock small configs sit
#: within ~13x (GPT-2's 0.02 / sqrt(2 n_layer) against Xavier at width 64); a wild init (N(0, 10²)) is 50x off.
DEFAULT_INIT_FACTOR = 20.0
#: The pre-activation std of the last activation may differ from the first's by at most this factor (times the
#: finite-width spread, :func:`width_spread`).
DEFAULT_DEPTH_RATIO = 10.0
#: The gradient norm at the first layer feeding an activation may differ from the one at the last by at most this
#: factor (times the finite-width spread, :func:`width_spread`).
DEFAULT_GRADIENT_RATIO = 10.0
#: An activation is saturating when its saturated fraction exceeds the healthy one (unit-variance input) by this.
DEFAULT_SATURATION_MARGIN = 0.3
#: A smooth activation (f'² no indicator) is saturating only when it also passes back less than this fraction of a
#: healthy (unit-variance input) layer's gradient power; the run report's ``Thresholds.min_transmission`` default.
MIN_TRANSMISSION = 0.1
#: How many standard deviations of the finite-width spread of ln(ratio) widen ``depth_ratio`` and ``gradient_ratio``
#: (:func:`width_spread`).
WIDTH_SIGMAS = 3.0
#: Var ln‖z_L‖² ≈ 5 Σ_l 1/n_l for a ReLU net of widths n_l (Hanin & Rolnick 2018): the most spread-out of the common
#: kinds (a linear layer alone gives 2/n per layer), so it serves every kind.
_HANIN_ROLNICK = 5.0
#: The seed of the random projection of the output that the backward pass differentiates (a private generator: the
#: global random stream is untouched).
_PROJECTION_SEED = 2017
#: wrappers the backward pass looks inside (class name -> the attribute holding the model)
_WRAPPED = {"DistributedDataParallel": "module", "OptimizedModule": "_orig_mod"}

Problem = Literal[
    "weight_scale", "nonfinite", "saturating", "vanishing", "exploding", "gradient_vanishing", "gradient_exploding"
]


@dataclass(frozen=True)
class InitFinding:
    """One init problem.

    Attributes:
        name: the layer (for ``vanishing``/``exploding`` and ``gradient_vanishing``/``gradient_exploding``:
            ``"first -> last"`` layer feeding an activation).
        problem: ``"weight_scale"``, ``"nonfinite"``, ``"saturating"``, ``"vanishing"``, ``"exploding"``,
            ``"gradient_vanishing"`` or ``"gradient_exploding"``.
        value: ``weight_scale``: weight std / the std ``prepare()`` would draw; ``vanishing``/``exploding``:
            pre-activation std of the last activation / that of the first; ``gradient_vanishing``/
            ``gradient_exploding``: gradient norm at the first layer / that at the last (above 1: gradients grow
            toward the input); ``saturating``: saturated fraction; ``nonfinite``: count of non-finite outputs.
        detail: the figures behind it, in words (for the gradient findings: both norms, the number of layers, the
            per-layer factor and the mean-field χ₁ it implies, and the tolerance at these widths).
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
            rms = weight_rms(module.weight)
            what = f"weight std {rms:.3g} is {rms / needed:.3g}x the {needed:.3g} that {activation.describe()} needs"
            finding = _scale_finding(name, rms / needed, what, factor)
            findings += [finding] if finding is not None and rms > 0 else []
        return findings
    plans, _, _ = plan_layers(model, found, "auto", {})
    for plan in plans:
        trace = plan.trace
        spec = get_layer_kind(plan.module).weights(plan.module)[0]
        if spec.fixed is not None:
            continue  # its scale cannot act (weight standardized, spectral norm): prepare() keeps it too
        gain = 1.0 if plan.scheme == "lecun" else plan.activation.gain
        if plan.critical is not None:
            gain = plan.critical.gain
        needed = scheme_std(plan.scheme, spec.fan_in, spec.fan_out, gain)
        rms = weight_rms(spec.effective_weight(plan.module))
        ratio = rms / needed
        what = (f"weight std {rms:.3g} is {ratio:.3g}x the {needed:.3g} that prepare() would draw "
                f"({plan.scheme} for {plan.activation.describe()}); output std {trace.output_std:.3g}")  # fmt: skip
        if (plan.correct or plan.lsuv) and 1 / factor <= trace.output_std <= factor:
            continue  # prepare() would rescale it to unit output variance: a weight that gives about that is its choice
        if plan.role == "branch" and 1 / factor <= trace.output_std / plan.target_std <= factor:
            continue  # the end of a residual branch: prepare() sets its output's share of the stream, not its weight
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
    """Activations whose inputs sit on the flat ends. Where ``f'²`` is not an indicator (sigmoid, tanh, GELU, ...) an
    element near the asymptote still passes some gradient, so the saturated fraction is also judged by what reaches
    back: the gradient transmission ``E[f'(s z)²] / E[f'(z)²]`` at the input's std ``s`` must be below
    :data:`MIN_TRANSMISSION` too (the run report's rule). The mean-field critical sigmoid (input std √45.6 = 6.75)
    has ~40% of its inputs past the 1% slope but transmits 0.22 of a healthy layer's gradient power, with χ₁ = 1."""
    findings = []
    for site in found.sites:
        healthy = site.activation.healthy_saturation
        if not (math.isfinite(site.saturation) and site.saturation > healthy + margin):
            continue
        transmission = math.nan
        if not site.activation.slope_is_indicator and math.isfinite(site.input_std) and site.input_std > 0:
            transmission = site.activation.transmission(site.input_std)
            if transmission >= MIN_TRANSMISSION:
                continue
        name = site.producer or site.name
        detail = (
            f"{site.saturation:.0%} of the inputs of {site.activation.describe()} at '{site.name}' are saturated "
            f"(healthy: {healthy:.0%}); its input std is {site.input_std:.3g}"
        )
        if math.isfinite(transmission):
            detail += f", which passes back {transmission:.2g} of a healthy layer's gradient power"
        findings.append(InitFinding(name, "saturating", site.saturation, detail))
    return findings


def width_spread(widths: Iterable[int]) -> float:
    """The factor by which finite width alone spreads a first/last ratio along layers of ``widths`` units.

    ``exp(WIDTH_SIGMAS · sqrt(5 Σ 1/n_l) / 2)``: for a ReLU net Var ln‖z_L‖² ≈ 5 Σ_l 1/n_l (Hanin & Rolnick 2018), so
    the log of a ratio of norms (not squared) has standard deviation ``sqrt(5 Σ 1/n_l) / 2``, and three of them cover
    the seeds of an init at the critical point. Measured (40 seeds, He-ReLU, width 64, depth 100, batch 256): the
    forward ratio's ln has mean −1.80 and sd 1.40 (theory: −1.95, 1.40); the gradient ratio's ln mean −1.02, sd 1.16.
    There the spread is 65x, so the 10x tolerance becomes 650x; at width 128 and depth 100 it is 19x.

    Example::

        >>> round(width_spread([64] * 99), 1), width_spread([])
        (64.8, 1.0)
    """
    total = sum(1 / n for n in widths if n > 0)
    return math.exp(WIDTH_SIGMAS * math.sqrt(_HANIN_ROLNICK * total) / 2)


def _units(trace: LayerTrace) -> int:
    """The width of a layer's output: its units (features, channels) along the traced layout."""
    shape = trace.output_shape
    if not shape:
        return 0
    dim = trace.layout.unit_dim if trace.layout is not None and 0 <= trace.layout.unit_dim < len(shape) else -1
    return int(shape[dim])


def _fed_layers(found: ModelMap) -> list[str]:
    """Layers whose output feeds an activation (traced activation not the identity), in forward order."""
    return [name for name, trace in found.layers.items() if not trace.activation.is_identity]


def _chain(found: ModelMap) -> list[str]:
    """The layers the backward pass compares, in forward order: those feeding an activation with no norm in between,
    of the activation kind most of them feed (the first one's on a tie).

    A norm after a layer makes the layer's gradient the inverse of its output's scale (scale invariance): neither its
    weight scale nor the mean-field phase of the init decides it (BatchNorm's own gradient growth at init, Yang et al.
    2019, is no init mismatch). One kind, because the per-layer factor χ₁ is a property of one activation: a pooler's
    tanh after BERT's GELU blocks is a head, not the next link of the chain.
    """
    fed = [(name, t) for name, t in found.layers.items() if not t.activation.is_identity and t.norm_after is None]
    counts = Counter(t.activation.name for _, t in fed)
    if not counts:
        return []
    kind = max(counts, key=counts.__getitem__)  # first seen on a tie: a Counter keeps insertion order
    return [name for name, t in fed if t.activation.name == kind]


@dataclass(frozen=True)
class _Backward:
    """What one backward pass of a random projection of the output found at the layers feeding an activation."""

    first: str
    last: str
    first_norm: float
    last_norm: float
    steps: int  # layers feeding an activation from the first to the last, minus one
    tolerance: float  # gradient_ratio widened by the finite-width spread

    @property
    def ratio(self) -> float:
        return self.first_norm / self.last_norm

    @property
    def off(self) -> bool:
        return not 1 / self.tolerance <= self.ratio <= self.tolerance

    @property
    def per_layer(self) -> float:
        return self.ratio ** (1 / self.steps)


class _GradientTaps(HookSet):
    """Forward hooks for the one backward pass: on the first call of each watched layer, a tensor hook on its output
    that keeps the norm of the gradient reaching it (registered before anything can modify the output in place, so
    it sees the gradient with respect to the layer's output itself, not to an in-place activation's result); and the
    anchor: the first watched layer's floating input, detached and made to require grad (no copy), so gradients flow
    from the output down to the first layer whatever requires grad in the model (frozen parameters, integer inputs
    upstream), and the backward pass stops there."""

    def __init__(self, layers: dict[nn.Module, str], first: nn.Module) -> None:
        super().__init__()
        self.layers, self.first = layers, first
        self.anchor: Tensor | None = None
        self._anchored = False
        self.norms: dict[str, Tensor] = {}
        self.tensor_hooks: list[RemovableHandle] = []
        self._seen: set[str] = set()

    def _register(self) -> Iterable[RemovableHandle]:
        yield self.first.register_forward_pre_hook(self._anchor, with_kwargs=True)
        for module in self.layers:
            yield module.register_forward_hook(self._tap)

    def _anchor(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._anchored or not torch.is_grad_enabled():
            return None
        self._anchored = True  # the first call only
        for i, arg in enumerate(args):
            if isinstance(arg, Tensor) and arg.is_floating_point():
                self.anchor = arg.detach().requires_grad_()
                return (*args[:i], self.anchor, *args[i + 1 :]), kwargs
        for key, arg in kwargs.items():
            if isinstance(arg, Tensor) and arg.is_floating_point():
                self.anchor = arg.detach().requires_grad_()
                return args, {**kwargs, key: self.anchor}
        return None

    def _tap(self, module: nn.Module, args: tuple, output: Any) -> None:
        name = self.layers[module]
        if name in self._seen:
            return  # a layer called again (shared weights): its first call is the one the trace measured
        self._seen.add(name)
        main = output[0] if isinstance(output, (tuple, list)) and output else output
        if isinstance(main, Tensor) and main.is_floating_point() and main.requires_grad:
            self.tensor_hooks.append(main.register_hook(lambda grad, name=name: self._keep(name, grad)))

    def _keep(self, name: str, grad: Tensor) -> None:
        self.norms[name] = torch.linalg.vector_norm(grad.detach(), dtype=torch.float64)  # no float32 overflow

    def release(self) -> None:
        """Remove the forward hooks and the tensor hooks (these live on until the backward pass has run)."""
        self.detach()
        for handle in self.tensor_hooks:
            handle.remove()
        self.tensor_hooks.clear()


def _differentiable(output: Any) -> Tensor | None:
    """The first floating tensor that requires grad in a model's output (a Tensor, a tuple/list, a dict or a
    transformers ``ModelOutput``)."""
    if isinstance(output, Tensor):
        return output if output.is_floating_point() and output.requires_grad else None
    items = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else ()
    for item in items:
        found = _differentiable(item)
        if found is not None:
            return found
    return None


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module whose eager forward the backward pass runs: inside DDP (its reducer expects a backward through the
    parameters after a forward with gradients) and ``torch.compile`` (no compilation for a check)."""
    attribute = _WRAPPED.get(type(model).__name__)
    inner = getattr(model, attribute, None) if attribute is not None else None
    return _unwrapped(inner) if isinstance(inner, nn.Module) else model


def _random_projection(like: Tensor) -> Tensor:
    """A fixed N(0, 1) tensor of ``like``'s shape, dtype and device, from a private generator (the global random
    stream is untouched)."""
    try:
        generator = torch.Generator(device=like.device).manual_seed(_PROJECTION_SEED)
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    except (RuntimeError, TypeError):  # a device without its own generator: draw on the host
        generator = torch.Generator().manual_seed(_PROJECTION_SEED)
        return torch.randn(like.shape, generator=generator).to(device=like.device, dtype=like.dtype)


def _backward(model: nn.Module, example_input: Any, found: ModelMap, gradient_ratio: float) -> _Backward | None:
    """One forward pass with gradients (training mode, as the trace: same dropout draws; buffers, modes, RNG state
    and every ``.grad`` restored) and one backward pass of ``<output, R>`` (``R`` a fixed N(0, 1) tensor of the
    output's shape) down to the first layer feeding an activation: the gradient norm at the first and the last such
    layer whose gradient is finite and not zero (zero: behind a zero-initialized head or residual gain, a deliberate
    choice). ``None`` when no gradient can be made, the model is sharded, or anything fails: the check never raises
    into the user's code."""
    names = _chain(found)
    if len(names) < 2 or is_sharded(model):
        return None  # sharded (FSDP, DTensor): a partial backward would leave FSDP's gradient hooks half-run
    target = _unwrapped(model)
    modules: dict[nn.Module, str] = {}
    for name in names:
        modules.setdefault(found.layers[name].module, name)
    taps = _GradientTaps(modules, found.layers[names[0]].module)
    grads = {p: p.grad for p in model.parameters()}
    try:
        args, kwargs = as_call(target, example_input)
        # training mode as the trace; `calibration`: a deliberate train-mode pass, `guard(expect_eval=True)` stays quiet
        with model_state(target, train=True, grad=True, restore_buffers=True, fork_rng=True, calibration=True):
            with taps:
                output = run_forward(target, args, kwargs)
            out = _differentiable(output)
            if out is None or taps.anchor is None:
                return None
            torch.autograd.grad(out, [taps.anchor], _random_projection(out), allow_unused=True)
        if not taps.norms:
            return None
        values: dict[str, float] = {}
        for device in {v.device for v in taps.norms.values()}:  # one transfer per device (a model split over several)
            names_here = [n for n, v in taps.norms.items() if v.device == device]
            values.update(zip(names_here, torch.stack([taps.norms[n] for n in names_here]).cpu().tolist()))
    except Exception:  # best effort: the forward findings stand on their own
        return None
    finally:
        taps.release()
        for param, grad in grads.items():
            if param.grad is not grad:
                param.grad = grad
    judged = [(i, n) for i, n in enumerate(names) if n in values and math.isfinite(values[n]) and values[n] > 0]
    if len(judged) < 2:
        return None
    (i, first), (j, last) = judged[0], judged[-1]
    spread = width_spread(_units(found.layers[n]) for n in names[i + 1 : j + 1])
    return _Backward(first, last, values[first], values[last], j - i, gradient_ratio * spread)


def _gradient(backward: _Backward) -> InitFinding | None:
    if not backward.off:
        return None
    problem: Problem = "gradient_exploding" if backward.ratio > 1 else "gradient_vanishing"
    verb = "grows" if backward.ratio > 1 else "falls"
    per_layer = backward.per_layer
    detail = (
        f"the gradient norm {verb} toward the input from {backward.last_norm:.3g} at '{backward.last}' to "
        f"{backward.first_norm:.3g} at '{backward.first}' ({backward.ratio:.3g}x over {backward.steps} layers: "
        f"{per_layer:.3g}x per layer, mean-field chi_1 ~ {per_layer**2:.3g}; 1 is critical; allowed at these widths: "
        f"{backward.tolerance:.3g}x)"
    )
    return InitFinding(f"{backward.first} -> {backward.last}", problem, backward.ratio, detail)


def _depth(found: ModelMap, depth_ratio: float, backward: _Backward | None) -> InitFinding | None:
    """The trend of the pre-activation std along the activations of the kind most of them are (the signal the
    nonlinearities see; kinds run at scales their blocks set: Segformer's GELUs at ~1e-2, its decode head's ReLU
    behind a BatchNorm at 1) over the stack: the Theil-Sen slope of log std against the activation's index (the
    median of the pairwise slopes), times the number of steps from the first to the last. One layer off the trend
    (MobileNetV3's deliberately small N(0, 0.01) classifier before its last Hardswish) moves the median slope
    little; a compounding error (Xavier under ReLU halves the variance per layer) is the slope itself. Judged with
    the finite-width spread, and only when the gradients between the first and last layers are off too (or were not
    compared there: not measured, or other layers, as behind norms)."""
    hidden = [s for s in found.sites if not s.activation.is_identity and math.isfinite(s.input_std) and s.input_std > 0]
    if not hidden:
        return None
    counts = Counter(s.activation.name for s in hidden)
    kind = max(counts, key=counts.__getitem__)  # first seen on a tie
    hidden = [s for s in hidden if s.activation.name == kind]
    if len(hidden) < 2:
        return None
    first, last = hidden[0], hidden[-1]
    logs = [math.log(s.input_std) for s in hidden]
    step = max(1, len(logs) // 256)  # Theil-Sen is quadratic: at most ~256 evenly spaced points (33k pairs)
    points = list(range(0, len(logs), step))
    slopes = [(logs[j] - logs[i]) / (j - i) for a, i in enumerate(points) for j in points[a + 1 :]]
    ratio = math.exp(statistics.median(slopes) * (len(logs) - 1))
    tolerance = depth_ratio * width_spread(_units(found.layers[n]) for n in _fed_layers(found)[1:])
    if 1 / tolerance <= ratio <= tolerance:
        return None
    same = backward is not None and (first.producer, last.producer) == (backward.first, backward.last)
    if same and backward is not None and not backward.off:
        return None  # bounded activations: the forward signal may shrink while the gradients stay balanced
    problem: Problem = "vanishing" if ratio < 1 else "exploding"
    verb = "falls" if ratio < 1 else "grows"
    detail = (
        f"the input std of the activations {verb} {ratio:.3g}x along its trend over {len(hidden)} activations "
        f"(from {first.input_std:.3g} to {last.input_std:.3g} at the ends; allowed at these widths: {tolerance:.3g}x"
        + (f"; the gradient ratio between them: {backward.ratio:.3g}x)" if same else ")")
    )
    return InitFinding(f"{first.producer or first.name} -> {last.producer or last.name}", problem, ratio, detail)


def init_mismatches(
    model: nn.Module,
    example_input: Any = None,
    factor: float = DEFAULT_INIT_FACTOR,
    depth_ratio: float = DEFAULT_DEPTH_RATIO,
    saturation_margin: float = DEFAULT_SATURATION_MARGIN,
    gradient_ratio: float = DEFAULT_GRADIENT_RATIO,
) -> list[InitFinding]:
    """What is wrong with an initialization, judged by how the first forward pass and its gradients propagate.

    With ``example_input``, one forward pass in training mode without gradients (the trace), then one more with
    gradients and one backward pass (buffers, modes, RNG state and every parameter's ``.grad`` restored; a parameter
    whose ``.grad`` is ``None`` keeps ``None``):

    1. *nonfinite*: the first layer whose output holds inf/NaN (normalization after it cannot help).
    2. *saturating*: an activation whose saturated fraction exceeds its healthy one (at unit-variance input: 50%
       for ReLU, ~0 for sigmoid/tanh) by more than ``saturation_margin`` (Glorot & Bengio 2010) and, for a smooth
       kind, whose gradient transmission at its input's std is below :data:`MIN_TRANSMISSION` (an input std of 6.75
       under sigmoid — ``prepare()``'s critical init — is 40% saturated element by element but passes back 0.22 of
       a healthy layer's gradient power, and χ₁ = 1 there).
    3. *gradient_exploding* / *gradient_vanishing*: the backward pass of ``<output, R>`` (``R`` a fixed N(0, 1)
       tensor of the output's shape, from a private generator) gives ‖∂L/∂h‖ — the norm over the whole output ``h``
       of a layer, not an RMS per element: under fan-in scaling the norm, not the per-element size, carries across
       layers of different widths — at the first and the last layer feeding an activation; their ratio
       (first / last) outside ``[1/gradient_ratio, gradient_ratio]`` widened by the finite-width spread
       (:func:`width_spread`). Mean field: the squared ratio over ``L − 1`` layers is ≈ χ₁^(L−1), χ₁ = σ_w²·E[φ′(z)²]
       (Poole et al. 2016; Schoenholz et al. 2017): above 1 the chaotic phase (tanh at its forward-preserving gain,
       χ₁ 1.18: ~3e3x over 100 layers), below it the ordered one (Xavier-gain sigmoid, χ₁ 0.15: 2e-4x over 10);
       the detail gives the per-layer factor ``ratio^(1/(L−1))`` and χ₁ ≈ its square. Bounded activations keep the
       forward variance near 1 whatever χ₁ is, so only the backward pass sees this. Compared are the layers with no
       norm between them and their activation (a norm makes a layer's gradient the inverse of its output's scale, so
       its init cannot set the phase; BatchNorm's own gradient growth at init, Yang et al. 2019, is no init mismatch)
       feeding the kind most of them feed (χ₁ belongs to one activation: BERT's pooler tanh is a head, not the next
       GELU block); layers with a zero gradient (behind a zero-initialized head or residual gain) are left out. Not
       judged when 1. fires.
    4. *vanishing* / *exploding*: the trend of the activations' input std over the stack (the activations of the
       kind most of them are; a robust Theil-Sen fit of log std against their index, so that one deliberately small
       layer, as MobileNetV3's N(0, 0.01) classifier, is not the verdict), last over first, outside
       ``[1/depth_ratio, depth_ratio]`` widened by the finite-width spread (a per-layer error of √2, as Xavier under
       ReLU, compounds over 30 layers; He et al. 2015), raised only when the gradient ratio of 3. between the same
       two layers is off too (tanh at σ_w² = 1 lets the signal shrink ~10x over 50 layers while its gradients stay
       within the band) or was not measured there (no gradient could be made; the layers have a norm before their
       activation, as in EfficientNet). Not judged when 1. fires.
    5. *weight_scale*: a layer ``prepare()`` would re-initialize whose weight std is more than ``factor`` away from
       what it would draw (for a layer it rescales on data: and whose output std is more than ``factor`` from 1);
       layers ``prepare()`` keeps
       (embeddings, tied, zero or constant, zero gains, head-init scales, frozen, attention queries/keys, no
       well-founded rule) are never flagged, nor are
       small weights before a norm (the norm restores the scale; large ones shrink the layer's gradients).

    The finite-width spread: a net of widths ``n_l`` at the critical point still spreads a first/last ratio over
    seeds, ln of it with standard deviation ``sqrt(5 Σ 1/n_l) / 2`` (Hanin & Rolnick 2018); both tolerances are
    multiplied by ``exp(3 · that)`` (:data:`WIDTH_SIGMAS`), e.g. 65x for 100 layers of width 64, 19x at width 128,
    2.4x for 10 layers of width 128.

    The backward pass needs a gradient path: the first watched layer's floating input is detached and made to require
    grad, so frozen parameters and integer inputs upstream (token ids) are no obstacle; the output is the first
    floating tensor that requires grad in what the model returns (a Tensor, tuple, dict or ``ModelOutput``). It runs
    inside a ``DistributedDataParallel`` wrapper's module and a ``torch.compile``'d module's original, eagerly. Where
    no gradient can be made (no such output, no floating input to the first layer, a forward that fails with
    gradients), 3. is skipped silently and 4. judges the forward alone; nothing is raised into the user's code.

    Without an example input only 5. runs, on Linear/Conv layers, with the activation found by module order.

    Sharded models work as they are (every rank must call it then, as in a Lightning hook): the forward pass runs
    the sharded forward (FSDP gathers each weight there), and the weights are read whole
    (:func:`~lightning_bn.guards.full_parameters`) — DTensor parameters of FSDP2 ``fully_shard`` or tensor
    parallelism, FSDP1 units. Pass an FSDP1 wrapper itself (not the module inside it, whose weights it frees);
    names are reported without FSDP1's ``_fsdp_wrapped_module`` parts. The backward pass (3.) is skipped for them:
    FSDP's gradient hooks (reduce-scatter, resharding) expect a full backward through the parameters, and a partial
    one would leave them half-run; 4. then judges the forward alone.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> _ = nn.init.normal_(net[0].weight, std=10.0)
        >>> [(f.name, f.problem, f.value > 50) for f in init_mismatches(net)]  # std 10 vs sqrt(2 / 64)
        [('0', 'weight_scale', True)]
    """
    checks.number("factor", factor, 1.0)
    checks.number("depth_ratio", depth_ratio, 1.0)
    checks.number("gradient_ratio", gradient_ratio, 1.0)
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
            backward = _backward(model, example_input, found, gradient_ratio)
            gradient = _gradient(backward) if backward is not None else None
            depth = _depth(found, depth_ratio, backward)
            findings += [f for f in (gradient, depth) if f is not None]
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
    "gradient_exploding": "gradients grow toward the input, layer after layer: the init is in the chaotic phase "
    "(mean-field chi_1 = sigma_w^2 E[f'(z)^2] > 1); re-initialize at the critical point chi_1 = 1 "
    "(`lightning_bn.prepare`: init='auto' draws it for chains of bounded activations; tanh: sigma_w^2 2.15 with bias "
    "variance 0.15, not the forward-preserving 2.54), or add normalization layers",
    "gradient_vanishing": "gradients vanish toward the input, layer after layer: the init is in the ordered phase "
    "(mean-field chi_1 = sigma_w^2 E[f'(z)^2] < 1); re-initialize at the critical point chi_1 = 1 "
    "(`lightning_bn.prepare`: He for the ReLU family, init='auto' draws the critical point for chains of bounded "
    "activations; sigmoid: sigma_w^2 ~ 103, not Xavier's 3.4), or add normalization layers",
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
