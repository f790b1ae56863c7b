"""On-device summaries of a tensor: the functional core of the monitors (pure torch, no hooks, no Lightning).

A tensor is summarized into a small float64 *row* on its own device. Rows combine exactly — every field declares
whether it is summed, min-reduced or max-reduced — so rows from several calls, or several DDP ranks, give the
same figures as one pass over all the data. Nothing here calls ``.item()`` or moves data to the host; only
:func:`figures` works on host values, after the one transfer.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_bn.activations import Activation
from lightning_bn.fused import fused_row, saturation_counts

__all__ = [
    "FIELDS",
    "REDUCTIONS",
    "combine",
    "empty_row",
    "figures",
    "histogram",
    "histogram_record",
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
    "sum_cube",
    "sum_fourth",
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

    With an ``activation``, ``t`` is its output; saturation and dead units are judged from ``pre_activation`` (its
    input) or, for kinds whose derivative is a function of the output (ReLU, sigmoid, tanh, ...), from ``t`` itself.
    Non-finite elements are counted; when present they also show in mean, std, min and max (NaN/inf), on purpose.

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
    if pre_activation is None or activation.kind.output_derivative is not None:
        saturated, units, alive = saturation(t, activation, from_output=True)
    else:
        saturated, units, alive = saturation(pre_activation, activation)
    dead = units - alive.sum(dtype=torch.float64)
    return torch.cat([row, torch.stack([saturated, units, dead])])


def _float(t: Tensor) -> Tensor:
    x = t.detach()
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def value_stats(t: Tensor, zero_tol: float = DEFAULT_ZERO_TOL) -> Tensor:
    """The value fields (count .. nonfinite) of a row, as float64 on ``t``'s device (the eager fused pass)."""
    return fused_row(t, zero_tol)[0][: _INDEX["nonfinite"] + 1]


def saturation(
    t: Tensor, activation: Activation, unit_dim: int | None = None, *, from_output: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Saturated-element count, unit count, and a per-unit *alive* flag (float, 1 where any sample is unsaturated).

    ``t`` is the activation's input, or its output when ``from_output`` (only for monotone kinds, those with an
    ``output_derivative``). An element is saturated where it sits on an asymptote of the activation
    (:attr:`~lightning_bn.activations.Activation.asymptotes`); a unit is dead when no finite sample of the batch is
    unsaturated. Non-finite elements are neither saturated nor alive (``act_nonfinite`` counts them). The alive flags
    combine exactly across calls and processes by max, which is how :func:`reduce_across_processes` keeps ``dead``
    exact under DDP.

    Example::

        >>> from lightning_bn.activations import get_activation
        >>> x = torch.tensor([[-1.0, 2.0], [float("nan"), -3.0]])
        >>> saturated, units, alive = saturation(x, get_activation("relu"))
        >>> saturated.item(), units.item(), alive.tolist()
        (2.0, 2.0, [0.0, 1.0])
    """
    x = _float(t)
    x = x if x.ndim else x.reshape(1)
    low, high = activation.output_asymptotes() if from_output else activation.asymptotes
    return saturation_counts(x, low, high, unit_dim_of(x) if unit_dim is None else unit_dim)


def empty_row(device: torch.device | str = "cpu") -> Tensor:
    """The row of nothing: the identity of :func:`combine` (zero counts, min +inf, max -inf)."""
    column = torch.arange(len(FIELDS), device=device)
    # built with kernels only: item assignment of a Python float would be a synchronizing copy on CUDA
    return torch.where(column == _MIN, math.inf, torch.where(column == _INDEX["max"], -math.inf, 0.0)).double()


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


#: Histograms are taken over at most this many evenly strided elements of a tensor (a faithful picture, cheaply).
HISTOGRAM_SAMPLE = 4096


def histogram(t: Tensor, low: Tensor, high: Tensor, bins: int) -> Tensor:
    """Counts of the finite elements of ``t`` in ``bins`` equal bins over ``[low, high]``, on device, no sync.

    ``low``/``high`` are 0-d tensors (e.g. a row's min/max), so no value needs to reach the host. Large tensors are
    subsampled by a stride to :data:`HISTOGRAM_SAMPLE` elements.
    """
    x = _float(t).reshape(-1)
    if x.numel() > HISTOGRAM_SAMPLE:
        x = x[:: -(-x.numel() // HISTOGRAM_SAMPLE)]
    if x.device.type == "cpu":  # reading the bounds is no device sync here: one histc kernel (NaN/inf ignored)
        lo, hi = float(low), float(high)
        if math.isfinite(lo) and math.isfinite(hi) and hi > lo:
            return torch.histc(x, bins, lo, hi).double()
    return _bin_counts(x, low, high, bins)


def _bin_counts(x: Tensor, low: Tensor, high: Tensor, bins: int) -> Tensor:
    """:func:`histogram`'s kernels-only path (CUDA, degenerate or non-finite bounds): no value leaves the device."""
    low, high = low.to(x.dtype), high.to(x.dtype)
    scale = bins / (high - low).clamp_min(1e-12)
    valid = (x * 0).nan_to_num_(nan=-1.0).add_(1.0)  # 1 for finite elements, 0 for inf/NaN
    index = ((x - low) * scale).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).clamp_(0, bins - 1).long()
    if x.device.type == "cpu":
        return torch.bincount(index, weights=valid, minlength=bins).double()
    # CUDA bincount reads the max index on the host; index_add_ stays on the device
    return torch.zeros(bins, dtype=x.dtype, device=x.device).index_add_(0, index, valid).double()


def histogram_record(
    name: str, low: float, high: float, counts: list[float], num: float, total: float, sum_squares: float, **extra: Any
) -> dict[str, Any]:
    """A histogram as the writers take it (TensorBoard's ``HistogramProto`` fields): ``len(counts)`` equal buckets
    over ``[low, high]`` (counts from :func:`histogram`), with the figures of the whole tensor and any ``extra`` keys.

    Example::

        >>> histogram_record("fc1", 0.0, 1.0, [1.0, 3.0], num=4, total=2.5, sum_squares=2.0)["bucket_limits"]
        [0.5, 1.0]
    """
    bins = len(counts)
    return {
        "name": name,
        "min": low,
        "max": high,
        "num": num,
        "sum": total,
        "sum_squares": sum_squares,
        "bucket_limits": [low + (high - low) * (k + 1) / bins for k in range(bins)],
        "bucket_counts": counts,
        **extra,
    }


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
        "kurtosis": _kurtosis(r, finite),
        "min": r["min"],
        "max": r["max"],
        "zero": r["near_zero"] / r["count"] if r["count"] else math.nan,
        "nonfinite": r["nonfinite"],
    }
    if r["units"] > 0:
        out["saturation"] = r["saturated"] / finite if finite else math.nan
        out["dead"] = r["dead_units"] / r["units"]
    return out


def _kurtosis(r: dict[str, float], n: float) -> float:
    """Pearson's kurtosis E[(x-mu)^4] / var^2 from raw power sums (3 for a Gaussian; outlier features are far above)."""
    if n < 2 or not all(math.isfinite(r[k]) for k in ("sum", "sum_sq", "sum_cube", "sum_fourth")):
        return math.nan
    mu = r["sum"] / n
    m2 = r["sum_sq"] / n - mu * mu
    m4 = r["sum_fourth"] / n - 4 * mu * r["sum_cube"] / n + 6 * mu * mu * r["sum_sq"] / n - 3 * mu**4
    return m4 / (m2 * m2) if m2 > 0 else math.nan


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
    """Combine per-tensor norms into the norm of all of them together (the p-norm of the p-norms)."""
    if norms.numel() == 0:
        return norms.new_zeros(())
    return torch.linalg.vector_norm(norms, ord=norm_type)
