"""nnU-Net's training loss: soft Dice + cross entropy, with deep supervision.

Conventions follow nnU-Net v2 (MemoryEfficientSoftDiceLoss, DC_and_CE_loss, DeepSupervisionWrapper):
the Dice term is the *negative* mean soft Dice, so the combined loss can go below zero.
Everything is computed in float32, also under autocast.

``ignore_label`` K (nnU-Net's ignore label, the number of classes): voxels labelled K are unknown and take
part in neither term. CE is the mean over the other voxels (0 when there are none, as nnU-Net skips it); the
Dice multiplies prediction and one-hot reference by the mask of known voxels before every sum (nnU-Net's
``loss_mask``), so an ignored voxel adds nothing to the intersection, the predicted or the reference volume.
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

    def __init__(self, smooth: float = 1e-5, batch_dice: bool = True, include_background: bool = False,
                 ignore_label: int | None = None) -> None:
        super().__init__()
        self.smooth = smooth
        self.batch_dice = batch_dice
        self.include_background = include_background
        self.ignore_label = ignore_label

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            labels = _label_map(target, logits)
            probs = torch.softmax(logits.float(), dim=1)
            known = None
            if self.ignore_label is not None:
                known = (labels != self.ignore_label).unsqueeze(1)  # (B, 1, *spatial)
                labels = labels.masked_fill(~known[:, 0], 0)  # any class: the mask removes these voxels
            onehot = torch.zeros_like(probs).scatter_(1, labels.unsqueeze(1), 1.0)
            if known is not None:
                probs, onehot = probs * known, onehot * known
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
                 batch_dice: bool = True, include_background: bool = False, ignore_label: int | None = None) -> None:
        super().__init__()
        self.weight_dice = weight_dice
        self.weight_ce = weight_ce
        self.dice = SoftDiceLoss(smooth=smooth, batch_dice=batch_dice, include_background=include_background,
                                 ignore_label=ignore_label)

    @property
    def ignore_label(self) -> int | None:
        return self.dice.ignore_label

    def with_ignore_label(self, ignore_label: int | None) -> "DiceCELoss":
        """The same loss with another ignore label (itself when it is the same)."""
        if ignore_label == self.ignore_label:
            return self
        d = self.dice
        return DiceCELoss(weight_dice=self.weight_dice, weight_ce=self.weight_ce, smooth=d.smooth,
                          batch_dice=d.batch_dice, include_background=d.include_background, ignore_label=ignore_label)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            loss = logits.new_zeros((), dtype=torch.float32)
            if self.weight_ce != 0:
                loss = loss + self.weight_ce * self._cross_entropy(logits.float(), _label_map(target, logits))
            if self.weight_dice != 0:
                loss = loss + self.weight_dice * self.dice(logits, target)
            return loss

    def _cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.ignore_label is None:
            return F.cross_entropy(logits, labels)
        # mean over the known voxels; none known: 0 (F.cross_entropy's mean would be 0 / 0)
        known = int((labels != self.ignore_label).sum())
        return F.cross_entropy(logits, labels, ignore_index=self.ignore_label, reduction="sum") / max(known, 1)


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

    def __init__(self, loss: nn.Module, weights: Sequence[float], ignore_label: int | None = None) -> None:
        """``ignore_label``: the ignore label of every scale's loss (``loss.with_ignore_label``); None keeps ``loss``'s.
        Targets downsampled by ``downsample_targets`` (nearest neighbour) keep the ignore value."""
        super().__init__()
        if len(weights) == 0 or all(w == 0 for w in weights):
            raise ValueError(f"weights must contain a non-zero entry, got {list(weights)!r}")
        self.loss = loss if ignore_label is None else loss.with_ignore_label(ignore_label)
        self.weights = [float(w) for w in weights]

    @property
    def ignore_label(self) -> int | None:
        return getattr(self.loss, "ignore_label", None)

    def with_ignore_label(self, ignore_label: int | None) -> "DeepSupervisionLoss":
        """The same weights and loss with another ignore label (itself when it is the same)."""
        if ignore_label == self.ignore_label:
            return self
        return DeepSupervisionLoss(self.loss.with_ignore_label(ignore_label), self.weights)

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
