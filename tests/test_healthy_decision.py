"""The healthy-scan decision: features, the rule, its operating point (hand-computed), settings, the Predictor."""
import math

import numpy as np
import pytest
import torch

from lightning_flare.component_confidence import THRESHOLDS
from lightning_flare.healthy_choice import candidate_thresholds, choose_from_rows, choose_rule, row_width, validation_row
from lightning_flare.healthy_decision import (
    case_report_fields as case_extras,
    check_setting,
    chosen_rule,
    decide,
    decision_line,
    declared_healthy,
    largest_component_features,
)
from lightning_flare.metrics.healthy_decision_scores import HealthyDecisionScores
from lightning_flare.plan import Plan
from lightning_flare.predictor import InferenceSettings, Predictor

SPACING = (10.0, 10.0, 10.0)  # one voxel = 1 ml


def choose_mass_threshold(masses, dsc, healthy, **kwargs):
    """The choice on the mass alone (the decision's first feature)."""
    return choose_rule({"mass_ml": masses}, dsc, healthy, **kwargs)


def _logits(probability: np.ndarray) -> torch.Tensor:
    """Two-class logits whose softmax tumour probability is ``probability`` (background logit 0)."""
    p = torch.from_numpy(np.clip(probability, 1e-6, 1 - 1e-6).astype(np.float32))
    return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))])


def test_largest_component_is_the_one_with_the_largest_probability_mass():
    mask, prob = np.zeros((6, 6, 6), np.uint8), np.full((6, 6, 6), 0.1, np.float32)
    mask[0, 0, 0] = mask[0, 0, 1] = 1
    prob[0, 0, 0], prob[0, 0, 1] = 0.6, 0.8  # component A: 2 ml, mass 1.4, max 0.8
    for v in [(3, 3, 3), (4, 4, 4), (5, 5, 5)]:  # component B (corner contacts: one component), 3 ml at 0.5
        mask[v], prob[v] = 1, 0.5
    features = largest_component_features(mask, prob, SPACING)
    assert features == pytest.approx({"mass_ml": 1.5, "mean_probability": 0.5, "volume_ml": 3.0, "max_probability": 0.5,
                                      "components": 2})
    prob[0, 0, 0] = 0.9  # A: mass 1.7 now exceeds B's 1.5
    assert largest_component_features(mask, prob, SPACING) == pytest.approx(
        {"mass_ml": 1.7, "mean_probability": 0.85, "volume_ml": 2.0, "max_probability": 0.9, "components": 2})
    assert largest_component_features(mask * 0, prob, (1.0, 2.0, 5.0)) == {
        "mass_ml": 0.0, "mean_probability": 0.0, "volume_ml": 0.0, "max_probability": 0.0, "components": 0}
    assert largest_component_features(mask, prob, (1.0, 2.0, 5.0))["mass_ml"] == pytest.approx(1.7 * 0.01)
    with pytest.raises(ValueError, match=r"probability shape \(6, 6, 5\) differs from mask shape \(6, 6, 6\)"):
        largest_component_features(mask, prob[..., :5], SPACING)


def test_the_rule_is_strictly_below_the_threshold():
    features = {"mass_ml": 1.0, "mean_probability": 0.5}
    assert declared_healthy(features, ("mass_ml", 1.5)) and not declared_healthy(features, ("mass_ml", 1.0))
    assert declared_healthy(features, ("mean_probability", 0.6)) and not declared_healthy(features, ("mean_probability", 0.5))
    assert not declared_healthy({"mass_ml": 0.0}, None)  # off


def test_candidates_come_from_the_observed_masses():
    assert candidate_thresholds([0.0, 0.4, 3.0, 0.4, 1.0]) == pytest.approx([0.0, 0.7, 2.0, 6.0])
    assert candidate_thresholds([0.0, 0.0]) == [0.0] and candidate_thresholds([]) == [0.0]


# validation cases: (mass of the largest component, FLARE DSC after small-component removal, healthy)
CASES = [(0.3, 0.0, True), (0.9, 0.0, True), (0.0, 1.0, True),  # two healthy false positives, one clean
         (0.6, 0.2, False), (5.0, 0.9, False), (8.0, 0.8, False)]  # lesion cases
MASSES, DSC, HEALTHY = (list(c) for c in zip(*CASES))


def test_operating_point_hand_computed():
    # candidates 0, 0.45, 0.75, 2.95, 6.5, 16. Off: (0+0+1+0.2+0.9+0.8)/6 = 2.9/6, lesion mean 1.9/3.
    # 0.45 empties the 0.3 healthy case: 3.9/6. 0.75 and 2.95 also empty the 0.6 lesion case (-0.2/3 = 6.7 points
    # of lesion DSC: over the 1-point limit), 2.95 would reach 4.7/6.
    record = choose_mass_threshold(MASSES, DSC, HEALTHY)
    assert record["mass_ml"] == pytest.approx(0.45) and record["reason"] == "chosen"
    assert record["val_dsc"] == pytest.approx(3.9 / 6) and record["val_dsc_off"] == pytest.approx(2.9 / 6)
    assert record["val_lesion_dsc_loss"] == 0.0
    assert (record["healthy_cases"], record["lesion_cases"], record["healthy_fp_off"], record["healthy_fp"]) == (3, 3, 2, 1)
    assert record["feature"] == "mass_ml" and record["mean_probability"] is None
    assert "mass (ml) < 0.45" in record["status"] and "2 -> 1 of 3" in record["status"]
    looser = choose_mass_threshold(MASSES, DSC, HEALTHY, max_lesion_dsc_loss=0.1)  # 6.5 would lose 0.9 as well
    assert looser["mass_ml"] == pytest.approx(2.95) and looser["val_dsc"] == pytest.approx(4.7 / 6)
    assert looser["val_lesion_dsc_loss"] == pytest.approx(0.2 / 3) and looser["healthy_fp"] == 0


def test_ties_go_to_the_smaller_threshold():
    # 0.4 fixes the healthy case; 2.25 also empties a lesion case scored 0 anyway: same mean, smaller wins
    record = choose_mass_threshold([0.3, 0.5, 4.0], [0.0, 0.0, 0.9], [True, False, False])
    assert record["mass_ml"] == pytest.approx(0.4) and record["val_dsc"] == pytest.approx(1.9 / 3)


def test_off_without_healthy_or_lesion_cases_or_gain():
    no_healthy = choose_mass_threshold([0.6, 5.0], [0.2, 0.9], [False, False])
    assert no_healthy["mass_ml"] is None and no_healthy["feature"] is None and no_healthy["reason"] == "no_healthy_cases"
    assert "no healthy case among the 2 validation cases" in no_healthy["status"]
    assert choose_mass_threshold([0.3], [0.0], [True])["reason"] == "no_lesion_cases"
    clean = choose_mass_threshold([0.0, 5.0], [1.0, 0.9], [True, False])  # nothing to fix
    assert clean["mass_ml"] is None and clean["reason"] == "no_gain" and clean["val_dsc"] == pytest.approx(0.95)
    # the only fix costs a lesion case 0.5 of 2 lesion cases: 25 points > 1
    costly = choose_mass_threshold([0.3, 0.2, 5.0], [0.0, 0.5, 0.9], [True, False, False])
    assert costly["reason"] == "no_gain"
    with pytest.raises(ValueError, match=r"differ in length: \[2\], 1, 2"):
        choose_mass_threshold([0.1, 0.2], [0.0], [True, False])
    with pytest.raises(ValueError, match="features must include 'mass_ml'"):
        choose_rule({"mean_probability": [0.5]}, [0.0], [True])
    with pytest.raises(ValueError, match="max_lesion_dsc_loss must be >= 0, got -0.5"):
        choose_mass_threshold([0.1], [0.0], [True], max_lesion_dsc_loss=-0.5)


def _validation_cases():
    healthy_pred, healthy_prob = np.zeros((6, 6, 6), np.uint8), np.zeros((6, 6, 6), np.float32)
    healthy_pred[0, 0, 0], healthy_prob[0, 0, 0] = 1, 0.6  # a 1-ml false positive carrying 0.6 ml
    lesion = np.zeros((6, 6, 6), np.uint8)
    lesion[2:4, 2:4, 2:4] = 1  # 8 ml predicted exactly, at 0.9: 7.2 ml
    return [(healthy_pred, healthy_prob, np.zeros_like(healthy_pred)), (lesion, lesion * np.float32(0.9), lesion)]


def test_validation_rows_and_the_choice_after_min_component_ml():
    rows = [validation_row(p, q, r, SPACING, (0.0, 2.0)) for p, q, r in _validation_cases()]
    # [healthy, mass at 0 / 2 ml, mean probability at 0 / 2 ml, DSC at 0 / 2 ml, largest component alone: DSC at 0 / 2 ml]
    np.testing.assert_allclose(np.asarray(rows)[:, :9], [[1, 0.6, 0.0, 0.6, 0.0, 0.0, 1.0, 0.0, 1.0],
                                                         [0, 7.2, 7.2, 0.9, 0.9, 1.0, 1.0, 1.0, 1.0]], rtol=1e-6)
    # then the component rule's DSCs: per block (every component, the largest), per candidate, per threshold
    g, t = len(THRESHOLDS), np.asarray(THRESHOLDS)
    assert len(rows[0]) == row_width(2) == 9 + 2 * 2 * g
    block = lambda row, b, k: row[9 + (2 * b + k) * g: 9 + (2 * b + k + 1) * g]  # noqa: E731
    for b in (0, 1):  # one component per case: the largest alone is the same
        np.testing.assert_array_equal(block(rows[0], b, 0), np.where(t > 0.6, 1.0, 0.0))  # the 0.6 FP goes above 0.6
        np.testing.assert_array_equal(block(rows[0], b, 1), 1.0)  # gone at 2 ml already
        np.testing.assert_array_equal(block(rows[1], b, 0), np.where(t < 0.9, 1.0, 0.0))  # the 0.9 lesion below 0.9
    after_none = choose_from_rows(np.asarray(rows), (0.0, 2.0), after_min_component_ml=0.0)
    # mass (0.6 + 7.2) / 2 and mean probability (0.6 + 0.9) / 2 both empty the healthy case alone: a tie, which goes
    # to the mean probability
    assert after_none["feature"] == "mean_probability" and after_none["mass_ml"] is None
    assert after_none["mean_probability"] == pytest.approx(0.75) and after_none["after_min_component_ml"] == 0.0
    after_removal = choose_from_rows(np.asarray(rows), (0.0, 2.0), after_min_component_ml=2.0)
    assert after_removal["feature"] is None and after_removal["reason"] == "no_gain"  # removal fixed it already
    with pytest.raises(ValueError, match=r"after_min_component_ml 1.0 is not among the scored candidates \[0.0, 2.0\]"):
        choose_from_rows(np.asarray(rows), (0.0, 2.0), after_min_component_ml=1.0)


def test_the_choice_follows_the_largest_component_and_masses_ignore_no_region():
    """A lesion case with a 2-ml false positive beside its 8-ml lesion: the predictor's largest component removes it
    before the decision, so the decision is scored on those DSCs. An ignore region (the false positive's voxels)
    leaves the DSC but not the mass, which ``decide`` computes on the whole prediction at test / predict time."""
    lesion = np.zeros((8, 8, 8), np.uint8)
    lesion[2:4, 2:4, 2:4] = 1  # 8 ml at 0.9
    pred, prob = lesion.copy(), lesion * np.float32(0.9)
    pred[7, 7, 6:8], prob[7, 7, 6:8] = 1, 0.95  # a 2-ml false positive, 1.9 ml of mass
    healthy_pred, healthy_prob = np.zeros_like(pred), np.zeros_like(prob)
    healthy_pred[0, 0, 0], healthy_prob[0, 0, 0] = 1, 0.6
    row = validation_row(pred, prob, lesion, SPACING, (0.0,))
    np.testing.assert_allclose(row[:5], [0, 7.2, 0.9, 16 / 18, 1.0], rtol=1e-6)  # the lesion is the most probable
    t, g = np.asarray(THRESHOLDS), len(THRESHOLDS)
    # the component rule: below 0.9 both stay (16/18), up to 0.95 only the confident false positive (0); the largest
    # of those left: the lesion, then the false positive
    np.testing.assert_allclose(row[5:5 + g], np.where(t < 0.9, 16 / 18, 0.0), rtol=1e-6)
    np.testing.assert_allclose(row[5 + g:], np.where(t < 0.9, 1.0, 0.0), rtol=1e-6)
    rows = np.asarray([row, validation_row(healthy_pred, healthy_prob, np.zeros_like(pred), SPACING, (0.0,))])
    assert choose_from_rows(rows, (0.0,), 0.0)["val_dsc_off"] == pytest.approx((16 / 18 + 0) / 2)
    after_largest = choose_from_rows(rows, (0.0,), 0.0, largest_component=True)
    assert after_largest["val_dsc_off"] == pytest.approx(0.5) and after_largest["after_largest_component"] is True
    assert after_largest["val_dsc"] == pytest.approx(1.0)  # the healthy case emptied at 0.6 < threshold
    ignored = np.zeros(pred.shape, bool)
    ignored[7, 7, :] = True
    masked = validation_row(pred, prob, lesion, SPACING, (0.0,), ignored)
    np.testing.assert_allclose(masked[:5], [0, 7.2, 0.9, 1.0, 1.0], rtol=1e-6)  # the FP is not scored; features the same
    np.testing.assert_allclose(masked[5:5 + g], np.where(t < 0.9, 1.0, 0.0), rtol=1e-6)  # left alone: nothing scored
    fp_only = np.zeros_like(pred)
    fp_only[7, 7, 6:8] = 1
    masked = validation_row(fp_only, prob, np.zeros_like(pred), SPACING, (0.0,), ignored)
    np.testing.assert_allclose(masked[:5], [1, 1.9, 0.95, 1.0, 1.0], rtol=1e-6)  # healthy outside the region, features kept
    np.testing.assert_allclose(masked[5:], 1.0)


def test_metric_matches_the_pure_choice():
    metric = HealthyDecisionScores((2.0, 0.0), also_ml=0.5)
    assert metric.candidates == (0.0, 0.5, 2.0)
    for p, q, r in _validation_cases():
        metric.update(p, q, r, SPACING)
    rows = [validation_row(p, q, r, SPACING, (0.0, 0.5, 2.0)) for p, q, r in _validation_cases()]
    np.testing.assert_allclose(metric.compute().numpy(), rows, rtol=1e-6)
    record = metric.choose(0.0)
    assert record["mean_probability"] == pytest.approx(0.75, rel=1e-6) and len(metric.rows) == 0  # reset after the choice
    kept = record["validation_rows"]  # kept for pooling folds (benchmarks/cross_validate.py)
    assert kept["candidates_ml"] == [0.0, 0.5, 2.0]
    np.testing.assert_allclose(kept["rows"], rows, rtol=1e-5, atol=1e-6)
    assert HealthyDecisionScores(also_ml="auto").candidates == (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)


def test_settings_and_the_threshold_in_force():
    chosen = {"min_component_ml": 0.5, "healthy_decision": {"mass_ml": 1.5, "after_min_component_ml": 0.5}}
    assert chosen_rule("auto", chosen) == ("mass_ml", 1.5)  # a choice written before mean_probability existed
    probability = {"healthy_decision": {"feature": "mean_probability", "mean_probability": 0.8, "mass_ml": None}}
    assert chosen_rule("auto", probability) == ("mean_probability", 0.8)
    assert chosen_rule("auto", {"min_component_ml": 0.5}) is None  # an older checkpoint: as before
    assert chosen_rule("auto", None) is None
    assert chosen_rule("auto", {"healthy_decision": {"feature": None, "mass_ml": None, "mean_probability": None}}) is None
    assert chosen_rule("off", chosen) is None and chosen_rule(0, chosen) is None
    assert chosen_rule(2, None) == ("mass_ml", 2.0)
    assert check_setting(False) == "off" and InferenceSettings(healthy_decision=False).healthy_decision == "off"
    assert InferenceSettings().healthy_decision == "off"
    assert InferenceSettings.from_dict({"healthy_decision": 0.25}).to_dict()["healthy_decision"] == 0.25
    assert chosen_rule("mean_probability:0.9", None) == ("mean_probability", 0.9)  # e.g. pooled over folds
    assert chosen_rule("mass_ml:2.5", chosen) == ("mass_ml", 2.5) and chosen_rule("mass_ml:0", None) is None
    assert InferenceSettings(healthy_decision="mean_probability:0.9").healthy_decision == "mean_probability:0.9"
    assert "mean tumour probability < 0.9 are emptied" in decision_line("mean_probability:0.9", None)
    for bad in ("maybe", -1, True, "volume_ml:2", "mean_probability:x", "mean_probability:-0.1", "mass_ml:inf"):
        with pytest.raises(ValueError, match=f"healthy_decision must be .* got {bad!r}"):
            InferenceSettings(healthy_decision=bad)
    assert "tumour probability mass (ml) < 0.5 are emptied" in decision_line(0.5, None)
    assert "after min_component_ml 0.5" in decision_line("auto", chosen)
    assert "mean tumour probability < 0.8 are emptied (auto" in decision_line("auto", probability)
    assert "none (healthy_decision off)" in decision_line("off", chosen)
    assert "no validation choice in the checkpoint" in decision_line("auto", {})


def test_decide_on_the_plan_grid_after_small_component_removal():
    prob = np.zeros((6, 6, 6), np.float32)
    prob[1, 1, 1] = 0.75  # one 1-ml voxel carrying 0.75 ml
    prob[4, 4, 4] = 0.4  # below 0.5: not in the argmax mask, so not counted
    found = decide(_logits(prob), SPACING, 0.0, ("mass_ml", 1.0))
    assert found["healthy"] and found["mass_ml"] == pytest.approx(0.75, rel=1e-5) and found["components"] == 1
    assert found["mean_probability"] == pytest.approx(0.75, rel=1e-5) and found["rule"] == ("mass_ml", 1.0)
    assert not decide(_logits(prob), SPACING, 0.0, ("mass_ml", 0.5))["healthy"]
    assert decide(_logits(prob), SPACING, 0.0, ("mean_probability", 0.8))["healthy"]
    assert not decide(_logits(prob), SPACING, 0.0, ("mean_probability", 0.7))["healthy"]
    removed = decide(_logits(prob), SPACING, 2.0, ("mass_ml", 0.5))  # small-component removal first: nothing left
    assert removed["mass_ml"] == 0.0 and removed["healthy"]


def _predictor(probability, healthy_decision, postprocessing=None) -> Predictor:
    plan = Plan(target_spacing=SPACING, patch_size=(4, 4, 4), intensity={"clip_low": -1, "clip_high": 1, "mean": 0, "std": 1})
    predictor = Predictor(torch.nn.Conv3d(1, 2, 1), plan, InferenceSettings(healthy_decision=healthy_decision),
                          postprocessing, device="cpu")
    predictor.logits = lambda image, tta=None: _logits(probability)  # the network's part is not under test here
    return predictor


def test_predictor_empties_a_scan_declared_healthy_and_keeps_the_components_only_mask():
    prob = np.zeros((6, 6, 6), np.float32)
    prob[1, 1, 1] = 0.75
    image = torch.zeros(1, 6, 6, 6)
    decision: dict = {}
    mask = _predictor(prob, 1.0).mask(image, SPACING, (6, 6, 6), decision=decision)
    assert mask.sum() == 0 and decision["healthy"] and decision["components_only_mask"].sum() == 1
    extras = case_extras(mask, np.zeros_like(mask), SPACING, decision)
    assert extras["predicted_ml_components_only"] == 1.0 and extras["dsc_components_only"] == 0.0
    assert extras["decision_mass_ml"] == pytest.approx(0.75, rel=1e-5) and extras["components_predicted"] == 0
    kept: dict = {}
    auto = _predictor(prob, "auto", {"healthy_decision": {"mass_ml": 0.5}})
    assert auto.mask(image, SPACING, (6, 6, 6), decision=kept).sum() == 1 and not kept["healthy"]
    assert "components_only_mask" not in kept
    old: dict = {}
    assert _predictor(prob, "auto", {"min_component_ml": 0.0}).mask(image, SPACING, (6, 6, 6), decision=old).sum() == 1
    assert old == {}  # an older checkpoint: no decision, no features computed
    assert math.isclose(case_extras(np.ones((2, 2, 2)), np.ones((2, 2, 2)), SPACING, old)["predicted_ml_components_only"], 8.0)
