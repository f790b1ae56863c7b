"""What every guard shares: the warning category, the module lists the checks look at, and name formatting."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

__all__ = ["BatchNormWarning", "batch_norms", "running_stat_norms"]


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
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _NormBase) and m.track_running_stats]


def batch_norms(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """Every BatchNorm (``BatchNorm1d/2d/3d``, lazy variants, ``SyncBatchNorm``): the modules batch size affects."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
