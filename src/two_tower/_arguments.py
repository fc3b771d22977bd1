"""Checks of scalar constructor and method arguments, shared by every public class.

Each check accepts what a user plausibly passes for a number (Python numbers and NumPy
scalars such as `np.int64(16)` or `np.float32(0.9)`, which come out of array arithmetic),
returns a plain Python value (so `get_config` stays JSON-serializable), and refuses
anything else with a `ValueError` that names the argument, what was received and what
was expected. `bool` is never a number here: `True` for a count is a mistake.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def _received(name: str, value: Any) -> str:
    kind = type(value).__name__
    return f"Received: {name}={value!r} ({kind})"


def _where(owner: str | None) -> str:
    return f"{owner}: " if owner else ""


def integer(
    name: str,
    value: Any,
    *,
    minimum: int | None = 1,
    maximum: int | None = None,
    owner: str | None = None,
) -> int:
    """Returns `value` as a Python `int` in `[minimum, maximum]`, or raises `ValueError`.

    Accepts Python and NumPy integers; refuses `bool`, floats (even `16.0`) and strings.
    """
    expected = f"an integer {_range_text(minimum, maximum)}".rstrip()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{_where(owner)}`{name}` must be {expected}. {_received(name, value)}")
    result = int(value)
    if (minimum is not None and result < minimum) or (maximum is not None and result > maximum):
        raise ValueError(f"{_where(owner)}`{name}` must be {expected}. {_received(name, value)}")
    return result


def _range_text(minimum: float | None, maximum: float | None, open_low: bool = False) -> str:
    low = "(" if open_low else "["
    if minimum is not None and maximum is not None:
        return f"in {low}{minimum}, {maximum}]"
    if minimum is not None:
        return f"{'>' if open_low else '>='} {minimum}"
    if maximum is not None:
        return f"<= {maximum}"
    return ""


def number(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    open_minimum: bool = False,
    owner: str | None = None,
) -> float:
    """Returns `value` as a finite Python `float` within the bounds, or raises `ValueError`.

    Accepts Python and NumPy integers and floats; refuses `bool`, strings, NaN and inf.
    `open_minimum=True` excludes `minimum` itself (for a temperature or a learning rate).
    """
    expected = f"a finite number {_range_text(minimum, maximum, open_minimum)}".rstrip()
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise ValueError(f"{_where(owner)}`{name}` must be {expected}. {_received(name, value)}")
    result = float(value)
    too_low = minimum is not None and (result <= minimum if open_minimum else result < minimum)
    too_high = maximum is not None and result > maximum
    if not math.isfinite(result) or too_low or too_high:
        raise ValueError(f"{_where(owner)}`{name}` must be {expected}. {_received(name, value)}")
    return result


def boolean(name: str, value: Any, *, owner: str | None = None) -> bool:
    """Returns `value` as a Python `bool` (NumPy's `np.bool_` too), or raises `ValueError`."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{_where(owner)}`{name}` must be True or False. {_received(name, value)}")
    return bool(value)


def choice(name: str, value: Any, options: tuple[str, ...], *, owner: str | None = None) -> str:
    """Returns `value` if it is one of the string `options`, or raises `ValueError`."""
    if not isinstance(value, str) or value not in options:
        listed = ", ".join(repr(option) for option in options)
        raise ValueError(
            f"{_where(owner)}`{name}` must be one of {listed}. {_received(name, value)}"
        )
    return value


def seed(name: str, value: Any, *, owner: str | None = None) -> int | None:
    """Returns a seed: `None` (draw one) or a non-negative integer, or raises `ValueError`."""
    if value is None:
        return None
    return integer(name, value, minimum=0, owner=owner)


def cutoffs(name: str, value: Any, *, owner: str | None = None) -> tuple[int, ...]:
    """A non-empty sequence of positive integers (the `ks` of a metric table), as a tuple."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ValueError(
            f"{_where(owner)}`{name}` must be a non-empty sequence of positive integers. "
            f"Received: {name}={value!r}"
        )
    return tuple(integer(name, k, owner=owner) for k in value)
