"""Argument checks shared by every public function: one clear error that names the argument."""

from __future__ import annotations

import math
import numbers

__all__ = ["finite_float", "integer"]


def finite_float(name: str, value: object) -> float:
    """Return ``value`` as a finite float.

    Raises:
        TypeError: ``value`` is a bool or not a real number.
        ValueError: ``value`` is NaN, infinite, or too large for a float.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__}).")
    try:
        result = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be finite, got {value!r}.") from None
    if not math.isfinite(result):
        raise ValueError(f"{name} must be finite, got {value!r}.")
    return result


def integer(name: str, value: object, *, minimum: int) -> int:
    """Return ``value`` as an int of at least ``minimum``.

    Raises:
        TypeError: ``value`` is a bool or not an integer.
        ValueError: ``value`` is below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
    result = int(value)
    if result < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {result}.")
    return result


def bounded_float(
    name: str,
    value: object,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return `value` as a finite float in the interval from `low` to `high`.

    `low_open` / `high_open` exclude that end (`low_open=True, low=0.0` means `> 0`).

    Raises:
        TypeError: `value` is a bool or not a real number.
        ValueError: `value` is not finite or lies outside the interval.
    """
    result = finite_float(name, value)
    below = result <= low if low_open else result < low
    above = result >= high if high_open else result > high
    if below or above:
        if math.isinf(high):
            expected = f"{'>' if low_open else '>='} {low!r}"
        else:
            expected = f"in {'(' if low_open else '['}{low!r}, {high!r}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be {expected}, got {value!r}.")
    return result
