"""Did an init reach the weight forward uses? The check ``prepare()`` runs on its own outcome.

:func:`weight_samples` takes a fingerprint of a layer's effective weights (what forward uses, as
:class:`lightning_bn.layers.WeightSpec` computes them: a weight norm's ``g·v/‖v‖``, a standardized convolution's
weight) before the init; :func:`check_weights` compares them afterwards: did they change, and does their std match the
one the scheme draws (:func:`drawn_stds`, the same rules as :func:`~lightning_bn.init.init_layer_`)?
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_bn.init.sharded import unsharded_params
from lightning_bn.layers import WeightSpec, get_layer_kind, scheme_std

__all__ = ["WeightCheck", "check_weights", "drawn_stds", "weight_samples"]

_SAMPLES = 4096


@dataclass
class WeightCheck:
    """What an init did to a layer's effective weights.

    Attributes:
        changed: some weight forward uses differs from before the init.
        std: RMS of the first effective weight checked, over its chunks checked (about 0: the std of a zero-mean
            draw).
        target: the std the scheme draws for it (its first chunk's).
        missed: why the weights do not have the scheme's std, or did not change; ``None`` if they do.
    """

    changed: bool
    std: float
    target: float
    missed: str | None = None


def _drawn(module: nn.Module) -> list[WeightSpec]:
    kind = get_layer_kind(module)
    return [] if kind is None else [s for s in kind.weights(module) if s.fixed is None]


def weight_samples(module: nn.Module) -> list[Tensor]:
    """Up to 4096 evenly spaced values of each effective weight an init draws (copies): a fingerprint to compare.

    Gathers sharded parameters (a collective: every rank, same module)."""
    with torch.no_grad(), unsharded_params(module):
        found = []
        for spec in _drawn(module):
            flat = spec.effective_weight(module).detach().reshape(-1)
            found.append(flat[:: max(1, flat.numel() // _SAMPLES)].float().clone())
        return found


def drawn_stds(module: nn.Module, scheme: str, gain: float, mode: str = "fan_in") -> list[list[float]]:
    """The std :func:`~lightning_bn.init.init_layer_` draws for each chunk of each weight it draws (the matrices it
    draws one by one: a packed q, k, v; an RNN's gates, the recurrent ones orthogonal with gain 1)."""
    kind = get_layer_kind(module)
    if kind is None:
        return []
    if kind.recurrent:
        stds = []
        for spec in _drawn(module):
            weight = spec.tensor(module)
            hidden = getattr(module, "hidden_size", weight.shape[0])
            gates = 1 if spec.name.startswith("weight_hr") else max(1, weight.shape[0] // hidden)
            rows, cols = weight.shape[0] // gates, weight.shape[1]
            if spec.name.startswith("weight_hh"):
                stds.append([1.0 / math.sqrt(max(rows, cols))] * gates)
            else:
                stds.append([scheme_std(scheme, float(cols), float(rows), gain, mode)] * gates)
        return stds
    return [[scheme_std(scheme, s.fan_in, s.fan_out, gain, mode)] * s.chunks for s in _drawn(module)]


def check_weights(
    module: nn.Module,
    before: list[Tensor],
    scheme: str,
    gain: float,
    mode: str = "fan_in",
    *,
    tolerance: float = 1.2,
    kept_chunks: Mapping[str, Collection[int]] | None = None,
    scaled: bool = False,
) -> WeightCheck:
    """Compare a layer's effective weights after an init with their :func:`weight_samples` from before it.

    Each drawn chunk's RMS must be within ``tolerance``x of what the scheme draws (widened for small chunks by five
    times the spread of a sample std, ``1 + 5/√(2n)``), unless ``scaled`` (a data-driven rescale set the scale
    afterwards: only the change is checked). ``kept_chunks``: spec name -> chunks whose scale was kept on purpose
    (``nn.MultiheadAttention``'s query and key blocks).

    Example::

        >>> from torch.nn.utils.parametrizations import weight_norm
        >>> from lightning_bn.init import init_layer_
        >>> layer = weight_norm(nn.Linear(256, 256))
        >>> before = weight_samples(layer)
        >>> gain = init_layer_(layer, "kaiming")
        >>> check = check_weights(layer, before, "kaiming", gain)
        >>> check.changed, check.missed, round(check.std / check.target, 1)
        (True, None, 1.0)
    """
    kept_chunks = kept_chunks or {}
    specs = _drawn(module)
    if not specs:
        return WeightCheck(False, math.nan, math.nan, "no weight whose scale an init can set")
    after = weight_samples(module)
    changed = len(after) != len(before) or any(not torch.equal(a, b) for a, b in zip(after, before))
    targets = drawn_stds(module, scheme, gain, mode)
    found: list[tuple[str, float, float, int]] = []
    with torch.no_grad(), unsharded_params(module):
        for spec, chunk_targets in zip(specs, targets):
            weight = spec.effective_weight(module).detach().float()
            matrix = weight.T if spec.transposed else weight
            for index, (chunk, target) in enumerate(zip(matrix.chunk(len(chunk_targets), dim=0), chunk_targets)):
                if index in kept_chunks.get(spec.name, ()) or chunk.numel() == 0:
                    continue
                found.append((spec.name, chunk.pow(2).mean().sqrt().item(), target, chunk.numel()))
    if not found:
        return WeightCheck(changed, math.nan, math.nan, None if changed else "the effective weight did not change")
    first = [(got, want, count) for name, got, want, count in found if name == found[0][0]]
    std = math.sqrt(sum(got**2 * count for got, _, count in first) / sum(count for _, _, count in first))
    target = first[0][1]
    if not changed:
        return WeightCheck(False, std, target, "the weight forward uses did not change: the draw did not reach it")
    if scaled:
        return WeightCheck(True, std, target)
    for name, got, want, count in found:
        allowed = max(tolerance, 1.0 + 5.0 / math.sqrt(2.0 * count))
        if not (math.isfinite(got) and want > 0 and 1.0 / allowed <= got / want <= allowed):
            where = f" ({name})" if len(specs) > 1 or name != "weight" else ""
            return WeightCheck(True, std, target, f"effective weight std {got:.3g}{where}, the scheme draws {want:.3g}")
    return WeightCheck(True, std, target)
