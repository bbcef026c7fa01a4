"""Argument validation helpers: each returns the checked value (as floats / ints / tuples) or raises ValueError."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _probability(value, name: str) -> float:
    value = _number(value, name)
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return value


def _range(value, name: str, *, min_value: float | None = None, max_value: float | None = None,
           positive: bool = False) -> tuple[float, float]:
    """``(low, high)`` with ``low <= high`` within the given bounds; ``positive`` requires ``low > 0``."""
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}")
    low, high = (_number(v, name) for v in value)
    if low > high:
        raise ValueError(f"{name} must be (low, high) with low <= high, got {value!r}")
    if positive and low <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    if min_value is not None and low < min_value:
        raise ValueError(f"{name} must be >= {min_value}, got {value!r}")
    if max_value is not None and high > max_value:
        raise ValueError(f"{name} must be <= {max_value}, got {value!r}")
    return low, high


def _triplet(value, name: str, *, min_value: float | None = None, max_value: float | None = None,
             positive: bool = False) -> tuple[float, float, float]:
    """A number (same for the three axes) or three numbers."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != 3:
            raise ValueError(f"{name} must be a number or three numbers, got {value!r}")
        values = tuple(_number(v, name) for v in value)
    else:
        values = (_number(value, name),) * 3
    for v in values:
        if positive and v <= 0:
            raise ValueError(f"{name} must be positive, got {value!r}")
        if min_value is not None and v < min_value:
            raise ValueError(f"{name} must be >= {min_value}, got {value!r}")
        if max_value is not None and v > max_value:
            raise ValueError(f"{name} must be <= {max_value}, got {value!r}")
    return values  # type: ignore[return-value]


def _channels(value) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, Sequence) or not value or not all(
        isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c >= 0 for c in value
    ):
        raise ValueError(f"channels must be None or non-negative channel indices, got {value!r}")
    return tuple(sorted({int(c) for c in value}))


def _crop_margin(value) -> tuple[int, int, int]:
    if isinstance(value, Sequence) and not isinstance(value, str):
        values = tuple(value)
    else:
        values = (value,) * 3
    if len(values) != 3 or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in values
    ):
        raise ValueError(f"crop must be a non-negative integer or three of them, got {value!r}")
    return tuple(int(v) for v in values)  # type: ignore[return-value]
