"""Random draws for the random transforms; every number comes from torch's global generator."""
from __future__ import annotations

import torch

from .spec import split_at_one_ranges


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high)) if high > low else float(low)


def _uniform_split_at_one(low: float, high: float) -> float:
    """nnU-Net's ``BGContrast`` draw (``split_at_one_ranges``): one coin, then one value from the range it picked."""
    allowed, below, above = split_at_one_ranges(low, high)
    if float(torch.rand(1)) < 0.5 and allowed:
        return _uniform(*below)
    return _uniform(*above)


def _coin(probability: float) -> bool:
    return probability >= 1 or (probability > 0 and float(torch.rand(1)) < probability)
