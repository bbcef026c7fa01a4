"""Training on partially labelled cases: confident unmarked lesions become "unknown" instead of "background".

A partially labelled case (dataset.json ``"partially_labelled"``; FLARE24 marks only the primary lesion of
such scans) has lesions whose voxels are labelled background. Trained as if complete, the network is taught
that those lesions are background. The setting is positive-unlabelled learning: a marked voxel is certainly
tumour, an unmarked one is tumour or background. Where the network itself (after ``warmup_epochs``, once it
recognises lesions) predicts tumour with probability above ``threshold`` on an unmarked voxel of such a case,
that voxel is more likely a missed lesion than background, so for that training step it gets nnU-Net's ignore
label: it then takes part in neither the cross entropy nor the Dice (``loss.DiceCELoss(ignore_label=K)``,
the semantics of nnU-Net's sparse-annotation ignore label, K = the number of classes). Marked lesions, the
rest of the background and every voxel of completely labelled cases teach as before. The probabilities are
the detached softmax of the full-resolution output of the same forward pass (no second pass, no gradient
through the choice); the deep-supervision targets are downsampled from the modified label (nearest
neighbour, so the ignore value survives).

A predicted region connected (26-neighbourhood, within the patch) to a marked lesion is that lesion's
over-segmentation, not an unmarked lesion: a marked lesion is marked whole (FLARE24's partial labels mark the
primary lesion completely), so its surroundings are background and keep teaching it (``spare_marked``, on by
default; off: every confident unmarked voxel is ignored, the rule before; at the demonstration's final weights
16 % of the voxels it ignored were such rims).

In the YAML, ``model.partial_labels: {mode: none | ignore_confident, threshold: 0.5, warmup_epochs: 0,
spare_marked: true}``; ``none`` (the default) changes nothing.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import numpy as np
import torch

from .plan import Plan

MODES = ("none", "ignore_confident")


@dataclass(frozen=True)
class PartialLabelSettings:
    """``mode``: "none" or "ignore_confident"; ``threshold``: tumour probability (1 - p(background)) above which an
    unmarked voxel of a partially labelled case is ignored; ``warmup_epochs``: epochs trained on the labels as they
    are before that starts; ``spare_marked``: predicted regions connected to a marked lesion are not ignored."""

    mode: str = "none"
    threshold: float = 0.5
    warmup_epochs: int = 0
    spare_marked: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"model.partial_labels.mode must be one of {list(MODES)}, got {self.mode!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not 0 <= self.threshold < 1:
            raise ValueError(f"model.partial_labels.threshold must be a probability in [0, 1), got {self.threshold!r}")
        if isinstance(self.warmup_epochs, bool) or not isinstance(self.warmup_epochs, int) or self.warmup_epochs < 0:
            raise ValueError(f"model.partial_labels.warmup_epochs must be an integer >= 0, got {self.warmup_epochs!r}")
        if not isinstance(self.spare_marked, bool):
            raise ValueError(f"model.partial_labels.spare_marked must be true or false, got {self.spare_marked!r}")

    @classmethod
    def from_any(cls, value: "PartialLabelSettings | Mapping[str, Any] | None") -> "PartialLabelSettings":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"unknown model.partial_labels settings {unknown}; known: {sorted(names)}")
        return cls(**dict(value))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def ignore_value(self, plan: Plan | None) -> int | None:
        """The loss's ignore label: the dataset's (the plan's), else num_classes when this mode needs one, else None."""
        if plan is not None and plan.ignore_label is not None:
            return plan.ignore_label
        if self.active:
            if plan is None:
                raise ValueError("model.partial_labels needs the plan (its number of classes) before training")
            return plan.num_classes
        return None


def connected_to(seeds: torch.Tensor, region: torch.Tensor, check_every: int = 8) -> torch.Tensor:
    """bool (B, 1, *spatial) voxels of ``region`` connected to a voxel of ``seeds`` (both bool, same shape; seeds
    inside the region) through the region, 26-neighbourhood (3-D; 8 in 2-D): geodesic dilation by max pooling
    until nothing changes, on the tensors' device (one host sync every ``check_every`` steps)."""
    pool = {4: torch.nn.functional.max_pool2d, 5: torch.nn.functional.max_pool3d}.get(seeds.ndim)
    if pool is None:
        raise ValueError(f"seeds must be (B, 1, x, y) or (B, 1, x, y, z), got {tuple(seeds.shape)}")
    grown, region = (seeds & region).float(), region.float()
    while True:
        before = grown
        for _ in range(check_every):
            grown = pool(grown, 3, stride=1, padding=1) * region
        if torch.equal(grown, before):  # it only grows: unchanged after the steps, unchanged by each
            return grown > 0


def ignore_confident_background(target: torch.Tensor, logits: torch.Tensor, partial: torch.Tensor,
                                ignore_label: int, threshold: float, spare_marked: bool = False) -> torch.Tensor:
    """``target`` (B, 1, *spatial) integer labels with background voxels of the ``partial`` samples ((B,) bool)
    where the detached softmax of ``logits`` (B, C, *spatial) gives tumour (1 - p(background)) above ``threshold``
    set to ``ignore_label``; with ``spare_marked``, except those connected through such voxels to a marked (tumour)
    voxel: the marked lesion's over-segmentation. A new tensor; ``target`` is not changed."""
    if target.ndim != logits.ndim or target.shape[1] != 1 or target.shape[2:] != logits.shape[2:]:
        raise ValueError(f"target {tuple(target.shape)} must be (B, 1, *spatial) of logits {tuple(logits.shape)}")
    with torch.no_grad():
        tumour = 1 - torch.softmax(logits.detach().float(), dim=1)[:, :1]
        which = partial.to(device=target.device, dtype=torch.bool).view(-1, *([1] * (target.ndim - 1)))
        confident = which & (target == 0) & (tumour > threshold)
        if spare_marked and bool(confident.any()):
            marked = (target > 0) & (target != ignore_label)
            confident &= ~connected_to(marked, confident | marked)
        return target.masked_fill(confident, ignore_label)


def training_target(settings: PartialLabelSettings, target: torch.Tensor, logits: torch.Tensor,
                    partial: torch.Tensor | None, ignore_label: int | None, epoch: int) -> torch.Tensor:
    """The step's full-resolution target: ``target`` itself unless ``ignore_confident`` is on, past its warm-up,
    and the batch holds partially labelled patches."""
    if settings.mode != "ignore_confident" or epoch < settings.warmup_epochs or partial is None or not bool(partial.any()):
        return target
    return ignore_confident_background(target, logits, partial, ignore_label, settings.threshold, settings.spare_marked)


def unmarked_components(prediction: np.ndarray, label: np.ndarray) -> np.ndarray:
    """bool mask of the predicted components (26-connected, ``prediction > 0``) that touch no marked voxel
    (``label`` > 0) of a partially labelled case: unmarked lesions or false positives, the label cannot say which.
    Validation leaves them out of its scores (as the round's merge rule treats them: unknown), so that a partially
    labelled validation case neither rewards removing a found unmarked lesion (the choice of ``min_component_ml``,
    the healthy-scan decision) nor penalises finding it (val/dsc); components over a marked lesion are scored whole
    (its excess is over-segmentation: the marked lesion is complete)."""
    from scipy import ndimage

    prediction = np.asarray(prediction)
    components, count = ndimage.label(prediction > 0, structure=np.ones((3,) * prediction.ndim, bool))
    if count == 0:
        return np.zeros(np.shape(prediction), bool)
    touched = np.unique(components[np.asarray(label) > 0])
    return (components > 0) & ~np.isin(components, touched[touched > 0])


def left_out_of_scores(prediction: np.ndarray, raw: np.ndarray, ignore_label: int | None,
                       partial: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Validation's label and what it leaves out of its scores: ``raw`` with a declared ignore region set to
    background, and the bool mask of that region plus, on a partially labelled case, the predicted components that
    touch no marked lesion (``unmarked_components``); None when nothing is left out."""
    ignored = None if ignore_label is None else raw == ignore_label
    label = without_ignored(raw, raw, ignore_label)[1]
    if partial:
        unknown = unmarked_components(prediction, label)
        ignored = unknown if ignored is None else ignored | unknown
    return label, ignored


def without_ignored(prediction: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor, ignore_label: int | None):
    """Masks with the ignore region left out of the scores (validation, patch pseudo-Dice, test; nnU-Net's evaluation
    ignores it too): both set to background where ``label`` is ``ignore_label``; unchanged without one. NumPy arrays
    or torch tensors (on their device), of the same shape; dtypes kept."""
    if ignore_label is None:
        return prediction, label
    ignored = label == ignore_label
    if isinstance(label, torch.Tensor):
        return prediction.masked_fill(ignored, 0), label.masked_fill(ignored, 0)
    return np.where(ignored, 0, prediction).astype(prediction.dtype), np.where(ignored, 0, label).astype(label.dtype)
