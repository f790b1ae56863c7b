"""The options :func:`lightning_bn.prepare` and :class:`lightning_bn.AutoInit` share: one typed dataclass, checked once.

Every check raises when the options are built, naming the bad value and what is allowed, before any model is seen.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

from lightning_bn.init import SCHEMES
from lightning_bn.norms import POSITIONS, get_norm_layer

__all__ = ["INIT_CHOICES", "OVERRIDE_CHOICES", "InitChoice", "PrepareOptions"]

InitChoice = Literal["auto", "lsuv", "xavier", "kaiming", "lecun", "orthogonal", "numeric"]
Distribution = Literal["normal", "uniform", "truncated_normal"]
FanMode = Literal["fan_in", "fan_out"]
Position = Literal["pre", "post"]

#: What ``init=`` accepts: ``"auto"`` (per layer, from the activation), ``"lsuv"``, or one scheme for every layer.
INIT_CHOICES: tuple[str, ...] = get_args(InitChoice)
#: What an ``overrides`` value accepts: any ``init`` choice, or ``"skip"`` to leave the layer as it is.
OVERRIDE_CHOICES: tuple[str, ...] = (*INIT_CHOICES, "skip")
assert set(SCHEMES) <= set(INIT_CHOICES)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"Expected `{name}` to be one of {list(allowed)} but got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive integer but got {value!r}")


@dataclass(frozen=True)
class PrepareOptions:
    """What to do to a model: the init scheme, the norms to insert, and how to draw and rescale.

    Args:
        init: ``"auto"``, ``"lsuv"`` or a scheme of :data:`lightning_bn.init.SCHEMES`.
        norm: ``None`` (no insertion), ``"auto"``, a registered norm name, a norm class or a ``functools.partial``.
        overrides: glob pattern on qualified layer names -> ``init`` choice or ``"skip"``; the first match wins.
        position: ``"pre"`` (norm between layer and activation) or ``"post"`` (after an activation module).
        exclude: glob patterns on qualified layer names that get no norm.
        keep_bias: keep the biases a following BatchNorm / InstanceNorm makes redundant.
        distribution: ``"normal"``, ``"uniform"`` or ``"truncated_normal"``.
        mode: ``"fan_in"`` or ``"fan_out"``.
        zero_init_residual: zero the weight of the last norm in each residual branch.
        tol: tolerance (> 0) on the unit output variance of the data-driven rescaling.
        max_iters: rescaling iterations per layer (>= 1).
        seed: seed of a private generator for the random draws; ``None`` draws from the global one.

    Raises:
        ValueError: naming the bad value and the values allowed.
        TypeError: for ``overrides`` that is not a dict of patterns, an ``exclude`` that is not a list of patterns.

    Example::

        >>> PrepareOptions(init="lsuv", norm="batch").norm
        'batch'
        >>> try:
        ...     PrepareOptions(init="glorot")
        ... except ValueError as err:
        ...     print(str(err).split(" but ")[1])
        got 'glorot'
    """

    init: InitChoice = "auto"
    norm: Any = None
    overrides: Mapping[str, str] = field(default_factory=dict)
    position: Position = "pre"
    exclude: tuple[str, ...] = ()
    keep_bias: bool = False
    distribution: Distribution = "normal"
    mode: FanMode = "fan_in"
    zero_init_residual: bool = False
    tol: float = 0.1
    max_iters: int = 10
    seed: int | None = None

    def __post_init__(self) -> None:
        _choice("init", self.init, INIT_CHOICES)
        if self.norm is not None and self.norm != "auto" and get_norm_layer(self.norm) is None:
            raise ValueError(f"Expected `norm` to be a norm, 'auto' or None but got {self.norm!r}")
        _choice("position", self.position, tuple(POSITIONS))
        exclude = self.exclude
        if exclude is None:
            exclude = ()
        if isinstance(exclude, str) or not all(isinstance(p, str) for p in exclude):
            raise TypeError(f"Expected `exclude` to be a list of glob patterns (str) but got {exclude!r}")
        object.__setattr__(self, "exclude", tuple(exclude))
        _choice("distribution", self.distribution, get_args(Distribution))
        _choice("mode", self.mode, get_args(FanMode))
        overrides = {} if self.overrides is None else self.overrides
        if not isinstance(overrides, Mapping):
            raise TypeError(f"Expected `overrides` to be a dict of glob pattern -> scheme but got {overrides!r}")
        for pattern, scheme in overrides.items():
            if not isinstance(pattern, str):
                raise TypeError(f"Expected each `overrides` key to be a glob pattern (str) but got {pattern!r}")
            if scheme not in OVERRIDE_CHOICES:
                raise ValueError(
                    f"Expected `overrides[{pattern!r}]` to be one of {list(OVERRIDE_CHOICES)} but got {scheme!r}"
                )
        object.__setattr__(self, "overrides", dict(overrides))
        for name in ("keep_bias", "zero_init_residual"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Expected `{name}` to be True or False but got {getattr(self, name)!r}")
        tol = self.tol
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (tol > 0 and math.isfinite(tol)):
            raise ValueError(f"Expected `tol` to be a positive number but got {tol!r}")
        _positive_int("max_iters", self.max_iters)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"Expected `seed` to be an integer or None but got {self.seed!r}")

    @classmethod
    def names(cls) -> list[str]:
        """The option names, in order (the keyword arguments of ``prepare`` and ``AutoInit``)."""
        return [f.name for f in fields(cls)]
