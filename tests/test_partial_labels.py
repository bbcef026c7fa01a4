"""Partial-label-aware training: the settings, the ignore rule by hand, the per-case flag through the tio.Queue,
the module's loss and a seconds-long fit from the YAML keys."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny_cli_args

from lightning_flare.io import Geometry
from lightning_flare.loss import DiceCELoss
from lightning_flare.module import FlareSegmentationModule
from lightning_flare.partial_labels import (PartialLabelSettings, ignore_confident_background, training_target,
                                            unmarked_components, without_ignored)
from lightning_flare.plan import IntensityStats, Plan
from lightning_flare.preprocessing import CachedCase
from lightning_flare.sampling import PatchSampler, build_patch_loader
from lightning_flare.volumes import VolumeItem

PLAN = Plan((1, 1, 1), (4, 1, 1), IntensityStats(-100, 200, 50, 30))
# 2 samples x 4 voxels, 2 classes; tumour probability sigmoid(fg - bg) per voxel: 0.88, 0.88, 0.27, 0.62
LOGITS = torch.tensor([[0.0, 0.0, 1.0, 0.0], [2.0, 2.0, 0.0, 0.5]]).reshape(1, 2, 4, 1, 1).repeat(2, 1, 1, 1, 1)
TARGET = torch.tensor([1, 0, 0, 0]).reshape(1, 1, 4, 1, 1).repeat(2, 1, 1, 1, 1)


def test_settings_parse_and_name_the_bad_key():
    assert PartialLabelSettings() == PartialLabelSettings.from_any(None)
    assert not PartialLabelSettings().active and PartialLabelSettings().to_dict() == {"mode": "none", "threshold": 0.5,
                                                                                      "warmup_epochs": 0, "spare_marked": True}
    s = PartialLabelSettings.from_any({"mode": "ignore_confident", "threshold": 0.7, "warmup_epochs": 3})
    assert s.active and (s.threshold, s.warmup_epochs, s.spare_marked) == (0.7, 3, True)
    for bad, words in (({"mode": "teacher"}, "mode must be one of ['none', 'ignore_confident'], got 'teacher'"),
                       ({"threshold": 1.5}, "threshold must be a probability in [0, 1), got 1.5"),
                       ({"warmup_epochs": -1}, "warmup_epochs must be an integer >= 0, got -1"),
                       ({"spare_marked": "yes"}, "spare_marked must be true or false, got 'yes'"),
                       ({"treshold": 0.5}, "unknown model.partial_labels settings ['treshold']")):
        with pytest.raises(ValueError) as info:
            PartialLabelSettings.from_any(bad)
        assert words in str(info.value)


def test_ignore_value_is_the_dataset_s_else_num_classes_when_on():
    on, off = PartialLabelSettings(mode="ignore_confident"), PartialLabelSettings()
    assert off.ignore_value(PLAN) is None and on.ignore_value(PLAN) == 2
    declared = Plan((1, 1, 1), (4, 1, 1), PLAN.intensity, ignore_label=2)
    assert off.ignore_value(declared) == 2 and on.ignore_value(declared) == 2
    assert off.ignore_value(None) is None


def test_confident_unmarked_voxels_of_partial_cases_are_ignored_by_hand():
    """The rule before ``spare_marked`` (off): voxel 1, next to the marked voxel 0, is ignored too."""
    got = ignore_confident_background(TARGET, LOGITS, torch.tensor([True, False]), ignore_label=2, threshold=0.7)
    # sample 0 (partial): voxel 0 is marked (stays 1); voxel 1 unmarked at 0.88 > 0.7 -> 2; voxel 3 at 0.62 stays 0
    assert got[:, 0, :, 0, 0].tolist() == [[1, 2, 0, 0], [1, 0, 0, 0]]  # sample 1 is completely labelled
    assert TARGET[0, 0, 1, 0, 0] == 0  # the input is not changed
    lower = ignore_confident_background(TARGET, LOGITS, torch.tensor([True, True]), ignore_label=2, threshold=0.5)
    assert lower[:, 0, :, 0, 0].tolist() == [[1, 2, 0, 2], [1, 2, 0, 2]]  # 0.62 > 0.5 too


def test_training_target_is_the_label_when_off_in_warmup_or_without_partial_patches():
    on = PartialLabelSettings(mode="ignore_confident", warmup_epochs=2, spare_marked=False)
    partial = torch.tensor([True, False])
    assert training_target(PartialLabelSettings(), TARGET, LOGITS, partial, None, epoch=5) is TARGET
    assert training_target(on, TARGET, LOGITS, partial, 2, epoch=1) is TARGET
    assert training_target(on, TARGET, LOGITS, torch.tensor([False, False]), 2, epoch=2) is TARGET
    assert training_target(on, TARGET, LOGITS, None, 2, epoch=2) is TARGET
    assert training_target(on, TARGET, LOGITS, partial, 2, epoch=2)[:, 0, :, 0, 0].tolist() == [[1, 2, 0, 2], [1, 0, 0, 0]]
    spared = PartialLabelSettings(mode="ignore_confident", warmup_epochs=2)  # the default: voxel 1 is the marked rim
    assert training_target(spared, TARGET, LOGITS, partial, 2, epoch=2)[:, 0, :, 0, 0].tolist() == [[1, 0, 0, 2], [1, 0, 0, 0]]


def test_spare_marked_keeps_the_marked_lesion_s_over_segmentation_as_background():
    """A 3-D partial patch: a marked lesion (x 2-3) whose predicted region runs on to x 5 and, diagonally, to a
    voxel of the next row; a separate confident blob at x 8-9 (an unmarked lesion, as far as the label says). Only
    the blob is ignored; off, the rim (x 4-5 and the diagonal voxel) is ignored too."""
    target = torch.zeros(1, 1, 10, 3, 2, dtype=torch.long)
    target[0, 0, 2:4, 1, :] = 1
    tumour = torch.zeros(10, 3, 2)
    tumour[2:6, 1, :] = 0.9  # the marked lesion and its rim
    tumour[6, 2, 0] = 0.9  # diagonal neighbour of (5, 1, *): the rim too (26-neighbourhood)
    tumour[8:10, 0, :] = 0.8  # apart: x 7 separates it from the diagonal voxel
    p = tumour.clamp(1e-4, 1 - 1e-4)
    logits = torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))])[None]
    on = ignore_confident_background(target, logits, torch.tensor([True]), 2, 0.5, spare_marked=True)[0, 0]
    assert set(map(tuple, (on == 2).nonzero().tolist())) == {(x, 0, z) for x in (8, 9) for z in (0, 1)}
    assert (on[2:4, 1] == 1).all() and on.eq(1).sum() == 4
    off = ignore_confident_background(target, logits, torch.tensor([True]), 2, 0.5, spare_marked=False)[0, 0]
    assert (off == 2).sum() == 4 + 4 + 1
    assert torch.equal(ignore_confident_background(target, logits, torch.tensor([False]), 2, 0.5, True), target)


def test_validation_scores_leave_a_declared_ignore_region_out():
    prediction, label = np.array([1, 1, 0, 1], np.uint8), np.array([1, 2, 2, 0], np.uint8)
    p, lab = without_ignored(prediction, label, 2)
    assert p.tolist() == [1, 0, 0, 1] and lab.tolist() == [1, 0, 0, 0] and p.dtype == np.uint8
    assert without_ignored(prediction, label, None) == (prediction, label)
    p, lab = without_ignored(torch.from_numpy(prediction).long(), torch.from_numpy(label), 2)  # tensors: the same
    assert p.tolist() == [1, 0, 0, 1] and lab.tolist() == [1, 0, 0, 0] and p.dtype == torch.int64


def _entry(tmp_path, case_id: str, seed: int) -> CachedCase:
    shape = (12, 10, 8)
    label = np.zeros(shape, np.uint8)
    label[4:8, 4:7, 3:6] = 1
    e = CachedCase(case_id, *(tmp_path / f"{case_id}{s}" for s in ("_i.npy", "_l.npy", "_f.npy", ".json")))
    np.save(e.image, np.random.default_rng(seed).normal(size=shape).astype(np.float32))
    np.save(e.label, label)
    np.save(e.foreground, np.argwhere(label > 0).astype(np.int32))
    e.meta.write_text("{}")
    return e


@pytest.mark.parametrize("workers", [0, 1])
def test_the_partial_flag_reaches_the_batch_through_the_queue(tmp_path, workers):
    entries = [_entry(tmp_path, "a", 0), _entry(tmp_path, "b", 1), _entry(tmp_path, "c", 2)]
    loader = build_patch_loader(entries, PatchSampler((6, 6, 4), 3), (1, 1, 1), iterations_per_epoch=4,
                                num_workers=workers, seed=7, partial_ids=frozenset({"b"}))
    seen = []
    for batch in loader:
        assert batch["partial"].dtype == torch.bool and batch["partial"].shape == (3,)
        assert batch["partial"].tolist() == [c == "b" for c in batch["case_id"]]
        seen += batch["case_id"]
    assert len(seen) == 12 and {"a", "b", "c"} <= set(seen)
    default = build_patch_loader(entries, PatchSampler((6, 6, 4), 3), (1, 1, 1), 1, seed=7)
    assert not any(next(iter(default))["partial"].tolist())  # no partially labelled cases: all False


class FixedLogits(nn.Module):
    """A stand-in network whose output is LOGITS (plus a zero-valued parameter, so the loss has a gradient)."""

    num_classes, deep_supervision = 2, False

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return LOGITS[: x.shape[0]] + self.w


@pytest.mark.filterwarnings("ignore:You are trying to")
def test_training_step_loss_ignores_confident_unmarked_voxels():
    batch = {"image": torch.zeros(2, 1, 4, 1, 1), "label": TARGET.to(torch.uint8), "partial": torch.tensor([True, False])}
    module = FlareSegmentationModule(FixedLogits(), partial_labels={"mode": "ignore_confident", "threshold": 0.7,
                                                                    "spare_marked": False})
    module.plan = PLAN
    expected = DiceCELoss(ignore_label=2)(LOGITS, torch.tensor([1, 2, 0, 0, 1, 0, 0, 0]).reshape(2, 1, 4, 1, 1))
    torch.testing.assert_close(module.training_step(batch, 0), expected)
    assert module.loss.ignore_label == 2 and module.hparams["partial_labels"]["threshold"] == 0.7
    plain = FlareSegmentationModule(FixedLogits())
    plain.plan = PLAN
    as_complete = plain.training_step(batch, 0)
    torch.testing.assert_close(as_complete, DiceCELoss()(LOGITS, TARGET))
    assert plain.loss.ignore_label is None and not math.isclose(as_complete.item(), expected.item(), rel_tol=1e-3)
    # before the warm-up ends the labels are used as they are
    warm = FlareSegmentationModule(FixedLogits(), partial_labels={"mode": "ignore_confident", "warmup_epochs": 1})
    warm.plan = PLAN
    torch.testing.assert_close(warm.training_step(batch, 0), DiceCELoss(ignore_label=2)(LOGITS, TARGET))


def test_pseudo_dice_and_test_scores_leave_a_declared_ignore_region_out():
    """FixedLogits predicts tumour at voxels 0, 1, 3; the label has tumour at 1 and the ignore value 2 at 0: the
    ignore voxel counts as neither (without the ignore label it would be a true positive)."""
    declared = Plan((1, 1, 1), (4, 1, 1), PLAN.intensity, ignore_label=2)
    label = torch.tensor([2, 1, 0, 0], dtype=torch.uint8).reshape(4, 1, 1)
    module = FlareSegmentationModule(FixedLogits(), inference={"autocast": False}, pseudo_val_patches=2)
    module.plan = declared
    module._pseudo_dice_update(VolumeItem(0, "a", image=torch.zeros(1, 4, 1, 1), label=label, spacing=(1, 1, 1)))
    assert module._pseudo_counts.tolist() == [2, 2, 0]  # TP, FP, FN of two windows: voxel 1; voxel 3; none
    module.predict_original_grid = lambda item, decision=None: np.array([1, 1, 0, 1], np.uint8).reshape(4, 1, 1)
    module.test_step(VolumeItem(0, "a", label=label, geometry=Geometry((4, 1, 1), (10.0, 10, 10), (0, 0, 0),
                                                                       (1, 0, 0, 0, 1, 0, 0, 0, 1))), 0)
    indices, dsc, _ = module.test_metrics.per_case()
    assert float(dsc[0]) == pytest.approx(2 / 3)  # 2 * 1 / (2 + 1); with the ignore voxel as tumour 0.8
    assert (module.test_rows[0]["reference_ml"], module.test_rows[0]["predicted_ml"]) == (1.0, 2.0)


def test_fit_with_partial_labels_from_the_yaml_keys(tmp_path):
    """A seconds-long fit on a synthetic dataset with partially labelled cases: the option parses from the command
    line, reaches the loss and is kept in the checkpoint."""
    import cli
    from lightning_flare.synthetic import write_dataset

    data = write_dataset(tmp_path / "Dataset902_Partial", num_train=5, num_test=0, seed=3, in_plane_size=64,
                         partial_fraction=1.0, lesions_per_case=(2, 3))
    assert len(json.loads((data / "dataset.json").read_text())["partially_labelled"]) >= 3
    args = tiny_cli_args(data, tmp_path / "cache", tmp_path / "out")
    result = cli.main(["fit", *args, "--trainer.max_epochs", "1", "--trainer.num_sanity_val_steps", "0",
                       "--trainer.limit_val_batches", "0", "--model.partial_labels.mode", "ignore_confident",
                       "--model.partial_labels.threshold", "0.6", "--data.fold", "all"])
    assert result.model.partial_labels == PartialLabelSettings(mode="ignore_confident", threshold=0.6)
    assert result.model.loss.ignore_label == 2  # num_classes: the dataset declares no ignore label
    assert 0 <= float(result.trainer.callback_metrics["train/ignored_fraction"]) <= 1
    checkpoint = torch.load(tmp_path / "out" / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["hyper_parameters"]["partial_labels"]["mode"] == "ignore_confident"


def _line_logits(probability):
    """(2, n, 1, 1) logits whose tumour probability along x is ``probability`` (background logit 0)."""
    p = torch.tensor(probability, dtype=torch.float32).clamp(1e-6, 1 - 1e-6)
    return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))]).reshape(2, len(probability), 1, 1)


def test_validation_postprocesses_the_whole_prediction_then_leaves_the_ignore_region_out(monkeypatch):
    """As test / predict do (Predictor.mask knows no ignore region): the largest component lies in the ignore region
    (voxels 0-2), a 1-ml one on the labelled lesion (voxel 5). Keeping the largest component of the whole mask
    leaves nothing outside the region: DSC 0, as test scores it (masked first, validation scored 1). The healthy
    decision's mass is that of the whole prediction (2.7 ml, what ``decide`` sees at predict time), not 0.8."""
    import lightning_flare.predictor as predictor_file

    logits = _line_logits([0.9, 0.9, 0.9, 0.1, 0.1, 0.8, 0.1, 0.1])
    monkeypatch.setattr(predictor_file, "sliding_window_logits", lambda net, image, *a, **k: logits.clone())
    label = torch.tensor([2, 2, 2, 0, 0, 1, 0, 0], dtype=torch.uint8).reshape(8, 1, 1)
    module = FlareSegmentationModule(FixedLogits(), inference={"autocast": False, "largest_component": True})
    module.plan = Plan((10, 10, 10), (8, 1, 1), PLAN.intensity, ignore_label=2)
    out = module.validation_step(VolumeItem(0, "a", image=torch.zeros(1, 8, 1, 1), label=label,
                                            spacing=(10.0, 10.0, 10.0)), 0)
    assert out["prediction"].flatten().tolist() == [0] * 8  # as predicted and kept, the ignore region left out
    _, dsc, _ = module.val_metrics.per_case()
    assert float(dsc[0]) == 0.0
    # the same case through the test order (postprocess, then leave the region out)
    from lightning_flare.postprocessing import flare_dsc, keep_largest_component

    kept = keep_largest_component((logits.argmax(0)).numpy().astype(np.uint8))
    assert flare_dsc(*without_ignored(kept, label.numpy(), 2)) == 0.0
    assert module.largest_component_scores.compute()[0.0] == 0.0
    assert module.postprocessing_scores.compute()[0.0] == 1.0  # all components kept: voxel 5 matches
    row = module.healthy_scores.compute()[0].numpy()
    assert row[0] == 0.0 and row[1] == pytest.approx(2.7, rel=1e-5)  # a lesion case; mass after 0 ml: 3 x 0.9


def test_test_rows_leave_the_ignore_region_out_of_the_mask_before_the_decision():
    """``predicted_ml_components_only`` / ``dsc_components_only`` are scored like ``predicted_ml`` / ``dsc``."""
    declared = Plan((1, 1, 1), (4, 1, 1), PLAN.intensity, ignore_label=2)
    label = torch.tensor([2, 1, 0, 0], dtype=torch.uint8).reshape(4, 1, 1)
    module = FlareSegmentationModule(FixedLogits(), inference={"autocast": False})
    module.plan = declared

    def emptied(item, decision=None):  # the healthy decision emptied a mask of voxels 0 (ignored) and 1
        decision.update(healthy=True, mass_ml=0.5, components_only_mask=np.array([1, 1, 0, 0], np.uint8).reshape(4, 1, 1))
        return np.zeros((4, 1, 1), np.uint8)

    module.predict_original_grid = emptied
    module.test_step(VolumeItem(0, "a", label=label, geometry=Geometry((4, 1, 1), (10.0, 10, 10), (0, 0, 0),
                                                                       (1, 0, 0, 0, 1, 0, 0, 0, 1))), 0)
    row = module.test_rows[0]
    assert row["predicted_ml_components_only"] == 1.0  # voxel 1 only (2.0 with the ignored voxel)
    assert row["dsc_components_only"] == 1.0  # voxel 1 against the lesion at voxel 1 (0.667 with voxel 0)


def test_unmarked_components_are_those_touching_no_marked_voxel():
    prediction = np.array([1, 1, 0, 1, 0, 1, 1, 0], np.uint8).reshape(8, 1, 1)
    label = np.array([0, 1, 0, 0, 0, 0, 0, 1], np.uint8).reshape(8, 1, 1)  # marked at 1 and 7 (7 missed)
    got = unmarked_components(prediction, label)
    assert got.ravel().tolist() == [False, False, False, True, False, True, True, False]
    assert not unmarked_components(np.zeros((3, 3, 3), np.uint8), np.ones((3, 3, 3), np.uint8)).any()


@pytest.mark.parametrize("partial", [False, True])
def test_partial_validation_cases_leave_unmarked_components_out_of_the_scores(monkeypatch, partial):
    """A partially labelled validation case: the marked lesion (voxels 0-1) found, and a 1-voxel component at voxel 5
    (an unmarked lesion or a false positive: the label cannot say). Scored as complete, removing it (min_component_ml
    above 1 ml) looks like a gain (DSC 0.8 -> 1.0), which is what chose 4 ml in the partial-label demonstration and
    removed true small lesions at test. Left out (partial), it changes no score; the healthy decision's mass is still
    that of the whole prediction."""
    import lightning_flare.predictor as predictor_file

    logits = _line_logits([0.9, 0.9, 0.1, 0.1, 0.1, 0.8, 0.1, 0.1])
    monkeypatch.setattr(predictor_file, "sliding_window_logits", lambda net, image, *a, **k: logits.clone())
    label = torch.tensor([1, 1, 0, 0, 0, 0, 0, 0], dtype=torch.uint8).reshape(8, 1, 1)
    module = FlareSegmentationModule(FixedLogits(), inference={"autocast": False})
    module.plan = Plan((10, 10, 10), (8, 1, 1), PLAN.intensity)
    out = module.validation_step(VolumeItem(0, "a", image=torch.zeros(1, 8, 1, 1), label=label,
                                            spacing=(10.0, 10.0, 10.0), partial=partial), 0)
    scores = module.postprocessing_scores.compute()
    _, dsc, _ = module.val_metrics.per_case()
    if partial:
        assert scores[0.0] == pytest.approx(1.0) and scores[2.0] == pytest.approx(1.0)
        assert float(dsc[0]) == pytest.approx(1.0) and out["prediction"].flatten().tolist() == [1, 1] + [0] * 6
    else:
        assert scores[0.0] == pytest.approx(0.8) and scores[2.0] == pytest.approx(1.0)
        assert float(dsc[0]) == pytest.approx(0.8)
    row = module.healthy_scores.compute()[0].numpy()
    assert row[0] == 0.0 and row[1] == pytest.approx(1.8, rel=1e-5)  # the marked lesion's mass, 2 x 0.9 ml
