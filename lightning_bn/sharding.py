"""DTensors (FSDP2 ``fully_shard``, tensor parallelism): whether a tensor or a model holds them, and this process's
part of one. The one place the package recognizes sharded tensors; plain PyTorch, no Lightning.

``torch.distributed.tensor`` is looked up, not imported: where nothing imported it, no DTensor can exist, and
importing it would cost every ``import lightning_bn``.
"""

from __future__ import annotations

import sys

from torch import Tensor, nn

__all__ = ["has_dtensors", "is_dtensor", "local"]


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a DTensor (a parameter, gradient or buffer of FSDP2 / tensor parallelism).

    Example::

        >>> import torch
        >>> is_dtensor(torch.zeros(2))
        False
    """
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return dtensor is not None and isinstance(t, dtensor)


def has_dtensors(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor."""
    return any(is_dtensor(p) for p in model.parameters())


def local(t: Tensor) -> Tensor:
    """This process's part of ``t``: ``to_local()`` of a DTensor (a view: in-place writes reach the shard), else
    ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t
