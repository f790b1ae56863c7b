"""The order in which modules first run during a forward pass (to name the *first* bad layer)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_bn.tracing import HookSet as _HookSet

__all__ = ["ForwardOrder"]


class ForwardOrder(_HookSet):
    """Record the order in which modules first run during a forward pass (to name the *first* bad layer).

    Example::

        >>> import torch
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> with ForwardOrder(net) as order:
        ...     _ = net(torch.randn(1, 2))
        >>> order.names
        ['0', '1']
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.names: list[str] = []
        self._seen: set[str] = set()

    def _register(self) -> Iterator[RemovableHandle]:
        self.names = []
        self._seen = set()
        for name, module in self.model.named_modules():
            if name and next(module.children(), None) is None:
                yield module.register_forward_pre_hook(self._record(name))

    def _record(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if name not in self._seen:
                self._seen.add(name)
                self.names.append(name)

        return hook
