"""One fused pass per watched tensor: every figure of a row (power sums up to the fourth, min/max, near-zero,
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
from typing import Literal

import torch
from torch import Tensor

__all__ = ["BACKENDS", "COMPILE_SECONDS", "Backend", "backend", "fused_row", "saturation_counts"]

Backend = Literal["auto", "compiled", "eager"]
BACKENDS: tuple[str, ...] = ("auto", "compiled", "eager")
#: ``{(rank, dtype, judged): seconds}`` of every compilation this process made.
COMPILE_SECONDS: dict[tuple, float] = {}
_ENV = "LIGHTNING_BN_FUSED"
_compiled: Callable | None = None
_compile_failed = False


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
    c = v.sum() / n
    d = v - c
    d2 = d * d
    s1, s2 = d.sum().double(), d2.sum().double()
    s3, s4 = torch.dot(d2, d).double(), torch.dot(d2, d2).double()
    c = c.double()
    low, high = torch.aminmax(v)
    nonfinite = (n - torch.count_nonzero(torch.isfinite(v))).double()
    near = torch.count_nonzero(v.abs() <= zero_tol).double()
    count = torch.full((), float(n), dtype=torch.float64, device=v.device)
    raw = torch.stack(
        [
            count,
            s1 + n * c,
            s2 + 2 * c * s1 + n * c * c,
            s3 + 3 * c * s2 + 3 * c * c * s1 + n * c**3,
            s4 + 4 * c * s3 + 6 * c * c * s2 + 4 * c**3 * s1 + n * c**4,
            low.double(),
            high.double(),
            near,
            nonfinite,
        ]
    )
    if not judge:
        zero = torch.zeros(3, dtype=torch.float64, device=v.device)
        return torch.cat([raw, zero]), torch.zeros(0, dtype=torch.float64, device=v.device)
    u = x if x.dtype in (torch.float32, torch.float64) else x.float()
    saturated, units, alive = saturation_counts(u, low_bound, high_bound, unit_dim)
    extra = torch.stack([saturated, units, torch.zeros((), dtype=torch.float64, device=v.device)])
    return torch.cat([raw, extra]), alive


#: ``_SHIFT[device]``: binomial coefficients and exponents that move power sums around ``c`` back to raw ones
_SHIFT: dict[torch.device, tuple[Tensor, Tensor]] = {}


def _shift_back(c: Tensor, centered: Tensor, n: int) -> Tensor:
    """Raw power sums 1..4 from sums of ``(v - c)^j``, j = 1..4, in four small operations:
    ``sum v^k = n c^k + sum_j C(k, j) c^(k-j) sum (v - c)^j``."""
    table = _SHIFT.get(c.device)
    if table is None:
        binom = torch.tensor(
            [[math.comb(k, j) if j <= k else 0 for j in range(1, 5)] for k in range(1, 5)], dtype=torch.float64
        )
        exps = torch.tensor([[max(k - j, 0) for j in range(1, 5)] for k in range(1, 5)] + [[1, 2, 3, 4]])
        table = _SHIFT[c.device] = (binom.to(c.device), exps.to(c.device))
    binom, exps = table
    powers = c.pow(exps)  # (5, 4): c^(k-j) per entry, and c^1..c^4 in the last row
    return torch.addmv(powers[4] * n, binom * powers[:4], centered)


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
    n = v.numel()
    on_cpu = v.device.type == "cpu"
    c = v.mean()
    d = v - c
    d2 = d * d
    parts = [d.sum(), d2.sum(), torch.dot(d2, d), torch.dot(d2, d2)]
    del d, d2  # at most two tensor-sized temporaries alive at once
    parts += torch.aminmax(v)
    # inf and NaN leave abs() as inf/NaN: nan_to_num_ makes both "large", so neither is near zero
    parts.append(_count(torch.nn.functional.threshold(v.abs().nan_to_num_(nan=math.inf), zero_tol, 0.0).sign_()))
    clean = on_cpu and math.isfinite(parts[1].item())  # any inf/NaN makes the centred square sum inf/NaN
    nonfinite = None if clean else _count((v * 0).nan_to_num_(nan=1.0))  # inf * 0 and NaN * 0 are NaN, the rest 0
    if nonfinite is not None:
        parts.append(nonfinite)
    if judge:
        u = x if x.dtype in (torch.float32, torch.float64) else x.float()
        same = u.shape == y.shape and u.data_ptr() == y.data_ptr() and u.dtype == v.dtype
        bounds = (low_bound.item(), high_bound.item()) if on_cpu else (low_bound, high_bound)
        finite = (n - nonfinite if nonfinite is not None else v.new_full((), float(n))) if same else None
        saturated, units, alive = _saturation_eager(u, *bounds, unit_dim, finite, assume_finite=clean and same)
        parts.append(saturated)
    scalars = torch.stack([p.to(v.dtype) for p in parts]).double()
    moments = _shift_back(c.double(), scalars[:4], n)
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
        ]
    )
    return row, (alive if judge else row.new_zeros(0))


def _saturation_eager(
    u: Tensor,
    low: Tensor | float,
    high: Tensor | float,
    unit_dim: int,
    finite: Tensor | None = None,
    assume_finite: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`saturation_counts` in float passes: an element's distance to the nearer bound, after clamping into the
    bounds, is > 0 exactly when it is finite and unsaturated (inf and NaN come out NaN, then 0). ``finite``: the
    finite-element count when the caller has it; ``assume_finite``: the caller knows there is no inf/NaN."""
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
    """One row (see :data:`lightning_bn.stats.FIELDS`) and the per-unit alive flags of a watched tensor, in one pass.

    Args:
        y: the values summarized.
        zero_tol: ``|y|`` at or below this is near zero.
        x: where saturation is judged (the activation's input, or its output for monotone kinds); ``None``: no
            saturation (a layer's output).
        bounds: ``(low, high)`` asymptote bounds as 0-d tensors on ``x``'s device (input or output bounds).
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
    if y.numel() == 0:  # the row of nothing: zero counts, min +inf, max -inf (lightning_bn.stats.empty_row)
        row = torch.zeros(12, dtype=torch.float64, device=y.device)
        row[5], row[6] = float("inf"), float("-inf")
        return row, torch.zeros(0, dtype=torch.float64, device=y.device)
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
                stacklevel=2,
            )
    return _summary(*args)
