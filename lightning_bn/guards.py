"""Checks for the classic normalization pitfalls, in plain PyTorch: each check returns findings, never mutates.

- *inference on batch statistics*: BatchNorm-family modules left in training mode (:func:`find_train_mode_norms`),
  running statistics changed by evaluation data (:func:`running_stats_snapshot`, :func:`changed_running_stats`),
  and :func:`guard`, which warns live when a BatchNorm in training mode runs under ``torch.no_grad()`` /
  ``torch.inference_mode()`` (the forgotten ``model.eval()``).
- *tiny batches*: :class:`BatchSizeRecorder` + :func:`small_batch_norms` (values per channel = batch × spatial).
- *uncalibrated running statistics*: :func:`uncalibrated_norms`.
- *init mismatch*: :func:`init_mismatches` (weight scale vs. what the activation needs, and the consequence in one
  forward pass: inf/NaN, vanishing or exploding signal).

Every warning has the category :class:`BatchNormWarning` and is one line: what is wrong, where, what to do.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.conv import _ConvNd
from torch.utils.hooks import RemovableHandle

from lightning_bn.activations import Activation, activation_of_module, get_activation
from lightning_bn.init import as_call, trace_activations
from lightning_bn.probes import HookSet

__all__ = [
    "BatchNormWarning",
    "BatchSizeRecorder",
    "EvalModeGuard",
    "InitFinding",
    "batch_norms",
    "changed_running_stats",
    "find_train_mode_norms",
    "guard",
    "init_mismatches",
    "init_messages",
    "running_stat_norms",
    "running_stats_snapshot",
    "small_batch_message",
    "small_batch_norms",
    "uncalibrated_norms",
]

#: Below this many values per channel (batch × spatial) batch statistics are too noisy: BN's error rises fast as the
#: per-device batch drops below 16 (Wu & He, "Group Normalization", ECCV 2018).
DEFAULT_MIN_VALUES_PER_CHANNEL = 16
#: A layer's weight std may differ from ``gain / sqrt(fan_in)`` by at most this factor.
DEFAULT_INIT_FACTOR = 3.0
#: The output std of the last hidden layer may differ from the first's by at most this factor (one forward pass).
DEFAULT_DEPTH_RATIO = 10.0

_WEIGHTED = (nn.Linear, _ConvNd)
_NORMS = (_NormBase, nn.LayerNorm, nn.GroupNorm)
# Set while a deliberate train-mode pass without gradients runs (recalibration), so `guard` stays quiet.
_CALIBRATING: contextvars.ContextVar[bool] = contextvars.ContextVar("lightning_bn_calibrating", default=False)


class BatchNormWarning(RuntimeWarning):
    """The category of every normalization-pitfall warning; filter it with ``warnings.filterwarnings``."""


def _names(names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


# ---- inference on batch statistics ------------------------------------------------------------------------------


def running_stat_norms(model: nn.Module) -> list[tuple[str, _NormBase]]:
    """BatchNorm-family modules that keep running statistics (BatchNorm*, SyncBatchNorm, InstanceNorm with stats).

    Only these behave differently in training and evaluation mode.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.LayerNorm(4), nn.InstanceNorm1d(4))
        >>> [name for name, _ in running_stat_norms(net)]
        ['1']
    """
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _NormBase) and m.track_running_stats]


def batch_norms(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """Every BatchNorm (``BatchNorm1d/2d/3d``, lazy variants, ``SyncBatchNorm``): the modules batch size affects."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


def find_train_mode_norms(model: nn.Module) -> list[str]:
    """Names of the BatchNorm-family modules with running statistics that are in training mode.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        >>> find_train_mode_norms(net)
        ['1']
        >>> find_train_mode_norms(net.eval())
        []
    """
    return [name for name, module in running_stat_norms(model) if module.training]


def running_stats_snapshot(model: nn.Module) -> dict[str, tuple[Tensor, ...]]:
    """A copy of every running statistic (mean, var, ``num_batches_tracked``), to compare after an evaluation loop."""
    return {
        name: tuple(b.detach().clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None)
        for name, m in running_stat_norms(model)
    }


def changed_running_stats(model: nn.Module, snapshot: Mapping[str, tuple[Tensor, ...]]) -> list[str]:
    """Names of the modules whose running statistics differ from ``snapshot``: data leaked into them.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
        >>> before = running_stats_snapshot(net)
        >>> _ = net.train()(torch.randn(8, 4))
        >>> changed_running_stats(net, before)
        ['1']
    """
    changed = []
    for name, m in running_stat_norms(model):
        now = tuple(b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None)
        old = snapshot.get(name)
        if old is None or len(old) != len(now) or not all(torch.equal(a, b) for a, b in zip(old, now)):
            changed.append(name)
    return changed


def train_mode_message(names: Sequence[str], where: str) -> str:
    """One line for BatchNorm modules found in training mode ``where`` (e.g. ``"during validation"``)."""
    return (
        f"BatchNorm modules {_names(names)} are in training mode {where}: they normalize with the statistics of "
        "this batch instead of the running ones (and overwrite those). Call `model.eval()` before inference "
        "and do not call `.train()` inside evaluation code."
    )


def leak_message(names: Sequence[str], where: str) -> str:
    """One line for running statistics that changed ``where`` (e.g. ``"during validation"``)."""
    return (
        f"Running statistics of {_names(names)} changed {where}: evaluation data leaked into them, so later "
        "predictions depend on it. Keep BatchNorm in eval mode during evaluation (no `.train()` in eval steps)."
    )


class EvalModeGuard(HookSet):
    """Handle returned by :func:`guard`: forward pre-hooks on the BatchNorm-family modules of one model.

    Use it as a context manager or call :meth:`remove`. It warns once (category :class:`BatchNormWarning`).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._norms = running_stat_norms(model)
        self.warned = False
        self.attach()

    def _register(self) -> list[RemovableHandle]:
        return [m.register_forward_pre_hook(self._check) for _, m in self._norms]

    def _check(self, module: nn.Module, args: tuple) -> None:
        # eval mode (the common case) costs one attribute read
        if not module.training or torch.is_grad_enabled() or self.warned or _CALIBRATING.get():
            return
        self.warned = True
        where = "under torch.inference_mode()" if torch.is_inference_mode_enabled() else "under torch.no_grad()"
        names = [n for n, m in self._norms if m.training]
        warnings.warn(train_mode_message(names, where), BatchNormWarning, stacklevel=3)

    @property
    def active(self) -> bool:
        return self.attached

    def remove(self) -> None:
        """Remove every hook; the model runs exactly as before."""
        self.detach()


def guard(model: nn.Module) -> EvalModeGuard:
    """Warn when a BatchNorm of ``model`` in training mode runs without gradients — the forgotten ``model.eval()``.

    Hooks only the BatchNorm-family modules; in eval mode each hook returns after reading ``module.training``.

    Example::

        >>> import warnings
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        >>> with guard(net), warnings.catch_warnings(record=True) as caught, torch.no_grad():
        ...     warnings.simplefilter("always")
        ...     _ = net(torch.randn(8, 4))
        >>> caught[0].category.__name__
        'BatchNormWarning'
    """
    return EvalModeGuard(model)


@contextlib.contextmanager
def calibrating() -> Iterator[None]:
    """Mark a deliberate train-mode pass without gradients (BatchNorm recalibration): :func:`guard` stays quiet."""
    token = _CALIBRATING.set(True)
    try:
        yield
    finally:
        _CALIBRATING.reset(token)


# ---- tiny batches -----------------------------------------------------------------------------------------------


def values_per_channel(x: Tensor) -> int:
    """How many values a BatchNorm normalizes per channel for input ``x``: batch × spatial.

    Example::

        >>> values_per_channel(torch.zeros(2, 16)), values_per_channel(torch.zeros(2, 8, 4, 4))
        (2, 32)
    """
    if x.ndim < 2:
        return x.numel()
    return x.numel() // max(x.shape[1], 1)


class BatchSizeRecorder(HookSet):
    """Record, per BatchNorm, the largest number of values per channel it normalized in training mode.

    Attach it for a few training steps only; :attr:`values` maps module names to counts on this device.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        >>> with BatchSizeRecorder(net) as recorder:
        ...     _ = net(torch.randn(2, 4))
        >>> recorder.values, small_batch_norms(recorder.values)
        ({'1': 2}, ['1'])
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._norms = batch_norms(model)
        self.values: dict[str, int] = {}

    def _register(self) -> list[RemovableHandle]:
        return [m.register_forward_pre_hook(self._record(n)) for n, m in self._norms]

    def _record(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if module.training and args and isinstance(args[0], Tensor):
                self.values[name] = max(self.values.get(name, 0), values_per_channel(args[0]))

        return hook


def small_batch_norms(values: Mapping[str, int], min_values: int = DEFAULT_MIN_VALUES_PER_CHANNEL) -> list[str]:
    """Names of the BatchNorms that normalized fewer than ``min_values`` values per channel."""
    return [name for name, count in values.items() if count < min_values]


def small_batch_message(
    names: Sequence[str],
    values: Mapping[str, int],
    min_values: int = DEFAULT_MIN_VALUES_PER_CHANNEL,
    world_size: int = 1,
    synced: bool = False,
) -> str:
    """One line for BatchNorms with too few values per channel, naming the fixes (and SyncBatchNorm under DDP)."""
    smallest = min(values[n] for n in names)
    line = (
        f"BatchNorm modules {_names(names)} normalize only {smallest} value(s) per channel (batch x spatial) on this "
        f"device, fewer than {min_values}: their batch statistics are noisy. Use GroupNorm or LayerNorm"
    )
    with contextlib.suppress(ImportError):
        from lightning_bn.norms import convert_norms  # noqa: F401

        line += " (`lightning_bn.convert_norms`)"
    if world_size > 1 and not synced:
        line += (
            f", or SyncBatchNorm (`Trainer(sync_batchnorm=True)`) to normalize over the global batch of "
            f"{smallest * world_size} values per channel across {world_size} devices"
        )
    return line + ", or a larger batch."


# ---- uncalibrated running statistics ----------------------------------------------------------------------------


def uncalibrated_norms(model: nn.Module) -> list[str]:
    """Names of the BatchNorm-family modules whose running statistics were never estimated.

    A module is flagged when its running statistics are non-finite, or still exactly at their initial values
    (mean 0, var 1) — never tracked a batch, or tracked batches with ``momentum=0``. ``num_batches_tracked == 0``
    alone is not enough: checkpoints from before PyTorch 0.4.1 load calibrated statistics without that counter.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        >>> uncalibrated_norms(net)
        ['1']
        >>> _ = net(torch.randn(8, 4))
        >>> uncalibrated_norms(net)
        []
    """
    found = []
    for name, m in running_stat_norms(model):
        mean, var = m.running_mean, m.running_var
        if mean is None or var is None:
            continue
        nonfinite = not (torch.isfinite(mean).all() and torch.isfinite(var).all())
        initial = bool((mean == 0).all() and (var == 1).all())
        if nonfinite or initial:
            found.append(name)
    return found


def uncalibrated_message(names: Sequence[str], where: str) -> str:
    return (
        f"BatchNorm modules {_names(names)} have uncalibrated running statistics {where} (never estimated from "
        "data, or non-finite): evaluation normalizes with garbage. Train first, or refresh them with "
        "`lightning_bn.recalibrate(model, dataloader)` / `BatchNormRecalibration`."
    )


# ---- init mismatch ----------------------------------------------------------------------------------------------

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


@contextlib.contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Run code on ``model`` in training mode without a trace: buffers, module modes and RNG state are restored."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    modes = {m: m.training for m in model.modules()}
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), calibrating():
            model.train()
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])


def _fallback_activations(model: nn.Module) -> dict[str, Activation]:
    """Module-order heuristic: each Linear/Conv gets the first activation module after it, unless another weighted
    layer comes first (then identity, as for the last layer)."""
    out: dict[str, Activation] = {}
    pending: str | None = None
    for name, module in model.named_modules():
        if isinstance(module, _WEIGHTED):
            if pending is not None:
                out[pending] = get_activation(None)
            pending = name
            continue
        activation = activation_of_module(module)
        if activation is not None and pending is not None:
            out[pending] = activation
            pending = None
    if pending is not None:
        out[pending] = get_activation(None)
    return out


def _activations(model: nn.Module, example_input: Any) -> dict[str, Activation]:
    found = _fallback_activations(model)
    if example_input is None:
        return found
    try:
        with _untouched(model):
            traced = trace_activations(model, example_input)
    except Exception:  # the trace is best effort; the module-order heuristic still answers
        return found
    for name, trace in traced.items():
        if name in found and getattr(trace, "activation", None) is not None:
            found[name] = trace.activation
    return found


@dataclass
class _Seen:
    std: float
    nonfinite: int


def _first_forward(model: nn.Module, example_input: Any) -> list[tuple[str, bool, _Seen]]:
    """``(name, is_norm, output figures)`` of every weighted and norm layer, in the order they first ran."""
    seen: dict[str, tuple[bool, Tensor]] = {}

    def hook(name: str, is_norm: bool) -> Callable:
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            if name in seen or not isinstance(output, Tensor) or not output.is_floating_point():
                return
            x = output.detach().double()
            finite = torch.isfinite(x)
            std = x[finite].std() if finite.sum() > 1 else x.new_tensor(math.nan)
            seen[name] = (is_norm, torch.stack([std, (~finite).sum().double()]))

        return record

    handles = [
        m.register_forward_hook(hook(n, isinstance(m, _NORMS)))
        for n, m in model.named_modules()
        if isinstance(m, _WEIGHTED + _NORMS)
    ]
    try:
        with _untouched(model):
            args, kwargs = as_call(model, example_input)
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return [(name, is_norm, _Seen(float(f[0]), int(f[1]))) for name, (is_norm, f) in seen.items()]


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
       ``lightning_bn.init.trace_activations`` when available, else by module order; identity for the logits).
       All-zero weights (a deliberate zero init) are skipped.
    2. *consequence*, with ``example_input``: one forward pass in training mode (no gradients; buffers, modes and
       RNG restored) measures each weighted layer's output std. Any inf/NaN output is ``nonfinite`` (normalization
       after it cannot help); the last hidden layer's std over the first's outside ``[1/depth_ratio, depth_ratio]``
       is ``vanishing``/``exploding`` (a per-layer error of √2, as Xavier under ReLU, compounds over 30 layers).

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
    activations = _activations(model, example_input)
    seen = _first_forward(model, example_input) if example_input is not None else []
    output_std = {name: s.std for name, is_norm, s in seen if not is_norm}
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
    bad = [(name, s) for name, _, s in seen if s.nonfinite]
    if bad:
        name, s = bad[0]
        before = [n for n, is_norm, _ in seen[: [n for n, _, _ in seen].index(name)] if not is_norm]
        detail = f"first forward pass overflows: {s.nonfinite} inf/NaN values out of '{name}'"
        if before:
            detail += f" (output std of '{before[-1]}' just before: {output_std[before[-1]]:.3g})"
        findings.append(InitFinding(name, "nonfinite", float(s.nonfinite), detail))
    weighted = [(name, s.std) for name, is_norm, s in seen if not is_norm]
    hidden = [(name, std) for name, std in weighted[:-1] if math.isfinite(std) and std > 0]  # the last is the logits
    if len(hidden) >= 2 and not bad:
        (first, first_std), (last, last_std) = hidden[0], hidden[-1]
        ratio = last_std / first_std
        if not 1 / depth_ratio <= ratio <= depth_ratio:
            problem: Problem = "vanishing" if ratio < 1 else "exploding"
            detail = (
                f"output std falls from {first_std:.3g} to {last_std:.3g} over {len(hidden)} hidden layers"
                if ratio < 1
                else f"output std grows from {first_std:.3g} to {last_std:.3g} over {len(hidden)} hidden layers"
            )
            findings.append(InitFinding(f"{first} -> {last}", problem, ratio, detail))
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
    """One line per problem kind, naming every layer that has it and what to do."""
    out = {}
    for problem, advice in _ADVICE.items():
        group = [f for f in findings if f.problem == problem]
        if group:
            shown = "; ".join(f"'{f.name}': {f.detail}" for f in group[:4])
            more = f"; (+{len(group) - 4} more)" if len(group) > 4 else ""
            out[problem] = f"Init mismatch ({problem}): {shown}{more}. Fix: {advice}."
    return out
