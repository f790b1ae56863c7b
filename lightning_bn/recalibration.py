"""Recompute BatchNorm running statistics exactly over a number of training batches (PreciseBN), in plain PyTorch.

The EMA of running statistics lags the weights and, with a high momentum, follows the last few batches; PreciseBN
(Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm") replaces it with the population statistics of ~100 batches.
Like ``torch.optim.swa_utils.update_bn`` and fvcore's ``update_bn_stats`` the model runs in training mode without
gradients, but the statistics are pooled exactly (per-channel count, mean and sum of squared deviations in float64),
so they equal the mean and unbiased variance of every value each BatchNorm saw — including across DDP ranks, with
one all-gather that every rank reaches however many batches it has (see :func:`recalibrate`), and under sharding
(FSDP2, FSDP1, tensor parallelism), whose forward is a collective: the ranks then run their batches in lockstep.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

from lightning_bn import checks
from lightning_bn.sharding import has_dtensors, is_dtensor
from lightning_bn.tracing import HookSet, model_state

__all__ = ["default_forward", "recalibrate", "resolve_forward", "sharded_statistics"]

# the buffers of a BatchNorm that recalibration writes; everything else in the model is put back as it was
_WRITTEN = ("running_mean", "running_var", "num_batches_tracked")


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on a batch: the first element of a tuple/list ``(x, y, ...)``, keywords of a dict, else as is."""
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(batch)


def resolve_forward(forward: Any) -> Callable[[nn.Module, Any], Any]:
    """``forward`` itself, or :func:`default_forward` for ``None``.

    Raises:
        TypeError: naming ``forward`` unless it is ``None`` or a callable that accepts ``(model, batch)``.

    Example::

        >>> resolve_forward(None) is default_forward
        True
        >>> resolve_forward(lambda model: model)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: Expected `forward` to be None or a callable taking (model, batch) but got <function <lambda> ...>
    """
    if forward is None:
        return default_forward
    message = f"Expected `forward` to be None or a callable taking (model, batch) but got {forward!r}"
    if not callable(forward):
        raise TypeError(message)
    try:
        signature = inspect.signature(forward)
    except (TypeError, ValueError):  # some builtins and extension types have none: nothing to check
        return forward
    try:
        signature.bind(None, None)
    except TypeError:
        raise TypeError(message) from None
    return forward


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({k: _to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


@dataclass
class _Accumulator:
    module: _BatchNorm
    shift: Tensor
    count: Tensor
    total: Tensor
    total_sq: Tensor

    def hook(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        if is_dtensor(x):  # a tensor-parallel activation: the whole of it (every rank of its mesh is in this forward)
            x = x.full_tensor()
        channels = x.shape[1] if x.ndim > 1 else x.shape[0]
        values = (x.transpose(0, 1) if x.ndim > 1 else x.unsqueeze(1)).reshape(channels, -1).double()
        values = values - self.shift[:, None]
        self.count += values.shape[1]
        self.total += values.sum(1)
        self.total_sq += values.square().sum(1)

    def moments(self) -> Tensor:
        """``[count, mean (C), sum of squared deviations from the mean (C)]`` of the values seen here."""
        centered = self.total / self.count.clamp_min(1)  # no values: count 0, and the mean does not count
        squares = (self.total_sq - self.total * centered).clamp_min(0)
        return torch.cat([self.count.reshape(1), self.shift + centered, squares])


class _Accumulation(HookSet):
    """The forward pre-hooks that feed each BatchNorm's input to its accumulator, attached for one pass."""

    def __init__(self, accumulators: list[_Accumulator]) -> None:
        super().__init__()
        self.accumulators = accumulators

    def _register(self) -> Iterator[RemovableHandle]:
        for accumulator in self.accumulators:
            yield accumulator.module.register_forward_pre_hook(accumulator.hook)


class _Buffers:
    """Every buffer of a model, as an object and as a copy of its values, to put back afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.saved = [
            (module, name, buffer, buffer.detach().clone())
            for module in model.modules()
            for name, buffer in module._buffers.items()
            if buffer is not None
        ]

    def restore(self, keep: Collection[tuple[nn.Module, str]] = ()) -> None:
        """Put every buffer back (the same tensor object with its old values), except ``(module, name)`` in ``keep``."""
        with torch.no_grad():
            for module, name, buffer, values in self.saved:
                if (module, name) in keep:
                    continue
                module._buffers[name] = buffer
                buffer.copy_(values)


def _forward_runs_collectives(model: nn.Module) -> bool:
    """Whether every forward of ``model`` is itself a collective, so the ranks must run their batches in lockstep:
    SyncBatchNorm, FSDP2 (``fully_shard``: an all-gather per unit), FSDP1 (``FullyShardedDataParallel``), or other
    DTensor parameters (tensor parallelism)."""
    if any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        return True
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6: FSDP2 lives elsewhere; its parameters are DTensors anyway
        FSDPModule = FullyShardedDataParallel  # noqa: N806
    if any(isinstance(m, (FullyShardedDataParallel, FSDPModule)) for m in model.modules()):
        return True
    return has_dtensors(model)


def sharded_statistics(model: nn.Module) -> list[str]:
    """Names of the BatchNorms whose running statistics are DTensors (a tensor-parallel plan or ``distribute_module``
    took them in): :func:`recalibrate` refuses those, it pools plain per-rank buffers.

    Example::

        >>> sharded_statistics(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
        []
    """
    return [
        _clean(n)
        for n, m in model.named_modules()
        if isinstance(m, _BatchNorm) and any(is_dtensor(b) for b in (m.running_mean, m.running_var))
    ]


def _clean(name: str) -> str:
    """A module's name without the wrapper attributes FSDP1 and activation checkpointing insert."""
    for part in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(part, "")
    return name


def _all_ranks_have_a_batch(have: bool, device: torch.device) -> bool:
    flag = torch.tensor([1 if have else 0], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def _run_pass(
    model: nn.Module,
    dataloader: Iterable[Any],
    num_batches: int,
    forward: Callable[[nn.Module, Any], Any],
    device: torch.device,
    lockstep: torch.device | None,
) -> Exception | None:
    """Run up to ``num_batches`` batches through ``forward``; return (not raise) the first exception.

    With ``lockstep`` (the device for the collective) the ranks agree before each batch whether every rank has one
    and none has failed, and all stop together: a model with SyncBatchNorm runs a collective in every forward.
    """
    batches: Iterator[Any] | None = None
    error: Exception | None = None
    end = object()
    while True:
        batch = end
        if error is None:
            try:
                batches = islice(dataloader, num_batches) if batches is None else batches
                batch = next(batches, end)
            except Exception as err:
                error = err
        go = batch is not end if lockstep is None else _all_ranks_have_a_batch(batch is not end, lockstep)
        if not go:
            return error
        try:
            forward(model, _to_device(batch, device))
        except Exception as err:
            error = err
            if lockstep is None:
                return error


def recalibrate(
    model: nn.Module,
    dataloader: Iterable[Any],
    num_batches: int = 100,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = default_forward,
    device: torch.device | str | None = None,
    group: Any = None,
) -> dict[str, dict[str, float]]:
    """Set every BatchNorm's running mean/var to the exact statistics of its inputs over ``num_batches`` batches.

    The model runs in training mode under ``torch.no_grad()`` (each BatchNorm normalizes with batch statistics, as
    in training). Afterwards momentum, module modes and the grad mode are as they were, and so is every buffer but
    the recalibrated BatchNorms' ``running_mean``/``running_var`` and ``num_batches_tracked`` (which counts the
    batches seen); BatchNorms that did not run keep their statistics. If anything fails, every buffer is restored.

    Under an initialized ``torch.distributed`` process group every rank must call it, and the statistics are pooled
    over all ranks exactly: each rank runs its own batches (as many as it has, up to ``num_batches``, possibly none)
    and the ranks meet once, in one all-gather of their counts, means and squared deviations, which also tells every
    rank whether another one failed: then every rank restores its buffers and raises (the failed rank its own error),
    rather than waiting for the others. A model with ``SyncBatchNorm``, whose forward is itself a collective, runs in
    lockstep instead: before each batch the ranks agree that every one of them has a batch and none has failed, so
    all run as many batches as the rank with the fewest (an error raised in the middle of one rank's forward can then
    still leave the others in SyncBatchNorm's collective, as in training).

    Sharded models work the same way: under FSDP2 (``fully_shard``), FSDP1 (pass the ``FullyShardedDataParallel``
    wrapper, whose forward gathers the weights) and tensor parallelism every forward is a collective too, so they run
    in lockstep; BatchNorm buffers are never sharded, so every rank ends with the same pooled statistics. Under tensor
    parallelism the ranks of one tensor-parallel group see the same batches: pass ``group`` = the data-parallel
    process group (``device_mesh["data_parallel"].get_group()``) so each value counts once; DTensor inputs of a
    BatchNorm are gathered whole.

    Args:
        model: any ``nn.Module`` with BatchNorm layers (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``).
        dataloader: yields batches; only the first ``num_batches`` are used.
        num_batches: batches to average over (per rank).
        forward: ``forward(model, batch)`` runs one batch; ``None`` or default: :func:`default_forward`.
        device: where to move each batch; default the device of the model's first parameter or buffer.
        group: under ``torch.distributed``, the process group (holding this rank) whose ranks' statistics are
            pooled; default all ranks. Every rank still takes part in the one all-gather (and the lockstep), so a
            failure anywhere makes every rank raise.

    Returns:
        Per BatchNorm name: ``mean_shift`` = ||new mean − old mean|| / ||new std|| and ``var_shift`` =
        ||new var − old var|| / ||new var|| (how far the running statistics moved), and ``count`` (values per channel,
        over all ranks).

    Raises:
        ValueError: for a ``num_batches`` that is not a positive integer, a ``group`` without ``torch.distributed``
            or without this rank, or BatchNorms with DTensor running statistics (:func:`sharded_statistics`).
        TypeError: for a ``forward`` that is not a callable taking ``(model, batch)``.
        RuntimeError: under ``torch.distributed``, on the ranks whose own pass went well when another rank's failed.

    Example::

        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
        >>> data = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=16)
        >>> shifts = recalibrate(net, data, num_batches=4)
        >>> x = net[0](torch.cat([b for (b,) in data])).detach()
        >>> torch.allclose(net[1].running_var, x.var(0), rtol=1e-4), shifts["1"]["count"]
        (True, 64.0)
    """
    checks.integer("num_batches", num_batches)
    forward = resolve_forward(forward)
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return {}
    sharded = sharded_statistics(model)
    if sharded:  # every rank has the same modules: every rank raises here, before any collective
        raise ValueError(
            f"Expected plain running statistics, but BatchNorm modules {sharded} hold DTensors (a tensor-parallel plan "
            "or `distribute_module` took them in). Leave BatchNorm out of the parallelize plan: its buffers then stay "
            "plain tensors, which recalibration pools exactly over the data-parallel ranks (`group`)."
        )
    if device is None:
        device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    device = torch.device(device)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    pooled = _pooled_ranks(group, distributed)
    collective_device = norms[0][1].running_mean.device
    lockstep = collective_device if distributed and _forward_runs_collectives(model) else None
    accumulators = []
    for _, m in norms:
        zeros = torch.zeros(m.num_features, dtype=torch.float64, device=m.running_mean.device)
        shift = m.running_mean.detach().clone().double()  # keeps the sums small; each rank may use its own
        accumulators.append(_Accumulator(m, shift, zeros.new_zeros(()), zeros.clone(), zeros.clone()))
    buffers = _Buffers(model)
    momenta = [m.momentum for _, m in norms]
    old = [(m.running_mean.detach().clone().double(), m.running_var.detach().clone().double()) for _, m in norms]
    try:
        for _, m in norms:
            m.momentum = 0.0  # leave the statistics alone during the pass; they are written once at the end
        # training mode without gradients, marked as calibration (the eval-mode guard stays quiet); modes restored
        with _Accumulation(accumulators), model_state(model, train=True, grad=False, calibration=True):
            error = _run_pass(model, dataloader, num_batches, forward, device, lockstep)
        if error is not None and not distributed:
            raise error
        # every rank gets here once, whatever happened in its pass: [failed, per BatchNorm: count, mean, squares]
        mine = torch.cat(
            [torch.tensor([float(error is not None)], dtype=torch.float64, device=collective_device)]
            + [a.moments().to(collective_device) for a in accumulators]
        )
        ranks = _gather(mine) if distributed else mine[None]
        failed = [rank for rank, flag in enumerate(ranks[:, 0].tolist()) if flag]
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(
                f"BatchNorm recalibration failed on rank(s) {failed} (see the error raised there); every rank's "
                "running statistics were restored."
            )
        result, written = _write(norms, ranks[pooled, 1:] if pooled is not None else ranks[:, 1:], old)
    except BaseException:
        buffers.restore()
        raise
    finally:
        for (_, m), momentum in zip(norms, momenta):
            m.momentum = momentum
    buffers.restore(keep={(m, name) for m in written for name in _WRITTEN})
    return result


def _pooled_ranks(group: Any, distributed: bool) -> list[int] | None:
    """The global ranks whose statistics are pooled (``None``: all of them)."""
    if group is None:
        return None
    if not distributed:
        raise ValueError("Expected `group` only under an initialized torch.distributed process group, but found none")
    ranks = sorted(torch.distributed.get_process_group_ranks(group))
    if torch.distributed.get_rank() not in ranks:
        raise ValueError(f"Expected `group` to hold this rank ({torch.distributed.get_rank()}) but it holds {ranks}")
    return ranks


def _gather(mine: Tensor) -> Tensor:
    """Every rank's ``mine``, stacked in rank order (one all-gather)."""
    ranks = [torch.empty_like(mine) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(ranks, mine)
    return torch.stack(ranks)


def _write(
    norms: list[tuple[str, _BatchNorm]], ranks: Tensor, old: list[tuple[Tensor, Tensor]]
) -> tuple[dict[str, dict[str, float]], list[_BatchNorm]]:
    """Pool each BatchNorm's per-rank ``[count, mean, squares]`` (rows of ``ranks``) and write mean and variance."""
    result: dict[str, dict[str, float]] = {}
    written: list[_BatchNorm] = []
    offset = 0
    figures = []
    for (name, m), (old_mean, old_var) in zip(norms, old):
        c = m.num_features
        counts, means, squares = ranks[:, offset], ranks[:, offset + 1 : offset + 1 + c], ranks[:, offset + 1 + c :]
        squares = squares[:, :c]
        offset += 1 + 2 * c
        count = counts.sum()
        if count < 2:
            continue
        mean = (counts[:, None] * means).sum(0) / count
        var = (squares + counts[:, None] * (means - mean).square()).sum(0) / (count - 1)
        mean, var = mean.to(old_mean.device), var.to(old_mean.device)
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.to(m.running_var.dtype))
        written.append(m)
        mean_shift = torch.linalg.vector_norm(mean - old_mean) / torch.linalg.vector_norm((var + m.eps).sqrt())
        var_shift = torch.linalg.vector_norm(var - old_var) / torch.linalg.vector_norm(var).clamp_min(1e-12)
        figures.append((name, torch.stack([mean_shift, var_shift, count.to(mean.device)])))
    if figures:
        host = torch.stack([f for _, f in figures]).cpu().tolist()  # one transfer
        for (name, _), (mean_shift, var_shift, count) in zip(figures, host):
            result[_clean(name)] = {"mean_shift": mean_shift, "var_shift": var_shift, "count": count}
    return result, written
