"""nnU-Net's training loss: soft Dice + cross entropy, with deep supervision.

Conventions follow nnU-Net v2 (MemoryEfficientSoftDiceLoss, DC_and_CE_loss, DeepSupervisionWrapper):
the Dice term is the *negative* mean soft Dice, so the combined loss can go below zero.
Everything is computed in float32, also under autocast.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _label_map(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Integer labels as (B, *spatial) long, from (B, 1, *spatial) or (B, *spatial)."""
    spatial = logits.shape[2:]
    if target.ndim == logits.ndim and target.shape[1] == 1:
        target = target[:, 0]
    if target.shape != (logits.shape[0], *spatial):
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}; "
                         "expected (B, 1, *spatial) or (B, *spatial) integer labels")
    return target.long()


class SoftDiceLoss(nn.Module):
    """Negative mean soft Dice over classes, on softmax probabilities.

    batch_dice sums intersection and volumes over the batch and spatial axes (one Dice per class);
    otherwise one Dice per sample and class. dc = (2 I + smooth) / max(P + G + smooth, 1e-8).
    """

    def __init__(self, smooth: float = 1e-5, batch_dice: bool = True, include_background: bool = False) -> None:
        super().__init__()
        self.smooth = smooth
        self.batch_dice = batch_dice
        self.include_background = include_background

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            labels = _label_map(target, logits)
            probs = torch.softmax(logits.float(), dim=1)
            onehot = torch.zeros_like(probs).scatter_(1, labels.unsqueeze(1), 1.0)
            if not self.include_background:
                probs, onehot = probs[:, 1:], onehot[:, 1:]
            axes = tuple(range(2, probs.ndim))
            intersect = (probs * onehot).sum(axes)  # (B, C)
            sum_pred = probs.sum(axes)
            sum_gt = onehot.sum(axes)
            if self.batch_dice:
                intersect, sum_pred, sum_gt = intersect.sum(0), sum_pred.sum(0), sum_gt.sum(0)
            dc = (2 * intersect + self.smooth) / torch.clamp(sum_pred + sum_gt + self.smooth, min=1e-8)
            return -dc.mean()


class DiceCELoss(nn.Module):
    """weight_ce * CrossEntropy + weight_dice * SoftDice (nnU-Net's DC_and_CE_loss); zero-weight terms are skipped."""

    def __init__(self, weight_dice: float = 1.0, weight_ce: float = 1.0, smooth: float = 1e-5,
                 batch_dice: bool = True, include_background: bool = False) -> None:
        super().__init__()
        self.weight_dice = weight_dice
        self.weight_ce = weight_ce
        self.dice = SoftDiceLoss(smooth=smooth, batch_dice=batch_dice, include_background=include_background)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            loss = logits.new_zeros((), dtype=torch.float32)
            if self.weight_ce != 0:
                loss = loss + self.weight_ce * F.cross_entropy(logits.float(), _label_map(target, logits))
            if self.weight_dice != 0:
                loss = loss + self.weight_dice * self.dice(logits, target)
            return loss


def deep_supervision_weights(n: int, lowest: float = 0.0) -> list[float]:
    """Weights 1/2^i for n outputs, the lowest resolution set to ``lowest`` (0), normalised to sum 1.

    n=3 -> [2/3, 1/3, 0]; n=1 -> [1.0]. Under DDP nnU-Net uses ``lowest=1e-6`` so that the last head
    takes part in the loss (DDP rejects parameters without gradient).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if n == 1:
        return [1.0]
    w = [1.0 / 2 ** i for i in range(n)]
    w[-1] = float(lowest)
    total = sum(w)
    return [x / total for x in w]


class DeepSupervisionLoss(nn.Module):
    """sum_i weights[i] * loss(outputs[i], targets[i]), skipping zero weights (nnU-Net's DeepSupervisionWrapper)."""

    def __init__(self, loss: nn.Module, weights: Sequence[float]) -> None:
        super().__init__()
        if len(weights) == 0 or all(w == 0 for w in weights):
            raise ValueError(f"weights must contain a non-zero entry, got {list(weights)!r}")
        self.loss = loss
        self.weights = [float(w) for w in weights]

    def forward(self, outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(outputs) != len(self.weights) or len(targets) != len(self.weights):
            raise ValueError(f"expected {len(self.weights)} outputs and targets, "
                             f"got {len(outputs)} outputs and {len(targets)} targets")
        terms = [w * self.loss(o, t) for w, o, t in zip(self.weights, outputs, targets) if w != 0]
        return torch.stack(terms).sum()


def downsample_targets(target: torch.Tensor, scales: Sequence[Sequence[float]]) -> list[torch.Tensor]:
    """Label maps for each deep-supervision scale, by nearest neighbour ('nearest-exact').

    target: (B, 1, *spatial) or (B, *spatial) integer labels. New size = round(size * scale).
    A scale of all ones returns the original tensor; dtype is kept.
    """
    results = []
    for scale in scales:
        scale = tuple(float(s) for s in scale)
        n_sp = len(scale)
        if target.ndim - n_sp not in (1, 2):
            raise ValueError(f"scale {scale} does not fit target of shape {tuple(target.shape)}")
        if all(s == 1.0 for s in scale):
            results.append(target)
            continue
        x = target if target.ndim - n_sp == 2 else target.unsqueeze(1)
        size = [max(1, round(d * s)) for d, s in zip(x.shape[2:], scale)]
        y = F.interpolate(x.float(), size=size, mode="nearest-exact").to(target.dtype)
        results.append(y if target.ndim - n_sp == 2 else y[:, 0])
    return results
