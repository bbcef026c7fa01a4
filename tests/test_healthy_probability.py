"""The healthy-scan decision on the mean probability of the most probable component: hand-made probability maps,
the choice on validation between the two features (hand-computed), the predictor, the test report."""
import json

import numpy as np
import pytest
import torch

from lightning_flare.healthy_choice import choose_from_rows, validation_row
from lightning_flare.healthy_decision import chosen_rule, decision_line, decision_report
from lightning_flare.plan import Plan
from lightning_flare.predictor import InferenceSettings, Predictor
from lightning_flare.report import write_reports

SPACING = (10.0, 10.0, 10.0)  # one voxel = 1 ml
SHAPE = (6, 6, 6)


def _case(block: tuple[slice, ...], p: float, lesion: bool):
    """(prediction, tumour probability, reference): ``block`` predicted at probability ``p`` (background 0), the
    reference that block when ``lesion`` (predicted exactly), else empty; an empty ``block`` predicts nothing."""
    prediction, probability = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.float32)
    prediction[block], probability[block] = 1, p
    return prediction, probability, prediction.copy() if lesion else np.zeros_like(prediction)


NOTHING = (slice(0, 0),) * 3
HEALTHY_FP = _case((slice(0, 2), slice(0, 2), slice(0, 2)), 0.7, False)  # 8 ml at 0.7: mass 5.6, mean 0.7
SMALL_LESION = _case((slice(0, 2), slice(0, 2), slice(0, 1)), 0.95, True)  # 4 ml at 0.95: mass 3.8, mean 0.95
LARGE_LESION = _case((slice(0, 3), slice(0, 3), slice(0, 3)), 0.9, True)  # 27 ml at 0.9: mass 24.3, mean 0.9
CLEAN = _case(NOTHING, 0.0, False)  # a healthy case without a false positive


def _rows(cases) -> np.ndarray:
    return np.asarray([validation_row(p, q, r, SPACING, (0.0,)) for p, q, r in cases])


def test_rows_hold_mass_and_mean_probability():
    # [healthy, mass, mean probability, DSC, DSC of the largest component alone], at min_component_ml 0
    np.testing.assert_allclose(_rows([HEALTHY_FP, SMALL_LESION, LARGE_LESION, CLEAN])[:, :5],
                               [[1, 5.6, 0.7, 0.0, 0.0], [0, 3.8, 0.95, 1.0, 1.0], [0, 24.3, 0.9, 1.0, 1.0],
                                [1, 0.0, 0.0, 1.0, 1.0]], rtol=1e-6)


def test_the_mean_probability_separates_where_the_mass_cannot():
    """Off: DSCs 0, 1, 1, 1 -> 0.75; lesion mean 1. Mass candidates 4.7, 14.95, 48.6 all empty the 3.8-ml lesion
    case first (lesion DSC -0.5: over the 1-point limit). Mean-probability candidates 0.8, 0.925, 1.9: 0.8 empties
    the healthy false positive (0.7) alone -> 4 / 4 = 1.0; 0.925 also empties the 0.9 lesion case."""
    record = choose_from_rows(_rows([HEALTHY_FP, SMALL_LESION, LARGE_LESION, CLEAN]), (0.0,), 0.0)
    assert record["reason"] == "chosen" and record["feature"] == "mean_probability" and record["mass_ml"] is None
    assert record["mean_probability"] == pytest.approx(0.8)
    assert record["val_dsc_off"] == pytest.approx(0.75) and record["val_dsc"] == pytest.approx(1.0)
    assert record["val_lesion_dsc_loss"] == 0.0
    assert (record["healthy_cases"], record["healthy_fp_off"], record["healthy_fp"]) == (2, 1, 0)
    assert "mean tumour probability < 0.8 are emptied" in record["status"] and "1 -> 0 of 2" in record["status"]


def test_the_mass_is_chosen_where_only_it_separates():
    """A confident 1-ml false positive (0.99) beside lesion cases of 0.9 / 0.95: the mean probability cannot
    empty it without the 0.9 lesion case (candidates 0.925, 0.97: lesion loss), the mass can: candidates
    (0.99 + 3.8) / 2 = 2.395 empties it alone."""
    confident = _case((slice(5, 6),) * 3, 0.99, False)
    record = choose_from_rows(_rows([confident, SMALL_LESION, LARGE_LESION]), (0.0,), 0.0)
    assert record["feature"] == "mass_ml" and record["mass_ml"] == pytest.approx(2.395)
    assert record["mean_probability"] is None and record["val_dsc"] == pytest.approx(1.0)


def test_off_when_validation_has_no_healthy_false_positive():
    """Three clean healthy cases: every threshold on either feature ties with no decision or costs a lesion case."""
    record = choose_from_rows(_rows([CLEAN, CLEAN, CLEAN, SMALL_LESION, LARGE_LESION]), (0.0,), 0.0)
    assert record["reason"] == "no_gain" and record["feature"] is None
    assert record["mass_ml"] is None and record["mean_probability"] is None
    assert record["healthy_cases"] == 3 and record["healthy_fp_off"] == record["healthy_fp"] == 0
    assert "mean_probability or mass_ml" in record["status"]
    assert chosen_rule("auto", {"healthy_decision": record}) is None


def _logits(probability: np.ndarray) -> torch.Tensor:
    """Two-class logits whose softmax tumour probability is ``probability`` (background logit 0)."""
    p = torch.from_numpy(np.clip(probability, 1e-6, 1 - 1e-6).astype(np.float32))
    return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))])


def _mask(probability: np.ndarray, postprocessing: dict, decision: dict) -> np.ndarray:
    plan = Plan(target_spacing=SPACING, patch_size=(4, 4, 4), intensity={"clip_low": -1, "clip_high": 1, "mean": 0, "std": 1})
    predictor = Predictor(torch.nn.Conv3d(1, 2, 1), plan, InferenceSettings(healthy_decision="auto"), postprocessing,
                          device="cpu")
    predictor.logits = lambda image, tta=None: _logits(probability)  # the network's part is not under test here
    return predictor.mask(torch.zeros(1, *SHAPE), SPACING, SHAPE, decision=decision)


def test_predictor_removes_the_unsure_healthy_component_and_keeps_the_confident_lesion():
    chosen = {"healthy_decision": choose_from_rows(_rows([HEALTHY_FP, SMALL_LESION, LARGE_LESION, CLEAN]), (0.0,), 0.0)}
    healthy: dict = {}
    assert _mask(HEALTHY_FP[1], chosen, healthy).sum() == 0  # mean 0.7 < 0.8: emptied
    assert healthy["healthy"] and healthy["rule"] == ("mean_probability", pytest.approx(0.8))
    assert healthy["mean_probability"] == pytest.approx(0.7, rel=1e-5) and healthy["components_only_mask"].sum() == 8
    lesion: dict = {}
    assert _mask(SMALL_LESION[1], chosen, lesion).sum() == 4 and not lesion["healthy"]  # 0.95 >= 0.8: kept
    old = {"healthy_decision": {"mass_ml": 4.7, "feature": "largest_component_probability_mass_ml"}}  # a mass choice
    assert _mask(SMALL_LESION[1], old, {}).sum() == 0 and _mask(HEALTHY_FP[1], old, {}).sum() == 8  # the other way


def test_the_test_report_says_which_rule_was_used(tmp_path):
    chosen = {"healthy_decision": {"feature": "mean_probability", "mean_probability": 0.8, "mass_ml": None,
                                   "reason": "chosen", "after_min_component_ml": 0.5}}
    report = decision_report("auto", chosen)
    assert report == {"setting": "auto", "feature": "mean_probability", "threshold": 0.8, "source": "validation",
                      "reason": "chosen", "after_min_component_ml": 0.5}
    assert decision_report(2.0, None) == {"setting": 2.0, "feature": "mass_ml", "threshold": 2.0, "source": "setting"}
    assert decision_report("off", chosen)["feature"] is None
    assert decision_report("auto", {})["reason"] == "no validation choice in the checkpoint"
    row = {"case": "h", "dsc": 1.0, "nsd": 1.0, "reference_ml": 0.0, "predicted_ml": 0.0, "healthy_false_positive": False,
           "decision_mass_ml": 5.6, "decision_mean_probability": 0.7}
    write_reports([row], tmp_path, healthy_decision=report)
    assert json.loads((tmp_path / "metrics_summary.json").read_text())["healthy_decision"] == report
    assert (tmp_path / "metrics_per_case.csv").read_text().splitlines()[1].endswith(",5.6,0.7")
    assert "mean tumour probability < 0.8" in decision_line("auto", chosen)
