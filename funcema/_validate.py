"""Argument checks shared by every public function: one clear error that names the argument.

Owns: every check of a user-supplied argument. A wrong *type* (including a bool where a number
is expected) is a `TypeError`; a value of the right type outside its range is a `ValueError`.

Must not import: any other funcema module (this is the bottom layer; it imports `torch` only).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

__all__ = ["boolean", "bounded_float", "callable_or_none", "finite_float", "floating_dtype", "integer", "one_of"]


def finite_float(name: str, value: object) -> float:
    """Return `value` as a finite float.

    Raises:
        TypeError: `value` is a bool or not a real number.
        ValueError: `value` is NaN, infinite, or too large for a float.
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
    """Return `value` as an int of at least `minimum`.

    Raises:
        TypeError: `value` is a bool or not an integer.
        ValueError: `value` is below `minimum`.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
    result = int(value)
    if result < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {result}.")
    return result


def boolean(name: str, value: object) -> bool:
    """Return `value` if it is a bool.

    Raises:
        TypeError: `value` is not a bool (an int such as 1 is rejected too).
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}.")
    return value


def floating_dtype(name: str, value: object, *, complex_ok: bool) -> torch.dtype | None:
    """Return `value` if it is `None` or a floating (or, with `complex_ok`, complex) dtype.

    Raises:
        TypeError: `value` is neither `None` nor a `torch.dtype`.
        ValueError: `value` is a dtype of another kind (integer, bool).
    """
    if value is None:
        return None
    if not isinstance(value, torch.dtype):
        raise TypeError(f"{name} must be None or a torch.dtype such as torch.float32, got {type(value).__name__}.")
    if not (value.is_floating_point or (complex_ok and value.is_complex)):
        raise ValueError(f"{name} must be None or a floating torch.dtype such as torch.float32, got {value!r}.")
    return value


def one_of(name: str, value: object, choices: Sequence[str]) -> str:
    """Return `value` if it is one of the strings `choices`.

    Raises:
        ValueError: `value` is not one of `choices`.
    """
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}.")
    return value


def callable_or_none(name: str, value: object, signature: str) -> None:
    """Check that `value` is `None` or callable.

    Raises:
        TypeError: `value` is neither, with the expected `signature` in the message.
    """
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a callable {signature} or None, got {type(value).__name__}.")


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
