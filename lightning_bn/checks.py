"""The one set of argument checks: every option of :class:`~lightning_bn.monitoring.MonitorOptions`,
:class:`~lightning_bn.prepare.PrepareOptions`, :class:`~lightning_bn.report.Thresholds` and ``lightning-bn report`` is
checked here, so the same value is accepted or rejected with the same message wherever it is given.

Each check returns the value (normalized: ints stay ints, numbers become floats) or raises ``ValueError`` naming the
option and the value: ``Expected `max_dead` to be a fraction in [0, 1] but got 5``. Pure Python.

:func:`user_stacklevel` is the one rule for where a warning points: the user's line, not the library's.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Collection
from typing import Any

__all__ = [
    "boolean",
    "choice",
    "fraction",
    "integer",
    "number",
    "parse_number",
    "user_stacklevel",
]

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` in the calling function that names the user's line: 1 (the caller)
    plus one per frame of lightning-bn or torch above it (a hook inside ``model(x)``, the monitoring engine under
    ``Monitor``); 1 when every frame is internal."""
    internal = [_PACKAGE]
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch, "__file__", None):
        internal.append(os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)
    frame = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(tuple(internal)):
        frame = frame.f_back
        level += 1
    return level if frame is not None else 1


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def _fail(name: str, what: str, value: Any) -> ValueError:
    return ValueError(f"Expected `{name}` to be {what} but got {value!r}")


def integer(name: str, value: Any, low: int = 1) -> int:
    """An integer >= ``low``.

    Example::

        >>> integer("every_n_steps", 0)
        Traceback (most recent call last):
        ...
        ValueError: Expected `every_n_steps` to be an integer >= 1 but got 0
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(name, f"an integer >= {low}", value)
    return value


def number(
    name: str, value: Any, low: float = 0.0, *, strict: bool = True, high: float = math.inf, allow_inf: bool = False
) -> float:
    """A number above ``low`` (at or above it unless ``strict``), at most ``high``, finite unless ``allow_inf``.

    Example::

        >>> number("norm_type", -1)
        Traceback (most recent call last):
        ...
        ValueError: Expected `norm_type` to be a number > 0 but got -1
        >>> number("norm_type", float("inf"), allow_inf=True)
        inf
    """
    what = f"a number {'>' if strict else '>='} {low:g}" + (f" and <= {high:g}" if math.isfinite(high) else "")
    if not _is_number(value) or math.isnan(value):
        raise _fail(name, what, value)
    if (value <= low if strict else value < low) or value > high or (math.isinf(value) and not allow_inf):
        raise _fail(name, what, value)
    return float(value)


def fraction(name: str, value: Any, *, open_low: bool = False) -> float:
    """A fraction in [0, 1] (in (0, 1] with ``open_low``).

    Example::

        >>> fraction("max_dead", 5)
        Traceback (most recent call last):
        ...
        ValueError: Expected `max_dead` to be a fraction in [0, 1] but got 5
    """
    what = f"a fraction in {'(' if open_low else '['}0, 1]"
    if not _is_number(value) or not (0 < value <= 1 if open_low else 0 <= value <= 1):
        raise _fail(name, what, value)
    return float(value)


def boolean(name: str, value: Any) -> bool:
    """``True`` or ``False``."""
    if not isinstance(value, bool):
        raise _fail(name, "True or False", value)
    return value


def choice(name: str, value: Any, allowed: Collection[Any]) -> Any:
    """One of ``allowed`` (compared by equality, booleans by identity).

    Example::

        >>> choice("fused", "fast", ("auto", "compiled", "eager"))
        Traceback (most recent call last):
        ...
        ValueError: Expected `fused` to be one of ['auto', 'compiled', 'eager'] but got 'fast'
    """
    for option in allowed:
        if value is option or (not isinstance(value, bool) and not isinstance(option, bool) and value == option):
            return option
    raise _fail(name, f"one of {list(allowed)}", value)


def parse_number(text: str) -> int | float:
    """A number typed on a command line: an ``int`` when it is written as one (``"5"``), else a ``float``; the value,
    not the text, is then checked like a Python argument. Raises ``ValueError`` for text that is no number."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected a number but got {text!r}") from None
