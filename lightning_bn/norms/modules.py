"""The norm wrappers and rank-agnostic norms that :mod:`lightning_bn.norms` builds.

A norm whose channel axis differs from the data's (BatchNorm on ``(N, T, C)`` from a Linear, LayerNorm on
``(N, C, H, W)`` from a Conv) is wrapped in :class:`ChannelsLast` / :class:`ChannelsFirst`, which move the channel
axis around it. :class:`BatchNormXd` / :class:`InstanceNormXd` take an input of any rank, for when the rank is unknown.
"""

from __future__ import annotations

import torch  # noqa: F401 - the doctests use it
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = ["BatchNormXd", "ChannelsFirst", "ChannelsLast", "InstanceNormXd"]


class ChannelsLast(nn.Module):
    """Apply a channels-first norm (BatchNorm, GroupNorm, InstanceNorm: channels on dim 1) to ``(N, ..., C)`` data.

    Kept as a wrapper rather than a subclass so that ``SyncBatchNorm.convert_sync_batchnorm`` (Lightning's
    ``sync_batchnorm=True``) converts the inner norm and the layout handling survives.

    Example::

        >>> norm = ChannelsLast(nn.BatchNorm1d(8))
        >>> norm(torch.randn(4, 10, 8)).shape
        torch.Size([4, 10, 8])
    """

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.movedim(-1, 1)).movedim(1, -1)


class ChannelsFirst(nn.Module):
    """Apply a channels-last norm (LayerNorm, RMSNorm over the last dim) to ``(N, C, ...)`` data, per position.

    ``ChannelsFirst(nn.LayerNorm(C))`` on ``(N, C, H, W)`` is ConvNeXt's channel LayerNorm (timm's ``LayerNorm2d``).

    Example::

        >>> ChannelsFirst(nn.LayerNorm(8))(torch.randn(2, 8, 5, 5)).shape
        torch.Size([2, 8, 5, 5])
    """

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class BatchNormXd(_BatchNorm):
    """BatchNorm for input of any rank >= 2 (as in mmcv's ``revert_sync_batchnorm``), for when the rank is unknown."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"Expected a (N, C, ...) input of rank >= 2 but got shape {tuple(input.shape)}")


class InstanceNormXd(_InstanceNorm):
    """InstanceNorm for input of any rank >= 3: the target when the rank is unknown."""

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 3:
            raise ValueError(f"Expected a (N, C, L, ...) input of rank >= 3 but got shape {tuple(input.shape)}")
        return self._apply_instance_norm(input)
