import numpy as np
import pytest

from lightning_flare.metrics.postprocessing_scores import ComponentThresholdScores, LargestComponentScores
from lightning_flare.postprocessing import (case_scores, choose_largest_component, choose_threshold, flare_dsc,
                                            keep_largest_component, remove_small_components, score_thresholds)

SPACING = (10.0, 10.0, 10.0)  # one voxel = 1 ml


def test_remove_small_components_by_volume_with_26_connectivity():
    mask = np.zeros((8, 8, 8), np.uint8)
    mask[1:3, 1:3, 1:3] = 1  # 8 ml
    mask[5, 5, 5] = 1  # 1 ml
    mask[6, 6, 6] = 1  # touches (5, 5, 5) at a corner: one 2-ml component
    assert remove_small_components(mask, SPACING, 0.0) is mask
    out = remove_small_components(mask, SPACING, 2.0)
    np.testing.assert_array_equal(out, mask)  # 2 ml is not below 2 ml
    out = remove_small_components(mask, SPACING, 2.5)
    assert out.sum() == 8 and out[1:3, 1:3, 1:3].all() and mask.sum() == 10  # input untouched
    assert remove_small_components(mask, (1.0, 1.0, 1.0), 0.01).sum() == 0  # 8 mm^3 = 0.008 ml
    with pytest.raises(ValueError, match="min_component_ml must be >= 0"):
        remove_small_components(mask, SPACING, -1)


def test_flare_dsc_rules():
    empty, one = np.zeros((3, 3, 3), bool), np.zeros((3, 3, 3), bool)
    one[1, 1, 1] = True
    assert flare_dsc(empty, empty) == 1.0
    assert flare_dsc(one, empty) == 0.0 and flare_dsc(empty, one) == 0.0
    two = one.copy()
    two[1, 1, 2] = True
    assert flare_dsc(two, one) == pytest.approx(2 * 1 / 3)


def _cases():
    healthy_pred = np.zeros((8, 8, 8), np.uint8)
    healthy_pred[0, 0, 0] = 1  # a 1-ml false positive
    lesion = np.zeros((8, 8, 8), np.uint8)
    lesion[2:4, 2:4, 2:4] = 1
    return [(healthy_pred, np.zeros_like(healthy_pred), SPACING), (lesion.copy(), lesion, SPACING)]


def test_threshold_choice_on_validation_cases():
    scores = score_thresholds(_cases(), (0.0, 0.5, 2.0, 4.0, 10.0))
    # 0 and 0.5 ml keep the false positive (0 + 1) / 2; 2 and 4 ml fix it; 10 ml also drops the 8-ml lesion
    assert scores == {0.0: 0.5, 0.5: 0.5, 2.0: 1.0, 4.0: 1.0, 10.0: 0.5}
    assert choose_threshold(scores) == 2.0  # the smallest of the best
    assert choose_threshold({0.0: 0.8, 1.0: 0.8}) == 0.0  # no gain: keep everything
    with pytest.raises(ValueError, match="no validation cases"):
        score_thresholds([])


def test_metric_matches_the_pure_function_on_random_masks():
    rng = np.random.default_rng(0)
    cases = [((rng.random((12, 10, 9)) > 0.93).astype(np.uint8), (rng.random((12, 10, 9)) > 0.9).astype(np.uint8),
              (3.0, 3.0, 4.0)) for _ in range(4)] + _cases()
    metric = ComponentThresholdScores((0.0, 0.05, 0.1, 2.0))
    for p, r, s in cases:
        metric.update(p, r, s)
    expected = score_thresholds(cases, (0.0, 0.05, 0.1, 2.0))
    assert metric.compute() == pytest.approx(expected)


def test_module_min_component_ml_auto_uses_the_validation_choice():
    from lightning_flare.module import FlareSegmentationModule
    from lightning_flare.network import PlainConvUNet
    from lightning_flare.predictor import InferenceSettings

    net = PlainConvUNet(features_per_stage=[4, 8, 16, 32])
    module = FlareSegmentationModule(net, inference=InferenceSettings(min_component_ml="auto"))
    assert module.min_component_ml() == 0.0  # nothing chosen yet
    module.on_load_checkpoint({"postprocessing": {"min_component_ml": 1.0}})
    assert module.min_component_ml() == 1.0
    assert FlareSegmentationModule(net, inference=InferenceSettings(min_component_ml=0.5)).min_component_ml() == 0.5
    with pytest.raises(ValueError, match="min_component_ml must be"):
        FlareSegmentationModule(net, inference={"min_component_ml": "big"})


def test_keep_largest_component_is_nnunets_remove_all_but_largest():
    mask = np.zeros((8, 8, 8), np.uint8)
    mask[1:3, 1:3, 1:3] = 1  # 8 voxels
    mask[5, 5, 5] = 1
    mask[6, 6, 6] = 2  # touches (5, 5, 5) at a corner: one 2-voxel component over all labels
    out = keep_largest_component(mask)
    assert out.sum() == 8 and out[1:3, 1:3, 1:3].all() and np.count_nonzero(mask) == 10  # input untouched
    single = np.zeros((4, 4, 4), np.uint8)
    single[1, 1, 1] = 1
    assert keep_largest_component(single) is single and keep_largest_component(np.zeros_like(single)).sum() == 0


def _two_lesion_cases():
    """Two cases with a false-positive blob beside the lesion (largest only: 1.0 instead of 16/18) and one
    case with two true lesions (largest only: 2 * 8 / (8 + 12) = 0.8 instead of 1.0)."""
    cases = []
    for _ in range(2):
        ref = np.zeros((10, 10, 10), np.uint8)
        ref[1:3, 1:3, 1:3] = 1  # 8 ml
        pred = ref.copy()
        pred[7, 7, 6:8] = 1  # 2-ml false positive
        cases.append((pred, ref, SPACING))
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[1:3, 1:3, 1:3] = 1  # 8 ml
    ref[6:8, 6:8, 6] = 1  # 4 ml
    cases.append((ref.copy(), ref, SPACING))
    return cases


def test_largest_component_is_chosen_only_when_it_beats_the_best_without_it():
    cases = _two_lesion_cases()
    scores = score_thresholds(cases, (0.0, 3.0))  # 3 ml also removes the 2-ml blobs
    largest = {t: float(np.mean([case_scores(p, r, s, (t,), largest_only=True)[0] for p, r, s in cases]))
               for t in (0.0, 3.0)}
    assert largest == pytest.approx({0.0: 0.9333333, 3.0: 0.9333333})  # (1 + 1 + 0.8) / 3
    assert scores == pytest.approx({0.0: (16 / 18 * 2 + 1) / 3, 3.0: 1.0})
    choice = choose_largest_component(scores, largest)  # 3 ml alone does better: no largest component
    assert choice["largest_component_only"] is False and choice["min_component_ml"] == 3.0
    assert choice["val_dsc_postprocessed"] == 1.0
    only_zero = {0.0: scores[0.0]}  # without the threshold candidate, largest-only wins (0.9333 > 0.9259)
    choice = choose_largest_component(only_zero, {0.0: largest[0.0]})
    assert choice["largest_component_only"] is True and choice["min_component_ml"] == 0.0
    assert choice["val_dsc_postprocessed"] == pytest.approx(0.933333)
    assert choice["val_dsc_largest_component_by_min_component_ml"] == {"0.0": pytest.approx(0.933333)}
    tie = choose_largest_component({0.0: 0.8}, {0.0: 0.8, 1.0: 0.8})  # no gain: not applied
    assert tie["largest_component_only"] is False and tie["min_component_ml"] == 0.0


def test_largest_component_metric_matches_the_pure_function():
    cases = _two_lesion_cases() + _cases()
    metric = LargestComponentScores((0.0, 1.5, 9.0))
    for p, r, s in cases:
        metric.update(p, r, s)
    # per case, largest only: 1, 1, 0.8, healthy 0 (0 with 1.5 and 9 ml too: the FP is 1 ml -> 1.0), lesion 1
    expected = {0.0: (1 + 1 + 0.8 + 0 + 1) / 5, 1.5: (1 + 1 + 0.8 + 1 + 1) / 5, 9.0: (0 + 0 + 0 + 1 + 0) / 5}
    assert metric.compute() == pytest.approx(expected)


def test_inference_largest_component_setting_and_old_choices():
    from lightning_flare.predictor import InferenceSettings, chosen_largest_component, postprocessing_summary

    auto = InferenceSettings(largest_component="auto")
    assert chosen_largest_component(auto, None) is False  # nothing chosen yet
    assert chosen_largest_component(auto, {"min_component_ml": 1.0}) is False  # a checkpoint from before the choice
    assert chosen_largest_component(auto, {"largest_component_only": True}) is True
    assert chosen_largest_component(InferenceSettings(largest_component=True), {"largest_component_only": False}) is True
    assert InferenceSettings().largest_component is False  # default: as before
    for wrong in ("yes", 1, None):
        with pytest.raises(ValueError, match=f"largest_component must be true, false or 'auto', got {wrong!r}"):
            InferenceSettings(largest_component=wrong)
    line = postprocessing_summary(auto, {"largest_component_only": True, "min_component_ml": 0.5})
    assert line == ("Postprocessing: components below 0 ml removed; only the largest component kept "
                    "(largest_component auto: chosen on the validation fold)\n"
                    "Healthy-scan decision: none (healthy_decision off)")


def test_predictor_applies_the_checkpoint_choice(monkeypatch):
    """Predictor.mask (test, predict and python -m lightning_flare.predict) keeps the largest component when
    the setting says so, or says auto and the validation chose it."""
    import torch

    from lightning_flare import predictor as predictor_file
    from lightning_flare.network import PlainConvUNet
    from lightning_flare.plan import IntensityStats, Plan

    foreground = torch.zeros(8, 8, 8, dtype=torch.bool)
    foreground[1:3, 1:3, 1:3] = True  # 8 voxels
    foreground[6, 6, 6] = True  # a second component
    logits = torch.stack([(~foreground).float(), foreground.float()])
    monkeypatch.setattr(predictor_file, "sliding_window_logits", lambda *args, **kwargs: logits.clone())
    plan = Plan((1.0, 1.0, 1.0), (8, 8, 8), IntensityStats(-100.0, 100.0, 0.0, 50.0))
    net = PlainConvUNet(features_per_stage=[4, 8, 16, 32])
    voxels = {}
    for setting, chosen in [(False, True), ("auto", False), ("auto", True), (True, None)]:
        settings = predictor_file.InferenceSettings(largest_component=setting)
        predictor = predictor_file.Predictor(net, plan, settings, None if chosen is None else {"largest_component_only": chosen}, "cpu")
        voxels[(setting, chosen)] = int(predictor.mask(torch.zeros(1, 8, 8, 8), (1.0, 1.0, 1.0), (8, 8, 8)).sum())
    assert voxels == {(False, True): 9, ("auto", False): 9, ("auto", True): 8, (True, None): 8}


def test_scores_postprocess_the_whole_prediction_and_leave_an_ignore_region_out():
    """Components of the whole prediction (as the predictor's), scored outside the ignore region (as test)."""
    pred = np.zeros((8, 1, 1), np.uint8)
    pred[0:3] = 1  # 3 ml, inside the ignore region
    pred[5] = 1  # 1 ml on the lesion
    ref, ignored = np.zeros_like(pred), np.zeros(pred.shape, bool)
    ref[5], ignored[0:3] = 1, True
    assert case_scores(pred, ref, SPACING, (0.0, 2.0), ignored=ignored) == [1.0, 0.0]  # 2 ml removes voxel 5
    assert case_scores(pred, ref, SPACING, (0.0,), largest_only=True, ignored=ignored) == [0.0]  # largest: ignored
    assert case_scores(pred, ref, SPACING, (0.0,), largest_only=True) == [0.0]
    metric = LargestComponentScores((0.0,))
    metric.update(pred, ref, SPACING, ignored)
    assert metric.compute() == {0.0: 0.0}


def test_largest_component_at_a_fixed_min_component_ml():
    """With a fixed min_component_ml both arms are compared where the predictor applies them."""
    cases = _two_lesion_cases()
    scores = score_thresholds(cases, (0.0, 3.0))
    largest = {t: float(np.mean([case_scores(p, r, s, (t,), largest_only=True)[0] for p, r, s in cases]))
               for t in (0.0, 3.0)}
    assert choose_largest_component(scores, largest)["largest_component_only"] is False  # auto: 3 ml alone is best
    fixed = choose_largest_component(scores, largest, fixed_ml=0.0)  # 0 ml is applied: largest-only beats it
    assert fixed["largest_component_only"] is True and fixed["min_component_ml"] == 0.0
    assert fixed["val_dsc_postprocessed"] == pytest.approx(0.933333)
    assert choose_largest_component(scores, largest, fixed_ml=3.0)["largest_component_only"] is False
    with pytest.raises(ValueError, match=r"min_component_ml 0.3 is not among the scored candidates \[0.0, 3.0\]"):
        choose_largest_component(scores, largest, fixed_ml=0.3)
    assert ComponentThresholdScores((0.0, 1.0), also_ml=0.3).candidates == (0.0, 1.0, 0.3)
    assert LargestComponentScores((0.0, 1.0), also_ml=1.0).candidates == (0.0, 1.0)
    assert ComponentThresholdScores((0.0, 1.0), also_ml="auto").candidates == (0.0, 1.0)


def test_min_component_ml_auto_follows_the_largest_component_arm_applied():
    """The choice's min_component_ml goes with its largest_component_only; a fixed largest_component setting that
    differs from it gets the best volume of its own arm (min_component_ml auto with the default false: demo.yaml)."""
    from lightning_flare.predictor import InferenceSettings, chosen_min_component_ml

    scores, largest = {0.0: 0.8, 2.0: 0.9}, {0.0: 0.95, 2.0: 0.7}
    choice = {"min_component_ml": 0.0, **choose_largest_component(scores, largest),
              "val_dsc_by_min_component_ml": {str(t): v for t, v in scores.items()}}
    assert choice["largest_component_only"] is True and choice["min_component_ml"] == 0.0  # the joint choice
    assert chosen_min_component_ml(InferenceSettings(min_component_ml="auto", largest_component="auto"), choice) == 0.0
    # largest_component false (the default): the largest-only arm is not applied, so its 0 ml is not the best volume
    assert chosen_min_component_ml(InferenceSettings(min_component_ml="auto"), choice) == 2.0
    assert chosen_min_component_ml(InferenceSettings(min_component_ml="auto", largest_component=True), choice) == 0.0
    plain = {"min_component_ml": 2.0, **choose_largest_component(scores, {0.0: 0.7, 1.0: 0.85})}
    assert plain["largest_component_only"] is False
    assert chosen_min_component_ml(InferenceSettings(min_component_ml="auto", largest_component=True), plain) == 1.0
    assert chosen_min_component_ml(InferenceSettings(min_component_ml="auto"), {"min_component_ml": 0.5}) == 0.5  # old
    assert chosen_min_component_ml(InferenceSettings(min_component_ml=0.25), choice) == 0.25


def test_validation_choice_orders_the_choices_as_the_predictor_applies_them():
    """min_component_ml, then the largest component (at a fixed volume when only largest_component is auto), then
    the healthy decision after the two in force."""
    from lightning_flare.predictor import InferenceSettings, scored_ml, validation_choice

    scores, largest = {0.0: 0.8, 2.0: 0.9, 0.5: 0.8}, {0.0: 0.85, 2.0: 0.7, 0.5: 0.85}
    seen = []
    decide = lambda ml, largest_only: seen.append((ml, largest_only)) or {"mass_ml": None, "val_dsc": 0.0}  # noqa: E731
    auto = validation_choice(InferenceSettings(min_component_ml="auto", largest_component="auto"), scores, largest,
                             decide, 3)
    assert (auto["min_component_ml"], auto["largest_component_only"], auto["epoch"]) == (2.0, False, 3)
    fixed = validation_choice(InferenceSettings(min_component_ml=0.5, largest_component="auto"), scores, largest, decide, 3)
    assert fixed["largest_component_only"] is True and fixed["min_component_ml"] == 0.5  # 0.85 > 0.8 at 0.5 ml
    default = validation_choice(InferenceSettings(min_component_ml="auto"), scores, largest, decide, 3)
    assert default["largest_component_only"] is False
    assert seen == [(2.0, False), (0.5, True), (2.0, False)]
    assert scored_ml(InferenceSettings(min_component_ml=0.5, largest_component="auto")) == 0.5
    assert scored_ml(InferenceSettings(min_component_ml=0.5)) == "auto"
