"""The gradient probe: per-parameter gradient norms, weight norms and update ratios of one optimizer step, exact
under data parallelism and under sharding, in plain PyTorch (the engine of :class:`~lightning_bn.GradientMonitor` and
:class:`~lightning_bn.Monitor`).

Sharded parameters (DTensors: FSDP2 ``fully_shard``, tensor parallel) are reduced from their local shards: each rank
computes ``sum |x|^p`` of its shards, one all-reduce adds them over the processes, and a parameter replicated over part
of the mesh is divided by its number of copies, so every figure equals the unsharded one. Plain parameters under DDP
are identical on every rank after its gradient all-reduce: rank zero's figures are the figures, with no collective.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_bn.monitoring.rows import histogram, histogram_record, parameter_norms
from lightning_bn.sharding import is_dtensor
from lightning_bn.sharding import local as _local
from lightning_bn.tags import TOTAL_GRADIENT_TAG

__all__ = ["GradientProbe", "GradientResult", "dense_values", "local"]

#: Parameters with fewer elements are copied whole for the update ratio.
WHOLE = 4096


def local(t: Tensor) -> Tensor:
    """This process's part of ``t`` (the local shard of a DTensor), detached: what is measured and copied."""
    return _local(t).detach()


def dense_values(t: Tensor) -> Tensor:
    """What a gradient's norm is taken of: this process's part of ``t`` (:func:`local`), or, for a sparse gradient
    (``nn.Embedding(sparse=True)``), the values it holds (coalesced: an index given twice is summed first), whose
    p-norm is the norm of the sparse tensor."""
    t = local(t)
    if t.layout == torch.sparse_coo:
        return t.coalesce().values()
    if t.layout != torch.strided:  # sparse CSR/CSC/BSR: the values are the stored elements
        return t.values()
    return t


def _copies(t: Tensor, world: int) -> int:
    """How many processes hold each element of ``t``: ``world`` for a plain tensor, ``world / (product of the mesh
    sizes it is sharded over)`` for a DTensor (replicated mesh dimensions and processes outside its mesh hold
    copies)."""
    if not is_dtensor(t):
        return world
    from torch.distributed.tensor import Shard

    split = math.prod(t.device_mesh.size(dim) for dim, p in enumerate(t.placements) if isinstance(p, Shard))
    return max(world // split, 1)


def _sample(t: Tensor, stride: int) -> Tensor:
    """Every ``stride``-th element of a (local) tensor, as a view (no copy) of its data."""
    flat = t.reshape(-1)
    return flat if stride == 1 else flat[::stride]


@dataclass
class GradientResult:
    """Host-side figures of one optimizer step: ``metrics`` (``grad_norm/<param>``, ``weight_norm/<param>``,
    ``update_ratio/<param>``, ``grad_norm/total``), histogram data and the values of ``extra`` tensors."""

    step: int
    metrics: dict[str, float]
    histograms: list[dict[str, Any]] = field(default_factory=list)
    extra: list[float] = field(default_factory=list)


class GradientProbe:
    """Measure the parameters of one optimizer step: call :meth:`measure` after ``backward`` (before
    ``optimizer.step()``) and :meth:`collect` after it.

    Args:
        named_parameters: ``(name, parameter)`` pairs, e.g. ``model.named_parameters()``.
        norm_type: the p of the p-norm (``inf`` allowed).
        update_ratio: ``True`` (an evenly strided sample of at most ``update_ratio_budget`` of each large parameter's
            elements is copied before the step), ``"all"`` (a full copy: exact) or ``False``.
        update_ratio_budget: fraction of the large parameters' elements copied.
        histogram_bins: bins of a per-parameter gradient histogram (0: none). Histograms are of this process's local
            shard of a sharded parameter (``"covers"`` says which part).

    Every process must call :meth:`collect` when any does if the parameters are sharded (one all-reduce).

    Example::

        >>> net = torch.nn.Linear(4, 2)
        >>> probe = GradientProbe(net.named_parameters())
        >>> net(torch.randn(8, 4)).sum().backward()
        >>> probe.measure(step=0)
        >>> with torch.no_grad():
        ...     _ = net.weight.sub_(0.1 * net.weight.grad)
        >>> sorted(probe.collect().metrics)[:3]
        ['grad_norm/bias', 'grad_norm/total', 'grad_norm/weight']
    """

    def __init__(
        self,
        named_parameters: Iterable[tuple[str, Tensor]],
        norm_type: float = 2.0,
        update_ratio: bool | str = True,
        update_ratio_budget: float = 0.25,
        histogram_bins: int = 0,
    ) -> None:
        self.names: dict[Tensor, str] = {p: name for name, p in named_parameters}
        self.norm_type = float(norm_type)
        self.update_ratio = update_ratio
        self.update_ratio_budget = update_ratio_budget
        self.histogram_bins = histogram_bins
        #: some parameter is a DTensor: every process measures its shards and one all-reduce combines them
        self.sharded = any(is_dtensor(p) for p in self.names)
        self._pending: dict[str, Any] | None = None
        self._snapshot: dict[Tensor, tuple[int, Tensor]] = {}

    def snapshot(self, params: Sequence[Tensor] | None = None) -> None:
        """Copy the (sampled) weights now, for the update ratio of a step measured after ``optimizer.step()`` (a plain
        loop: :class:`~lightning_bn.Monitor` calls this before the forward pass of a logging step)."""
        if not self.update_ratio:
            return
        chosen = [p for p in (self.names if params is None else params) if p in self.names and p.requires_grad]
        strides = self._strides(chosen)
        self._snapshot = {p: (k, _sample(local(p), k).clone()) for p, k in zip(chosen, strides)}

    @property
    def pending(self) -> bool:
        """A step was measured and not collected yet."""
        return self._pending is not None

    def reset(self) -> None:
        """Drop an uncollected step (and its parameter copies)."""
        self._pending = None
        self._snapshot = {}

    def measure(self, step: int, params: Sequence[Tensor] | None = None) -> None:
        """Gradient norms of ``params`` (default: every named parameter with a gradient) on the device and, for the
        update ratio, a sampled copy of them; may be called for several optimizers of the same step."""
        chosen = [
            p
            for p in (self.names if params is None else params)
            if p in self.names and p.requires_grad and p.grad is not None
        ]
        if self._pending is None:
            self._pending = {"step": step, "params": [], "grad": [], "before": [], "strides": [], "hists": []}
        pending = self._pending
        if not chosen:
            return
        pending["params"] += chosen
        pending["grad"].append(self._powers([dense_values(p.grad) for p in chosen]))
        if self.update_ratio:
            snapshot, self._snapshot = self._snapshot, {}
            if all(p in snapshot for p in chosen):  # copied before the forward pass (see snapshot)
                strides = [snapshot[p][0] for p in chosen]
                before = [snapshot[p][1] for p in chosen]
            else:
                strides = self._strides(chosen)
                before = [_sample(local(p), k).clone() for p, k in zip(chosen, strides)]
            pending["strides"] += strides
            pending["before"] += before
        if self.histogram_bins:
            for p in chosen:
                g = dense_values(p.grad)
                if not g.numel():  # a sparse gradient holding no value
                    continue
                low, high = g.amin().double(), g.amax().double()
                pending["hists"].append(
                    (
                        self.names[p],
                        g.numel(),
                        p.grad.numel() if p.grad.layout == torch.strided else g.numel(),  # sparse: its values
                        torch.stack([low, high, g.double().sum(), g.double().square().sum()]),
                        histogram(g, low, high, self.histogram_bins),
                    )
                )

    def _powers(self, tensors: list[Tensor]) -> Tensor:
        """``sum |x|^p`` per tensor (``max |x|`` for p = inf), float64, one fused call."""
        norms = parameter_norms(tensors, self.norm_type)
        return norms if math.isinf(self.norm_type) else norms.pow(self.norm_type)

    def _strides(self, params: list[Tensor]) -> list[int]:
        """Per parameter, the stride of its sample: 1 for ``"all"`` and small parameters; the large ones share what
        the budget leaves after the small ones, so the copies stay within ``update_ratio_budget`` in total."""
        if self.update_ratio == "all":
            return [1] * len(params)
        sizes = [local(p).numel() for p in params]
        small = sum(n for n in sizes if n < WHOLE)
        large = sum(sizes) - small
        room = self.update_ratio_budget * sum(sizes) - small
        stride = max(1, math.ceil(large / room)) if room > 0 else max(1, large)
        return [1 if n < WHOLE else stride for n in sizes]

    def gather(
        self, extra: Sequence[Tensor] = (), distributed: bool = True
    ) -> tuple[Tensor, Callable[[list[float]], GradientResult]] | None:
        """After the optimizer step: weight norms and update ratios on the device; with sharded parameters (and
        ``distributed``), one all-reduce over the processes. Returns everything flattened, ``extra`` tensors (e.g. a
        non-finite watch's state) included, and the function that turns its host copy into a
        :class:`GradientResult`; ``None`` when nothing was measured."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        params: list[Tensor] = pending["params"]
        n = len(params)
        step = pending["step"]
        extra = [t.reshape(-1).double() for t in extra]
        if not n:
            device = extra[0].device if extra else torch.device("cpu")
            empty = torch.cat(extra) if extra else torch.zeros(0, dtype=torch.float64, device=device)
            return empty, lambda host: GradientResult(step, {}, [], host)
        grad = torch.cat(pending["grad"])
        device = grad.device
        strides = pending["strides"]
        weights = [local(p) for p in params]
        if strides:
            after = [_sample(w, k) for w, k in zip(weights, strides)]
            torch._foreach_sub_(pending["before"], after)  # in place: Δw on the same sample
            weights += pending["before"] + after
        parts = [grad, self._powers(weights)]  # weights, Δw and w on the sample: one fused call
        sums = torch.cat([t.to(device) for t in parts])
        dist = torch.distributed
        if self.sharded and distributed and dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            copies = torch.tensor([float(_copies(p, world)) for p in params], dtype=torch.float64, device=device)
            if math.isinf(self.norm_type):
                dist.all_reduce(sums, op=dist.ReduceOp.MAX)
            else:
                dist.all_reduce(sums, op=dist.ReduceOp.SUM)
                sums = sums / copies.repeat(len(sums) // n)
        p_norm = self.norm_type
        norms = sums if math.isinf(p_norm) else sums.pow(1.0 / p_norm)
        grad_norms = norms[:n]
        total = grad_norms.max() if math.isinf(p_norm) else sums[:n].sum().pow(1.0 / p_norm)
        payload = [norms, total.reshape(1)]
        payload += [torch.cat([h[3], h[4]]) for h in pending["hists"]]
        payload += [t.to(device) for t in extra]
        names = [self.names[p] for p in params]
        width, hists, bins = len(sums) // n, pending["hists"], self.histogram_bins

        def parse(host: list[float]) -> GradientResult:
            metrics = {f"grad_norm/{name}": host[i] for i, name in enumerate(names)}
            metrics[TOTAL_GRADIENT_TAG] = host[width * n]
            for i, name in enumerate(names):
                metrics[f"weight_norm/{name}"] = host[n + i]
            if strides:
                for i, name in enumerate(names):
                    update, weight = host[2 * n + i], host[3 * n + i]
                    metrics[f"update_ratio/{name}"] = update / weight if weight else math.nan
            offset = width * n + 1
            histograms = []
            for name, numel, total_numel, _, _ in hists:
                low, high, total_sum, sum_sq = host[offset : offset + 4]
                counts = host[offset + 4 : offset + 4 + bins]
                offset += 4 + bins
                if not (math.isfinite(low) and math.isfinite(high)):
                    continue
                covers = "all" if numel == total_numel else f"this process's shard ({numel} of {total_numel})"
                histograms.append(histogram_record(name, low, high, counts, numel, total_sum, sum_sq, covers=covers))
            return GradientResult(step, metrics, histograms, host[offset:])

        return torch.cat(payload), parse

    def collect(self, extra: Sequence[Tensor] = (), distributed: bool = True) -> GradientResult | None:
        """:meth:`gather`, then one device-to-host transfer; ``None`` when nothing was measured."""
        gathered = self.gather(extra, distributed)
        if gathered is None:
            return None
        payload, parse = gathered
        return parse(payload.cpu().tolist())
