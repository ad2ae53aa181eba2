"""Checks of the user's settings (model, data set and training arguments), shared by every public constructor.

Each check names the argument, what it expects and what it got, and returns the value in its plain Python type.
A bool is never taken for a number, and a float is never truncated to an int: ``size=10.7`` is refused instead of
silently becoming 10.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = ["check_bool_setting", "check_choice", "check_int_setting", "check_positive_setting", "check_real_setting"]


def check_bool_setting(name: str, value, *, optional: bool = False) -> bool | None:
    """``value`` if it is a bool (a NumPy bool too), or None when ``optional``; anything else, even 0, 1 or "no"
    (which is truthy), is refused."""
    if optional and value is None:
        return None
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be {'None or ' if optional else ''}a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def check_int_setting(name: str, value, minimum: int, *, optional: bool = False) -> int | None:
    """``value`` as an int >= minimum (or None when ``optional``); a float (even 2.0), a bool or anything else is
    refused with a TypeError, a smaller int with a ValueError."""
    if optional and value is None:
        return None
    expected = f"{'None or ' if optional else ''}an int >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be {'None or ' if optional else ''}>= {minimum}, got {value}")
    return int(value)


def check_real_setting(name: str, value, minimum, *, exclusive: bool = False, maximum=None,
                       optional: bool = False) -> float | None:
    """``value`` as a finite float >= minimum (> minimum when ``exclusive``; <= maximum where given), or None when
    ``optional``. A non-number or a bool is refused with a TypeError; NaN, an infinity or a value out of range
    with a ValueError."""
    if optional and value is None:
        return None
    bounds = f"{'>' if exclusive else '>='} {minimum}" + ("" if maximum is None else f" and <= {maximum}")
    expected = f"{'None or ' if optional else ''}a finite number {bounds}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    in_range = (value > minimum if exclusive else value >= minimum) and (maximum is None or value <= maximum)
    if not (math.isfinite(value) and in_range):
        raise ValueError(f"{name} must be {expected}, got {value}")
    return float(value)


def check_positive_setting(name: str, value) -> float:
    """``value`` as a finite float > 0."""
    return check_real_setting(name, value, 0, exclusive=True)


def check_choice(name: str, value, choices) -> str:
    """``value`` if it is one of ``choices`` (strings), else a ValueError naming the argument and the choices."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value
