"""Dataset verification: a clean dataset passes; a dataset with many defects reports each one, naming its file."""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from lightning_flare.raw_dataset import DatasetError
from lightning_flare.verify import main, verify_dataset

META = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "tumor": 1}, "numTraining": 2, "file_ending": ".nii.gz"}
SPACING = (0.8, 0.8, 2.5)


def _ct(seed: int = 0, shape=(6, 8, 8)) -> np.ndarray:
    """HU-like volume (z, y, x): air at -1000 up to 300."""
    arr = np.random.default_rng(seed).integers(-1000, 301, size=shape).astype(np.int16)
    arr.flat[0], arr.flat[-1] = -1000, 300
    return arr


def _seg(shape=(6, 8, 8), value: int = 1) -> np.ndarray:
    arr = np.zeros(shape, np.uint8)
    arr[2:4, 2:5, 3:6] = value
    return arr


def _write(path: Path, arr_or_image, spacing=SPACING, origin=(0.0, 0.0, 0.0), direction=None) -> Path:
    image = arr_or_image if isinstance(arr_or_image, sitk.Image) else sitk.GetImageFromArray(arr_or_image)
    if image.GetDimension() == 3:
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        image.SetDirection(direction or (1, 0, 0, 0, 1, 0, 0, 0, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return path


def _case(root: Path, case_id: str, image=None, label=None, split: str = "Tr", label_kwargs=None, **image_kwargs):
    img = _write(root / f"images{split}" / f"{case_id}_0000.nii.gz", _ct() if image is None else image, **image_kwargs)
    lab = _write(root / f"labels{split}" / f"{case_id}.nii.gz", _seg() if label is None else label,
                 **{**image_kwargs, **(label_kwargs or {})})
    return img, lab


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("verify") / "Dataset001_Clean"
    _case(root, "a")
    _case(root, "b", label_kwargs={"spacing": (0.8, 0.8, 2.5001)})  # 1e-4 mm: within tolerance
    _write(root / "imagesTs" / "t_0000.nii.gz", _ct(1))  # test image without labelsTs: fine
    (root / "dataset.json").write_text(json.dumps(META))
    return root


@pytest.fixture(scope="module")
def defective(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify") / "Dataset002_Broken"
    files = {}
    _case(root, "good")
    files["nolabel"] = _write(root / "imagesTr" / "nolabel_0000.nii.gz", _ct())
    files["noimage"] = _write(root / "labelsTr" / "noimage.nii.gz", _seg())
    files["suffix"] = _write(root / "imagesTr" / "suffix_0001.nii.gz", _ct())
    _write(root / "labelsTr" / "suffix.nii.gz", _seg())
    files["size"] = _case(root, "size", label=_seg((5, 8, 8)))[1]
    files["spacing"] = _case(root, "spacing", label_kwargs={"spacing": (0.8, 0.8, 2.51)})[1]
    files["origin"] = _case(root, "origin", label_kwargs={"origin": (0.0, 0.5, 0.0)})[1]
    files["direction"] = _case(root, "direction", label_kwargs={"direction": (-1, 0, 0, 0, 1, 0, 0, 0, 1)})[1]
    files["labelval"] = _case(root, "labelval", label=_seg(value=3))[1]
    nan = _ct().astype(np.float32)
    nan[1, 1, 1] = np.nan
    files["nan"] = _case(root, "nan", image=nan)[0]
    files["2d"] = _case(root, "twod", image=_ct()[0])[0]
    files["4d"] = _case(root, "fourd", image=sitk.JoinSeries([sitk.GetImageFromArray(_ct())] * 2))[0]
    files["trunc"] = _case(root, "trunc")[0]
    data = files["trunc"].read_bytes()
    files["trunc"].write_bytes(data[: len(data) // 2])
    files["unit"] = _case(root, "unit", image=np.random.default_rng(0).random((6, 8, 8)).astype(np.float32))[0]
    files["thick"] = _case(root, "thick", spacing=(0.8, 0.8, 12.0))[0]
    (root / "dataset.json").write_text(json.dumps({k: v for k, v in META.items() if k not in ("file_ending", "numTraining")}))
    files["meta"] = root / "dataset.json"
    return root, files


def test_clean_dataset_passes(clean, capsys):
    report = verify_dataset(clean)
    assert report.ok and report.errors == [] and report.warnings == []
    assert report.num_cases == 3
    report.raise_if_errors()
    assert main([str(clean)]) == 0
    assert "OK: 3 cases checked, 0 error(s), 0 warning(s)" in capsys.readouterr().out


EXPECTED_ERRORS = {  # file key -> words of its one error
    "meta": "file_ending", "nolabel": "image without label", "noimage": "label without image",
    "suffix": "wrong channel suffix _0001", "size": "size", "spacing": "spacing", "origin": "origin",
    "direction": "direction", "labelval": "label values [3]", "nan": "1 NaN and 0 inf voxels", "2d": "3D image, got 2D",
    "4d": "3D image, got 4D", "trunc": "truncated",
}
EXPECTED_WARNINGS = {"unit": "rescaled to [0, 1]", "thick": "exceeds 10 mm"}


def test_every_defect_reported_once(defective):
    root, files = defective
    report = verify_dataset(root)
    assert not report.ok
    for expected, messages in ((EXPECTED_ERRORS, report.errors), (EXPECTED_WARNINGS, report.warnings)):
        for key, words in expected.items():
            hits = [m for m in messages if m.startswith(f"{files[key]}:")]
            assert len(hits) == 1, (key, hits, messages)
            assert words in hits[0], (key, hits[0])
        assert len(messages) == len(expected), messages  # nothing spurious, nothing missing (no early stop)
    assert report.num_cases == 13  # every *_0000 image; suffix_0001 is not a case
    with pytest.raises(DatasetError) as info:
        report.raise_if_errors()
    lines = str(info.value).splitlines()
    assert lines == report.errors and all(line.startswith(str(root)) for line in lines)


def test_process_pool_gives_same_report(defective):
    root, _ = defective
    serial, pooled = verify_dataset(root), verify_dataset(root, num_workers=2)
    assert (pooled.errors, pooled.warnings, pooled.num_cases) == (serial.errors, serial.warnings, serial.num_cases)


def test_main_exit_code_on_errors(defective, capsys):
    root, files = defective
    assert main([str(root), "--splits", "Tr"]) == 1
    out = capsys.readouterr().out
    assert f"ERROR: {files['trunc']}:" in out and f"WARNING: {files['thick']}:" in out
    assert "FAILED: 13 cases checked, 13 error(s), 2 warning(s)" in out


@pytest.mark.parametrize("meta, words", [
    (None, "missing"),
    ("{not json", "cannot be parsed as JSON"),
    ({**META, "channel_names": {"0": "CT", "1": "PET"}}, "only single-channel CT"),
    ({**META, "labels": {"tumor": 1}}, "background"),
    ({**META, "labels": {"background": 0, "tumor": 2}}, "consecutive"),
])
def test_dataset_json_problems(tmp_path, meta, words):
    _case(tmp_path, "a")
    if meta is not None:
        (tmp_path / "dataset.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    report = verify_dataset(tmp_path)
    assert len(report.errors) == 1 and report.errors[0].startswith(f"{tmp_path / 'dataset.json'}:")
    assert words in report.errors[0]


def test_truncated_uncompressed_nifti(tmp_path):
    for f in _case(tmp_path, "a"):
        sitk.WriteImage(sitk.ReadImage(str(f)), str(f)[: -len(".gz")], False)
        f.unlink()
    nii = tmp_path / "imagesTr" / "a_0000.nii"
    nii.write_bytes(nii.read_bytes()[:-100])
    (tmp_path / "dataset.json").write_text(json.dumps({**META, "numTraining": 1, "file_ending": ".nii"}))
    errors = verify_dataset(tmp_path).errors
    assert len(errors) == 1 and errors[0].startswith(f"{nii}: truncated"), errors


@pytest.mark.parametrize("file_ending", [".nii.gz", ".mha"])
def test_nonfinite_found_in_nifti_and_other_formats(tmp_path, file_ending):
    """ITK's NIfTI reader silently turns NaN/inf into 0, so NIfTI voxels are scanned from the raw bytes."""
    arr = _ct().astype(np.float64)
    arr[0, 1, 1], arr[2, 2, 2], arr[3, 3, 3] = np.nan, np.inf, -np.inf
    image = _write(tmp_path / "imagesTr" / f"a_0000{file_ending}", arr)
    _write(tmp_path / "labelsTr" / f"a{file_ending}", _seg())
    (tmp_path / "dataset.json").write_text(json.dumps({**META, "numTraining": 1, "file_ending": file_ending}))
    report = verify_dataset(tmp_path)
    assert report.errors == [f"{image}: 1 NaN and 2 inf voxels"] and report.warnings == []


def test_missing_dataset_folder(tmp_path):
    report = verify_dataset(tmp_path / "nope")
    assert report.errors == [f"{tmp_path / 'nope'}: dataset folder does not exist"] and report.num_cases == 0


def test_training_folders_required_unless_test_only(tmp_path):
    _write(tmp_path / "imagesTs" / "t_0000.nii.gz", _ct())
    (tmp_path / "dataset.json").write_text(json.dumps({**META, "numTraining": 0}))
    assert verify_dataset(tmp_path).ok  # evaluation-only dataset (numTraining 0)
    (tmp_path / "dataset.json").write_text(json.dumps(META))
    assert [e.split(":")[0] for e in verify_dataset(tmp_path).errors] == [str(tmp_path / "imagesTr"), str(tmp_path / "labelsTr")]
