"""Inference on batch statistics: BatchNorm left in training mode, and evaluation data leaking into running stats.

- :func:`find_train_mode_norms`: BatchNorm-family modules with running statistics that are in training mode.
- :func:`running_stats_snapshot` / :func:`changed_running_stats`: running statistics changed by evaluation data.
- :func:`guard` (:class:`EvalModeGuard`): warns live when a BatchNorm in training mode runs under
  ``torch.no_grad()`` / ``torch.inference_mode()`` (the forgotten ``model.eval()``), except inside
  :func:`lightning_bn.tracing.calibrating`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_bn.checks import user_stacklevel
from lightning_bn.guards._common import BatchNormWarning, _names, running_stat_norms
from lightning_bn.tracing import HookSet, is_calibrating

__all__ = [
    "EvalModeGuard",
    "changed_running_stats",
    "find_train_mode_norms",
    "guard",
    "leak_message",
    "running_stats_snapshot",
    "train_mode_message",
]


def find_train_mode_norms(model: nn.Module) -> list[str]:
    """Names of the BatchNorm-family modules with running statistics that are in training mode.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        >>> find_train_mode_norms(net)
        ['1']
        >>> find_train_mode_norms(net.eval())
        []
    """
    return [name for name, module in running_stat_norms(model) if module.training]


def running_stats_snapshot(model: nn.Module) -> dict[str, tuple[Tensor, ...]]:
    """A copy of every running statistic (mean, var, ``num_batches_tracked``), to compare after an evaluation loop."""
    return {
        name: tuple(b.detach().clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None)
        for name, m in running_stat_norms(model)
    }


def changed_running_stats(model: nn.Module, snapshot: Mapping[str, tuple[Tensor, ...]]) -> list[str]:
    """Names of the modules whose running statistics differ from ``snapshot``: data leaked into them.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
        >>> before = running_stats_snapshot(net)
        >>> _ = net.train()(torch.randn(8, 4))
        >>> changed_running_stats(net, before)
        ['1']
    """
    changed = []
    for name, m in running_stat_norms(model):
        now = tuple(b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None)
        old = snapshot.get(name)
        if old is None or len(old) != len(now) or not all(torch.equal(a, b) for a, b in zip(old, now)):
            changed.append(name)
    return changed


def train_mode_message(names: Sequence[str], where: str) -> str:
    """One line for BatchNorm modules found in training mode ``where`` (e.g. ``"during validation"``)."""
    return (
        f"BatchNorm modules {_names(names)} are in training mode {where}: they normalize with the statistics of "
        "this batch instead of the running ones (and overwrite those). Call `model.eval()` before inference "
        "and do not call `.train()` inside evaluation code."
    )


def leak_message(names: Sequence[str], where: str) -> str:
    """One line for running statistics that changed ``where`` (e.g. ``"during validation"``)."""
    return (
        f"Running statistics of {_names(names)} changed {where}: evaluation data leaked into them, so later "
        "predictions depend on it. Keep BatchNorm in eval mode during evaluation (no `.train()` in eval steps)."
    )


class EvalModeGuard(HookSet):
    """Handle returned by :func:`guard`: forward pre-hooks on the BatchNorm-family modules of one model.

    Use it as a context manager or call :meth:`remove`. It warns once (category :class:`BatchNormWarning`).
    """

    def __init__(self, model: nn.Module, expect_eval: bool = False) -> None:
        super().__init__()
        if not isinstance(expect_eval, bool):
            raise TypeError(f"Expected `expect_eval` to be True or False but got {expect_eval!r}")
        self._norms = running_stat_norms(model)
        self.expect_eval = expect_eval
        self.warned = False
        self.attach()

    def _register(self) -> list[RemovableHandle]:
        return [m.register_forward_pre_hook(self._check) for _, m in self._norms]

    def _check(self, module: nn.Module, args: tuple) -> None:
        # eval mode (the common case) costs one attribute read
        if not module.training or self.warned or is_calibrating():
            return
        if torch.is_grad_enabled() and not self.expect_eval:
            return
        if module.momentum is None:
            return  # a cumulative average of the statistics: a deliberate pass (torch.optim.swa_utils.update_bn)
        self.warned = True
        if torch.is_inference_mode_enabled():
            where = "under torch.inference_mode()"
        else:
            where = "under torch.no_grad()" if not torch.is_grad_enabled() else "inside guard(expect_eval=True)"
        names = [n for n, m in self._norms if m.training]
        warnings.warn(train_mode_message(names, where), BatchNormWarning, stacklevel=user_stacklevel())

    @property
    def active(self) -> bool:
        return self.attached

    def remove(self) -> None:
        """Remove every hook; the model runs exactly as before."""
        self.detach()


def guard(model: nn.Module, expect_eval: bool = False) -> EvalModeGuard:
    """Warn when a BatchNorm of ``model`` in training mode runs without gradients — the forgotten ``model.eval()``.

    With ``expect_eval=True`` (wrap an evaluation loop) a BatchNorm in training mode warns even with gradients on.
    Hooks only the BatchNorm-family modules; in eval mode each hook returns after reading ``module.training``.
    Deliberate statistics passes stay quiet: inside :func:`lightning_bn.tracing.calibrating` (recalibration), and
    with ``momentum=None`` (a cumulative average, as ``torch.optim.swa_utils.update_bn`` sets it).

    Example::

        >>> import warnings
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        >>> with guard(net), warnings.catch_warnings(record=True) as caught, torch.no_grad():
        ...     warnings.simplefilter("always")
        ...     _ = net(torch.randn(8, 4))
        >>> caught[0].category.__name__
        'BatchNormWarning'
    """
    return EvalModeGuard(model, expect_eval)
