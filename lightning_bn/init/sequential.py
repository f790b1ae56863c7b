"""Data-driven initialization in one forward pass: each layer is initialized and rescaled inside its own hook.

Layer-sequential unit-variance init (LSUV, Mishkin & Matas 2016) needs every layer's output variance on real data
*after* the layers before it were fixed. Instead of one forward pass per layer and iteration, :func:`sequential_init_`
runs the model once: a forward hook on each planned layer initializes it at its first call, recomputes the layer's
output from the same input, rescales the weight until that output has unit variance, and hands the new output on, so
every later layer already sees the fixed signal. Norms planned for insertion can be applied in the same pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_bn import checks
from lightning_bn.init.initializers import init_layer_
from lightning_bn.init.sharded import local_tensor, reshard, unsharded_params
from lightning_bn.layers import fixed_scale, get_layer_kind, sync_weights
from lightning_bn.tracing import HookSet, as_call, model_state, run_forward, trace_model

__all__ = ["LayerStep", "lsuv_", "rescale_to_unit_variance_", "sequential_init_", "sharded_sequential_init_"]


@dataclass
class LayerStep:
    """What :func:`sequential_init_` does to one layer at its first call.

    Attributes:
        name: qualified layer name.
        initialize: draws the layer's new weights (``None``: keep them).
        rescale: then rescale the weight until the output variance is 1 ± ``tol``.
        target_std: instead, rescale the weight until the output std is this (within ``tol``, relative).
    """

    name: str
    initialize: Callable[[nn.Module], Any] | None = None
    rescale: bool = False
    target_std: float | None = None


@dataclass
class StepResult:
    """What happened to one layer: its output std after the step, and the output variance reached by rescaling."""

    std: float
    variance: float


def _main(output: Any) -> Tensor | None:
    main = output[0] if isinstance(output, tuple) else output
    return main if isinstance(main, Tensor) else None


class _Sequential(HookSet):
    def __init__(
        self,
        model: nn.Module,
        steps: Sequence[LayerStep],
        after: Mapping[str, nn.Module],
        tol: float,
        max_iters: int,
    ) -> None:
        super().__init__()
        modules = dict(model.named_modules())
        self._steps = [(s, modules[s.name]) for s in steps]
        self._after = [(modules[n], norm) for n, norm in after.items()]
        self.tol, self.max_iters = tol, max_iters
        self.found: dict[str, tuple[Tensor, float]] = {}

    def _register(self) -> Iterator[Any]:
        for step, module in self._steps:
            yield module.register_forward_hook(self._layer_hook(step), with_kwargs=True)
        for module, norm in self._after:
            if not any(module is m for _, m in self._steps):
                yield module.register_forward_hook(self._norm_hook(norm))

    def _norm_for(self, module: nn.Module) -> nn.Module | None:
        return next((norm for m, norm in self._after if m is module), None)

    def _norm_hook(self, norm: nn.Module) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            main = _main(output)
            return None if main is None else _apply_norm(norm, main)

        return hook

    def _layer_hook(self, step: LayerStep) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if step.name in self.found:
                return self._after_norm(module, output)
            if step.initialize is not None:
                step.initialize(module)
                output = module.forward(*args, **kwargs)
            variance = math.nan
            if (step.rescale or step.target_std is not None) and _main(output) is not None:
                target = 1.0 if step.target_std is None else step.target_std**2
                output, variance = self._rescale(module, args, kwargs, output, target)
            main = _main(output)
            output = self._after_norm(module, output)
            shown = _main(output)
            if main is not None and shown is not None:
                self.found[step.name] = (shown.detach().float().std(), variance)
            return output

        return hook

    def _after_norm(self, module: nn.Module, output: Any) -> Any:
        norm, main = self._norm_for(module), _main(output)
        if norm is None or main is None:
            return output
        return _apply_norm(norm, main)

    def _rescale(self, module: nn.Module, args: tuple, kwargs: dict, output: Any, target: float) -> tuple[Any, float]:
        variance = _main(output).detach().float().var().item()
        weights = _scaled(module)  # the weight, or what scales it (a gain, a weight norm's g); none where fixed
        for _ in range(self.max_iters if weights else 0):
            if not math.isfinite(variance) or variance <= 0 or abs(variance / target - 1.0) <= self.tol:
                break
            for weight in weights:
                weight.mul_((variance / target) ** -0.5)
            sync_weights(module)
            output = module.forward(*args, **kwargs)
            variance = _main(output).detach().float().var().item()
        return output, variance

    def results(self) -> dict[str, StepResult]:
        if not self.found:
            return {}
        stds = torch.stack([s for s, _ in self.found.values()]).cpu().tolist()
        return {n: StepResult(std, v) for (n, (_, v)), std in zip(self.found.items(), stds)}


def _scaled(module: nn.Module) -> list[Tensor]:
    """What a rescale of the layer's output multiplies (:meth:`lightning_bn.layers.WeightSpec.scaled`): never a raw
    weight whose scale cannot change the output (weight standardized, spectral norm)."""
    return [t for spec in get_layer_kind(module).weights(module) for t in spec.scaled(module)]


def _apply_norm(norm: nn.Module, x: Tensor) -> Tensor:
    with model_state(norm):  # a new norm in eval mode: fresh running statistics, no update
        return norm(x)


def check_rescaling(tol: Any, max_iters: Any) -> None:
    """``tol`` a positive finite number, ``max_iters`` a positive int; ``ValueError`` naming the value otherwise."""
    checks.number("tol", tol)
    checks.integer("max_iters", max_iters)


def sequential_init_(
    model: nn.Module,
    example_input: Any,
    steps: Sequence[LayerStep],
    *,
    after: Mapping[str, nn.Module] | None = None,
    tol: float = 0.1,
    max_iters: int = 10,
    batch_stats: bool = False,
) -> dict[str, StepResult]:
    """Initialize and rescale layers in forward order in ONE forward pass on ``example_input`` (eval mode, no grad).

    Each step's layer is changed inside its own forward hook at its first call, and its new output goes on through the
    model, so later layers are measured on the signal the changed earlier layers produce. A layer whose output variance
    is 0 or not finite is left unscaled.

    Args:
        model: the model.
        example_input: a Tensor, tuple of args or dict of kwargs.
        steps: the layers to change, any order (they are changed in the order they run).
        after: ``{module name: norm}``: apply ``norm`` (in eval mode) to that module's output during the pass, for
            norms about to be inserted there, so later layers see the normalized signal.
        tol: tolerance on the unit output variance.
        max_iters: rescaling iterations per layer (each re-runs the layer alone, not the model).
        batch_stats: BatchNorm normalizes with the batch's statistics, as in training (running statistics restored).

    Returns:
        ``{layer name: StepResult}`` for the layers that ran: output std (after the norm in ``after``, if any) and the
        variance the rescaling reached (NaN where not rescaled).

    Example::

        >>> net = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4))
        >>> steps = [LayerStep(n, lambda m: nn.init.orthogonal_(m.weight), rescale=True) for n in ("0", "2", "4")]
        >>> results = sequential_init_(net, torch.randn(256, 16), steps)
        >>> all(abs(r.variance - 1) <= 0.1 for r in results.values())
        True
    """
    args, kwargs = as_call(model, example_input)
    with (
        _Sequential(model, steps, dict(after or {}), tol, max_iters) as runner,
        model_state(model, batch_stats=batch_stats),
    ):
        run_forward(model, args, kwargs)
    return runner.results()


class _FirstOutputs(HookSet):
    """Read-only forward hooks: the order in which the watched layers are first called, and their first outputs."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.modules = dict(modules)
        self.order: list[str] = []
        self.outputs: dict[str, Tensor] = {}

    def _register(self) -> Iterator[Any]:
        for name, module in self.modules.items():
            yield module.register_forward_hook(self._hook(name))

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if name in self.order:
                return
            self.order.append(name)
            main = _main(output)
            if main is not None:
                self.outputs[name] = main.detach().float()

        return hook


def sharded_sequential_init_(
    model: nn.Module,
    example_input: Any,
    steps: Sequence[LayerStep],
    *,
    tol: float = 0.1,
    max_iters: int = 10,
    batch_stats: bool = False,
) -> dict[str, StepResult]:
    """:func:`sequential_init_` for a model with sharded (``DTensor``, FSDP2) parameters: the same weights and results.

    Under FSDP2 a write inside ``forward`` reaches an unsharded copy that is dropped at the next reshard, so nothing is
    changed inside a hook here: one pass finds the order in which the layers are first called; then, in that order,
    each layer is drawn full-size with only this rank's slice kept (:func:`~lightning_bn.init.sharded.unsharded_params`,
    the same draws in the same order as the unsharded pass), and a layer to rescale is measured by a forward pass whose
    hooks only read its output, then its shards are scaled in place; one last pass measures every layer. A layer's
    output depends only on the layers called before it, so every measurement sees what the one-pass init would see.

    Every forward pass and gather is a collective: every rank must call this with the same steps and example input.
    Norms cannot be applied on the way (no ``after``): insert them before sharding. Costs one forward pass per
    rescaling iteration, plus two.
    """
    modules = dict(model.named_modules())
    watched = {s.name: modules[s.name] for s in steps}
    args, kwargs = as_call(model, example_input)

    def run(names: Sequence[str]) -> _FirstOutputs:
        try:
            with _FirstOutputs({n: watched[n] for n in names}) as seen, model_state(model, batch_stats=batch_stats):
                run_forward(model, args, kwargs)
        finally:
            reshard(model)  # the root's parameters stay unsharded after forward: writes must reach the shards
        return seen

    reshard(model)
    order = run(list(watched)).order
    by_name = {s.name: s for s in steps}
    variances: dict[str, float] = {}
    for name in order:
        step, module = by_name[name], watched[name]
        if step.initialize is not None:
            with unsharded_params(module):
                step.initialize(module)
        if not step.rescale and step.target_std is None:
            continue
        output = run([name]).outputs.get(name)
        if output is None:
            continue
        target = 1.0 if step.target_std is None else step.target_std**2
        weights = [local_tensor(t) for t in _scaled(module)]
        variance = output.var().item()
        for _ in range(max_iters if weights else 0):
            if not math.isfinite(variance) or variance <= 0 or abs(variance / target - 1.0) <= tol:
                break
            with torch.no_grad():
                for weight in weights:
                    weight.mul_((variance / target) ** -0.5)
            variance = run([name]).outputs[name].var().item()
        variances[name] = variance
    final = run(order).outputs
    if not final:
        return {}
    stds = torch.stack([final[n].std() for n in order if n in final]).cpu().tolist()
    names = [n for n in order if n in final]
    return {n: StepResult(std, variances.get(n, math.nan)) for n, std in zip(names, stds)}


def rescale_to_unit_variance_(
    model: nn.Module, example_input: Any, names: Sequence[str], tol: float = 0.1, max_iters: int = 10
) -> dict[str, float]:
    """Rescale each named layer's weight, in forward order, until its output variance is 1 ± ``tol``; one pass.

    The data-driven half of LSUV (Mishkin & Matas 2016). Returns the final output variance of each layer.
    """
    results = sequential_init_(model, example_input, [LayerStep(n, rescale=True) for n in names], tol=tol,
                               max_iters=max_iters)  # fmt: skip
    return {n: r.variance for n, r in results.items()}


def lsuv_(
    model: nn.Module,
    example_input: Any,
    layers: Sequence[str] | None = None,
    tol: float = 0.1,
    max_iters: int = 10,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Layer-sequential unit-variance init (Mishkin & Matas, ICLR 2016), in place, in two forward passes.

    Each layer gets an orthogonal weight (gain 1) and a zero bias, then, in forward order, its weight is rescaled
    until its output variance on ``example_input`` is 1 within ``tol``. One pass traces the layers, one initializes
    and rescales them all (:func:`sequential_init_`). Works with norm layers and residual connections; recurrent
    layers are left out (their output is not linear in the scale), and so are layers whose weight's scale cannot
    change the output (:func:`lightning_bn.layers.fixed_scale`: weight standardized, spectral norm).

    Args:
        model: the model.
        example_input: a Tensor, tuple of args or dict of kwargs; a batch large enough for a stable variance.
        layers: qualified names to initialize (default: every traced layer but RNNs).
        tol: tolerance on the output variance.
        max_iters: rescaling iterations per layer.
        generator: random generator for the orthogonal matrices.

    Returns:
        ``{name: output variance}`` after the rescaling.

    Raises:
        ValueError: if the example input fails in ``forward`` or a name in ``layers`` is no traced layer.

    Example::

        >>> net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4))
        >>> variances = lsuv_(net, torch.randn(256, 16))
        >>> all(abs(v - 1) <= 0.1 for v in variances.values())
        True
    """
    check_rescaling(tol, max_iters)
    if layers is not None and (isinstance(layers, str) or not all(isinstance(n, str) for n in layers)):
        raise TypeError(f"Expected `layers` to be a list of qualified layer names but got {layers!r}")
    traces = trace_model(model, example_input).layers
    eligible = [n for n, t in traces.items() if not isinstance(t.module, nn.RNNBase) and fixed_scale(t.module) is None]
    if layers is not None:
        unknown = [n for n in layers if n not in eligible]
        if unknown:
            raise ValueError(f"Expected `layers` to name traced Linear/Conv/Embedding layers but got {unknown}")
        eligible = [n for n in eligible if n in set(layers)]

    def orthogonal(module: nn.Module) -> None:
        init_layer_(module, "orthogonal", gain=1.0, generator=generator)

    steps = [LayerStep(n, orthogonal, rescale=True) for n in eligible]
    results = sequential_init_(model, example_input, steps, tol=tol, max_iters=max_iters)
    return {n: results[n].variance for n in eligible if n in results}
