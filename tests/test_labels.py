"""dataset.json labels in every form nnU-Net v2 accepts for a non-region dataset (FLARE24 writes "0", "1")."""
import json
import shutil
from pathlib import Path

import pytest

from lightning_flare.raw_dataset import DatasetError, load_raw_dataset, parse_labels
from lightning_flare.verify import verify_dataset

FLARE24 = Path(__file__).resolve().parent / "data" / "flare24_results"
SOURCE = Path("/data/Dataset024/dataset.json")


@pytest.mark.parametrize("labels, expected", [
    ({"background": 0, "tumor": 1}, {"background": 0, "tumor": 1}),
    ({"background": "0", "tumor": "1"}, {"background": 0, "tumor": 1}),  # FLARE24's dataset.json
    ({"tumor": "2", "background": 0, "organ": 1}, {"tumor": 2, "background": 0, "organ": 1}),
    ({"background": 0.0, "tumor": 1.0}, {"background": 0, "tumor": 1}),  # nnU-Net int()s integral floats
    ({"background": [0], "tumor": ("1",)}, {"background": 0, "tumor": 1}),  # one value: not a region in nnU-Net
    ({"background": 0, "tumor": 1, "ignore": "2"}, {"background": 0, "tumor": 1}),  # the ignore label is no class
])
def test_accepted_forms_give_ints(labels, expected):
    parsed = parse_labels(labels, source=SOURCE)
    assert parsed == expected and all(type(v) is int for v in parsed.values())


@pytest.mark.parametrize("labels, words", [
    ({"background": 0, "tumor": [1, 2]}, ["'tumor'", "[1, 2]", "region"]),
    ({"background": 0, "organ": 1, "tumor": (1, 2)}, ["'tumor'", "(1, 2)", "region"]),
    ({"background": 0, "tumor": 1, "ignore": 1}, ["'ignore'", "is 1", "ignore label", "2"]),
    ({"background": 0, "tumor": 1, "ignore": 3}, ["'ignore'", "is 3", "highest"]),
    ({"background": 0, "tumor": 1, "ignore": [2, 3]}, ["'ignore'", "[2, 3]", "region"]),
    ({"background": 0, "tumor": 2}, ["[0, 2]", "consecutive"]),
    ({"background": 0, "a": 1, "b": 1}, ["[0, 1, 1]", "consecutive"]),
    ({"background": 1, "tumor": 0}, ["'background'", "1", "must be 0"]),
    ({"tumor": 1, "liver": 0}, ["'background'", "missing"]),
    ({"background": 0, "tumor": True}, ["'tumor'", "True"]),
    ({"background": 0, "tumor": " 1"}, ["'tumor'", "' 1'"]),
    ({"background": 0, "tumor": "1.5"}, ["'tumor'", "'1.5'"]),
    ({"background": 0, "tumor": "x"}, ["'tumor'", "'x'"]),
    ({"background": 0, "tumor": 1.5}, ["'tumor'", "1.5"]),
    ({"background": 0, "tumor": "-1"}, ["'tumor'", "'-1'"]),
    ({"background": 0, "tumor": None}, ["'tumor'", "None"]),
    ({}, ["'labels'", "{}"]),
    (["background", "tumor"], ["'labels'", "['background', 'tumor']"]),
    (None, ["'labels'", "None"]),
])
def test_unsupported_forms_name_file_and_value(labels, words):
    with pytest.raises(DatasetError) as info:
        parse_labels(labels, source=SOURCE)
    message = str(info.value)
    assert message.startswith(f"{SOURCE}: ")
    for word in words:
        assert word in message, (word, message)


@pytest.fixture(scope="module")
def flare24_raw(tmp_path_factory) -> Path:
    """A synthetic raw dataset whose dataset.json is FLARE24's own (string labels, numTraining 5000)."""
    from lightning_flare.synthetic import write_dataset

    root = tmp_path_factory.mktemp("labels") / "Dataset024_FLARE24_Task1"
    write_dataset(root, num_train=2, num_test=0, seed=1, in_plane_size=48)
    shutil.copyfile(FLARE24 / "dataset.json", root / "dataset.json")
    return root


def test_flare24_dataset_json_verifies_and_loads(flare24_raw):
    assert json.loads((flare24_raw / "dataset.json").read_text())["labels"] == {"background": "0", "tumor": "1"}
    report = verify_dataset(flare24_raw)
    assert report.ok, report.errors
    assert report.num_cases == 2
    assert report.warnings == [f"{flare24_raw / 'dataset.json'}: numTraining is 5000 but imagesTr holds 2 cases"]
    labels = load_raw_dataset(flare24_raw).labels
    assert labels == {"background": 0, "tumor": 1} and all(type(v) is int for v in labels.values())


def test_flare24_dataset_json_passes_fit_verification_and_plan(flare24_raw, tmp_path):
    """``fit`` verifies before any work; the plan it makes (saved in checkpoints) holds int labels."""
    from lightning_flare.datamodule import FlareDataModule

    dm = FlareDataModule(data_dir=flare24_raw, cache_dir=tmp_path / "cache", num_workers=0,
                         intensity_stats=[-900.0, 619.0, -52.232, 268.799])
    dm.verify_dataset()  # raised DatasetError ("needs a 'labels' mapping with "background": 0") before
    plan = dm.plan_from_data()
    assert plan.labels == {"background": 0, "tumor": 1} and plan.num_classes == 2


def test_verify_reports_label_error_with_file(flare24_raw, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(flare24_raw, root)
    meta = json.loads((root / "dataset.json").read_text())
    # an ignore label is accepted only as the highest value (2 here), as nnU-Net's
    (root / "dataset.json").write_text(json.dumps({**meta, "labels": {"background": "0", "tumor": "1", "ignore": "3"}}))
    report = verify_dataset(root, splits=("Tr",))
    assert len(report.errors) == 1 and report.errors[0].startswith(f"{root / 'dataset.json'}: ")
    assert "ignore label" in report.errors[0] and "'3'" in report.errors[0]
    with pytest.raises(DatasetError, match="ignore label"):
        load_raw_dataset(root)
