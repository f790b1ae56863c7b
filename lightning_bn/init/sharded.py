"""Sharded parameters (``DTensor``, as FSDP2's ``fully_shard`` leaves them): the same init as the unsharded model.

A random draw on a ``DTensor`` does not reproduce the unsharded draw (on CPU every shard draws from its own offset),
and inside ``forward`` FSDP2 swaps in unsharded copies whose changes are dropped at the next reshard. So every write
to a sharded parameter goes through here: :func:`unsharded_params` gathers a layer's parameters into full-size plain
tensors, the initializer draws on those exactly as on an unsharded layer (same generator, same order, same values),
and each rank copies its own slice back into its shard. Only one layer is full at a time.

Every function that gathers (``full_tensor``) or runs the model is a collective: every rank must call it with the same
module, in the same order.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from lightning_bn.sharding import has_dtensors, is_dtensor, swapped_dtensors
from lightning_bn.sharding import local as local_tensor

__all__ = ["is_sharded", "local_tensor", "planning_view", "reshard", "unsharded_params", "write_full_"]


def is_sharded(model: nn.Module) -> bool:
    """True if any parameter of ``model`` is a ``DTensor`` (call :func:`reshard` first under FSDP2)."""
    return has_dtensors(model)


def reshard(model: nn.Module) -> None:
    """Bring every FSDP2 module of ``model`` back to its sharded parameters.

    FSDP2 keeps the root's parameters unsharded after a forward pass without backward; until they are resharded, the
    module holds plain unsharded tensors, and a write to them would be lost.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: no module was sharded with it
    FSDPModule = getattr(fsdp, "FSDPModule", None)  # noqa: N806
    if FSDPModule is None:
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _local_slice(full: Tensor, param: Tensor) -> Tensor:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    index = tuple(slice(start, start + size) for start, size in zip(offset, shape))
    return full[index]


@torch.no_grad()
def write_full_(param: Tensor, full: Tensor) -> None:
    """Copy the full-size ``full`` into ``param``: a ``DTensor`` takes only this rank's slice, without communication."""
    if is_dtensor(param):
        param.to_local().copy_(_local_slice(full, param))
    else:
        param.copy_(full)


@contextlib.contextmanager
def unsharded_params(module: nn.Module) -> Iterator[None]:
    """Inside the block, every ``DTensor`` parameter of ``module`` is a full-size plain parameter with the gathered
    values; afterwards each rank copies its slice of it into its shard and the sharded parameters are back.

    A no-op for a module without ``DTensor`` parameters. Gathering is a collective (every rank, same module); use it
    outside ``forward`` (FSDP2 parameters must be resharded: :func:`reshard`).

    Example::

        >>> layer = nn.Linear(4, 2)
        >>> with unsharded_params(layer):  # nothing sharded: nothing happens
        ...     _ = nn.init.zeros_(layer.weight)
        >>> layer.weight.abs().sum().item()
        0.0
    """

    def gathered(param: Tensor) -> nn.Parameter:
        with torch.no_grad():
            return nn.Parameter(param.detach().full_tensor(), requires_grad=param.requires_grad)

    with swapped_dtensors(module, gathered) as pairs:
        yield
    for param, full in pairs:
        write_full_(param, full.detach())


def _stand_in(param: Tensor, low: float, high: float, nan: float) -> Tensor:
    """Constant ``low`` where the whole tensor is constant, else 0, 1, 2, ... along its first dimension above 1."""
    shape, device = tuple(param.shape), param.to_local().device
    if param.numel() < 2:
        return param.detach().full_tensor().to(device)
    if nan == 0 and low == high:
        return torch.full((), low, dtype=param.dtype, device=device).expand(shape)
    dim = next(d for d, size in enumerate(shape) if size > 1)
    ramp = torch.arange(shape[dim], dtype=param.dtype, device=device)
    view = [1] * len(shape)
    view[dim] = shape[dim]
    return ramp.reshape(view).expand(shape)


@contextlib.contextmanager
def planning_view(model: nn.Module) -> Iterator[None]:
    """Inside the block, every ``DTensor`` parameter of ``model`` is a plain stand-in of the same shape (expanded from
    at most one dimension's worth of memory) that says what the init policy asks of a weight's values: all zero,
    constant (and its value) or neither, for the whole tensor.

    The policy keeps zero or constant weights (a deliberate init); a sharded tensor can neither be flattened when its
    shards are uneven nor judged from one shard, so each rank's shard is reduced to its min and max and those are
    reduced over the mesh (a collective). Tied parameters share one stand-in; nothing is gathered.
    """

    def stand_in(param: Tensor) -> nn.Parameter:
        import torch.distributed as dist

        with torch.no_grad():
            local = param.to_local().detach().float().reshape(-1)
            nan = torch.isnan(local).any().float()
            low = local.min() if local.numel() else local.new_tensor(float("inf"))
            high = local.max() if local.numel() else local.new_tensor(float("-inf"))
            bounds = torch.stack([-low, high, nan])
            for dim in range(param.device_mesh.ndim):  # every mesh dimension: replicated ones reduce to themselves
                dist.all_reduce(bounds, dist.ReduceOp.MAX, group=param.device_mesh.get_group(dim))
            low, high, nan = -bounds[0].item(), bounds[1].item(), bounds[2].item()
            return nn.Parameter(_stand_in(param, low, high, nan), requires_grad=False)

    with swapped_dtensors(model, stand_in):
        yield
