"""DTensors (FSDP2 ``fully_shard``, tensor parallelism): whether a tensor or a model holds them, and this process's
part of one. The one place the package recognizes sharded tensors; plain PyTorch, no Lightning.

``torch.distributed.tensor`` is looked up, not imported: where nothing imported it, no DTensor can exist, and
importing it would cost every ``import lightning_bn``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

from torch import Tensor, nn

__all__ = ["has_dtensors", "is_dtensor", "local", "swapped_dtensors"]


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


@contextlib.contextmanager
def swapped_dtensors(
    model: nn.Module, replacement: Callable[[Tensor], nn.Parameter]
) -> Iterator[list[tuple[Tensor, nn.Parameter]]]:
    """Inside the block, every DTensor parameter of ``model`` is ``replacement(param)`` (made once per parameter, in
    module order, so tied parameters stay tied and collectives inside ``replacement`` run in the same order on every
    rank); the DTensors are put back afterwards, also on an error. Yields the ``(param, replacement)`` pairs.

    Example::

        >>> net = nn.Linear(2, 2)
        >>> with swapped_dtensors(net, lambda p: p) as pairs:  # nothing sharded: nothing swapped
        ...     pairs
        []
    """
    found = [
        (owner, name, param)
        for owner in model.modules()
        for name, param in owner._parameters.items()
        if param is not None and is_dtensor(param)
    ]
    made: dict[int, nn.Parameter] = {}
    pairs: list[tuple[Tensor, nn.Parameter]] = []
    try:
        for owner, name, param in found:
            if id(param) not in made:
                made[id(param)] = replacement(param)
                pairs.append((param, made[id(param)]))
            owner._parameters[name] = made[id(param)]
        yield pairs
    finally:
        for owner, name, param in found:
            owner._parameters[name] = param
