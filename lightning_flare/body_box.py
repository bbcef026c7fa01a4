"""Where the body is: a bounding box on the preprocessed volume, so that windows of air need not run."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

from .plan import IntensityStats

BODY_HU = -500.0  # well below soft tissue and fat, above air (-1000 HU); lungs fall inside the box
MIN_PART_ML = 5.0  # eroded cores of body parts (torso, arms, legs) are larger; specks of noise are not
MIN_THICKNESS_MM = 20.0  # thinner structures (table, blankets, cables) are not body


def body_threshold(stats: IntensityStats, hu: float = BODY_HU) -> float:
    """``hu`` in the normalised units of ``stats``; a voxel is body when strictly above it (air, clipped to
    ``clip_low`` when that lies above ``hu``, is then never body)."""
    return (max(float(hu), stats.clip_low) - stats.mean) / max(stats.std, 1e-8)


def body_box(image: torch.Tensor | np.ndarray, threshold: float, spacing_mm: Sequence[float],
             margin_mm: float = 20.0, min_part_ml: float = MIN_PART_ML,
             min_thickness_mm: float = MIN_THICKNESS_MM) -> tuple[slice, slice, slice] | None:
    """Bounding box (x, y, z slices) of every part of the body, grown by ``margin_mm`` and clipped to the volume,
    for a (1, x, y, z) or (x, y, z) normalised image; None when there is none (the caller runs the whole grid).

    The body is what lies above ``threshold``, opened by a ball of diameter ``min_thickness_mm``: the patient
    table, blankets and cables are thinner and drop out, also where the patient lies on them; torso, arms and
    legs stay. A part counts when its eroded core holds at least ``min_part_ml``. Found on every second voxel
    (a box needs no finer grid)."""
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    array = array[0] if array.ndim == 4 else array
    if array.ndim != 3:
        raise ValueError(f"body_box needs a (1, x, y, z) or (x, y, z) image, got shape {array.shape}")
    step = [2 if n >= 8 else 1 for n in array.shape]
    core = array[::step[0], ::step[1], ::step[2]] > threshold
    spacing = [float(s) * k for s, k in zip(spacing_mm, step)]
    radius = [int(np.floor(min_thickness_mm / 2 / s)) for s in spacing]
    if any(radius):
        grids = np.ogrid[tuple(slice(-r, r + 1) for r in radius)]
        ball = sum((g / max(r, 0.5)) ** 2 for g, r in zip(grids, radius)) <= 1.0
        core = ndimage.binary_erosion(core, structure=ball)
    labels, count = ndimage.label(core)
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:] * (float(np.prod(spacing)) / 1000.0)
    kept = np.flatnonzero(sizes >= min_part_ml)
    if kept.size == 0:
        return None
    boxes = ndimage.find_objects(labels)
    boxes = [boxes[i] for i in kept]
    box = []
    for a in range(3):  # the core's box, grown back by the erosion and then by the margin
        grow = (radius[a] + 1) * step[a] + int(np.ceil(margin_mm / float(spacing_mm[a])))
        start, stop = min(b[a].start for b in boxes) * step[a], max(b[a].stop for b in boxes) * step[a]
        box.append(slice(max(start - grow, 0), min(stop + grow, array.shape[a])))
    return tuple(box)


def windows_touching(locations: np.ndarray, box: tuple[slice, slice, slice] | None) -> np.ndarray:
    """Rows of ``locations`` (i0, j0, k0, i1, j1, k1), TorchIO's window corners, that overlap ``box``; all of
    them when ``box`` is None. Every voxel inside the box keeps all the windows that cover it."""
    if box is None:
        return np.ones(len(locations), dtype=bool)
    keep = np.ones(len(locations), dtype=bool)
    for axis, extent in enumerate(box):
        keep &= (locations[:, axis] < extent.stop) & (locations[:, axis + 3] > extent.start)
    return keep


def grid_region(box: tuple[slice, slice, slice], shape: Sequence[int],
                patch_size: Sequence[int]) -> tuple[slice, slice, slice]:
    """The region a fresh window grid is laid over for ``skip_air: box_grid``: ``box``, widened about its centre
    (within the volume) to at least one window along every axis, or the whole axis where the volume is shorter."""
    region = []
    for extent, size, patch in zip(box, shape, patch_size):
        start, stop, size, patch = int(extent.start), int(extent.stop), int(size), int(patch)
        if size <= patch:
            start, stop = 0, size
        elif stop - start < patch:
            start = min(max(start - (patch - (stop - start)) // 2, 0), size - patch)
            stop = start + patch
        region.append(slice(start, stop))
    return tuple(region)
