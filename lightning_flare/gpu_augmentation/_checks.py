"""Argument checks of ``BatchAugmentation`` (each returns the checked value or raises ValueError) and the seed
derivation shared by its generators and ``plan_gpu_augmentation``."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _probability(value, name: str) -> float:
    value = float(value)
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return value


def _pair(value, name: str, positive: bool = False, max_value: float | None = None) -> tuple[float, float]:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}")
    low, high = float(value[0]), float(value[1])
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ValueError(f"{name} must be finite with low <= high, got {value!r}")
    if positive and low <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    if low < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    if max_value is not None and high > max_value:
        raise ValueError(f"{name} must be <= {max_value}, got {value!r}")
    return low, high


def _crop(value) -> tuple[int, int, int]:
    values = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else (value,) * 3
    if len(values) != 3 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0
                                   for v in values):
        raise ValueError(f"crop must be a non-negative integer or three of them, got {value!r}")
    return tuple(int(v) for v in values)  # type: ignore[return-value]


def _derive_seed(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0] >> 1)
