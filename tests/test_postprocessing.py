import numpy as np
import pytest

from lightning_flare.metrics.postprocessing_scores import ComponentThresholdScores
from lightning_flare.postprocessing import choose_threshold, flare_dsc, remove_small_components, score_thresholds

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
