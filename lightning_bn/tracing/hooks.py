"""Hook lifecycle and model state: every part that runs or watches a model goes through these.

- :class:`HookSet`: hooks registered together and removed together (``attach`` / ``detach`` or ``with``).
- :func:`model_state`: run code on a model in a chosen train/eval mode and grad mode, and get every module's mode,
  the grad mode and, on request, the buffers and the RNG state back afterwards, whatever happens inside.
- :func:`calibrating`: mark a deliberate train-mode pass without gradients (BatchNorm recalibration,
  ``swa_utils.update_bn``-like code), so the eval-mode guard stays quiet.
- :func:`as_call` / :func:`run_forward`: turn an example input into ``model(*args, **kwargs)`` and run it with an error
  that names what went wrong.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map
from torch.utils.hooks import RemovableHandle

__all__ = ["HookSet", "StopForward", "as_call", "calibrating", "is_calibrating", "model_state", "run_forward"]

# Set while a deliberate train-mode pass without gradients runs (recalibration), so `guard` stays quiet.
_CALIBRATING: contextvars.ContextVar[bool] = contextvars.ContextVar("lightning_bn_calibrating", default=False)


class HookSet:
    """Hooks registered together and removed together: ``attach`` / ``detach``, or use it as a context manager.

    Subclasses say what to register in :meth:`_register`; the handles are kept here and nowhere else.

    Example::

        >>> class Count(HookSet):
        ...     def __init__(self, module):
        ...         super().__init__()
        ...         self.module, self.calls = module, 0
        ...     def _register(self):
        ...         yield self.module.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))
        >>> net = nn.Linear(2, 2)
        >>> with Count(net) as counter:
        ...     _ = net(torch.zeros(1, 2))
        >>> counter.calls, counter.attached, len(net._forward_hooks)
        (1, False, 0)
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def _register(self) -> Iterable[RemovableHandle]:
        raise NotImplementedError

    def attach(self) -> None:
        """Register the hooks (idempotent). If registering fails part-way, what was registered is removed."""
        if self._handles:
            return
        try:
            for handle in self._register():
                self._handles.append(handle)
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        """Remove every hook this set registered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self):  # noqa: ANN204 - returns the subclass
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


@contextlib.contextmanager
def model_state(
    model: nn.Module,
    *,
    train: bool | None = False,
    grad: bool | None = False,
    restore_buffers: bool = False,
    fork_rng: bool = False,
    calibration: bool = False,
    batch_stats: bool = False,
) -> Iterator[None]:
    """Run the block with ``model`` in train (``True``) / eval (``False``) / unchanged (``None``) mode and gradients
    on / off / unchanged; afterwards every module's own ``training`` flag and the grad mode are as they were.

    Args:
        model: the model.
        train: the mode to put every module in for the block.
        grad: the grad mode for the block.
        restore_buffers: copy every buffer (running statistics, ``num_batches_tracked``) back afterwards.
        fork_rng: restore the CPU and CUDA random state afterwards (dropout draws leave no trace).
        calibration: mark the block as a deliberate train-mode pass without gradients (see :func:`calibrating`).
        batch_stats: with ``train=False``, BatchNorm-family modules still normalize with the batch's statistics, as
            in training (dropout stays off); their running statistics are restored afterwards.

    Example::

        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
        >>> net[1].eval()  # doctest: +ELLIPSIS
        Dropout(...)
        >>> with model_state(net):
        ...     (net.training, torch.is_grad_enabled())
        (False, False)
        >>> net.training, net[1].training, torch.is_grad_enabled()
        (True, False, True)
    """
    modes = [(m, m.training) for m in model.modules()]
    restore_buffers = restore_buffers or batch_stats
    calibration = calibration or batch_stats
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()} if restore_buffers else {}
    devices = sorted({b.device.index or 0 for b in model.parameters() if b.device.type == "cuda"})
    with contextlib.ExitStack() as stack:
        if fork_rng:
            stack.enter_context(torch.random.fork_rng(devices=devices))
        if grad is not None:
            stack.enter_context(torch.set_grad_enabled(grad))
        if calibration:
            stack.enter_context(calibrating())
        try:
            if train is not None:
                model.train(train)
            if batch_stats:
                for module in model.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.train()
            yield
        finally:
            for module, training in modes:
                module.training = training
            if buffers:
                with torch.no_grad():
                    for name, buffer in model.named_buffers():
                        if name in buffers and buffer.shape == buffers[name].shape:
                            buffer.copy_(buffers[name])


@contextlib.contextmanager
def calibrating() -> Iterator[None]:
    """Mark a deliberate train-mode pass without gradients (BatchNorm recalibration): ``guard`` stays quiet."""
    token = _CALIBRATING.set(True)
    try:
        yield
    finally:
        _CALIBRATING.reset(token)


def is_calibrating() -> bool:
    """True inside :func:`calibrating`."""
    return _CALIBRATING.get()


def as_call(model: nn.Module, example_input: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` for ``model(*args, **kwargs)`` from a Tensor, a tuple of args or a dict of kwargs.

    Tensors are moved to the device of the model's first parameter.

    Example::

        >>> as_call(nn.Linear(2, 2), {"x": 1})
        ((), {'x': 1})
    """
    param = next(model.parameters(), None)
    if param is not None:
        example_input = tree_map(lambda t: t.to(param.device) if isinstance(t, Tensor) else t, example_input)
    if isinstance(example_input, dict):
        return (), dict(example_input)
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input), {}
    return (example_input,), {}


class StopForward(Exception):
    """Raised by a measuring hook once it has what it needs: the rest of the forward pass is not run."""


def run_forward(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    """``model(*args, **kwargs)``; an exception from ``forward`` becomes a ``ValueError`` naming it."""
    try:
        return model(*args, **kwargs)
    except StopForward:
        raise
    except Exception as err:
        raise ValueError(
            f"Expected the example input to run through {type(model).__name__}.forward, but it raised "
            f"{type(err).__name__}: {err}"
        ) from err
