"""Lesion-wise detection counts (26-connected components) and their pooled recall / precision, on tiny arrays."""
import numpy as np
import pytest

from lightning_flare.lesion_metrics import lesion_counts, pooled_lesion_scores


def _mask(*voxels, shape=(8, 8, 8)) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    for v in voxels:
        mask[v] = 1
    return mask


def test_counts_of_one_case():
    # reference: lesion A = two voxels touching at a corner (one lesion under 26-connectivity), lesion B apart
    reference = _mask((1, 1, 1), (2, 2, 2), (6, 6, 6))
    # prediction: one voxel on A, two false-positive components (not touching each other or A)
    prediction = _mask((2, 2, 2), (5, 0, 0), (0, 7, 7))
    assert lesion_counts(prediction, reference) == {"lesions_reference": 2, "lesions_detected": 1,
                                                    "components_predicted": 3, "components_true_positive": 1}


def test_one_component_over_two_lesions_detects_both_and_counts_once():
    reference = _mask((1, 1, 1), (1, 1, 3))  # two lesions: a gap of one voxel
    prediction = _mask((1, 1, 1), (1, 1, 2), (1, 1, 3))  # one component bridging them
    assert lesion_counts(prediction, reference) == {"lesions_reference": 2, "lesions_detected": 2,
                                                    "components_predicted": 1, "components_true_positive": 1}


def test_labels_above_one_count_as_foreground_and_empty_cases_count_nothing():
    reference = _mask((3, 3, 3)) * 2
    assert lesion_counts(reference, reference)["lesions_detected"] == 1
    empty = np.zeros((4, 4, 4), np.uint8)
    assert lesion_counts(empty, empty) == {"lesions_reference": 0, "lesions_detected": 0,
                                           "components_predicted": 0, "components_true_positive": 0}


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(4, 4, 4\) differs from reference shape \(4, 4, 5\)"):
        lesion_counts(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))


def test_pooled_scores_sum_counts_over_cases():
    rows = [{"lesions_reference": 2, "lesions_detected": 1, "components_predicted": 3, "components_true_positive": 1},
            {"lesions_reference": 0, "lesions_detected": 0, "components_predicted": 1, "components_true_positive": 0},
            {"lesions_reference": 3, "lesions_detected": 3, "components_predicted": 4, "components_true_positive": 4},
            {"case": "no counts (e.g. a folder evaluation row)"}]
    pooled = pooled_lesion_scores(rows)
    assert pooled["lesion_recall"] == pytest.approx(4 / 5)  # not the mean of per-case recalls (0.75)
    assert pooled["lesion_precision"] == pytest.approx(5 / 8)
    assert pooled["lesion_counts"] == {"lesions_reference": 5, "lesions_detected": 4, "components_predicted": 8,
                                       "components_true_positive": 5}


def test_pooled_scores_undefined_without_denominator():
    healthy_clean = {"lesions_reference": 0, "lesions_detected": 0, "components_predicted": 0, "components_true_positive": 0}
    assert pooled_lesion_scores([healthy_clean]) == {"lesion_recall": None, "lesion_precision": None,
                                                     "lesion_counts": healthy_clean}
    assert pooled_lesion_scores([{"case": "a"}]) == {"lesion_recall": None, "lesion_precision": None}
