"""Lesion-wise detection counts: connected components (26-connectivity) of the reference and the prediction.

- a reference lesion is *detected* when any predicted voxel overlaps it;
- a predicted component is a *true positive* when it overlaps any reference lesion.

Per case: ``lesions_reference``, ``lesions_detected``, ``components_predicted``, ``components_true_positive``.
Pooled over cases (``pooled_lesion_scores``): ``lesion_recall`` = detected / reference lesions and
``lesion_precision`` = true-positive components / predicted components, summed over every case (None when the
denominator is 0: no reference lesion, or no predicted component, anywhere).
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
from scipy import ndimage

COUNT_KEYS = ("lesions_reference", "lesions_detected", "components_predicted", "components_true_positive")
_CONNECTIVITY = np.ones((3, 3, 3), bool)


def _overlapped(components: np.ndarray, other: np.ndarray) -> int:
    """How many distinct labelled components touch a voxel of ``other``."""
    hit = np.unique(components[other])
    return int((hit > 0).sum())


def lesion_counts(prediction: np.ndarray, reference: np.ndarray) -> dict[str, int]:
    """The four counts of one case (foreground: label > 0)."""
    prediction, reference = np.asarray(prediction) > 0, np.asarray(reference) > 0
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from reference shape {reference.shape}")
    ref_components, n_ref = ndimage.label(reference, structure=_CONNECTIVITY)
    pred_components, n_pred = ndimage.label(prediction, structure=_CONNECTIVITY)
    return {"lesions_reference": int(n_ref), "lesions_detected": _overlapped(ref_components, prediction),
            "components_predicted": int(n_pred), "components_true_positive": _overlapped(pred_components, reference)}


def pooled_lesion_scores(rows: Iterable[Mapping]) -> dict:
    """Summed counts over the rows that carry them and the pooled ``lesion_recall`` / ``lesion_precision``
    (None when undefined, or when no row carries counts)."""
    rows = [r for r in rows if all(k in r for k in COUNT_KEYS)]
    totals = {k: int(sum(int(r[k]) for r in rows)) for k in COUNT_KEYS}
    recall = totals["lesions_detected"] / totals["lesions_reference"] if totals["lesions_reference"] else None
    precision = (totals["components_true_positive"] / totals["components_predicted"]
                 if totals["components_predicted"] else None)
    return {"lesion_recall": recall, "lesion_precision": precision, **({"lesion_counts": totals} if rows else {})}
