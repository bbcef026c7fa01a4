"""Where the body is: a bounding box on the preprocessed volume, so that windows of air need not run."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

from .plan import IntensityStats

BODY_HU = -500.0  # well below soft tissue and fat, above air (-1000 HU); lungs fall inside the box
MIN_PART_ML = 10.0  # parts of the body (torso, arms, legs) are kept; specks of noise in the air are not


def body_threshold(stats: IntensityStats, hu: float = BODY_HU) -> float:
    """``hu`` in the normalised units of ``stats``; a voxel is body when strictly above it (air, clipped to
    ``clip_low`` when that lies above ``hu``, is then never body)."""
    return (max(float(hu), stats.clip_low) - stats.mean) / max(stats.std, 1e-8)


def body_box(image: torch.Tensor | np.ndarray, threshold: float, spacing_mm: Sequence[float],
             margin_mm: float = 20.0, min_part_ml: float = MIN_PART_ML) -> tuple[slice, slice, slice] | None:
    """Bounding box (x, y, z slices) of every part of the body of at least ``min_part_ml``, grown by
    ``margin_mm`` and clipped to the volume, for a (1, x, y, z) or (x, y, z) normalised image; None when no
    voxel is above ``threshold`` in a part that large (no body found: the caller runs the whole grid)."""
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    array = array[0] if array.ndim == 4 else array
    if array.ndim != 3:
        raise ValueError(f"body_box needs a (1, x, y, z) or (x, y, z) image, got shape {array.shape}")
    labels, count = ndimage.label(array > threshold)
    if count == 0:
        return None
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:] * voxel_ml
    kept = np.flatnonzero(sizes >= min_part_ml) + 1
    if kept.size == 0:
        return None
    boxes = [box for box in ndimage.find_objects(labels) if box is not None]
    boxes = [boxes[i - 1] for i in kept]
    margin = [int(np.ceil(margin_mm / s)) for s in spacing_mm]
    return tuple(slice(max(min(b[a].start for b in boxes) - margin[a], 0),
                       min(max(b[a].stop for b in boxes) + margin[a], array.shape[a])) for a in range(3))


def windows_touching(locations: np.ndarray, box: tuple[slice, slice, slice] | None) -> np.ndarray:
    """Rows of ``locations`` (i0, j0, k0, i1, j1, k1), TorchIO's window corners, that overlap ``box``; all of
    them when ``box`` is None. Every voxel inside the box keeps all the windows that cover it."""
    if box is None:
        return np.ones(len(locations), dtype=bool)
    keep = np.ones(len(locations), dtype=bool)
    for axis, extent in enumerate(box):
        keep &= (locations[:, axis] < extent.stop) & (locations[:, axis + 3] > extent.start)
    return keep
