"""Measurements on a model that need no trace: output std per module, and the module-order fallback detector."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_bn.activations import Activation, activation_of_module, get_activation
from lightning_bn.tracing.hooks import HookSet, as_call, model_state, run_forward

__all__ = ["OutputStds", "module_order_activations", "output_stds"]


class OutputStds(HookSet):
    """Record the standard deviation of each named module's output (first call) while attached; one transfer.

    Example::

        >>> import torch
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        >>> with OutputStds(net, ["0"]) as recorder:
        ...     _ = net(torch.randn(8, 4))
        >>> list(recorder.values())
        ['0']
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        modules = dict(model.named_modules())
        self._targets = [(n, modules[n]) for n in names]
        self._found: dict[str, Tensor] = {}

    def _register(self) -> Any:
        self._found = {}
        for name, module in self._targets:
            yield module.register_forward_hook(self._hook(name))

    def _hook(self, name: str) -> Callable:
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            main = output[0] if isinstance(output, tuple) else output
            if name not in self._found and isinstance(main, Tensor):
                self._found[name] = main.detach().float().std()

        return record

    def values(self) -> dict[str, float]:
        """``{name: std}`` of the modules that ran (one device-to-host transfer)."""
        if not self._found:
            return {}
        return dict(zip(self._found, torch.stack(list(self._found.values())).cpu().tolist()))


def output_stds(model: nn.Module, example_input: Any, names: Sequence[str]) -> dict[str, float]:
    """Standard deviation of each named module's output (first call) on ``example_input``, in eval mode.

    Example::

        >>> import torch
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        >>> list(output_stds(net, torch.randn(8, 4), ["0", "1"]))
        ['0', '1']
    """
    args, kwargs = as_call(model, example_input)
    recorder = OutputStds(model, names)
    with recorder, model_state(model):
        run_forward(model, args, kwargs)
    return recorder.values()


def module_order_activations(model: nn.Module, layer_types: tuple[type[nn.Module], ...]) -> dict[str, Activation]:
    """The detector for when no example input exists: each layer gets the first activation *module* registered
    after it, unless another layer comes first (then identity, as for the last layer). Functional activations are
    invisible to it; :func:`~lightning_bn.tracing.trace_model` sees them.

    Example::

        >>> net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))
        >>> {n: a.name for n, a in module_order_activations(net, (nn.Linear,)).items()}
        {'0': 'tanh', '2': 'identity'}
    """
    out: dict[str, Activation] = {}
    pending: str | None = None
    for name, module in model.named_modules():
        if isinstance(module, layer_types):
            if pending is not None:
                out[pending] = get_activation(None)
            pending = name
            continue
        activation = activation_of_module(module)
        if activation is not None and not activation.is_identity and pending is not None:
            out[pending] = activation
            pending = None
    if pending is not None:
        out[pending] = get_activation(None)
    return out
