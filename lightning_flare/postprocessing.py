"""Connected-component postprocessing, chosen on the validation fold (as nnU-Net chooses its postprocessing).

FLARE scores a healthy case 0 for a single false-positive voxel, so small spurious components matter. The
rules here: drop predicted tumour components smaller than ``min_component_ml``, and nnU-Net's "remove all but
the largest component" of the foreground (``largest_component_only``). Both are picked on validation cases
(never on test cases) by mean FLARE DSC: a threshold from a few candidates, 0 (keep everything) unless one does
strictly better; the largest component only when it strictly beats the best without it.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from .metrics.functional import dice

CANDIDATES_ML = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)
_CONNECTIVITY = np.ones((3, 3, 3), bool)  # 26-neighbourhood: diagonal contact joins components


def component_volumes(mask: np.ndarray, spacing_mm: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Labelled foreground components (26-connected, over all labels > 0) and the volume in ml of each label
    (index 0: the background)."""
    components, count = ndimage.label(mask > 0, structure=_CONNECTIVITY)
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    return components, np.bincount(components.ravel(), minlength=count + 1) * voxel_ml


def remove_small_components(mask: np.ndarray, spacing_mm: Sequence[float], min_ml: float) -> np.ndarray:
    """``mask`` with its foreground components (26-connected, over all labels > 0) smaller than ``min_ml``
    millilitres set to background. Returns ``mask`` itself when nothing is removed."""
    if min_ml < 0:
        raise ValueError(f"min_component_ml must be >= 0, got {min_ml}")
    if min_ml == 0 or not mask.any():
        return mask
    components, volumes = component_volumes(mask, spacing_mm)
    small = np.flatnonzero(volumes < min_ml)
    small = small[small > 0]
    if small.size == 0:
        return mask
    out = mask.copy()
    out[np.isin(components, small)] = 0
    return out


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """nnU-Net's "remove all but the largest component" on the foreground: ``mask`` with every foreground
    component (26-connected, over all labels > 0) but the one of most voxels set to background (the first of
    equal ones). Returns ``mask`` itself when it has at most one component."""
    components, count = ndimage.label(mask > 0, structure=_CONNECTIVITY)
    if count <= 1:
        return mask
    largest = 1 + int(np.argmax(np.bincount(components.ravel())[1:]))
    out = mask.copy()
    out[(components != largest) & (components > 0)] = 0
    return out


def flare_dsc(prediction: np.ndarray, reference: np.ndarray) -> float:
    """FLARE DSC of binary tumour masks: 1 when both are empty, 0 when exactly one is."""
    p, r = prediction > 0, reference > 0
    p_any, r_any = bool(p.any()), bool(r.any())
    if not (p_any or r_any):
        return 1.0
    return dice(p, r) if p_any and r_any else 0.0


def case_scores(prediction: np.ndarray, reference: np.ndarray, spacing_mm: Sequence[float],
                candidates_ml: Sequence[float], largest_only: bool = False,
                ignored: np.ndarray | None = None) -> list[float]:
    """FLARE DSC of one case after removing components below each candidate volume (labelled once); with
    ``largest_only``, of its largest component alone (``keep_largest_component``) below each candidate.

    ``ignored``: a declared ignore region (bool, ``reference`` background there). The components are those of the
    whole ``prediction``, as the predictor postprocesses it at test / predict time (it knows no ignore region);
    only the score leaves the region out, as ``test`` does after postprocessing."""
    components, volumes = component_volumes(prediction, spacing_mm)
    if largest_only and len(volumes) > 2:  # every other component can never be kept
        largest = 1 + int(np.argmax(volumes[1:]))
        volumes = np.where(np.arange(len(volumes)) == largest, volumes, -np.inf)
    known = None if ignored is None else ~np.asarray(ignored, bool)
    scores = []
    for threshold in candidates_ml:
        keep = volumes >= threshold
        keep[0] = False
        kept = keep[components]
        scores.append(flare_dsc(kept if known is None else kept & known, reference))
    return scores


def score_thresholds(cases: Iterable[tuple[np.ndarray, np.ndarray, Sequence[float]]],
                     candidates_ml: Sequence[float] = CANDIDATES_ML) -> dict[float, float]:
    """Mean FLARE DSC over ``(prediction, reference, spacing)`` cases for each threshold."""
    cases = list(cases)
    if not cases:
        raise ValueError("no validation cases to choose the postprocessing on")
    candidates = [float(c) for c in candidates_ml]
    totals = np.sum([case_scores(p, r, s, candidates) for p, r, s in cases], axis=0)
    return {t: float(total) / len(cases) for t, total in zip(candidates, totals)}


def choose_threshold(scores: dict[float, float], min_gain: float = 1e-6) -> float:
    """The threshold with the best mean DSC; the smallest among ties; 0 unless it beats 0 by ``min_gain``."""
    best = max(scores.values())
    chosen = min(t for t, s in scores.items() if s >= best - 1e-12)
    return chosen if best > scores.get(0.0, -np.inf) + min_gain else 0.0


def choose_largest_component(scores: dict[float, float], largest_scores: dict[float, float],
                             min_gain: float = 1e-6, fixed_ml: float | None = None) -> dict:
    """nnU-Net's choice of "remove all but the largest component" (``determine_postprocessing``): kept only
    when its best mean validation DSC (over the thresholds, ``largest_scores``) beats the best without it
    (``scores`` at ``choose_threshold(scores)``) by ``min_gain``. ``fixed_ml``: a fixed ``min_component_ml`` (not
    "auto"): both arms are compared at that threshold, the one the predictor applies (it must be scored). Returns
    the postprocessing entries: ``largest_component_only``, ``min_component_ml`` (the threshold that goes with the
    choice), ``val_dsc_postprocessed`` and the scores with the largest component only, by threshold."""
    if fixed_ml is not None:
        fixed_ml = float(fixed_ml)
        if fixed_ml not in scores or fixed_ml not in largest_scores:
            raise ValueError(f"min_component_ml {fixed_ml:g} is not among the scored candidates {sorted(scores)}")
        plain, best, threshold = fixed_ml, largest_scores[fixed_ml], fixed_ml
    else:
        plain = choose_threshold(scores, min_gain)
        best = max(largest_scores.values())
        threshold = min(t for t, s in largest_scores.items() if s >= best - 1e-12)
    chosen = best > scores[plain] + min_gain
    return {"largest_component_only": bool(chosen), "min_component_ml": threshold if chosen else plain,
            "val_dsc_postprocessed": round(best if chosen else scores[plain], 6),
            "val_dsc_largest_component_by_min_component_ml": {str(t): round(v, 6) for t, v in largest_scores.items()}}
