"""Random draws for the random transforms; every number comes from torch's global generator."""
from __future__ import annotations

import torch


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high)) if high > low else float(low)


def _uniform_split_at_one(low: float, high: float) -> float:
    """nnU-Net's ``BGContrast`` draw: with probability 0.5 (if ``low < 1``) from U(low, 1),
    otherwise from U(max(low, 1), high)."""
    if float(torch.rand(1)) < 0.5 and low < 1:
        return _uniform(low, min(1.0, high))
    return _uniform(max(low, 1.0), high) if high >= 1 else _uniform(low, high)


def _coin(probability: float) -> bool:
    return probability >= 1 or (probability > 0 and float(torch.rand(1)) < probability)
