"""Pseudo-labelling: the component filter and the merge on hand-made arrays, the teacher's passes against the
predictor's masks."""
import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from lightning_flare.network import PlainConvUNet
from lightning_flare.plan import IntensityStats, Plan
from lightning_flare.predict import load_predictor
from lightning_flare.predictor import InferenceSettings, Predictor
from lightning_flare.preprocessing import preprocess_image
from lightning_flare.pseudo_filter import Thresholds, merge_labels, score_components
from lightning_flare.pseudo_teacher import resample_difference, teacher_passes
from lightning_flare.resample import resample_to_mask

NET = {"in_channels": 1, "num_classes": 2, "features_per_stage": [4, 8, 16], "strides": [1, 2, 2],
       "deep_supervision": True}
PLAN = Plan((4.0, 4.0, 5.0), (16, 16, 16), IntensityStats(-1000.0, 300.0, 0.0, 200.0))


def line(values, dtype=np.float32):
    """A (n, 1, 1) volume: components along x only."""
    return np.asarray(values, dtype).reshape(-1, 1, 1)


# ---------------------------------------------------------------- filter and merge on hand-made arrays


def test_components_are_scored_and_dropped_with_their_reasons():
    mask = line([1, 1, 1, 0, 0, 1, 1, 0, 0, 0], bool)
    prob = line([0.9, 0.8, 0.7, 0, 0, 0.6, 0.6, 0, 0, 0])
    plain = line([0, 1, 1, 1, 0, 0, 0, 0, 0, 1], bool)  # touches A (3 voxels, 2 shared); voxel 9 touches nothing
    spacing = (2.0, 5.0, 10.0)  # 100 mm^3 = 0.1 ml per voxel
    components, scores = score_components(mask, prob, spacing, Thresholds(0.7, 0.5, 0.25), plain=plain)
    assert components.ravel().tolist() == [1, 1, 1, 0, 0, 2, 2, 0, 0, 0]
    a, b = scores
    assert (a.voxels, b.voxels) == (3, 2)
    assert a.volume_ml == pytest.approx(0.3) and b.volume_ml == pytest.approx(0.2)
    assert a.mean_prob == pytest.approx(0.8) and b.mean_prob == pytest.approx(0.6)
    assert a.mirror_agreement == pytest.approx(2 * 2 / (3 + 3)) and b.mirror_agreement == 0.0
    assert a.round_agreement is None and a.decision == "kept" and a.reasons == []
    assert b.decision == "dropped"
    assert b.reasons == ["mean_prob 0.6 < min_mean_prob 0.7", "mirror_agreement 0 < min_agreement 0.5",
                         "volume_ml 0.2 < min_volume_ml 0.25"]


def test_agreement_counts_the_whole_touching_component_and_diagonal_contact_joins():
    mask = np.zeros((4, 4, 4), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True  # diagonal neighbours: one component (26-connectivity)
    previous = np.zeros((4, 4, 4), bool)
    previous[1, 1, 1:4] = True  # 3 voxels, 1 shared
    components, [score] = score_components(mask, mask.astype(np.float32), (1, 1, 1), Thresholds(0.5, 0.5, 0.0),
                                           previous=previous)
    assert components.max() == 1 and score.voxels == 2
    assert score.round_agreement == pytest.approx(2 * 1 / (2 + 3)) and score.mirror_agreement is None
    assert score.reasons == ["round_agreement 0.4 < min_agreement 0.5"]


def test_merge_given_labels_win_and_dropped_components_become_ignore():
    given = line([1, 1, 1, 0, 0, 0, 0, 0, 2, 0], np.uint8)  # a given lesion, a given ignore voxel
    mask = line([0, 1, 1, 1, 0, 0, 1, 1, 1, 1], bool)  # over the lesion; kept 6..9 (8 is given ignore)
    prob = line([0, 0.9, 0.9, 0.9, 0, 0, 0.9, 0.9, 0.9, 0.9])
    components, scores = score_components(mask, prob, (1, 1, 1), Thresholds(0.5, 0.0, 0.0), given_tumour=given == 1)
    assert [s.decision for s in scores] == ["given", "kept"]
    merged = merge_labels(components, scores, tumour=1, ignore=2, given=given)
    # the given lesion keeps its extent (voxel 3 stays background), the given ignore voxel stays ignore
    assert merged.ravel().tolist() == [1, 1, 1, 0, 0, 0, 1, 1, 2, 1]
    scores[1].reasons = ["mean_prob low"]  # the same component dropped
    assert merge_labels(components, scores, tumour=1, ignore=2, given=given).ravel().tolist() == \
        [1, 1, 1, 0, 0, 0, 2, 2, 2, 2]
    assert merge_labels(components, scores, tumour=1, ignore=None, given=given).ravel().tolist() == \
        [1, 1, 1, 0, 0, 0, 0, 0, 2, 0]


def test_unlabelled_scan_kept_dropped_and_healthy():
    mask = line([1, 1, 0, 1, 0, 0], bool)
    prob = line([0.9, 0.95, 0, 0.55, 0, 0])
    components, scores = score_components(mask, prob, (1, 1, 1), Thresholds(0.75, 0.0, 0.0))
    assert merge_labels(components, scores, tumour=1, ignore=2).ravel().tolist() == [1, 1, 0, 2, 0, 0]
    empty = line([0] * 6, bool)
    components, scores = score_components(empty, line([0.1] * 6), (1, 1, 1), Thresholds())
    assert scores == [] and not merge_labels(components, scores, tumour=1, ignore=2).any()  # healthy: background


def test_thresholds_are_checked():
    with pytest.raises(ValueError, match="min_mean_prob must be a number in"):
        Thresholds(min_mean_prob=1.5)
    with pytest.raises(ValueError, match="min_volume_ml"):
        Thresholds(min_volume_ml=-1)


# ---------------------------------------------------------------- the teacher's passes


@pytest.mark.parametrize("nearest_axis", [None, 0, 2])
def test_resampled_difference_has_the_predictors_sign(nearest_axis):
    logits = torch.randn(2, 5, 6, 7, generator=torch.Generator().manual_seed(0))
    difference = resample_difference(logits, (9, 11, 13), nearest_axis)
    assert difference.shape == (9, 11, 13) and difference.dtype == np.float32
    np.testing.assert_array_equal(difference > 0, resample_to_mask(logits, (9, 11, 13), nearest_axis=nearest_axis) > 0)


def _teacher(path, seed):
    torch.manual_seed(seed)
    net = PlainConvUNet(**NET)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "net_init_args": NET,
                "plan": PLAN.to_dict()}, path)
    return path


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teachers")
    return _teacher(folder / "teacher0.ckpt", 0), _teacher(folder / "teacher2.ckpt", 2)


def test_teacher_masks_are_the_predictors_masks(teachers, tiny_dataset):
    settings = InferenceSettings(tta=True, autocast=False)
    predictor = load_predictor(teachers[1], settings, torch.device("cpu"))  # seed 2: some tumour on this crop
    image = sitk.ReadImage(str(tiny_dataset / "imagesTr" / "SYN_000_0000.nii.gz"))[:, :, 10:22]  # one window a pass
    tensor = torch.from_numpy(preprocess_image(image, predictor.plan))[None]
    with torch.inference_mode():
        out = teacher_passes(predictor, tensor, image.GetSpacing(), image.GetSize(), tta=True)
        mirrored = predictor.mask(tensor, image.GetSpacing(), image.GetSize())
        plain = Predictor(predictor.net, predictor.plan, dataclasses.replace(settings, tta=False), device="cpu")
        plain = plain.mask(tensor, image.GetSpacing(), image.GetSize())
    assert out.mask.shape == tuple(image.GetSize()) and out.mask.any() and not out.mask.all()
    np.testing.assert_array_equal(out.mask, mirrored > 0)
    np.testing.assert_array_equal(out.plain_mask, plain > 0)
    assert (out.mask != out.plain_mask).any()  # the two passes differ: the agreement measures something
    assert out.probability.min() >= 0 and out.probability.max() <= 1 and (out.probability[out.mask] >= 0.5).all()
