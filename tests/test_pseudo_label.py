"""Pseudo-labelling rounds: the component filter and the merge on hand-made arrays, the teacher's passes against the
predictor's masks, and whole rounds (a random-weight checkpoint, or a stand-in teacher with hand-made outputs) on a
tiny synthetic dataset with unlabelled and partially labelled scans; a student's seconds-long fit on a round's output."""
import csv
import dataclasses
import json
import math
import shutil
import types

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from scipy import ndimage

from conftest import ROOT, tiny_cli_args
from lightning_flare import pseudo_label, pseudo_validation
from lightning_flare.network import PlainConvUNet
from lightning_flare.plan import IntensityStats, Plan
from lightning_flare.predict import load_predictor
from lightning_flare.predictor import InferenceSettings, Predictor
from lightning_flare.preprocessing import PreprocessedCache, preprocess_image
from lightning_flare.pseudo_filter import (ComponentScore, Thresholds, choose_min_mean_prob, label_components, merge_labels,
                                          score_components)
from lightning_flare.pseudo_label import PseudoLabelError, main, read_config, run_round
from lightning_flare.pseudo_source import read_source
from lightning_flare.pseudo_teacher import TeacherOutput, file_sha256, resample_difference, teacher_passes
from lightning_flare.raw_dataset import DatasetError, kfold_splits, load_raw_dataset
from lightning_flare.resample import resample_to_mask

NET = {"in_channels": 1, "num_classes": 2, "features_per_stage": [4, 8, 16], "strides": [1, 2, 2],
       "deep_supervision": True}
PLAN = Plan((4.0, 4.0, 5.0), (16, 16, 16), IntensityStats(-1000.0, 300.0, 0.0, 200.0))
LABELLED = [f"SYN_{k:03d}" for k in range(6)]
NO_AUTOCAST = ["--set", "inference.autocast=false"]  # fp32 everywhere: no CPU precision probe in the tests


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


def _component(mean_prob, agreement=0.9, volume_ml=1.0):
    return ComponentScore(1, 10, volume_ml, mean_prob, mirror_agreement=agreement)


def test_min_mean_prob_is_the_loosest_with_the_target_precision_on_validation():
    """Hand-made validation components (score, overlaps a reference lesion): false positives at 0.6 and 0.8; the
    loosest threshold keeping precision >= 0.8 keeps 0.7 and up (4 true of 5), the midpoint 0.65 below 0.7;
    >= 0.95 keeps 0.85 and up (all 3 true): 0.825."""
    found = [(_component(0.6), False), (_component(0.7), True), (_component(0.8), False), (_component(0.85), True),
             (_component(0.9), True), (_component(0.95), True),
             (_component(0.55, agreement=0.1), True), (_component(0.65, volume_ml=0.01), False)]  # fail other thresholds
    base = Thresholds(0.75, 0.5, 0.1)
    chosen = choose_min_mean_prob(found, base, precision_target=0.8)
    assert chosen["min_mean_prob"] == pytest.approx(0.65) and (chosen["reason"], chosen["kept"], chosen["precision"]) == \
        ("chosen", 5, 0.8)
    assert chosen["eligible_components"] == 6 and chosen["false_positives"] == 2
    assert np.allclose(chosen["table"][:2], [[0.55, 6, 4], [0.65, 5, 4]])
    strict = choose_min_mean_prob(found, base, precision_target=0.95)
    assert strict["min_mean_prob"] == pytest.approx(0.825) and (strict["kept"], strict["precision"]) == (3, 1.0)
    # at least 4 kept components: 0.85 keeps 3, so no threshold qualifies: the config's 0.75 stays (4 kept, 3 true)
    kept = choose_min_mean_prob(found, base, precision_target=0.95, min_components=4)
    assert (kept["min_mean_prob"], kept["reason"], kept["kept"], kept["precision"]) == (0.75, "target_not_reached", 4, 0.75)
    assert choose_min_mean_prob(found, base, 0.95, min_components=7)["reason"] == "too_few_components"
    none = choose_min_mean_prob([], base, 0.9)
    assert (none["min_mean_prob"], none["reason"], none["kept"], none["precision"]) == (0.75, "no_components", 0, None)
    with pytest.raises(ValueError, match="precision_target"):
        choose_min_mean_prob(found, base, 0.0)


def test_choose_on_settings_are_checked():
    paths = {"teacher": "t.ckpt", "source": "s", "output": "o"}
    config = pseudo_label.RoundConfig.from_dict({**paths, "choose_on": "validation", "precision_target": 0.9})
    assert (config.choose_on, config.precision_target, config.min_validation_components, config.validation_fold) == \
        ("validation", 0.9, 5, 0)
    for bad, words in (({"choose_on": "test"}, "choose_on must be one of ['none', 'validation']"),
                       ({"precision_target": 0}, "precision_target must be a number in (0, 1]"),
                       ({"min_validation_components": -1}, "min_validation_components must be an integer >= 0")):
        with pytest.raises(PseudoLabelError) as info:
            pseudo_label.RoundConfig.from_dict({**paths, **bad})
        assert words in str(info.value)


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


# ---------------------------------------------------------------- whole rounds


def make_source(root, tiny_dataset, declare_ignore=False, broken=False):
    """The tiny dataset's cases, SYN_001 partially labelled, its two test images also as unlabelled scans."""
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        shutil.copytree(tiny_dataset / sub, root / sub)
    (root / "imagesUnlabelled").mkdir()
    for k, image in enumerate(sorted((tiny_dataset / "imagesTs").glob("*_0000.nii.gz"))):
        shutil.copy(image, root / "imagesUnlabelled" / f"UNL_{k:03d}_0000.nii.gz")
    if broken:
        (root / "imagesUnlabelled" / "UNL_000_0000.nii.gz").write_bytes(b"not a NIfTI file")
    meta = json.loads((tiny_dataset / "dataset.json").read_text())
    meta["partially_labelled"] = ["SYN_001"]
    if declare_ignore:
        meta["labels"]["ignore"] = 2
        label = sitk.ReadImage(str(root / "labelsTr" / "SYN_001.nii.gz"))
        array = sitk.GetArrayFromImage(label)  # (z, y, x)
        array[0:2, 60:64, 60:64] = 2  # a given ignore region in a corner (air)
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(label)
        sitk.WriteImage(out, str(root / "labelsTr" / "SYN_001.nii.gz"))
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_the_source_is_read_by_raw_dataset(tiny_dataset, tmp_path):
    """Unlabelled scans, partially labelled cases and the ignore label are RawDataset's; its errors name dataset.json."""
    root = make_source(tmp_path / "source", tiny_dataset, declare_ignore=True)
    source = read_source(root)
    assert [c.case_id for c in source.unlabelled] == ["UNL_000", "UNL_001"] and source.partially_labelled == {"SYN_001"}
    assert (source.ignore_label, source.num_classes, source.tumour) == (2, 2, 1)  # ignore K = number of classes
    assert [c.case_id for c in source.labelled] == LABELLED and all(c.label is None for c in source.unlabelled)
    meta = json.loads((root / "dataset.json").read_text())
    for change, words in (({"labels": {**meta["labels"], "ignore": 3}}, "label 'ignore' is 3"),
                          ({"partially_labelled": ["UNL_000"]}, "'partially_labelled' lists 'UNL_000'"),
                          ({"labels": {"background": 0, "liver": 1, "tumor": 2}}, "exactly one tumour class")):
        (root / "dataset.json").write_text(json.dumps({**meta, **change}))
        with pytest.raises(DatasetError, match=f"dataset.json: .*{words}"):
            read_source(root)
    (root / "dataset.json").write_text(json.dumps(meta))
    shutil.copy(root / "imagesTr" / "SYN_000_0000.nii.gz", root / "imagesUnlabelled")
    with pytest.raises(DatasetError, match=r"imagesUnlabelled: case ids also in imagesTr: \['SYN_000'\]"):
        read_source(root)


def read(path) -> np.ndarray:
    return np.transpose(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), (2, 1, 0))  # (x, y, z)


def box(shape, *slices):
    out = np.zeros(shape, bool)
    out[slices] = True
    return out


@pytest.mark.parametrize("declare_ignore", [False, True])
def test_round_folder_with_hand_made_teacher_outputs(teachers, tiny_dataset, tmp_path, monkeypatch, declare_ignore):
    source = make_source(tmp_path / "source", tiny_dataset, declare_ignore)
    given = read(source / "labelsTr" / "SYN_001.nii.gz")
    shape_p, shape_u = given.shape, read(source / "imagesUnlabelled" / "UNL_000_0000.nii.gz").shape
    lesion = ndimage.binary_dilation(given == 1, np.ones((3, 3, 3), bool))  # over the given lesion
    new = box(shape_p, slice(0, 3), slice(0, 3), slice(0, 2))  # a lesion the annotator did not mark
    corner = box(shape_p, slice(58, 62), slice(60, 64), slice(0, 2))  # partly over the given ignore region
    assert not (given[new | corner] == 1).any() and not (lesion & (new | corner)).any()
    lesions = label_components(lesion)[1]  # components over given lesions
    assert lesions >= 1
    a = box(shape_u, slice(5, 9), slice(5, 9), slice(2, 4))  # confident, both passes: kept
    c = box(shape_u, slice(20, 24), slice(40, 44), slice(5, 7))  # only in the mirrored pass: dropped
    b = box(shape_u, slice(40, 44), slice(40, 44), slice(2, 4))  # low probability: dropped

    def output(mask, plain, prob):
        return lambda size: TeacherOutput(probability=prob.astype(np.float32), mask=mask, plain_mask=plain)

    outputs = iter([  # called in this order: partial cases, then unlabelled scans, each sorted
        output(lesion | new | corner, lesion | new | corner, np.where(lesion | new | corner, 0.9, 0.1)),
        output(a | b | c, a | b, np.where(a | c, 0.95, np.where(b, 0.55, 0.05))),
        lambda size: TeacherOutput(probability=np.full(size, 0.2, np.float32), mask=np.zeros(size, bool),
                                   plain_mask=np.zeros(size, bool)),  # UNL_001: nothing found, a healthy scan
    ])
    monkeypatch.setattr(pseudo_label, "teacher_passes", lambda predictor, image, spacing, size, tta: next(outputs)(size))
    out = tmp_path / "round1"
    assert main(["--teacher", str(teachers[0]), "--source", str(source), "--output", str(out), *NO_AUTOCAST,
                 "--set", "min_volume_ml=0.01"]) == 0

    expected = given.copy()
    expected[(new | corner) & (given == 0)] = 1  # given labels win (the given ignore voxels stay 2)
    np.testing.assert_array_equal(read(out / "labelsTr" / "SYN_001.nii.gz"), expected)
    np.testing.assert_array_equal(read(out / "labelsTr" / "UNL_000.nii.gz"), a * 1 + (b | c) * 2)
    assert not read(out / "labelsTr" / "UNL_001.nii.gz").any()
    np.testing.assert_array_equal(read(out / "teacher_masks" / "UNL_000.nii.gz"), a | b | c)

    for case in LABELLED:  # links to the originals, absolute; given labels linked for fully labelled cases
        link = out / "imagesTr" / f"{case}_0000.nii.gz"
        assert link.is_symlink() and link.readlink() == (source / "imagesTr" / link.name).resolve()
        label = out / "labelsTr" / f"{case}.nii.gz"
        assert label.is_symlink() == (case != "SYN_001")
    assert (out / "imagesTr" / "UNL_000_0000.nii.gz").readlink() == (source / "imagesUnlabelled" / "UNL_000_0000.nii.gz").resolve()
    assert (out / "imagesTs").readlink() == (source / "imagesTs").resolve() and (out / "labelsTs").is_symlink()

    meta = json.loads((out / "dataset.json").read_text())
    assert meta["numTraining"] == 8 and meta["labels"] == {"background": 0, "tumor": 1, "ignore": 2}
    assert meta["partially_labelled"] == [] and meta["pseudo_labelled"] == ["SYN_001", "UNL_000", "UNL_001"]
    splits = json.loads((out / "splits_final.json").read_text())
    assert splits == [{"train": s["train"] + ["UNL_000", "UNL_001"], "val": s["val"]} for s in kfold_splits(LABELLED)]

    report = json.loads((out / "pseudo_label_report.json").read_text())
    assert report["round"]["teacher_sha256"] == file_sha256(teachers[0])
    rows = {r["case"]: r for r in csv.DictReader(open(out / "pseudo_label_report.csv"))}
    assert {k: rows["SYN_001"][k] for k in ("kind", "components_found", "kept", "dropped", "given", "voxels_added")} == \
        {"kind": "partial", "components_found": str(lesions + 2), "kept": "2", "dropped": "0", "given": str(lesions),
         "voxels_added": str(int(((new | corner) & (given == 0)).sum()))}
    unl = rows["UNL_000"]
    assert (unl["kind"], unl["kept"], unl["dropped"], unl["voxels_added"], unl["voxels_ignored"], unl["healthy"]) == \
        ("unlabelled", "1", "2", str(a.sum()), str((b | c).sum()), "False")
    assert unl["dropped_reasons"] == ("component 2: mirror_agreement 0 < min_agreement 0.5; "
                                      "component 3: mean_prob 0.55 < min_mean_prob 0.75")
    assert rows["UNL_001"]["components_found"] == "0" and rows["UNL_001"]["healthy"] == "True"


def test_a_student_fits_on_a_round_s_output(teachers, tiny_dataset, tmp_path, monkeypatch):
    """A seconds-long fit on a round's output folder: the ignore label the round added reaches the plan, the loss
    and the checkpoint; the linked images go through verify and the cache (entries reused, made from the sources)."""
    import cli

    source = make_source(tmp_path / "source", tiny_dataset)  # declares no ignore label: the round adds one

    def passes(predictor, image, spacing, size, tta):  # one component, probability too low: dropped -> ignore
        mask = box(size, slice(5, 9), slice(5, 9), slice(2, 4))
        return TeacherOutput(probability=np.where(mask, 0.55, 0.05).astype(np.float32), mask=mask, plain_mask=mask)

    monkeypatch.setattr(pseudo_label, "teacher_passes", passes)
    out = tmp_path / "Dataset903_Round1"
    assert main(["--teacher", str(teachers[0]), "--source", str(source), "--output", str(out), *NO_AUTOCAST]) == 0
    assert load_raw_dataset(out).ignore_label == 2 and (read(out / "labelsTr" / "UNL_000.nii.gz") == 2).any()
    result = cli.main(["fit", *tiny_cli_args(out, tmp_path / "cache", tmp_path / "student"), "--trainer.max_epochs", "1",
                       "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "0",
                       "--data.intensity_stats", json.dumps(dataclasses.asdict(PLAN.intensity))])  # no fingerprint
    plan = result.model.plan
    assert plan.ignore_label == 2 and result.model.loss.ignore_label == 2
    assert math.isfinite(float(result.trainer.callback_metrics["train/loss"]))
    checkpoint = torch.load(tmp_path / "student" / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["plan"]["ignore_label"] == 2
    cache = PreprocessedCache(tmp_path / "cache", plan, out.name)
    cases = {c.case_id: c for c in load_raw_dataset(out).cases("Tr")}
    assert cases["UNL_000"].image.is_symlink() and cache.is_complete("UNL_000", cases["UNL_000"])  # reused as is
    entry = cache.entry("UNL_000")
    assert set(np.unique(np.load(entry.label)).tolist()) == {0, 2} and entry.load_meta()["num_foreground"] == 0
    original = sitk.ReadImage(str(source / "imagesUnlabelled" / "UNL_000_0000.nii.gz"))
    np.testing.assert_array_equal(np.load(entry.image), preprocess_image(original, plan))


def test_round_is_reproducible_from_its_round_yaml(teachers, tiny_dataset, tmp_path):
    source = make_source(tmp_path / "source", tiny_dataset)
    first, second = tmp_path / "round1", tmp_path / "again"
    args = ["--set", "tta=false", "--set", "min_mean_prob=0.5", "--set", "min_volume_ml=0.05"]  # tta: 9x the time
    assert main(["--teacher", str(teachers[0]), "--source", str(source), "--output", str(first), *NO_AUTOCAST, *args]) == 0
    recorded = yaml.safe_load((first / "round.yaml").read_text())
    assert recorded["teacher_sha256"] == file_sha256(teachers[0]) and recorded["source"] == str(source.resolve())
    assert (recorded["min_mean_prob"], recorded["tta"], recorded["inference"]["autocast"]) == (0.5, False, False)
    assert main(["--config", str(first / "round.yaml"), "--output", str(second)]) == 0
    reports = [json.loads((f / "pseudo_label_report.json").read_text())["cases"] for f in (first, second)]
    for report in reports:
        for case in report:
            case.pop("seconds")
    assert reports[0] == reports[1]
    decisions = {c["decision"] for case in reports[0] for c in case["components"]}
    assert decisions >= {"kept", "dropped"}  # the random teacher gives both: the comparison covers both
    for case in ("SYN_001", "UNL_000", "UNL_001"):
        for sub in ("labelsTr", "teacher_masks"):
            np.testing.assert_array_equal(read(first / sub / f"{case}.nii.gz"), read(second / sub / f"{case}.nii.gz"))


def test_agreement_between_rounds(teachers, tiny_dataset, tmp_path):
    source = make_source(tmp_path / "source", tiny_dataset)
    first = tmp_path / "round1"
    base = ["--teacher", str(teachers[0]), "--source", str(source), *NO_AUTOCAST, "--set", "tta=false"]
    assert main([*base, "--output", str(first)]) == 0
    with pytest.raises(PseudoLabelError, match="same teacher"):
        run_round(read_config(None, {"teacher": str(teachers[0]), "source": str(source), "output": str(tmp_path / "x"),
                                     "previous": str(first)}))
    # the same teacher's masks as the previous round (its record edited): every component agrees exactly, except
    # in a case whose previous mask is emptied
    previous = tmp_path / "edited"
    shutil.copytree(first, previous, symlinks=True)
    record = yaml.safe_load((previous / "round.yaml").read_text())
    (previous / "round.yaml").write_text(yaml.safe_dump({**record, "teacher_sha256": "0" * 64}))
    empty = sitk.ReadImage(str(previous / "teacher_masks" / "UNL_001.nii.gz")) * 0
    sitk.WriteImage(empty, str(previous / "teacher_masks" / "UNL_001.nii.gz"))
    second = tmp_path / "round2"
    assert main([*base, "--output", str(second), "--previous", str(previous), "--set", "min_agreement=0.5"]) == 0
    cases = {c["case"]: c for c in json.loads((second / "pseudo_label_report.json").read_text())["cases"]}
    same = [c for case in ("SYN_001", "UNL_000") for c in cases[case]["components"]]
    assert same and all(c["round_agreement"] == 1.0 and c["mirror_agreement"] is None for c in same)
    emptied = cases["UNL_001"]["components"]
    assert emptied and all(c["round_agreement"] == 0.0 and c["decision"] == "dropped" for c in emptied)
    assert all("round_agreement 0 < min_agreement 0.5" in c["reasons"] for c in emptied)
    assert yaml.safe_load((second / "round.yaml").read_text())["previous"] == str(previous.resolve())


def test_a_broken_unlabelled_scan_leaves_no_output_folder(teachers, tiny_dataset, tmp_path, capsys):
    source = make_source(tmp_path / "source", tiny_dataset, broken=True)
    out = tmp_path / "rounds" / "round1"
    assert main(["--teacher", str(teachers[0]), "--source", str(source), "--output", str(out), *NO_AUTOCAST,
                 "--set", "tta=false"]) == 1
    err = capsys.readouterr().err
    assert "UNL_000_0000.nii.gz" in err and "no output folder written" in err
    assert not out.exists() and list(out.parent.iterdir()) == []  # nor its temporary folder


def test_an_existing_output_needs_overwrite(teachers, tiny_dataset, tmp_path, capsys):
    source = make_source(tmp_path / "source", tiny_dataset)
    out = tmp_path / "round1"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["--teacher", str(teachers[0]), "--source", str(source), "--output", str(out)]) == 1
    assert "output folder exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("existing", [True, False])
def test_a_failed_move_into_place_keeps_the_old_output(tmp_path, monkeypatch, existing):
    """--overwrite: old -> .old-*, new -> final; when the second rename fails the old folder is put back and the
    new one removed (without an old folder: the new one removed), and the error comes through."""
    import os

    from lightning_flare.pseudo_output import StagedFolder

    out = tmp_path / "round1"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    real_rename = os.rename

    def rename(src, dst):
        if ".partial-" in str(src):
            raise OSError("disk says no")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="disk says no"):
        with StagedFolder(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["round1"] if existing else [])
    if existing:
        assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    monkeypatch.setattr(os, "rename", real_rename)
    with StagedFolder(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round1"] and [p.name for p in out.iterdir()] == ["new.txt"]


def test_config_errors_name_the_problem(teachers, tmp_path):
    config = tmp_path / "round.yaml"
    config.write_text(yaml.safe_dump({"teacher": str(teachers[0]), "source": "s", "output": "o", "min_prob": 0.9}))
    with pytest.raises(PseudoLabelError, match=r"round.yaml: unknown keys \['min_prob'\]"):
        read_config(str(config))
    with pytest.raises(PseudoLabelError, match="inference.tta is the round's to decide"):
        read_config(None, {"teacher": "t", "source": "s", "output": "o"}, ["inference.tta=true"])
    for key in ("largest_component=true", "healthy_decision=auto"):  # the teacher would not apply them
        with pytest.raises(PseudoLabelError, match=f"inference.{key.split('=')[0]} is the round's to decide"):
            read_config(None, {"teacher": "t", "source": "s", "output": "o"}, [f"inference.{key}"])
    with pytest.raises(PseudoLabelError, match="output required"):
        read_config(None, {"teacher": "t", "source": "s"})
    with pytest.raises(PseudoLabelError, match="min_agreement must be a number"):
        read_config(None, {"teacher": "t", "source": "s", "output": "o"}, ["min_agreement=2"])
    config.write_text("teacher: t\nsource: s\noutput: o\ntta: maybe\n")
    with pytest.raises(PseudoLabelError, match=r"round.yaml: tta must be true or false, got 'maybe'"):
        read_config(str(config))
    shipped = read_config(str(ROOT / "configs" / "pseudo_round.yaml"), {"teacher": "t", "source": "s", "output": "o"})
    assert (shipped.thresholds, shipped.tta, shipped.ignore_dropped) == (Thresholds(0.75, 0.5, 0.1), True, True)
    assert shipped.settings.autocast == "auto" and shipped.settings.sw_overlap == 0.5


def test_a_changed_teacher_or_a_round_as_source_is_refused(teachers, tiny_dataset, tmp_path):
    source = make_source(tmp_path / "source", tiny_dataset)
    paths = {"teacher": str(teachers[0]), "source": str(source), "output": str(tmp_path / "round1")}
    with pytest.raises(PseudoLabelError, match="teacher0.ckpt: sha256 .* differs from the config's teacher_sha256"):
        run_round(read_config(None, {**paths, "teacher_sha256": "0" * 64}))
    meta = json.loads((source / "dataset.json").read_text())
    (source / "dataset.json").write_text(json.dumps({**meta, "pseudo_labelled": ["UNL_000"]}))
    with pytest.raises(PseudoLabelError, match="dataset.json: a round's output; a round's source is the original"):
        run_round(read_config(None, paths))
    assert not (tmp_path / "round1").exists()


def test_choose_on_validation_applies_and_reports_the_chosen_threshold(teachers, tiny_dataset, tmp_path, monkeypatch):
    """The round labels with the threshold chosen on validation (0.625 here, below the 0.65 component: a 0.7
    component is kept that the config's 0.75 would drop); the report holds the choice, round.yaml the config."""
    source = make_source(tmp_path / "source", tiny_dataset)
    found = [(_component(p), p >= 0.65) for p in (0.6, 0.65, 0.8, 0.9, 0.95)]
    seen = {}

    def validation(predictor, config, source, log):
        seen["fold"] = config.validation_fold
        return found

    def passes(predictor, image, spacing, size, tta):
        mask = box(size, slice(5, 9), slice(5, 9), slice(2, 4))
        return TeacherOutput(probability=np.where(mask, 0.7, 0.05).astype(np.float32), mask=mask, plain_mask=mask)

    monkeypatch.setattr(pseudo_label, "validation_components", validation)
    monkeypatch.setattr(pseudo_label, "teacher_passes", passes)
    out = tmp_path / "round1"
    assert main(["--teacher", str(teachers[0]), "--source", str(source), "--output", str(out), *NO_AUTOCAST,
                 "--set", "choose_on=validation", "--set", "precision_target=0.95", "--set", "min_volume_ml=0.01",
                 "--set", "min_validation_components=4"]) == 0
    report = json.loads((out / "pseudo_label_report.json").read_text())
    choice = report["threshold_choice"]
    assert choice["min_mean_prob"] == pytest.approx(0.625) and (choice["reason"], choice["kept"]) == ("chosen", 4)
    assert seen["fold"] == 0
    assert report["totals"]["kept"] == 3 and report["totals"]["dropped"] == 0  # the 0.7 components kept everywhere
    assert yaml.safe_load((out / "round.yaml").read_text())["min_mean_prob"] == 0.75


def test_validation_components_are_the_fully_labelled_fold_cases_with_their_truth(teachers, tiny_dataset, tmp_path,
                                                                                   monkeypatch):
    """The fold's validation cases without the partially labelled ones, each component true when it overlaps the
    reference label: the teacher's mask is a box over each case's lesion plus one box in a corner (air)."""
    source_root = make_source(tmp_path / "source", tiny_dataset)
    source = read_source(source_root)
    val = [c for c in kfold_splits(LABELLED)[1]["val"] if c != "SYN_001"]  # SYN_001: partially labelled
    sizes = []

    def passes(predictor, image, spacing, size, tta):
        sizes.append(tuple(size))
        reference = read(source_root / "labelsTr" / f"{val[len(sizes) - 1]}.nii.gz") > 0
        mask = ndimage.binary_dilation(reference) | box(size, slice(0, 2), slice(0, 2), slice(0, 2))
        return TeacherOutput(probability=mask.astype(np.float32) * 0.9, mask=mask, plain_mask=mask)

    monkeypatch.setattr(pseudo_validation, "teacher_passes", passes)
    config = pseudo_label.RoundConfig(teacher="t", source=str(source_root), output="o", validation_fold=1)
    found = pseudo_validation.validation_components(types.SimpleNamespace(plan=PLAN), config, source, log=lambda line: None)
    assert len(sizes) == len(val)
    truths = [t for _, t in found]
    lesions = sum(label_components(read(source_root / "labelsTr" / f"{c}.nii.gz") > 0)[1] for c in val)
    assert lesions > 0 and truths.count(False) == len(val) and truths.count(True) == lesions


def test_a_failing_validation_case_is_named(tiny_dataset, tmp_path, monkeypatch):
    """choose_on validation: an error on one validation case says which case and file (as a labelled case's does)."""
    source_root = make_source(tmp_path / "source", tiny_dataset)
    source = read_source(source_root)
    first = [c for c in kfold_splits(LABELLED)[1]["val"] if c != "SYN_001"][0]

    def passes(predictor, image, spacing, size, tta):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(pseudo_validation, "teacher_passes", passes)
    config = pseudo_label.RoundConfig(teacher="t", source=str(source_root), output="o", validation_fold=1)
    with pytest.raises(PseudoLabelError, match=rf"validation case {first} \(.*{first}_0000.nii.gz\): out of memory"):
        pseudo_validation.validation_components(types.SimpleNamespace(plan=PLAN), config, source, log=lambda line: None)

def test_an_old_output_left_aside_by_a_killed_run_is_put_back(tmp_path):
    """A run killed between its two renames leaves the only copy of the old output as .old-HOST-PID: the next
    run restores it (then refuses to replace it without overwrite) instead of deleting it as a stale temporary."""
    from lightning_flare.io import HOST
    from lightning_flare.pseudo_output import StagedFolder

    dead = 2 ** 22 + 12345  # above the kernel's pid_max default: no live process has it
    aside = tmp_path / f".round1.old-{HOST}-{dead}"
    aside.mkdir()
    (aside / "keep.txt").write_text("mine")
    (tmp_path / f".round1.partial-{HOST}-{dead}").mkdir()  # its half-built new output: removed
    out = tmp_path / "round1"
    with pytest.warns(UserWarning, match="restored from"), pytest.raises(FileExistsError, match="--overwrite"):
        with StagedFolder(out):
            pass
    assert (out / "keep.txt").read_text() == "mine"
    with StagedFolder(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round1"] and [p.name for p in out.iterdir()] == ["new.txt"]
