"""On-device summaries of a tensor: the functional core of the monitors (pure torch, no hooks, no Lightning).

A tensor is summarized into a small float64 *row* on its own device. Rows combine exactly — every field declares
whether it is summed, min-reduced or max-reduced — so rows from several calls, or several DDP ranks, give the
same figures as one pass over all the data. Nothing here calls ``.item()`` or moves data to the host; only
:func:`figures` works on host values, after the one transfer.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from lightning_bn.activations import Activation

__all__ = [
    "FIELDS",
    "REDUCTIONS",
    "combine",
    "figures",
    "histogram",
    "parameter_norms",
    "reduce_across_processes",
    "saturation",
    "summarize",
    "total_norm",
    "unit_dim_of",
]

#: The row layout. ``units`` / ``dead_units`` count features (or channels); ``saturated`` counts elements.
FIELDS: tuple[str, ...] = (
    "count",
    "sum",
    "sum_sq",
    "min",
    "max",
    "near_zero",
    "nonfinite",
    "saturated",
    "units",
    "dead_units",
)
#: How each field combines across calls and processes.
REDUCTIONS: dict[str, Literal["sum", "min", "max"]] = {f: "sum" for f in FIELDS} | {
    "min": "min",
    "max": "max",
    "units": "max",  # the same layer has the same units on every call and every rank
}
_INDEX = {name: i for i, name in enumerate(FIELDS)}
_MIN = _INDEX["min"]
_SUM_COLUMNS = [i for i, f in enumerate(FIELDS) if REDUCTIONS[f] == "sum"]
_MAX_COLUMNS = [i for i, f in enumerate(FIELDS) if REDUCTIONS[f] == "max"]

#: Absolute value below which an element counts as "near zero".
DEFAULT_ZERO_TOL = 1e-6


def unit_dim_of(t: Tensor) -> int:
    """The dimension that indexes units: features of ``(N, C)`` and ``(N, T, C)``, channels of ``(N, C, *spatial)``.

    Example::

        >>> unit_dim_of(torch.zeros(8, 16)), unit_dim_of(torch.zeros(8, 5, 16)), unit_dim_of(torch.zeros(8, 3, 4, 4))
        (1, 2, 1)
    """
    if t.ndim <= 1:
        return 0
    return t.ndim - 1 if t.ndim == 3 else 1


def summarize(
    t: Tensor,
    activation: Activation | None = None,
    *,
    pre_activation: Tensor | None = None,
    zero_tol: float = DEFAULT_ZERO_TOL,
) -> Tensor:
    """Summarize ``t`` into one row (see :data:`FIELDS`) on ``t``'s device.

    Mean, std, min and max are taken over the finite elements; ``nonfinite`` counts the others. With an
    ``activation``, saturation and dead units are judged on ``pre_activation`` (its input; defaults to
    recomputing nothing and using ``t`` as that input).

    Example::

        >>> from lightning_bn.activations import get_activation
        >>> x = torch.tensor([[-1.0, 2.0], [-3.0, 4.0]])
        >>> row = summarize(torch.relu(x), get_activation("relu"), pre_activation=x)
        >>> f = figures(row.tolist())
        >>> f["mean"], f["saturation"], f["dead"]
        (1.5, 0.5, 0.5)
    """
    row = value_stats(t, zero_tol)
    if activation is None:
        return torch.cat([row, row.new_zeros(3)])
    saturated, units, alive = saturation(t if pre_activation is None else pre_activation, activation)
    dead = units - alive.sum(dtype=torch.float64)
    return torch.cat([row, torch.stack([saturated, units, dead])])


def value_stats(t: Tensor, zero_tol: float = DEFAULT_ZERO_TOL) -> Tensor:
    """The first seven fields (count .. nonfinite) of a row, as float64 on ``t``'s device."""
    x = t.detach()
    finite = torch.isfinite(x)
    masked = x.masked_fill(~finite, 0).double()
    inf = torch.tensor(math.inf, dtype=x.dtype, device=x.device)
    count = torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)
    return torch.stack(
        [
            count,
            masked.sum(),
            masked.square().sum(),
            torch.where(finite, x, inf).amin().double() if x.numel() else inf.double(),
            torch.where(finite, x, -inf).amax().double() if x.numel() else -inf.double(),
            (masked.abs() <= zero_tol).logical_and(finite).sum(dtype=torch.float64),
            count - finite.sum(dtype=torch.float64),
        ]
    )


def saturation(
    pre_activation: Tensor, activation: Activation, unit_dim: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Saturated-element count, unit count, and a per-unit *alive* flag (float, 1 where any sample is unsaturated).

    A unit is dead when it is saturated for every sample of the batch. The alive flags combine exactly across
    calls and processes by max, which is how :func:`reduce_across_processes` keeps ``dead`` exact under DDP.
    """
    x = pre_activation.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    mask = activation.saturated(x)
    dim = unit_dim_of(x) if unit_dim is None else unit_dim
    units = x.shape[dim] if x.ndim else 1
    alive = (~mask).movedim(dim, 0).reshape(units, -1).any(dim=1) if x.ndim else (~mask).reshape(1)
    return (
        mask.sum(dtype=torch.float64),
        torch.tensor(float(units), dtype=torch.float64, device=x.device),
        alive.double(),
    )


def combine(a: Tensor, b: Tensor) -> Tensor:
    """Combine two rows (or two stacks of rows) field by field: sums add, min/max reduce."""
    out = a + b
    out[..., _MIN] = torch.minimum(a[..., _MIN], b[..., _MIN])
    out[..., _MAX_COLUMNS] = torch.maximum(a[..., _MAX_COLUMNS], b[..., _MAX_COLUMNS])
    return out


def reduce_across_processes(rows: Tensor, alive: Tensor, group: object | None = None) -> tuple[Tensor, Tensor]:
    """All-reduce a ``(M, len(FIELDS))`` stack of rows and the concatenated alive flags, in two collectives.

    One ``SUM`` for the summed fields; one ``MAX`` for the max-reduced fields, the negated min and the alive flags.
    A no-op when ``torch.distributed`` is not initialized.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return rows, alive
    dist = torch.distributed
    summed = rows[:, _SUM_COLUMNS].contiguous()
    dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
    maxed_columns = rows[:, _MAX_COLUMNS]
    maxed = torch.cat([maxed_columns.reshape(-1), -rows[:, _MIN], alive])
    dist.all_reduce(maxed, op=dist.ReduceOp.MAX, group=group)
    m, k = maxed_columns.shape
    out = rows.clone()
    out[:, _SUM_COLUMNS] = summed
    out[:, _MAX_COLUMNS] = maxed[: m * k].reshape(m, k)
    out[:, _MIN] = -maxed[m * k : m * k + m]
    return out, maxed[m * k + m :]


def histogram(t: Tensor, low: Tensor, high: Tensor, bins: int) -> Tensor:
    """Counts of the finite elements of ``t`` in ``bins`` equal bins over ``[low, high]``, on device, no sync.

    ``low``/``high`` are 0-d tensors (e.g. a row's min/max), so no value needs to reach the host.
    """
    x = t.detach().reshape(-1).double()
    width = (high - low).clamp_min(1e-12) / bins
    index = ((x - low) / width).floor().clamp(0, bins - 1)
    index = torch.where(torch.isfinite(index), index, torch.zeros_like(index)).long()
    weight = torch.isfinite(x).double()
    return torch.zeros(bins, dtype=torch.float64, device=x.device).index_add_(0, index, weight)


def figures(row: list[float] | tuple[float, ...]) -> dict[str, float]:
    """Turn one host-side row into named figures: mean, std (unbiased), min, max, zero/saturation/dead fractions.

    ``saturation`` and ``dead`` are present only for rows that carry an activation (``units > 0``).
    """
    r = dict(zip(FIELDS, row))
    finite = r["count"] - r["nonfinite"]
    mean = r["sum"] / finite if finite else math.nan
    var = (r["sum_sq"] - r["sum"] * mean) / (finite - 1) if finite > 1 else math.nan
    out = {
        "mean": mean,
        "std": math.sqrt(max(var, 0.0)) if not math.isnan(var) else math.nan,
        "min": r["min"],
        "max": r["max"],
        "zero": r["near_zero"] / r["count"] if r["count"] else math.nan,
        "nonfinite": r["nonfinite"],
    }
    if r["units"] > 0:
        out["saturation"] = r["saturated"] / r["count"] if r["count"] else math.nan
        out["dead"] = r["dead_units"] / r["units"]
    return out


def parameter_norms(tensors: list[Tensor], norm_type: float = 2.0) -> Tensor:
    """The ``norm_type``-norm of each tensor, stacked as float64 on their device in one fused call.

    Example::

        >>> parameter_norms([torch.ones(4), torch.zeros(2)]).tolist()
        [2.0, 0.0]
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    norms = torch._foreach_norm(
        [t.detach().float() if t.dtype not in (torch.float32, torch.float64) else t.detach() for t in tensors],
        norm_type,
    )
    return torch.stack(norms).double()


def total_norm(norms: Tensor, norm_type: float = 2.0) -> Tensor:
    """Combine per-tensor norms into the norm of all of them together."""
    if math.isinf(norm_type):
        return norms.amax() if norms.numel() else norms.new_zeros(())
    return norms.pow(norm_type).sum().pow(1.0 / norm_type)
