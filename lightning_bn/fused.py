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
    """
    v = (y if y.dtype in (torch.float32, torch.float64) else y.float()).reshape(-1)
    n = v.numel()
    c = v.sum() / n
    d = v - c
    d2 = d * d
    # dot products: the third and fourth power sums without another tensor-sized temporary
    s1, s2 = d.sum().double(), d2.sum().double()
    s3, s4 = torch.dot(d2, d).double(), torch.dot(d2, d2).double()
    c = c.double()
    low, high = torch.aminmax(v)
    if torch.compiler.is_compiling():  # fused into one kernel: the plain forms
        nonfinite = (n - torch.count_nonzero(torch.isfinite(v))).double()
        near = torch.count_nonzero(v.abs() <= zero_tol).double()
    else:  # eager: float passes only (comparisons that make bool tensors are several times slower on CPU)
        nonfinite = (v * 0).nan_to_num_(nan=1.0).sum().double()  # inf * 0 and NaN * 0 are NaN, the rest 0
        above = torch.nn.functional.threshold(v.abs().nan_to_num_(nan=math.inf), zero_tol, 0.0).sign_().sum()
        near = n - above.double()  # NaN became inf above, so it is no zero
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
    # False for inf and NaN; eagerly two passes where isfinite takes three (inductor would fold u * 0 to 0)
    finite = torch.isfinite(u) if torch.compiler.is_compiling() else (u * 0) == 0
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
