"""On-device summaries of a tensor: the functional core of the monitors (pure torch, no hooks, no Lightning).

A tensor is summarized into a small float64 *row* on its own device. Rows combine exactly — every field declares
whether it is summed, min- or max-reduced, or merged with the pairwise formulas of centred moments — so rows from
several calls, or several DDP ranks, give the same figures as one pass over all the data. On CUDA nothing here reads
a value on the host; :func:`figures` works on host values, after the one transfer.

One fused pass per watched tensor: every figure of a row (mean and centred moments to the fourth, min/max, near-zero,
non-finite, saturated count and per-unit liveness) from a single function, compiled where a compiler is available.

The same Python function runs either eagerly or through ``torch.compile(dynamic=True)`` (inductor: C++ on CPU, Triton
on GPU), so both paths compute the same figures (sums to float32 rounding, counts exactly). Compilation happens once
per process and rank of the tensor (dynamic shapes), shared by every module and activation kind: the activation enters
only through its asymptote bounds, which are tensors. :func:`backend` chooses: ``"auto"`` compiles for CUDA tensors
(Triton) and runs eagerly on CPU — measured on a 2-core CPU, inductor's C++ kernels save ~0.4 ms per watched tensor
per logging step but take ~20 s to build, which the quickstart's whole run (9 s) cannot repay; ``"compiled"`` /
``"eager"`` force a path, and ``LIGHTNING_BN_FUSED=compiled|eager`` overrides ``"auto"``. A failed compilation falls
back to eager (one warning). :data:`COMPILE_SECONDS` holds how long each compilation took.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_bn.activations import Activation
from lightning_bn.checks import user_stacklevel

__all__ = [
    "BACKENDS",
    "COMPILE_SECONDS",
    "Backend",
    "backend",
    "fused_row",
    "saturation_counts",
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
    "transmission_sum",
    "TRANSMISSION",
    "TRANSMISSION_SAMPLE",
    "unit_dim_of",
]

#: The row layout: ``count`` elements, their ``mean`` and centred moments ``m2..m4`` (``m_k = sum (x - mean)^k``,
#: float64, filled by the fused pass around the tensor's own mean, never via raw power sums), ``min`` / ``max``,
#: counts of near-zero and non-finite elements; for an activation, ``saturated`` elements, ``units`` / ``dead_units``
#: (features or channels) and ``transmission``, the sum of ``f'(x)^2`` over its finite elements.
FIELDS: tuple[str, ...] = (
    "count",
    "mean",
    "m2",
    "m3",
    "m4",
    "min",
    "max",
    "near_zero",
    "nonfinite",
    "saturated",
    "units",
    "dead_units",
    "transmission",
)
#: How each field combines across calls and processes (``moments``: Chan et al. 1979 / Pébay 2008, see
#: :func:`combine`).
REDUCTIONS: dict[str, Literal["sum", "min", "max", "moments"]] = {f: "sum" for f in FIELDS} | {
    "count": "moments",
    "mean": "moments",
    "m2": "moments",
    "m3": "moments",
    "m4": "moments",
    "min": "min",
    "max": "max",
    "units": "max",  # the same layer has the same units on every call and every rank
}
_INDEX = {name: i for i, name in enumerate(FIELDS)}
_MIN = _INDEX["min"]
_SUM_COLUMNS = [i for i, f in enumerate(FIELDS) if REDUCTIONS[f] == "sum"]
_MAX_COLUMNS = [i for i, f in enumerate(FIELDS) if REDUCTIONS[f] == "max"]
TRANSMISSION = _INDEX["transmission"]
#: elements per chunk of the higher sums: float32 dot products over at most this many, then added in float64
_CHUNK = 1 << 18
#: on CPU the centred values are left unscaled while ``max |x - mean|`` lies in this range (their fourth powers, summed
#: over up to 2^24 elements, stay far inside float32); outside it they are scaled by a power of two
_UNSCALED = (2.0**-20, 2.0**20)

#: where :func:`_saturation_eager` puts an infinite asymptote bound (no flat side): beyond any finite activation
_FAR = 1e30

#: Absolute value below which an element counts as "near zero".
DEFAULT_ZERO_TOL = 1e-6


def _compiler_stance() -> AbstractContextManager:
    """The default compiler stance for the fused pass while a monitor forces a compiled model eager (else no change)."""
    stance = getattr(torch.compiler, "set_stance", None)
    if not eager_stance_held or stance is None:
        return nullcontext()
    try:
        return stance("default")  # set now; leaving the block restores force_eager
    except RuntimeError:  # inside a compiled region (hooks run outside one): leave the stance
        return nullcontext()


Backend = Literal["auto", "compiled", "eager"]
BACKENDS: tuple[str, ...] = ("auto", "compiled", "eager")
#: ``{(rank, dtype, judged): seconds}`` of every compilation this process made.
COMPILE_SECONDS: dict[tuple, float] = {}
_ENV = "LIGHTNING_BN_FUSED"
_compiled: Callable | None = None
_compile_failed = False
#: set while a monitor runs a torch.compile'd model's logging step eagerly (``set_stance("force_eager")``, see
#: ``lightning_bn.monitoring.engine._run_eagerly``): the compiled fused pass lifts that stance for its own call
eager_stance_held = False


def _summary(
    y: Tensor, x: Tensor, low_bound: Tensor, high_bound: Tensor, zero_tol: float, unit_dim: int, judge: bool
) -> tuple[Tensor, Tensor]:
    """The row of ``y`` (values) with saturation judged on ``x`` (when ``judge``), and per-unit liveness.

    Values: sums around the tensor's own mean (float32 accumulation keeps full precision), shifted back in float64;
    inf/NaN in ``y`` show in the sums, min and max on purpose (``nonfinite`` counts them). Saturation: finite
    elements of ``x`` at or beyond an asymptote bound; liveness: any finite, unsaturated sample per unit.

    Written twice on purpose: the plain forms below are what inductor fuses into one kernel; eagerly every operation
    is a kernel launch and a dispatch (~5-10 us each on CPU), so :func:`_summary_eager` reaches the same figures
    with half as many operations and float passes only.
    """
    if not torch.compiler.is_compiling():
        return _summary_eager(y, x, low_bound, high_bound, zero_tol, unit_dim, judge)
    v = (y if y.dtype in (torch.float32, torch.float64) else y.float()).reshape(-1)
    n = v.numel()
    low, high = torch.aminmax(v)
    c = (v.sum(dtype=torch.float64) / n).to(v.dtype)
    scale = _scale(c, low, high)
    e = (v - c) / scale
    e2 = e * e
    sums = torch.stack([e.sum(dtype=torch.float64), e2.sum(dtype=torch.float64), (e2 * e).sum(dtype=torch.float64),
                        (e2 * e2).sum(dtype=torch.float64)])  # fmt: skip
    nonfinite = (n - torch.count_nonzero(torch.isfinite(v))).double()
    near = torch.count_nonzero(v.abs() <= zero_tol).double()
    count = torch.full((), float(n), dtype=torch.float64, device=v.device)
    raw = torch.cat([count.reshape(1), _moments(n, c, scale, sums, low, high),
                     torch.stack([low.double(), high.double(), near, nonfinite])])  # fmt: skip
    if not judge:
        zero = torch.zeros(4, dtype=torch.float64, device=v.device)
        return torch.cat([raw, zero]), torch.zeros(0, dtype=torch.float64, device=v.device)
    u = x if x.dtype in (torch.float32, torch.float64) else x.float()
    saturated, units, alive = saturation_counts(u, low_bound, high_bound, unit_dim)
    zero = torch.zeros((), dtype=torch.float64, device=v.device)
    extra = torch.stack([saturated, units, zero, zero])
    return torch.cat([raw, extra]), alive


def _scale(c: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """``max |x - c|`` from the min and max (1 where that is 0 or not finite): the centred values are divided by it
    before their powers are summed, so ``sum (x - c)^4`` cannot overflow float32 (``randn * 1e9`` reads finite)."""
    s = torch.maximum(high - c, c - low)
    return torch.where((s > 0) & torch.isfinite(s), s, torch.ones_like(s))


def _moments(n: int, c: Tensor, scale: Tensor, sums: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """``(mean, m2, m3, m4)`` in float64 from the sums of ``e^k``, ``e = (x - c) / scale``, k = 1..4, around a ``c``
    near the mean: the shift to the exact mean moves by ``a = sum e / n``, a fraction of the spread, so nothing
    cancels (the raw-sum formulas lost everything at ``|mean| / std`` above ~1e4). A constant tensor has m2 = 0."""
    s1, s2, s3, s4 = sums.unbind()
    a = s1 / n
    m2 = s2 - n * a * a
    m3 = s3 - 3 * a * s2 + 2 * n * a**3
    m4 = s4 - 4 * a * s3 + 6 * a * a * s2 - 3 * n * a**4
    k = scale.double()
    flat = (high == low) & torch.isfinite(low)
    moments = torch.stack([c.double() + k * a, m2.clamp_min(0) * k**2, m3 * k**3, m4.clamp_min(0) * k**4])
    return torch.where(flat, torch.stack([low.double(), *([torch.zeros_like(a)] * 3)]), moments)


def _moments_host(n: int, c: float, scale: float, sums: tuple[float, ...], low: float, high: float) -> list[float]:
    """:func:`_moments` on host floats (float64)."""
    if high == low and math.isfinite(low):
        return [low, 0.0, 0.0, 0.0]
    s1, s2, s3, s4 = sums
    a = s1 / n
    return [
        c + scale * a,
        max(s2 - n * a * a, 0.0) * scale**2,
        (s3 - 3 * a * s2 + 2 * n * a**3) * scale**3,
        max(s4 - 4 * a * s3 + 6 * a * a * s2 - 3 * n * a**4, 0.0) * scale**4,
    ]


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """``a . b`` in float64 from float32 dot products over chunks of :data:`_CHUNK` elements (one dot over 1e8
    elements biased a kurtosis by -0.9%)."""
    if a.numel() <= _CHUNK:
        return torch.dot(a, b).double()
    return torch.stack([torch.dot(x, y) for x, y in zip(a.split(_CHUNK), b.split(_CHUNK))]).double().sum()


def _count(t: Tensor) -> Tensor:
    """Sum of a 0/1 float tensor, exact: float32 holds every integer up to 2^24, so larger tensors sum in float64."""
    return t.sum() if t.numel() < 1 << 24 else t.sum(dtype=torch.float64)


def _summary_eager(
    y: Tensor, x: Tensor, low_bound: Tensor, high_bound: Tensor, zero_tol: float, unit_dim: int, judge: bool
) -> tuple[Tensor, Tensor]:
    """:func:`_summary` for eager execution: the same figures in about 25 operations, float passes only (a comparison
    that makes a bool tensor, then counting it, is several times slower on CPU than a float pass).

    On CPU, where reading a value is no device synchronization, the non-finite count is skipped when the sums are
    finite (it is then 0), and the bounds are used as Python numbers (clamping to tensors is ~7x slower there).
    """
    v = (y if y.dtype in (torch.float32, torch.float64) else y.float()).reshape(-1)
    if v.device.type == "cpu" and v.numel() < 1 << 24:
        found = _summary_cpu(v, x, low_bound, high_bound, zero_tol, unit_dim, judge)
        if found is not None:
            return found
    n = v.numel()
    on_cpu = v.device.type == "cpu"
    low, high = torch.aminmax(v)
    c = v.mean()
    scale = _scale(c, low, high)
    e = (v - c).div_(scale)
    e2 = e * e
    parts = [e.sum(dtype=torch.float64), e2.sum(dtype=torch.float64), _dot(e2, e), _dot(e2, e2)]
    del e, e2  # at most two tensor-sized temporaries alive at once
    parts += [low, high]
    # inf and NaN leave abs() as inf/NaN: nan_to_num_ makes both "large", so neither is near zero
    parts.append(_count(torch.nn.functional.threshold(v.abs().nan_to_num_(nan=math.inf), zero_tol, 0.0).sign_()))
    clean = on_cpu and math.isfinite(low.item()) and math.isfinite(high.item())  # min/max: inf, or NaN (any NaN)
    nonfinite = None if clean else _count((v * 0).nan_to_num_(nan=1.0))  # inf * 0 and NaN * 0 are NaN, the rest 0
    if nonfinite is not None:
        parts.append(nonfinite)
    if judge:
        u = x if x.dtype in (torch.float32, torch.float64) else x.float()
        same = u.shape == y.shape and u.data_ptr() == y.data_ptr() and u.dtype == v.dtype
        scalar = low_bound.numel() == 1 and high_bound.numel() == 1  # else per-unit bounds (PReLU), broadcast
        bounds = (low_bound.item(), high_bound.item()) if on_cpu and scalar else (low_bound, high_bound)
        finite = (n - nonfinite if nonfinite is not None else v.new_full((), float(n))) if same else None
        saturated, units, alive = _saturation_eager(u, *bounds, unit_dim, finite, assume_finite=clean and same)
        parts.append(saturated)
    scalars = torch.stack([p.double() for p in parts])  # float64: counts above 2^24 stay exact
    moments = _moments(n, c, scale, scalars[:4], low, high)
    zero = scalars.new_zeros(1)
    row = torch.cat(
        [
            scalars.new_full((1,), float(n)),
            moments,
            scalars[4:6],
            n - scalars[6:7],  # near zero: the elements not above the tolerance
            scalars[7:8] if nonfinite is not None else zero,
            scalars[-1:] if judge else zero,
            units.reshape(1) if judge else zero,
            zero,
            zero,
        ]
    )
    return row, (alive if judge else row.new_zeros(0))


def _summary_cpu(
    v: Tensor, x: Tensor, low_bound: Tensor, high_bound: Tensor, zero_tol: float, unit_dim: int, judge: bool
) -> tuple[Tensor, Tensor] | None:
    """:func:`_summary_eager` on CPU for finite data (``None`` otherwise: the caller takes the general path), in
    fewer, mostly read-only passes: reading a value is no device synchronization there, so the scalars are read once
    and the row is assembled on the host (a dozen 0-d tensor operations fewer), near-zero elements are counted with
    one ``hardshrink`` (``|v| <= tol`` becomes 0) and, for a bound that is infinite on one side (ReLU, GELU, ELU, ...),
    saturation and liveness come from one shifted copy and one per-unit ``amax`` (``amin``)."""
    n = v.numel()
    low, high = (t.item() for t in torch.aminmax(v))
    if not (math.isfinite(low) and math.isfinite(high)):  # an inf or NaN somewhere: the general path counts them
        return None
    c = v.mean()
    mean = c.item()
    spread = max(high - mean, mean - low)
    scale = 1.0  # a power of two (exact) only where fourth powers could overflow or underflow float32
    if spread > 0 and math.isfinite(spread) and not _UNSCALED[0] < spread < _UNSCALED[1]:
        scale = 2.0 ** round(math.log2(spread))
    e = v - c
    if scale != 1.0:
        e.mul_(1.0 / scale)
    e2 = e * e
    s1, s2, s3, s4 = torch.stack([e.sum(), e2.sum(), _dot(e2, e), _dot(e2, e2)]).tolist()
    del e, e2
    row = [float(n), *_moments_host(n, mean, scale, (s1, s2, s3, s4), low, high), low, high]
    beyond = torch.nn.functional.hardshrink(v, zero_tol).sign_()  # +-1 where |v| > tol, else 0 (count_nonzero is slow)
    row.append(n - torch.dot(beyond, beyond).item())  # exact: integers below 2^24 in float32
    row.append(0.0)  # nonfinite
    if not judge:
        return torch.tensor([*row, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64), v.new_zeros(0, dtype=torch.float64)
    u = x if x.dtype in (torch.float32, torch.float64) else x.float()
    if low_bound.numel() != 1 or high_bound.numel() != 1:
        return None  # per-unit bounds (PReLU): the general path broadcasts them
    lo, hi = float(low_bound), float(high_bound)
    one_sided = (hi == math.inf) != (lo == -math.inf)
    same = u.data_ptr() == v.data_ptr() and u.numel() == n and u.dtype == v.dtype  # judged on the values: finite
    if not one_sided or not (same or math.isfinite(u.sum().item())):
        return None  # two finite bounds, or a judged tensor with inf/NaN (or too large to sum): the general path
    w = u.reshape(1) if u.ndim == 0 else u
    units = w.shape[unit_dim]
    dims = [i for i in range(w.ndim) if i != unit_dim % w.ndim]
    # finite w is unsaturated exactly when it is beyond the finite bound: w - lo > 0 (or hi - w > 0), exact in floats
    if hi == math.inf:
        gap = w - lo if lo != 0 else w
        extreme = w.amax(dim=dims) if dims else w
        alive = extreme > lo
    else:
        gap = hi - w
        extreme = w.amin(dim=dims) if dims else w
        alive = extreme < hi
    unsaturated = torch.nn.functional.threshold(gap, 0.0, 0.0).sign_().sum().item()
    row += [float(w.numel() - unsaturated), float(units), 0.0, 0.0]
    return torch.tensor(row, dtype=torch.float64), alive.reshape(units).double()


def _saturation_eager(
    u: Tensor,
    low: Tensor | float,
    high: Tensor | float,
    unit_dim: int,
    finite: Tensor | None = None,
    assume_finite: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`saturation_counts` in float passes: an element's distance to the nearer bound, after clamping into the
    bounds, is > 0 exactly when it is finite and unsaturated (inf and NaN come out NaN or 0, then 0). An infinite
    bound (no asymptote on that side: leaky ReLU, PReLU, a kind by behaviour) stands at ±1e30, so a finite element's
    distance to it is finite (it read +inf, then 0: every element saturated). ``finite``: the finite-element count
    when the caller has it; ``assume_finite``: the caller knows there is no inf/NaN."""
    low = low.clamp_min(-_FAR) if isinstance(low, Tensor) else max(low, -_FAR)
    high = high.clamp_max(_FAR) if isinstance(high, Tensor) else min(high, _FAR)
    units = u.shape[unit_dim] if u.ndim else 1
    w = u.reshape(1) if u.ndim == 0 else u
    inside = torch.clamp(w, low, high)
    gap = inside - low
    torch.minimum(gap, inside.neg_().add_(high), out=gap)
    if not assume_finite:
        gap.nan_to_num_(nan=0.0, posinf=0.0)
    dims = [i for i in range(w.ndim) if i != unit_dim % w.ndim]
    alive = (gap.amax(dim=dims) if dims else gap).reshape(units).sign().double()
    alive_elements = _count(gap.sign_())
    if finite is None:
        finite = w.numel() - _count((w * 0).nan_to_num_(nan=1.0))
    saturated = (finite - alive_elements).double()
    return saturated, torch.full((), float(units), dtype=torch.float64, device=u.device), alive


def saturation_counts(
    u: Tensor, low: Tensor | float, high: Tensor | float, unit_dim: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Saturated-element count, unit count and per-unit alive flags (float64) of ``u`` against asymptote bounds:
    the one saturation rule of the library. Non-finite elements are neither saturated nor alive.

    Example::

        >>> saturated, units, alive = saturation_counts(torch.tensor([[-1.0, 2.0], [0.5, -3.0]]), 0.0, float("inf"), 1)
        >>> saturated.item(), units.item(), alive.tolist()
        (2.0, 2.0, [1.0, 1.0])
    """
    if not torch.compiler.is_compiling():
        return _saturation_eager(u, low, high, unit_dim)
    finite = torch.isfinite(u)
    saturated = finite & ((u <= low) | (u >= high))
    units = u.shape[unit_dim]
    alive = (finite & ~saturated).movedim(unit_dim, -1).reshape(-1, units).any(0).double()
    count = torch.count_nonzero(saturated).double()
    return count, torch.full((), float(units), dtype=torch.float64, device=u.device), alive


def backend(choice: Backend = "auto", device_type: str | None = None) -> Backend:
    """The path a monitor takes: ``choice``, with ``"auto"`` resolved for ``device_type`` when given (CUDA:
    compiled, else eager; env ``LIGHTNING_BN_FUSED`` overrides auto). Without a device, ``"auto"`` stays ``"auto"``
    and :func:`fused_row` resolves it per tensor.

    Raises:
        ValueError: for a choice that is not one of :data:`BACKENDS`, naming it.
    """
    if choice not in BACKENDS:
        raise ValueError(f"Expected `fused` to be one of {list(BACKENDS)} but got {choice!r}")
    if choice != "auto":
        return choice
    forced = os.environ.get(_ENV, "").lower()
    if forced and forced not in ("compiled", "eager"):
        raise ValueError(f"Expected ${_ENV} to be 'compiled' or 'eager' but got {forced!r}")
    if forced:
        choice = forced
    elif device_type is None:
        return "auto"
    else:
        choice = "compiled" if device_type == "cuda" else "eager"
    if choice == "compiled" and (_compile_failed or not hasattr(torch, "compile")):
        return "eager"
    return choice  # type: ignore[return-value]


def fused_row(
    y: Tensor,
    zero_tol: float,
    *,
    x: Tensor | None = None,
    bounds: tuple[Tensor, Tensor] | None = None,
    unit_dim: int | None = None,
    path: Backend = "eager",
) -> tuple[Tensor, Tensor]:
    """One row (see :data:`FIELDS`) and the per-unit alive flags of a watched tensor, in one pass.

    Args:
        y: the values summarized.
        zero_tol: ``|y|`` at or below this is near zero.
        x: where saturation is judged (the activation's input, or its output for monotone kinds); ``None``: no
            saturation (a layer's output).
        bounds: ``(low, high)`` asymptote bounds as 0-d tensors on ``x``'s device (input or output bounds), or
            per-unit bounds broadcasting against ``x`` (PReLU's learned slopes; ``-inf`` / ``inf`` where a unit has
            no flat side).
        unit_dim: the dimension of ``x`` indexing units.
        path: ``"compiled"``, ``"eager"`` or ``"auto"`` (by ``y``'s device, see :func:`backend`); a failed
            compilation falls back to eager for the rest of the process, with one warning.

    Example::

        >>> y = torch.tensor([[-1.0, 2.0], [3.0, -4.0]])
        >>> row, alive = fused_row(y, 1e-6, x=y, bounds=(torch.tensor(0.0), torch.tensor(float("inf"))), unit_dim=1)
        >>> row.tolist()[:2], row.tolist()[9:11], alive.tolist()
        ([4.0, 0.0], [2.0, 2.0], [1.0, 1.0])
    """
    global _compiled, _compile_failed
    judge = x is not None and bounds is not None and y.numel() > 0
    if y.numel() == 0:  # the row of nothing: zero counts, min +inf, max -inf (empty_row)
        return empty_row(y.device), torch.zeros(0, dtype=torch.float64, device=y.device)
    if x is None or not judge:
        x, low, high, unit_dim = y, y.new_zeros((), dtype=torch.float32), y.new_zeros((), dtype=torch.float32), 0
    else:
        low, high = bounds
        unit_dim = 0 if unit_dim is None else unit_dim % max(x.ndim, 1)
        if x.ndim == 0:
            x = x.reshape(1)
    args = (y.detach(), x.detach(), low, high, float(zero_tol), int(unit_dim), judge)
    if path == "auto":
        path = backend("auto", y.device.type)
    if path == "compiled" and not _compile_failed:
        if _compiled is None:
            _compiled = torch.compile(_summary, dynamic=True)
        key = (x.ndim, y.ndim, str(y.dtype), judge, y.device.type)
        try:
            started = time.perf_counter()
            with _compiler_stance():
                out = _compiled(*args)
            if key not in COMPILE_SECONDS:
                COMPILE_SECONDS[key] = time.perf_counter() - started
            return out
        except Exception as err:  # no working compiler here: the eager path gives the same figures
            _compile_failed = True
            warnings.warn(
                f"lightning-bn: compiling the fused summary failed ({type(err).__name__}: {err}); using the eager "
                "path (same figures, slower). Set LIGHTNING_BN_FUSED=eager to skip the attempt.",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
    return _summary(*args)

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
        return torch.cat([row, row.new_zeros(4)])
    if pre_activation is None or activation.kind.output_derivative is not None:
        saturated, units, alive = saturation(t, activation, from_output=True)
    else:
        saturated, units, alive = saturation(pre_activation, activation)
    dead = units - alive.sum(dtype=torch.float64)
    return torch.cat([row, torch.stack([saturated, units, dead, transmission_sum(t, activation, pre_activation)])])


#: the slope of a smooth kind is evaluated on an evenly strided sample of at most this many elements of a tensor
TRANSMISSION_SAMPLE = 1 << 14


def transmission_sum(
    y: Tensor, activation: Activation, x: Tensor | None = None, unsaturated: Tensor | None = None
) -> Tensor:
    """``sum f'(x)^2 / E[f'(z)^2]`` over the finite elements, float64 on the device: divided by the count, the layer's
    gradient transmission ``act_transmission`` (1 for a healthy unit-variance layer of any kind; the local part of
    mean-field chi_1). ``y`` is the activation's output, ``x`` its input; monotone kinds take ``f'`` from ``y``.

    Where ``f'^2`` is the indicator of the unsaturated region (ReLU, ReLU6, hardtanh) the sum is the count of
    unsaturated elements (``unsaturated``, when the caller has it: no pass over the tensor). Otherwise ``f'`` is
    evaluated on an evenly strided sample of at most :data:`TRANSMISSION_SAMPLE` elements and the sum scaled to the
    whole tensor (the mean of a bounded quantity: a 16 384-element sample is within ~1% of it).

    Example::

        >>> from lightning_bn.activations import get_activation
        >>> x = torch.tensor([-1.0, 2.0, 3.0, -4.0])
        >>> round(transmission_sum(torch.relu(x), get_activation("relu"), x).item() / 4, 2)  # half the units pass
        1.0
    """
    if unsaturated is not None and activation.slope_is_indicator:
        return unsaturated.double() / activation.gradient_power
    use_output = activation.kind.output_derivative is not None
    source = y if use_output else x
    if source is None:
        return torch.full((), math.nan, dtype=torch.float64, device=y.device)
    flat = _float(source).reshape(-1)
    n = flat.numel()
    if n > TRANSMISSION_SAMPLE:
        flat = flat[:: -(-n // TRANSMISSION_SAMPLE)]
    slope = activation.derivative_from_output(flat) if use_output else activation.derivative(flat)
    slope = _float(slope)
    total = _dot(slope, slope)
    if flat.device.type != "cpu" or not math.isfinite(total.item()):  # CPU: reading it is no sync; inf/NaN: drop them
        slope = torch.nan_to_num(slope, nan=0.0, posinf=0.0, neginf=0.0)
        total = _dot(slope, slope)
    return total * (n / flat.numel()) / activation.gradient_power


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
    """Combine two rows (or two stacks of rows) field by field: counts and sums add, min/max reduce, and the centred
    moments merge exactly (Chan et al. 1979; Pébay 2008): with ``d = mean_b - mean_a`` and ``n = n_a + n_b``,
    ``mean = mean_a + d n_b / n``, ``m2 = m2_a + m2_b + d^2 n_a n_b / n``, and likewise ``m3``, ``m4``.

    Example::

        >>> x = torch.randn(1000, dtype=torch.float64) + 1e4
        >>> both = combine(summarize(x[:300]), summarize(x[300:]))
        >>> m2 = ((x - x.mean()) ** 2).sum().item()
        >>> abs(both[1].item() - x.mean().item()) < 1e-9, abs(both[2].item() / m2 - 1) < 1e-9
        (True, True)
    """
    out = a + b
    out[..., _MIN] = torch.minimum(a[..., _MIN], b[..., _MIN])
    out[..., _MAX_COLUMNS] = torch.maximum(a[..., _MAX_COLUMNS], b[..., _MAX_COLUMNS])
    out[..., 1:5] = _merge_moments(a[..., :5], b[..., :5])[..., 1:]
    return out


def _merge_moments(a: Tensor, b: Tensor) -> Tensor:
    """Pébay's pairwise update of ``(n, mean, m2, m3, m4)`` (stacks along the last dimension); an empty side (n = 0)
    leaves the other as it is."""
    na, ma, a2, a3, a4 = a.unbind(-1)
    nb, mb, b2, b3, b4 = b.unbind(-1)
    n = na + nb
    safe = torch.where(n > 0, n, torch.ones_like(n))
    d = torch.where((na > 0) & (nb > 0), mb - ma, torch.zeros_like(ma))  # inf - inf of two empty means: not NaN
    mean = torch.where(na > 0, ma, mb) + torch.where(na > 0, d * nb / safe, torch.zeros_like(d))
    m2 = a2 + b2 + d * d * na * nb / safe
    m3 = a3 + b3 + d**3 * na * nb * (na - nb) / safe**2 + 3 * d * (na * b2 - nb * a2) / safe
    m4 = (a4 + b4 + d**4 * na * nb * (na * na - na * nb + nb * nb) / safe**3
          + 6 * d * d * (na * na * b2 + nb * nb * a2) / safe**2 + 4 * d * (na * b3 - nb * a3) / safe)  # fmt: skip
    return torch.stack([n, mean, m2, m3, m4], dim=-1)


def reduce_across_processes(rows: Tensor, alive: Tensor, group: object | None = None) -> tuple[Tensor, Tensor]:
    """Combine a ``(M, len(FIELDS))`` stack of rows and the concatenated alive flags over the processes, in two
    collectives: one all-gather of the rows, folded in rank order with :func:`combine` identically on every rank
    (the centred moments merge pairwise, so they cannot be summed), and one ``MAX`` of the alive flags.
    A no-op when ``torch.distributed`` is not initialized.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return rows, alive
    dist = torch.distributed
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(rows) for _ in range(world)]
    dist.all_gather(gathered, rows.contiguous(), group=group)
    out = gathered[0]
    for other in gathered[1:]:
        out = combine(out, other)
    alive = alive.clone()
    if alive.numel():
        dist.all_reduce(alive, op=dist.ReduceOp.MAX, group=group)
    return out, alive


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
    """Turn one host-side row into named figures: mean, std, kurtosis, min, max, zero/saturation/dead fractions, and
    for an activation its gradient transmission sum.

    ``std`` is the sample standard deviation ``sqrt(m2 / (n - 1))`` (as ``torch.std``); ``kurtosis`` is Pearson's
    ``n m4 / m2^2`` (3 for a Gaussian, >= 1 always). Both are NaN where the tensor holds inf/NaN (``nonfinite``
    counts them) or has fewer than 2 elements; kurtosis also where ``m2 = 0`` (a constant). ``saturation`` and
    ``dead`` are present only for rows that carry an activation (``units > 0``), with ``transmission``, the mean of
    ``f'(x)^2`` relative to a healthy N(0, 1) input (:func:`transmission_sum`), and ``samples``, the observations
    per unit (``count / units``: batch x positions x calls) that ``dead`` is judged over.
    """
    r = dict(zip(FIELDS, row))
    n, nonfinite = r["count"], r["nonfinite"]
    clean = n > 0 and nonfinite == 0
    mean = r["mean"] if clean else math.nan
    var = r["m2"] / (n - 1) if clean and n > 1 else math.nan
    out = {
        "mean": mean,
        "std": math.sqrt(max(var, 0.0)) if not math.isnan(var) else math.nan,
        "kurtosis": n * r["m4"] / (r["m2"] * r["m2"]) if clean and n > 1 and r["m2"] > 0 else math.nan,
        "min": r["min"],
        "max": r["max"],
        "zero": r["near_zero"] / n if n else math.nan,
        "nonfinite": nonfinite,
    }
    if r["units"] > 0:
        finite = n - nonfinite
        out["saturation"] = r["saturated"] / finite if finite else math.nan
        out["dead"] = r["dead_units"] / r["units"]
        out["transmission"] = r["transmission"] / finite if finite else math.nan
        out["samples"] = n / r["units"]  # observations per unit (batch x positions): what `dead` is judged over
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
    """Combine per-tensor norms into the norm of all of them together (the p-norm of the p-norms)."""
    if norms.numel() == 0:
        return norms.new_zeros(())
    return torch.linalg.vector_norm(norms, ord=norm_type)
