"""Uncalibrated running statistics: :func:`uncalibrated_norms` and its message."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_bn.guards._common import _names, running_stat_norms

__all__ = ["uncalibrated_message", "uncalibrated_norms"]


def uncalibrated_norms(model: nn.Module) -> list[str]:
    """Names of the BatchNorm-family modules whose running statistics were never estimated.

    A module is flagged when its running statistics are non-finite, or still exactly at their initial values
    (mean 0, var 1) — never tracked a batch, or tracked batches with ``momentum=0``. ``num_batches_tracked == 0``
    alone is not enough: checkpoints from before PyTorch 0.4.1 load calibrated statistics without that counter.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        >>> uncalibrated_norms(net)
        ['1']
        >>> _ = net(torch.randn(8, 4))
        >>> uncalibrated_norms(net)
        []
    """
    found = []
    for name, m in running_stat_norms(model):
        mean, var = m.running_mean, m.running_var
        if mean is None or var is None:
            continue
        nonfinite = not (torch.isfinite(mean).all() and torch.isfinite(var).all())
        initial = bool((mean == 0).all() and (var == 1).all())
        if nonfinite or initial:
            found.append(name)
    return found


def uncalibrated_message(names: Sequence[str], where: str) -> str:
    """One line for BatchNorms with uncalibrated running statistics ``where`` (e.g. ``"when validate starts"``)."""
    return (
        f"BatchNorm modules {_names(names)} have uncalibrated running statistics {where} (never estimated from "
        "data, or non-finite): evaluation normalizes with garbage. Train first, or refresh them with "
        "`lightning_bn.recalibrate(model, dataloader)` / `BatchNormRecalibration`."
    )
