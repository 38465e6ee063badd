"""Argument checks shared by the library's public functions.

One convention throughout: a value of the wrong type (a float or a bool where an integer belongs, a string where a
number does) is a TypeError, and a value of the right type out of range is a ValueError; both name the argument and
say what was expected.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch


def check_positive(value: Any, name: str, expected: str = "a positive number") -> float:
    """``value`` as a float, or TypeError / ValueError naming ``name`` unless it is a positive, finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected {expected}, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: expected a positive finite number, got {value}")
    return float(value)


def check_number(value: Any, name: str, *, positive: bool = False) -> float:
    """``value`` (any real number: Python, NumPy or a 0-d tensor) as a float, or a ValueError / TypeError naming
    ``name`` unless it is finite (and positive, with ``positive``)."""
    try:
        if isinstance(value, (bool, str, bytes)):  # float("3") would pass
            raise TypeError
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}") from None
    if not math.isfinite(number) or (positive and number <= 0):
        raise ValueError(f"{name}: expected a {'positive ' if positive else ''}finite number, got {value!r}")
    return number


def _as_index(value: Any) -> int | None:
    """``value`` as an int if it is an integer (Python, NumPy or a one-element integer tensor), else None; bools,
    which Python counts as integers, are not."""
    if type(value).__name__ in ("bool", "bool_") or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_int(value: Any, name: str, low: int = 1, high: int | None = None) -> int:
    """``value`` as an int with low ≤ value (≤ high); TypeError naming ``name`` unless an integer, ValueError
    unless in range."""
    number = _as_index(value)
    bounds = f"from {low} to {high}" if high is not None else f">= {low}"
    if number is None:
        raise TypeError(f"{name}: expected an integer {bounds}, got {type(value).__name__}")
    if number < low or (high is not None and number > high):
        raise ValueError(f"{name}: expected an integer {bounds}, got {number}")
    return number


def check_shape(value: Any, name: str, *, min_dims: int = 1, what: str = "the shape of one sample") -> tuple[int, ...]:
    """``value`` (a tuple, list, ``torch.Size`` or other sequence of integers) as a tuple of ints, each >= 1, with at
    least ``min_dims`` of them. TypeError naming ``name`` unless a sequence of integers; ValueError unless the
    sizes are positive and enough."""
    if isinstance(value, (str, bytes)):
        sizes = None
    else:
        try:
            sizes = [_as_index(size) for size in value]
        except TypeError:
            sizes = None
    if sizes is None or any(size is None for size in sizes):
        raise TypeError(f"{name}: expected {what}, a tuple of integers, got {value!r}")
    if len(sizes) < min_dims or any(size < 1 for size in sizes):
        dims = f"at least {min_dims} " if min_dims > 1 else ""
        raise ValueError(f"{name}: expected {what}, {dims}positive sizes, got {tuple(sizes)}")
    return tuple(sizes)


def check_float_dtype(dtype: Any, name: str = "dtype") -> torch.dtype:
    """``dtype`` if it is a floating-point torch.dtype; a TypeError naming ``name`` otherwise."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point torch.dtype, got {dtype!r}")
    return dtype
