"""Tiny batches: :class:`BatchSizeRecorder` + :func:`small_batch_norms`.

Wu & He's threshold is about *samples* per device: a BatchNorm over images (``(N, C, *spatial)``) is judged by its
batch, however many pixels each sample has; a BatchNorm1d over features (``(N, C)``) by its values per channel.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_bn.guards._common import _names, batch_norms
from lightning_bn.tracing import HookSet

__all__ = [
    "DEFAULT_MIN_VALUES_PER_CHANNEL",
    "BatchSizeRecorder",
    "normalized_count",
    "small_batch_message",
    "small_batch_norms",
    "values_per_channel",
]

#: Below this many samples per device (images, sequences) — or values per channel for ``(N, C)`` features — batch
#: statistics are too noisy: BN's error rises fast as the per-device batch drops below 16 (Wu & He, ECCV 2018).
DEFAULT_MIN_VALUES_PER_CHANNEL = 16


def values_per_channel(x: Tensor) -> int:
    """How many values a BatchNorm normalizes per channel for input ``x``: batch × spatial.

    Example::

        >>> import torch
        >>> values_per_channel(torch.zeros(2, 16)), values_per_channel(torch.zeros(2, 8, 4, 4))
        (2, 32)
    """
    if x.ndim < 2:
        return x.numel()
    return x.numel() // max(x.shape[1], 1)


def normalized_count(x: Tensor) -> tuple[int, str]:
    """What a BatchNorm's statistics rest on for input ``x``: the samples of a batch of images/sequences
    (``(N, C, *spatial)``), or the values per channel of ``(N, C)`` features; with the word for it.

    Example::

        >>> import torch
        >>> normalized_count(torch.zeros(2, 16)), normalized_count(torch.zeros(2, 8, 32, 32))
        ((2, 'values per channel'), (2, 'samples'))
    """
    if x.ndim > 2:
        return x.shape[0], "samples"
    return values_per_channel(x), "values per channel"


class BatchSizeRecorder(HookSet):
    """Record, per BatchNorm, the smallest per-device count its statistics rested on in training mode: samples for
    ``(N, C, *spatial)`` inputs, values per channel for ``(N, C)``.

    Attach it for a few training steps only; :attr:`values` maps module names to counts on this device, :attr:`units`
    to what was counted.

    Example::

        >>> import torch
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        >>> with BatchSizeRecorder(net) as recorder:
        ...     _ = net(torch.randn(2, 4))
        >>> recorder.values, small_batch_norms(recorder.values)
        ({'1': 2}, ['1'])
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._norms = batch_norms(model)
        self.values: dict[str, int] = {}
        self.units: dict[str, str] = {}

    def _register(self) -> list[RemovableHandle]:
        return [m.register_forward_pre_hook(self._record(n)) for n, m in self._norms]

    def _record(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if module.training and args and isinstance(args[0], Tensor):
                count, unit = normalized_count(args[0])
                self.values[name] = max(self.values.get(name, 0), count)
                self.units[name] = unit

        return hook


def small_batch_norms(values: Mapping[str, int], min_values: int = DEFAULT_MIN_VALUES_PER_CHANNEL) -> list[str]:
    """Names of the BatchNorms that normalized fewer than ``min_values`` values per channel."""
    return [name for name, count in values.items() if count < min_values]


def small_batch_message(
    names: Sequence[str],
    values: Mapping[str, int],
    min_values: int = DEFAULT_MIN_VALUES_PER_CHANNEL,
    world_size: int = 1,
    synced: bool = False,
    unit: str = "values per channel",
    sync_hint: str = "`Trainer(sync_batchnorm=True)`",
) -> str:
    """One line for BatchNorms with too few values per channel, naming the fixes (and SyncBatchNorm under DDP).

    ``world_size`` is the number of data-parallel replicas (devices that see different samples); ``sync_hint`` says
    how to get SyncBatchNorm where the trainer's switch does not apply.

    Example::

        >>> print(small_batch_message(["bn"], {"bn": 4}, unit="samples").split(": ")[0])
        BatchNorm modules 'bn' normalize only 4 samples on this device, fewer than 16
    """
    smallest = min(values[n] for n in names)
    line = (
        f"BatchNorm modules {_names(names)} normalize only {smallest} {unit} on this device, fewer than "
        f"{min_values}: their batch statistics are noisy (Wu & He 2018). Use GroupNorm or LayerNorm "
        "(`lightning_bn.convert_norms`)"
    )
    if world_size > 1 and not synced:
        line += (
            f", or SyncBatchNorm ({sync_hint}) to normalize over the global batch of "
            f"{smallest * world_size} {unit} across {world_size} devices"
        )
    return line + ", or a larger batch."
