"""The component rule of the healthy-scan decision: mean probabilities across grids, removal, the validation DSCs
(hand-computed), its choice against the scan-level rules, and the Predictor's order (before the largest component)."""
import numpy as np
import pytest
import torch

from lightning_flare.component_confidence import (THRESHOLDS, component_mean_probabilities, plan_indices,
                                                  remove_unconfident_components, threshold_dscs)
from lightning_flare.healthy_choice import choose_from_rows, choose_rule, row_width, validation_row
from lightning_flare.healthy_decision import case_report_fields, chosen_rule, decision_line
from lightning_flare.plan import Plan
from lightning_flare.predictor import InferenceSettings, Predictor

SPACING = (10.0, 10.0, 10.0)  # one voxel = 1 ml


def test_nearest_plan_index_over_the_same_extent():
    np.testing.assert_array_equal(plan_indices(4, 2, np.arange(4)), [0, 0, 1, 1])  # two input voxels per plan voxel
    np.testing.assert_array_equal(plan_indices(2, 4, np.arange(2)), [1, 3])  # centres at 1/4 and 3/4 of the extent
    np.testing.assert_array_equal(plan_indices(3, 3, np.arange(3)), [0, 1, 2])
    with pytest.raises(ValueError, match="grid sizes must be positive, got 0 and 2"):
        plan_indices(0, 2, np.arange(1))


def test_mean_probability_per_component_on_its_own_grid_and_on_a_finer_one():
    mask, prob = np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 4), np.float32)
    mask[0, 0, 0:2], prob[0, 0, 0:2] = 1, (0.6, 0.8)  # component 1: (0.6 + 0.8) / 2
    mask[3, 3, 3], prob[3, 3, 3] = 1, 0.95
    components, sizes, means = component_mean_probabilities(mask, prob)
    assert components[0, 0, 0] == 1 and sizes.tolist() == [61, 2, 1]
    np.testing.assert_allclose(means, [0.0, 0.7, 0.95], rtol=1e-6)
    # the mask on a grid twice as fine: each 2x2x2 block reads its plan voxel
    fine = mask.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    _, sizes, means = component_mean_probabilities(fine, prob)
    assert sizes.tolist()[1:] == [16, 8]
    np.testing.assert_allclose(means, [0.0, 0.7, 0.95], rtol=1e-6)
    assert component_mean_probabilities(mask * 0, prob)[2].tolist() == [0.0]
    with pytest.raises(ValueError, match=r"mask \(4, 4, 4\) and probability \(4, 4\) differ in dimensions"):
        component_mean_probabilities(mask, prob[0])


def test_unconfident_components_are_removed():
    mask, prob = np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 4), np.float32)
    mask[0, 0, 0:2], prob[0, 0, 0:2] = 1, (0.6, 0.8)
    mask[3, 3, 3], prob[3, 3, 3] = 2, 0.95  # another tumour label: components are over every label > 0
    kept, removed = remove_unconfident_components(mask, prob, 0.75)
    assert removed == 1 and kept.sum() == 2 and kept[3, 3, 3] == 2 and mask.sum() == 4  # the input is left as it was
    assert remove_unconfident_components(mask, prob, 0.7)[0] is mask  # 0.7 >= 0.7: kept, nothing copied
    assert remove_unconfident_components(mask, prob, 0.0)[0] is mask
    assert remove_unconfident_components(mask, prob, 1.0)[0].sum() == 0 and remove_unconfident_components(mask, prob, 1.0)[1] == 2
    with pytest.raises(ValueError, match=r"component probability threshold must be within \[0, 1\], got 1.5"):
        remove_unconfident_components(mask, prob, 1.5)


def test_on_a_finer_grid_the_plan_grid_components_decide():
    """A mask resampled to a finer grid reaches past its plan-grid component into plan voxels below 0.5: its sampled
    mean would be biased low. The plan-grid component it falls in decides instead."""
    prob = np.full((8, 8, 8), 0.45, np.float32)  # background just below 0.5 around the components
    prob[2:4, 2:4, 2:4] = 0.95  # a confident lesion
    prob[6, 6, 6] = 0.7  # an unsure look-alike
    plan_mask = (prob > 0.5).astype(np.uint8)
    fine = np.zeros((16, 16, 16), np.uint8)
    fine[3:9, 3:9, 3:9] = 1  # the lesion's 4x4x4 fine voxels (4:8) and a rim of one voxel onto the 0.45 voxels
    fine[12:14, 12:14, 12:14] = 1  # the look-alike
    _, sizes, means = component_mean_probabilities(fine, prob)
    assert means[1] == pytest.approx((64 * 0.95 + 152 * 0.45) / 216, rel=1e-6) and means[1] < 0.9  # the biased mean
    kept, removed = remove_unconfident_components(fine, prob, 0.9, plan_mask)
    assert removed == 1 and kept.sum() == 216 and kept[12:14, 12:14, 12:14].sum() == 0
    rim = np.zeros_like(fine)
    rim[0, 0, 0:2] = 1  # on no plan-grid component: judged by its own sampled mean (0.45)
    assert remove_unconfident_components(rim, prob, 0.4, plan_mask)[1] == 0
    assert remove_unconfident_components(rim, prob, 0.5, plan_mask)[1] == 1
    with pytest.raises(ValueError, match=r"needs the plan-grid mask of that shape, got None"):
        remove_unconfident_components(fine, prob, 0.9)


def test_threshold_dscs_by_hand():
    # components 1 (lesion: 6 voxels, 4 on the reference of 8, mean 0.9) and 2 (a look-alike: 10 voxels, mean 0.7)
    sizes, overlaps, means = np.array([0, 6, 10]), np.array([0, 4, 0]), np.array([0.0, 0.9, 0.7])
    every, largest = threshold_dscs(sizes, sizes, overlaps, means, 8, np.array([False, True, True]), (0.6, 0.8, 0.95))
    assert every == pytest.approx([2 * 4 / (16 + 8), 2 * 4 / (6 + 8), 0.0])
    assert largest == pytest.approx([0.0, 2 * 4 / (6 + 8), 0.0])  # the look-alike is the larger until it goes
    scored = np.array([0, 6, 5])  # half the look-alike in an ignore region
    assert threshold_dscs(sizes, scored, overlaps, means, 8, np.array([False, True, True]), (0.6,))[0] == pytest.approx([8 / 19])
    kept = np.array([False, True, False])  # small-component removal took the look-alike already
    assert threshold_dscs(sizes, sizes, overlaps, means, 8, kept, (0.6,))[0] == pytest.approx([8 / 14])
    healthy = threshold_dscs(np.array([0, 3]), np.array([0, 3]), np.array([0, 0]), np.array([0.0, 0.7]), 0,
                             np.array([False, True]), (0.6, 0.8))
    assert healthy == ([0.0, 1.0], [0.0, 1.0])  # a healthy case: 1 once its false positive is gone


def _mimic_cases():
    """A lesion case whose confident lesion (8 ml at 0.95) has an unsure look-alike beside it (2 ml at 0.7), and a
    healthy case with an unsure look-alike (3 ml at 0.8) and a tiny unsure speck (1 ml at 0.55)."""
    lesion_pred, lesion_prob = np.zeros((8, 8, 8), np.uint8), np.zeros((8, 8, 8), np.float32)
    lesion_pred[1:3, 1:3, 1:3], lesion_prob[1:3, 1:3, 1:3] = 1, 0.95
    reference = lesion_pred.copy()
    lesion_pred[6, 6, 5:7], lesion_prob[6, 6, 5:7] = 1, 0.7
    healthy_pred, healthy_prob = np.zeros_like(lesion_pred), np.zeros_like(lesion_prob)
    healthy_pred[4, 4, 3:6], healthy_prob[4, 4, 3:6] = 1, 0.8
    healthy_pred[0, 7, 7], healthy_prob[0, 7, 7] = 1, 0.55
    return [(lesion_pred, lesion_prob, reference), (healthy_pred, healthy_prob, np.zeros_like(reference))]


def test_the_component_rule_wins_where_emptying_scans_cannot_help():
    rows = np.asarray([validation_row(p, q, r, SPACING, (0.0, 4.0)) for p, q, r in _mimic_cases()])
    assert rows.shape == (2, row_width(2))
    # without a decision: lesion 16/18, healthy 0. A scan-level threshold above 0.8 (the healthy case's most
    # probable component) empties the healthy scan but also the lesion scan (its most probable: 0.95 > 0.8? no:
    # the lesion, kept), so the scan rule gets the healthy case right too; the component rule also removes the
    # lesion case's look-alike: both cases 1.0
    record = choose_from_rows(rows, (0.0, 4.0), 0.0)
    assert record["feature"] == "component_probability" and record["val_dsc"] == pytest.approx(1.0)
    assert 0.8 < record["component_probability"] <= 0.95 and record["component_probability"] == min(
        t for t in THRESHOLDS if t > 0.8)  # the smallest threshold of the best score
    assert record["mean_probability"] is None and record["healthy_fp_off"] == 1 and record["healthy_fp"] == 0
    assert "components whose mean tumour probability < 0.81 are removed" in record["status"]
    assert chosen_rule("auto", {"healthy_decision": record}) == ("component_probability", 0.81)
    # after 4 ml removal nothing unsure is left in either case: no decision is needed
    assert choose_from_rows(rows, (0.0, 4.0), 4.0)["reason"] == "no_gain"
    # rows written before the component rule (no columns for it): the scan-level rule alone, as before
    legacy = np.concatenate([rows[:, :9]], axis=1)
    old = choose_from_rows(legacy, (0.0, 4.0), 0.0)
    assert old["feature"] == "mean_probability" and old["val_dsc"] == pytest.approx((16 / 18 + 1) / 2)
    with pytest.raises(ValueError, match="validation rows of 10 values fit neither"):
        choose_from_rows(rows[:, :10], (0.0, 4.0), 0.0)
    with pytest.raises(ValueError, match=r"component_dsc must be \(cases, thresholds\) = \(2, 49\), got \(2, 3\)"):
        choose_rule({"mass_ml": [1.0, 1.0]}, [1.0, 0.0], [False, True], component_dsc=np.zeros((2, 3)))


def test_the_component_rule_respects_the_lesion_budget():
    # the only component threshold that clears the healthy case (above 0.8) also removes a lesion at 0.75
    dsc = np.array([[1.0 if t <= 0.75 else 0.0 for t in THRESHOLDS],  # lesion case
                    [0.0 if t <= 0.8 else 1.0 for t in THRESHOLDS]])  # healthy case
    record = choose_rule({"mass_ml": [2.0, 2.4], "mean_probability": [0.75, 0.8]}, [1.0, 0.0], [False, True],
                         component_dsc=dsc)
    assert record["reason"] == "no_gain" and "on the mean probability of each component" in record["status"]


def _logits(probability: np.ndarray) -> torch.Tensor:
    p = torch.from_numpy(np.clip(probability, 1e-6, 1 - 1e-6).astype(np.float32))
    return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))])


def _predictor(probability, settings: InferenceSettings, postprocessing=None) -> Predictor:
    plan = Plan(target_spacing=SPACING, patch_size=(4, 4, 4), intensity={"clip_low": -1, "clip_high": 1, "mean": 0, "std": 1})
    predictor = Predictor(torch.nn.Conv3d(1, 2, 1), plan, settings, postprocessing, device="cpu")
    predictor.logits = lambda image, tta=None: _logits(probability)  # the network's part is not under test here
    return predictor


def test_predictor_removes_unsure_components_before_keeping_the_largest():
    prob, reference = np.full((8, 8, 8), 0.1, np.float32), np.zeros((8, 8, 8), np.uint8)
    prob[1:3, 1:3, 1:3], reference[1:3, 1:3, 1:3] = 0.95, 1  # the lesion: 8 voxels at 0.95
    prob[5:7, 6, 3:8] = 0.7  # a look-alike of 10 voxels at 0.7: the largest component
    image = torch.zeros(1, 8, 8, 8)
    settings = InferenceSettings(healthy_decision="component_probability:0.9", largest_component=True)
    decision: dict = {}
    mask = _predictor(prob, settings).mask(image, SPACING, (8, 8, 8), decision=decision)
    # removed first, then the largest of what is left: the lesion (the largest first would have kept the look-alike)
    np.testing.assert_array_equal(mask, reference)
    assert decision["components_removed"] == 1 and not decision["healthy"]
    before = decision["components_only_mask"]
    assert before.sum() == 10 and before[1:3, 1:3, 1:3].sum() == 0
    extras = case_report_fields(mask, reference, SPACING, decision)
    assert extras["dsc_components_only"] == 0.0 and extras["predicted_ml_components_only"] == 10.0


def test_predictor_declares_a_scan_left_with_nothing_healthy_on_a_finer_grid():
    prob = np.full((8, 8, 8), 0.1, np.float32)
    prob[4:6, 4:6, 4:6] = 0.8  # a look-alike on the plan's grid; the input grid is twice as fine
    image = torch.zeros(1, 8, 8, 8)
    healthy: dict = {}
    unsure = _predictor(prob, InferenceSettings(healthy_decision="component_probability:0.9"))
    assert unsure.mask(image, (5.0, 5.0, 5.0), (16, 16, 16), decision=healthy).sum() == 0
    assert healthy["healthy"] and healthy["components_removed"] == 1 and healthy["components_only_mask"].sum() > 0
    kept: dict = {}  # its input-grid voxels read the plan's 0.8: kept at 0.75
    confident = _predictor(prob, InferenceSettings(healthy_decision="component_probability:0.75"))
    assert confident.mask(image, (5.0, 5.0, 5.0), (16, 16, 16), decision=kept).sum() > 0
    assert kept["components_removed"] == 0 and not kept["healthy"] and "components_only_mask" not in kept
    speck: dict = {}
    prob[0, 7, 7] = 0.55  # on the plan's own grid: a speck of 0.55 goes at 0.75, the look-alike stays
    assert confident.mask(image, SPACING, (8, 8, 8), decision=speck).sum() == 8
    assert speck["components_removed"] == 1 and speck["components_only_mask"].sum() == 9


def test_component_rule_settings():
    assert InferenceSettings(healthy_decision="component_probability:0.85").healthy_decision == "component_probability:0.85"
    assert chosen_rule("component_probability:0.85", None) == ("component_probability", 0.85)
    assert "components with mean tumour probability < 0.85 are removed" in decision_line("component_probability:0.85", None)
    for bad in ("component_probability:1.5", "component_probability:x", "mean_probability:2"):
        with pytest.raises(ValueError, match=f"healthy_decision must be .* got {bad!r}"):
            InferenceSettings(healthy_decision=bad)
