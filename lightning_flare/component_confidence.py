"""Removing predicted components the network is unsure of: a component whose mean tumour probability is below a
threshold is set to background, and a scan left with none is declared healthy.

This is the component-level form of the healthy-scan decision (``healthy_decision.py``, rule
``component_probability``). The scan-level rules empty a whole scan when its most probable component is unsure,
which on a lesion scan also throws away its confident lesions; this one drops only the unsure components, so the
look-alikes next to real lesions go too. Its threshold is chosen on validation cases from the fixed grid
``THRESHOLDS`` (``healthy_choice.py``): validation rows have a fixed length (they are gathered over DDP ranks and
pooled over folds), so the candidates cannot be the observed values as for the scan-level features. Every voxel of
an argmax tumour mask has a tumour probability (1 - background softmax) above 0.5, so thresholds start above it.

Grids: the probability lives on the plan's grid, where validation chose the threshold; the mask is on the input's.
The decision is made on the plan's grid: each component of the plan-grid argmax mask is unsure when its mean
probability is below the threshold (as validation scored it), and each input-grid component follows the plan-grid
components its voxels fall in (nearest plan voxel, ``plan_indices``: the grids span the same extent, voxel centres
at (i + 0.5) / n of it), by a majority of those voxels; one that falls on no plan-grid component (made by
interpolation alone) is judged by its own mean of the sampled probabilities. Judging input-grid components by their
sampled mean instead would be biased low: a mask resampled to a finer grid reaches past the plan-grid component's
voxels into plan voxels below 0.5, and confident lesions would be removed with the look-alikes.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from .postprocessing import _CONNECTIVITY

THRESHOLDS = tuple(round(0.51 + 0.01 * i, 2) for i in range(49))  # 0.51 ... 0.99, the validation candidates


def plan_indices(size: int, plan_size: int, indices: np.ndarray) -> np.ndarray:
    """Nearest plan-grid index along one axis of ``size`` voxels for each of ``indices`` (``plan_size`` voxels over
    the same extent)."""
    if size <= 0 or plan_size <= 0:
        raise ValueError(f"grid sizes must be positive, got {size} and {plan_size}")
    return np.minimum(((indices + 0.5) * plan_size / size).astype(np.int64), plan_size - 1)


def component_mean_probabilities(mask: np.ndarray, probability: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labelled foreground components of ``mask`` (26-connected), their voxel counts and mean tumour
    probabilities (index 0: background, probability 0), ``probability`` on the plan's grid (the mask's own when the
    shapes agree)."""
    if mask.ndim != probability.ndim:
        raise ValueError(f"mask {mask.shape} and probability {probability.shape} differ in dimensions")
    components, count = ndimage.label(mask > 0, structure=_CONNECTIVITY)
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    if count == 0:
        return components, sizes, np.zeros(1)
    where = np.nonzero(components)
    if mask.shape == probability.shape:
        values = probability[where]
    else:
        values = probability[tuple(plan_indices(n, p, i) for n, p, i in zip(mask.shape, probability.shape, where))]
    sums = np.bincount(components[where], weights=values.astype(np.float64), minlength=count + 1)
    means = sums / np.maximum(sizes, 1)
    means[0] = 0.0
    return components, sizes, means


def remove_unconfident_components(mask: np.ndarray, probability: np.ndarray, threshold: float,
                                  plan_mask: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """``mask`` without its components of mean tumour probability below ``threshold`` (``mask`` itself when none
    is), and how many were removed. ``probability`` is on the plan's grid; when the mask is on another grid,
    ``plan_mask`` (the plan-grid argmax mask) is needed: see the module docstring."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"component probability threshold must be within [0, 1], got {threshold!r}")
    if threshold == 0 or not mask.any():
        return mask, 0
    components, sizes, means = component_mean_probabilities(mask, probability)
    unsure = means < threshold
    if mask.shape != probability.shape:
        if plan_mask is None or plan_mask.shape != probability.shape:
            raise ValueError(f"a mask of shape {mask.shape} on another grid than the probability "
                             f"{probability.shape} needs the plan-grid mask of that shape, got "
                             f"{None if plan_mask is None else plan_mask.shape}")
        plan_components, _, plan_means = component_mean_probabilities(plan_mask, probability)
        plan_unsure = plan_means < threshold
        where = np.nonzero(components)
        mapped = plan_components[tuple(plan_indices(n, p, i) for n, p, i in zip(mask.shape, probability.shape, where))]
        labels = components[where]
        votes_unsure = np.bincount(labels, weights=(mapped > 0) & plan_unsure[mapped], minlength=len(sizes))
        votes_sure = np.bincount(labels, weights=(mapped > 0) & ~plan_unsure[mapped], minlength=len(sizes))
        voted = votes_unsure + votes_sure > 0
        unsure = np.where(voted, votes_unsure > votes_sure, unsure)
    unsure[0] = False
    if not unsure.any():
        return mask, 0
    out = mask.copy()
    out[unsure[components]] = 0
    return out, int(unsure.sum())


def threshold_dscs(sizes: np.ndarray, scored: np.ndarray, overlaps: np.ndarray, means: np.ndarray,
                   reference_voxels: int, kept: np.ndarray,
                   thresholds: Sequence[float] = THRESHOLDS) -> tuple[list[float], list[float]]:
    """FLARE DSC per threshold of a case whose components (index 0: background, ignored) have ``sizes`` voxels,
    ``scored`` of them outside an ignore region, ``overlaps`` voxels of reference and mean probabilities ``means``,
    among which ``kept`` are left by small-component removal: of the components at or above the threshold, and
    (second list) of the largest of them alone (most voxels, as ``keep_largest_component``). 1 when prediction and
    reference are both empty, 0 when exactly one is."""
    def dsc(flags: np.ndarray) -> float:
        predicted, hit = int(scored[flags].sum()), float(overlaps[flags].sum())
        if predicted == 0 or reference_voxels == 0:
            return float(predicted == 0 and reference_voxels == 0)
        return 2.0 * hit / (predicted + reference_voxels)

    every, largest = [], []
    for t in thresholds:
        passing = kept & (means >= t)
        passing[0] = False
        every.append(dsc(passing))
        only = np.zeros_like(passing)
        if passing.any():
            only[int(np.argmax(np.where(passing, sizes, -1)))] = True
        largest.append(dsc(only))
    return every, largest
