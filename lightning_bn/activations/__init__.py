"""The one activation registry: activation kind -> implementations, local derivative, saturation, init.

Every other module asks this registry what an activation is; nothing else hard-codes activation names. See
:mod:`lightning_bn.activations.registry` for the registry and :mod:`lightning_bn.activations.builtins` for the kinds.
"""

from lightning_bn.activations import builtins as _builtins  # noqa: F401  (registers the built-in kinds)
from lightning_bn.activations.registry import (
    SATURATION_THRESHOLD,
    Activation,
    ActivationKind,
    activation_of_call,
    activation_of_module,
    available_activations,
    get_activation,
    register_activation,
    registered_kinds,
)

__all__ = [
    "SATURATION_THRESHOLD",
    "Activation",
    "ActivationKind",
    "activation_of_call",
    "activation_of_module",
    "available_activations",
    "get_activation",
    "register_activation",
    "registered_kinds",
]
