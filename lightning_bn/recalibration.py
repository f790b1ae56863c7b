"""Recompute BatchNorm running statistics exactly over a number of training batches (PreciseBN), in plain PyTorch.

The EMA of running statistics lags the weights and, with a high momentum, follows the last few batches; PreciseBN
(Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm") replaces it with the population statistics of ~100 batches.
Like ``torch.optim.swa_utils.update_bn`` and fvcore's ``update_bn_stats`` the model runs in training mode without
gradients, but the statistics are pooled exactly (per-channel count, sum and sum of squares in float64, shifted by
the old running mean), so they equal the mean and unbiased variance of every value each BatchNorm saw — including
across DDP ranks, with one all-reduce.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

from lightning_bn.tracing import HookSet, model_state

__all__ = ["default_forward", "recalibrate"]


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on a batch: the first element of a tuple/list ``(x, y, ...)``, keywords of a dict, else as is."""
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(batch)


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
        channels = x.shape[1] if x.ndim > 1 else x.shape[0]
        values = (x.transpose(0, 1) if x.ndim > 1 else x.unsqueeze(1)).reshape(channels, -1).double()
        values = values - self.shift[:, None]
        self.count += values.shape[1]
        self.total += values.sum(1)
        self.total_sq += values.square().sum(1)


class _Accumulation(HookSet):
    """The forward pre-hooks that feed each BatchNorm's input to its accumulator, attached for one pass."""

    def __init__(self, accumulators: list[_Accumulator]) -> None:
        super().__init__()
        self.accumulators = accumulators

    def _register(self) -> Iterator[RemovableHandle]:
        for accumulator in self.accumulators:
            yield accumulator.module.register_forward_pre_hook(accumulator.hook)


def _layout(accumulators: list[_Accumulator]) -> Tensor:
    return torch.cat([torch.cat([a.count.reshape(1), a.total, a.total_sq]) for a in accumulators])


def recalibrate(
    model: nn.Module,
    dataloader: Iterable[Any],
    num_batches: int = 100,
    *,
    forward: Callable[[nn.Module, Any], Any] = default_forward,
    device: torch.device | str | None = None,
) -> dict[str, dict[str, float]]:
    """Set every BatchNorm's running mean/var to the exact statistics of its inputs over ``num_batches`` batches.

    The model runs in training mode under ``torch.no_grad()`` (each BatchNorm normalizes with batch statistics, as
    in training); momentum, module modes and, on error, the old statistics are restored. Under an initialized
    ``torch.distributed`` process group every rank must call it; the statistics are pooled over all ranks.
    ``num_batches_tracked`` counts the batches seen. BatchNorms that did not run keep their statistics.

    Args:
        model: any ``nn.Module`` with BatchNorm layers (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``).
        dataloader: yields batches; only the first ``num_batches`` are used.
        num_batches: batches to average over (per rank).
        forward: ``forward(model, batch)`` runs one batch; default :func:`default_forward`.
        device: where to move each batch; default the device of the model's first parameter or buffer.

    Returns:
        Per BatchNorm name: ``mean_shift`` = ||new mean − old mean|| / ||new std|| and ``var_shift`` =
        ||new var − old var|| / ||new var|| (how far the running statistics moved), and ``count`` (values per channel).

    Raises:
        ValueError: for a ``num_batches`` that is not a positive integer.

    Example::

        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
        >>> data = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=16)
        >>> shifts = recalibrate(net, data, num_batches=4)
        >>> x = net[0](torch.cat([b for (b,) in data])).detach()
        >>> torch.allclose(net[1].running_var, x.var(0), rtol=1e-4), shifts["1"]["count"]
        (True, 64.0)
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"Expected `num_batches` to be a positive integer but got {num_batches!r}")
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return {}
    if device is None:
        device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    shifts = torch.cat([m.running_mean.detach().double() for _, m in norms])
    if distributed:
        torch.distributed.broadcast(shifts, src=0)  # pooling needs the same shift on every rank
    accumulators, start = [], 0
    for _, m in norms:
        zeros = torch.zeros(m.num_features, dtype=torch.float64, device=m.running_mean.device)
        shift = shifts[start : start + m.num_features].to(zeros.device)
        start += m.num_features
        accumulators.append(_Accumulator(m, shift, zeros.new_zeros(()), zeros.clone(), zeros.clone()))
    old = [(m.running_mean.detach().clone(), m.running_var.detach().clone(), m.momentum) for _, m in norms]
    try:
        for _, m in norms:
            m.momentum = 0.0  # leave the buffers alone during the pass; they are written once at the end
        # training mode without gradients, marked as calibration (the eval-mode guard stays quiet); modes restored
        with _Accumulation(accumulators), model_state(model, train=True, grad=False, calibration=True):
            for index, batch in enumerate(dataloader):
                if index >= num_batches:
                    break
                forward(model, _to_device(batch, device))
            sums = _layout(accumulators)
            if distributed:
                torch.distributed.all_reduce(sums)
            result = _write(norms, accumulators, sums, old)
    except BaseException:
        for (_, m), (mean, var, _momentum) in zip(norms, old):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
        raise
    finally:
        for (_, m), (_mean, _var, momentum) in zip(norms, old):
            m.momentum = momentum
    return result


def _write(
    norms: list[tuple[str, _BatchNorm]],
    accumulators: list[_Accumulator],
    sums: Tensor,
    old: list[tuple[Tensor, Tensor, Any]],
) -> dict[str, dict[str, float]]:
    result: dict[str, dict[str, float]] = {}
    offset = 0
    figures = []
    for (name, m), acc, (old_mean, old_var, _) in zip(norms, accumulators, old):
        c = m.num_features
        count = sums[offset]
        total, total_sq = sums[offset + 1 : offset + 1 + 2 * c].split(c)
        offset += 1 + 2 * c
        if count < 2:
            continue
        centered = total / count
        mean = acc.shift + centered
        var = (total_sq / count - centered.square()).clamp_min(0) * (count / (count - 1))
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.to(m.running_var.dtype))
        mean_shift = torch.linalg.vector_norm(mean - old_mean.double()) / torch.linalg.vector_norm((var + m.eps).sqrt())
        var_shift = torch.linalg.vector_norm(var - old_var.double()) / torch.linalg.vector_norm(var).clamp_min(1e-12)
        figures.append((name, torch.stack([mean_shift, var_shift, count])))
    if not figures:
        return result
    host = torch.stack([f for _, f in figures]).cpu().tolist()  # one transfer
    for (name, _), (mean_shift, var_shift, count) in zip(figures, host):
        result[name] = {"mean_shift": mean_shift, "var_shift": var_shift, "count": count}
    return result
