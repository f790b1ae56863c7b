"""What every guard shares: the warning category, the module lists the checks look at, name formatting, and the
whole weights of a sharded model (:func:`full_parameters`) for checks that read them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from lightning_bn.sharding import has_dtensors, swapped_dtensors

__all__ = ["BatchNormWarning", "batch_norms", "clean_name", "full_parameters", "running_stat_norms"]

# the attribute names FSDP1 (`FullyShardedDataParallel`) and activation checkpointing put between a module and its
# children: left out of the names the guards report, so they read as in the model the user wrote
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


class BatchNormWarning(RuntimeWarning):
    """The category of every normalization-pitfall warning; filter it with ``warnings.filterwarnings``."""


def _names(names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def running_stat_norms(model: nn.Module) -> list[tuple[str, _NormBase]]:
    """BatchNorm-family modules that keep running statistics (BatchNorm*, SyncBatchNorm, InstanceNorm with stats).

    Only these behave differently in training and evaluation mode.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.LayerNorm(4), nn.InstanceNorm1d(4))
        >>> [name for name, _ in running_stat_norms(net)]
        ['1']
    """
    return [(clean_name(n), m) for n, m in model.named_modules() if isinstance(m, _NormBase) and m.track_running_stats]


def batch_norms(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """Every BatchNorm (``BatchNorm1d/2d/3d``, lazy variants, ``SyncBatchNorm``): the modules batch size affects."""
    return [(clean_name(n), m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


def clean_name(name: str) -> str:
    """A module's name without the wrapper attributes FSDP1 and activation checkpointing insert.

    Example::

        >>> clean_name("_fsdp_wrapped_module.net._fsdp_wrapped_module.0")
        'net.0'
    """
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name.removesuffix("_fsdp_wrapped_module").rstrip(".")


def _fsdp1_units(model: nn.Module) -> list[nn.Module]:
    """The outermost FSDP1 (``FullyShardedDataParallel``) modules in ``model``: their parameters are flattened and
    sharded, readable only inside their forward or ``summon_full_params``."""
    if not torch.distributed.is_available():
        return []
    from torch.distributed.fsdp import FullyShardedDataParallel

    units: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():  # parents come before their children
        if isinstance(module, FullyShardedDataParallel) and id(module) not in inside:
            units.append(module)
            inside |= {id(m) for m in module.modules()}
    return units


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds sharded parameters: DTensors (FSDP2 ``fully_shard``, tensor parallelism) or FSDP1 units.

    Example::

        >>> is_sharded(nn.Linear(2, 2))
        False
    """
    return has_dtensors(model) or bool(_fsdp1_units(model))


def _whole(param: torch.Tensor) -> torch.Tensor:
    """The full value of a DTensor, gathered on its mesh's device (a CPU-offloaded shard goes there first) and kept
    in host memory, so the device holds one whole weight at a time."""
    local = param.detach()
    mesh_device = param.device_mesh.device_type  # type: ignore[attr-defined]
    if local.device.type != mesh_device:
        local = local.to(mesh_device)
    return local.full_tensor().cpu()  # type: ignore[attr-defined]


@contextlib.contextmanager
def full_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Every parameter of ``model`` whole, on every rank, while the block runs: for checks that *read* weights.

    - DTensor parameters (FSDP2 ``fully_shard``, tensor parallelism) are swapped for plain host-memory tensors
      holding their full value (one all-gather each, in module order) and the DTensors are put back afterwards (tied
      parameters stay tied);
    - FSDP1 (``FullyShardedDataParallel``) units are unsharded with ``summon_full_params(writeback=False)`` (offloaded
      to host memory on accelerators): outside them FSDP1 leaves its modules' weights pointing at freed storage.

    So every rank holds the whole weights in host memory while the block runs (the accelerator one weight at a time).

    Nothing may run the model's forward or change a weight inside the block. On a model with no sharded parameter it
    does nothing (no collective); with one, every rank must enter it, as it gathers from all of them.

    Example::

        >>> net = nn.Linear(2, 2)
        >>> with full_parameters(net) as same:
        ...     same is net
        True
    """

    def whole(param: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(_whole(param), requires_grad=param.requires_grad)

    with contextlib.ExitStack() as stack:
        stack.enter_context(swapped_dtensors(model, whole))
        units = _fsdp1_units(model)
        if units:
            from torch.distributed.fsdp import FullyShardedDataParallel

            for unit in units:
                offload = getattr(getattr(unit, "compute_device", None), "type", "cpu") != "cpu"
                stack.enter_context(
                    FullyShardedDataParallel.summon_full_params(unit, writeback=False, offload_to_cpu=offload)
                )
        yield model
