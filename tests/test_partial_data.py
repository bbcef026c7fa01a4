"""Partially labelled and unlabelled scans in the raw dataset, and nnU-Net's ignore label from dataset.json to the
cache: reading, verification, the plan, preprocessing and the fingerprint."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from test_verify import META, _case, _ct, _seg, _write

from lightning_flare.fingerprint import compute_fingerprint
from lightning_flare.plan import IntensityStats, Plan
from lightning_flare.preprocessing import check_label, foreground_locations, preprocess_label
from lightning_flare.raw_dataset import Case, DatasetError, load_raw_dataset, parse_ignore_label
from lightning_flare.verify import main, verify_dataset

IGNORE_LABELS = {"background": 0, "tumor": 1, "ignore": 2}
STATS = IntensityStats(-100, 200, 50, 30)


def _dataset(root, meta=None, unlabelled=("u1", "u0")):
    """Training cases a (label with the ignore value 2), b, c; unlabelled scans in imagesUnlabelled."""
    _case(root, "a", label=_ignore_seg())
    _case(root, "b")
    _case(root, "c")
    for k, name in enumerate(unlabelled):
        _write(root / "imagesUnlabelled" / f"{name}_0000.nii.gz", _ct(k + 5))
    (root / "dataset.json").write_text(json.dumps({**META, "numTraining": 3, "labels": IGNORE_LABELS,
                                                   "partially_labelled": ["b"], **(meta or {})}))
    return root


def _ignore_seg():
    """(z, y, x) 6 x 8 x 8: tumour 1 in a block, ignore 2 in another."""
    arr = _seg()
    arr[4:6, 5:8, 0:3] = 2
    return arr


# ----------------------------------------------------------------- raw_dataset
def test_ignore_label_partially_labelled_and_unlabelled_are_read(tmp_path):
    ds = load_raw_dataset(_dataset(tmp_path))
    assert ds.labels == {"background": 0, "tumor": 1} and ds.ignore_label == 2  # num_classes stays 2
    assert ds.partially_labelled == frozenset({"b"})
    cases = ds.unlabelled_cases()
    assert [c.case_id for c in cases] == ["u0", "u1"] and all(c.label is None for c in cases)
    assert cases[0].image == tmp_path / "imagesUnlabelled" / "u0_0000.nii.gz"
    assert [c.case_id for c in ds.cases("Tr")] == ["a", "b", "c"]  # unlabelled scans are no training cases


def test_without_the_new_keys_nothing_is_partial_or_unlabelled(tmp_path):
    _case(tmp_path, "a")
    (tmp_path / "dataset.json").write_text(json.dumps(META))
    ds = load_raw_dataset(tmp_path)
    assert ds.ignore_label is None and ds.partially_labelled == frozenset() and ds.unlabelled_cases() == []


@pytest.mark.parametrize("listed, words", [
    (["b", "zz"], ["'zz'", "no training case with a label"]),
    (["u0"], ["'u0'", "no training case"]),  # an unlabelled scan cannot be partially labelled
    ("b", ["must be a list", "'b'"]),
])
def test_bad_partially_labelled_ids_name_dataset_json_and_the_id(tmp_path, listed, words):
    ds = load_raw_dataset(_dataset(tmp_path, {"partially_labelled": listed}))
    with pytest.raises(DatasetError) as info:
        ds.partially_labelled
    assert str(info.value).startswith(f"{tmp_path / 'dataset.json'}: ")
    assert all(w in str(info.value) for w in words), str(info.value)


def test_a_training_image_without_label_cannot_be_partially_labelled(tmp_path):
    _write(tmp_path / "imagesTr" / "a_0000.nii.gz", _ct())  # no labelsTr folder at all
    (tmp_path / "dataset.json").write_text(json.dumps({**META, "partially_labelled": ["a"]}))
    with pytest.raises(DatasetError, match="'a', which is no training case with a label"):
        load_raw_dataset(tmp_path).partially_labelled


def test_parse_ignore_label():
    assert parse_ignore_label({"background": 0, "a": 1, "b": 2, "ignore": 3}, "d.json") == 3
    assert parse_ignore_label({"background": 0, "tumor": 1}, "d.json") is None
    with pytest.raises(DatasetError, match=r"^d\.json: label 'ignore' is 5; .*highest value.*: 2"):
        parse_ignore_label({"background": 0, "tumor": 1, "ignore": 5}, "d.json")


# ----------------------------------------------------------------- verify
def test_verify_accepts_the_ignore_value_counts_and_checks_unlabelled_scans(tmp_path, capsys):
    root = _dataset(tmp_path)
    report = verify_dataset(root)
    assert report.ok, report.errors
    assert report.counts == {"labelled": 2, "partially_labelled": 1, "unlabelled": 2} and report.num_cases == 5
    assert main([str(root)]) == 0
    assert "training scans: 2 labelled, 1 partially labelled, 2 unlabelled" in capsys.readouterr().out
    assert verify_dataset(root, splits=("Tr",)).counts["unlabelled"] == 0  # fit's check reads no unlabelled scan


def test_verify_reports_other_label_values_bad_ids_and_broken_unlabelled_scans(tmp_path):
    root = _dataset(tmp_path, {"partially_labelled": ["b", "zz"]})
    _case(root, "d", label=_seg(value=3))  # 3: neither a class nor the ignore label
    broken = root / "imagesUnlabelled" / "u0_0000.nii.gz"
    broken.write_bytes(broken.read_bytes()[:100])
    thick = _write(root / "imagesUnlabelled" / "u2_0000.nii.gz", _ct(), spacing=(0.8, 0.8, 12.0))
    (root / "dataset.json").write_text(json.dumps({**json.loads((root / "dataset.json").read_text()), "numTraining": 4}))
    report = verify_dataset(root)
    assert report.errors[0] == (f"{root / 'dataset.json'}: 'partially_labelled' lists 'zz', which is no training case "
                                f"with a label in {root / 'imagesTr'} and {root / 'labelsTr'}")
    assert report.errors[1] == f"{root / 'labelsTr' / 'd.nii.gz'}: label values [3] not in dataset.json labels [0, 1, 2]"
    assert len(report.errors) == 3 and report.errors[2].startswith(f"{broken}: ")
    assert report.warnings == [f"{thick}: spacing (0.8, 0.8, 12) mm exceeds 10 mm"]
    assert report.counts == {"labelled": 3, "partially_labelled": 1, "unlabelled": 3}


def test_without_an_ignore_label_its_value_is_an_error(tmp_path):
    root = _dataset(tmp_path, {"labels": {"background": 0, "tumor": 1}})
    assert verify_dataset(root).errors == [
        f"{root / 'labelsTr' / 'a.nii.gz'}: label values [2] not in dataset.json labels [0, 1]"]


# ----------------------------------------------------------------- plan, preprocessing, fingerprint
def test_plan_carries_the_ignore_label_and_keeps_old_cache_keys():
    plan = Plan((2, 2, 3), (64, 64, 32), STATS)
    assert plan.ignore_label is None and plan.cache_key() == "df4b0cf875b5"  # the key before the field existed
    old = {k: v for k, v in plan.to_dict().items() if k != "ignore_label"}  # a checkpoint's plan of before
    assert Plan.from_dict(old) == plan
    ignoring = Plan((2, 2, 3), (64, 64, 32), STATS, ignore_label=2)
    assert Plan.from_dict(ignoring.to_dict()) == ignoring and ignoring.num_classes == 2
    assert ignoring.cache_key() != plan.cache_key()  # the cached labels keep the ignore voxels
    with pytest.raises(ValueError, match="ignore_label must be the number of classes"):
        Plan((2, 2, 3), (64, 64, 32), STATS, ignore_label=1)


def test_datamodule_plan_and_configuration_hold_the_dataset_ignore_label(tmp_path):
    from lightning_flare.datamodule import FlareDataModule

    dm = FlareDataModule(data_dir=str(_dataset(tmp_path)), cache_dir=str(tmp_path / "cache"),
                         intensity_stats={"clip_low": -100, "clip_high": 200, "mean": 50, "std": 30})
    assert dm.plan_from_data().ignore_label == 2 and dm.configured_plan()["ignore_label"] == 2


def _image(arr_zyx, spacing=(1.0, 1.0, 1.0)):
    image = sitk.GetImageFromArray(arr_zyx)
    image.SetSpacing(spacing)
    return image


def test_check_label_accepts_the_ignore_value_only_when_declared(tmp_path):
    label, image = _image(_ignore_seg()), _image(_ct())
    case = Case("a", tmp_path / "a_0000.nii.gz", tmp_path / "a.nii.gz")
    check_label(label, image, case, Plan((1, 1, 1), (8, 8, 8), STATS, ignore_label=2))
    with pytest.raises(ValueError, match=r"a\.nii\.gz: label values \[2\] are not in"):
        check_label(label, image, case, Plan((1, 1, 1), (8, 8, 8), STATS))
    with pytest.raises(ValueError, match=r"label values \[3\] .* \(ignore label 2\)"):
        check_label(_image(_seg(value=3)), image, case, Plan((1, 1, 1), (8, 8, 8), STATS, ignore_label=2))


def test_resampling_keeps_the_ignore_value_and_it_is_no_foreground():
    arr = np.zeros((4, 4, 4), np.uint8)  # (z, y, x)
    arr[:, :2, :2] = 1
    arr[:, 2:, 2:] = 2
    plan = Plan((2.0, 2.0, 1.0), (4, 4, 4), STATS, resampling="fast", ignore_label=2)
    seg = preprocess_label(_image(arr), plan, (2, 2, 4))  # (x, y, z), halved in-plane
    assert seg[:, :, 0].tolist() == [[1, 0], [0, 2]] and (seg[:, :, :] == seg[:, :, :1]).all()
    without = Plan((2.0, 2.0, 1.0), (4, 4, 4), STATS, resampling="fast")
    assert preprocess_label(_image(arr), without, (2, 2, 4))[:, :, 0].tolist() == [[1, 0], [0, 0]]  # 2 would be lost
    locations = foreground_locations(seg, np.random.default_rng(0), ignore_label=2)
    assert sorted(map(tuple, locations.tolist())) == [(0, 0, z) for z in range(4)]
    assert len(foreground_locations(seg, np.random.default_rng(0))) == 8  # without the ignore label: value > 0


def test_fingerprint_leaves_ignored_voxels_out(tmp_path, monkeypatch):
    monkeypatch.setattr("lightning_flare.fingerprint.NUM_FOREGROUND_SAMPLES", 1000)
    ct = np.full((6, 8, 8), -1000, np.int16)
    seg = _ignore_seg()
    ct[seg == 1], ct[seg == 2] = 40, 900  # tumour at 40 HU, the ignored region at 900 HU
    case = Case("a", _write(tmp_path / "a_0000.nii.gz", ct), _write(tmp_path / "a.nii.gz", seg))
    with_ignore = compute_fingerprint([case], ignore_label=2)
    assert with_ignore["intensity"]["max"] == 40 and with_ignore["ignore_label"] == 2
    assert compute_fingerprint([case])["intensity"]["max"] == 900 and "ignore_label" not in compute_fingerprint([case])
