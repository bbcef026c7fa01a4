"""The teacher's passes over one scan for a pseudo-labelling round: tumour probability and mask on the scan's
original grid, with mirroring and without (``pseudo_label`` filters their components, ``pseudo_filter``).

The mask is exactly ``Predictor.mask`` without small-component removal: the two-class logit difference resampled to
the original grid as ``resample.resample_to_mask`` resamples it (linear; nearest neighbour along nnU-Net's separate
low-resolution axis), positive = tumour. The probability is the sigmoid of that resampled difference (the softmax
of the resampled logits), so ``mask`` is ``probability > 0.5`` up to float rounding at 0.5."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from scipy.special import expit

from .predictor import Predictor
from .resample import probability_axis, resample_slabs


@dataclass
class TeacherOutput:
    """One scan's teacher outputs on its original grid (x, y, z)."""

    probability: np.ndarray  # float32 tumour probability of the main pass (mirrored when tta)
    mask: np.ndarray  # bool, the main pass's mask
    plain_mask: np.ndarray | None = None  # bool, the pass without mirroring (only when the main pass mirrors)


def resample_difference(logits: torch.Tensor, new_shape: Sequence[int], nearest_axis: int | None = None,
                        slab: int = 16) -> np.ndarray:
    """float32 (host) ``logits[1] - logits[0]`` of (2, x, y, z) logits resampled to ``new_shape``, computed in the
    same operations as ``resample_to_mask``'s two-class path (whose mask is this array > 0)."""
    if logits.shape[0] != 2:
        raise ValueError(f"pseudo-labelling needs a two-class teacher (background, tumour), got {logits.shape[0]} classes")
    logits = logits.float()
    return resample_slabs((logits[1] - logits[0])[None], new_shape, lambda planes: planes[:, 0], np.float32, slab,
                          nearest_axis)


def teacher_passes(predictor: Predictor, image: torch.Tensor, spacing: Sequence[float], size: Sequence[int],
                   tta: bool = True) -> TeacherOutput:
    """The teacher on a preprocessed (1, x, y, z) ``image`` of original ``spacing`` / ``size``: the main pass
    (mirrored when ``tta``) gives probability and mask, the pass without mirroring (only when ``tta``) its mask."""
    nearest = probability_axis(predictor.plan.target_spacing, spacing, predictor.plan.resampling)
    difference = resample_difference(predictor.logits(image, tta=tta), size, nearest)
    output = TeacherOutput(probability=expit(difference).astype(np.float32, copy=False), mask=difference > 0)
    if tta:
        output.plain_mask = resample_difference(predictor.logits(image, tta=False), size, nearest) > 0
    return output


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (the teacher checkpoint, recorded in the round's config)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
