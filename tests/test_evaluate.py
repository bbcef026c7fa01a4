"""Standalone scorer: lightning_flare.evaluate on tiny hand-made NIfTI masks."""
import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from lightning_flare.evaluate import evaluate_folders, main
from lightning_flare.metrics.functional import flare_case_scores
from lightning_flare.report import COLUMNS, build_summary, format_table, print_test_table, write_reports

SHAPE = (12, 10, 8)  # (x, y, z)
SPACING = (0.8, 0.6, 2.5)  # anisotropic, (x, y, z)
ORIGIN = (-10.0, 5.0, 30.0)
DIRECTION = (0, -1, 0, 1, 0, 0, 0, 0, 1)
VOXEL_ML = 0.8 * 0.6 * 2.5 / 1000


def write_mask(path, array_xyz, spacing=SPACING, origin=ORIGIN, direction=DIRECTION):
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array_xyz, np.uint8).transpose(2, 1, 0)))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def cube(x0, x1):
    mask = np.zeros(SHAPE, np.uint8)
    mask[x0:x1, 2:6, 2:6] = 1
    return mask


@pytest.fixture
def folders(tmp_path):
    """Labels and predictions; the arrays per case are returned for cross-checks."""
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    empty = np.zeros(SHAPE, np.uint8)
    few = empty.copy()
    few[0, 0, 0] = few[5, 5, 5] = few[11, 9, 7] = 1
    over_one = cube(2, 6) * 2
    cases = {  # case: (label, prediction or None)
        "half": (cube(2, 6), cube(4, 8)),  # 32 of 64 voxels overlap: DSC = 2 * 32 / 128
        "perfect": (cube(2, 6), cube(2, 6)),
        "healthy_fp": (empty, few),
        "healthy_ok": (empty, empty),
        "missing": (cube(2, 6), None),
        "over_one": (cube(2, 6), over_one),
    }
    for case, (gt, pred) in cases.items():
        write_mask(gt_dir / f"{case}.nii.gz", gt)
        if pred is not None:
            write_mask(pred_dir / f"{case}.nii.gz", pred)
    write_mask(pred_dir / "stray.nii.gz", cube(2, 6))  # a prediction without a label
    (pred_dir / "plans.json").write_text("{}")  # nnU-Net leaves such files beside its masks
    return pred_dir, gt_dir, cases


def test_scores_follow_flare_rules(folders):
    pred_dir, gt_dir, cases = folders
    rows, summary = evaluate_folders(pred_dir, gt_dir)
    by_case = {r["case"]: r for r in rows}
    assert list(by_case) == sorted(cases)  # label order; the extra prediction is not scored
    assert by_case["half"]["dsc"] == pytest.approx(0.5)
    assert by_case["half"]["nsd"] == 1.0  # the surfaces are 2 voxels = 1.6 mm apart along x: all within 2 mm
    assert (by_case["perfect"]["dsc"], by_case["perfect"]["nsd"]) == (1.0, 1.0)
    assert (by_case["healthy_fp"]["dsc"], by_case["healthy_fp"]["nsd"]) == (0.0, 0.0)
    assert by_case["healthy_fp"]["healthy_false_positive"] is True
    assert by_case["healthy_fp"]["predicted_ml"] == pytest.approx(3 * VOXEL_ML)
    assert (by_case["healthy_ok"]["dsc"], by_case["healthy_ok"]["nsd"]) == (1.0, 1.0)
    assert by_case["healthy_ok"]["healthy_false_positive"] is False
    assert (by_case["missing"]["dsc"], by_case["missing"]["nsd"], by_case["missing"]["predicted_ml"]) == (0, 0, 0)
    assert by_case["missing"]["missing"] is True and by_case["half"]["missing"] is False
    assert (by_case["over_one"]["dsc"], by_case["over_one"]["nsd"]) == (0.0, 0.0)
    for row in rows:
        assert not any(isinstance(v, float) and math.isnan(v) for v in row.values())
    assert by_case["half"]["reference_ml"] == pytest.approx(64 * VOXEL_ML)
    assert by_case["half"]["predicted_ml"] == pytest.approx(64 * VOXEL_ML)
    assert by_case["healthy_ok"]["reference_ml"] == 0

    assert summary["missing_predictions"] == ["missing"]
    assert summary["extra_predictions"] == ["stray"]
    assert summary["num_cases"] == 6 and summary["healthy_cases"] == 2
    assert summary["healthy_cases_with_false_positives"] == 1
    dsc = [r["dsc"] for r in rows]
    assert summary["dsc"]["mean"] == pytest.approx(np.mean(dsc))
    assert summary["dsc"]["median"] == pytest.approx(np.median(dsc))
    assert summary["tolerance_mm"] == 2.0


def test_scores_equal_flare_case_scores(folders):
    pred_dir, gt_dir, cases = folders
    rows, _ = evaluate_folders(pred_dir, gt_dir, tolerance_mm=1.0)
    spacing = sitk.ReadImage(str(gt_dir / "half.nii.gz")).GetSpacing()  # NIfTI keeps float32 spacing
    for row in rows:
        gt, pred = cases[row["case"]]
        if pred is not None:
            assert (row["dsc"], row["nsd"]) == flare_case_scores(pred, gt, spacing, 1.0)
    half = next(r for r in rows if r["case"] == "half")
    assert 0.5 < half["nsd"] < 1  # 1.6 mm apart: some surfels exceed the 1 mm tolerance
    assert half["nsd"] != pytest.approx(flare_case_scores(cube(4, 8), cube(2, 6), (1.0, 1.0, 1.0), 1.0)[1])


def test_process_pool_gives_the_same_rows(folders):
    pred_dir, gt_dir, _ = folders
    assert evaluate_folders(pred_dir, gt_dir, num_workers=2)[0] == evaluate_folders(pred_dir, gt_dir)[0]


def test_other_file_endings(tmp_path):
    write_mask(tmp_path / "gt" / "a.mha", cube(2, 6))
    write_mask(tmp_path / "pred" / "a.nrrd", cube(2, 6))
    write_mask(tmp_path / "gt" / "b.nii", cube(2, 6))
    write_mask(tmp_path / "pred" / "b.nii.gz", cube(4, 8))
    rows, summary = evaluate_folders(tmp_path / "pred", tmp_path / "gt")
    assert [(r["case"], r["dsc"]) for r in rows] == [("a", 1.0), ("b", 0.5)]
    assert summary["missing_predictions"] == summary["extra_predictions"] == []


def test_geometry_mismatch_names_every_case(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    for case in ("ok", "tiny_shift", "spacing", "size"):
        write_mask(gt_dir / f"{case}.nii.gz", cube(2, 6))
    write_mask(pred_dir / "ok.nii.gz", cube(2, 6))
    write_mask(pred_dir / "tiny_shift.nii.gz", cube(2, 6), origin=(-10.0004, 5.0, 30.0))  # within 1e-3 mm
    write_mask(pred_dir / "spacing.nii.gz", cube(2, 6), spacing=(0.8, 0.6, 3.0))
    write_mask(pred_dir / "size.nii.gz", np.zeros((12, 10, 9), np.uint8))
    with pytest.raises(ValueError) as info:
        evaluate_folders(pred_dir, gt_dir)
    message = str(info.value)
    assert "spacing (0.8, 0.6, 3.0) vs (0.8, 0.6, 2.5)" in message and "size (12, 10, 9) vs (12, 10, 8)" in message
    assert "2 case(s)" in message and "tiny_shift" not in message and "ok (" not in message


def test_cli_writes_reports_and_prints_table(folders, tmp_path, capsys):
    pred_dir, gt_dir, _ = folders
    out = tmp_path / "out"
    assert main(["--pred", str(pred_dir), "--gt", str(gt_dir), "--tolerance", "2", "--out", str(out)]) == 0
    with open(out / "metrics_per_case.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == [*COLUMNS, "volume_ratio", "missing"] == ["case", "dsc", "nsd", "reference_ml", "predicted_ml",
                                                                 "healthy_false_positive", "volume_ratio", "missing"]
    assert len(table) == 7
    summary = json.loads((out / "metrics_summary.json").read_text())
    assert {"num_cases", "dsc", "nsd", "healthy_cases", "healthy_cases_with_false_positives",
            "missing_predictions", "extra_predictions"} <= set(summary)
    assert set(summary["dsc"]) == {"mean", "std", "median", "q1", "q3"}
    assert summary["missing_predictions"] == ["missing"] and summary["extra_predictions"] == ["stray"]
    printed = capsys.readouterr()
    assert "DSC: mean" in printed.out and "median" in printed.out and "IQR" in printed.out
    assert "Healthy cases with false positives: 1 of 2" in printed.out
    assert "missing" in printed.err and "stray" in printed.err
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_cli_default_out_is_pred_dir(folders):
    pred_dir, gt_dir, _ = folders
    assert main(["--pred", str(pred_dir), "--gt", str(gt_dir)]) == 0
    assert (pred_dir / "metrics_per_case.csv").is_file() and (pred_dir / "metrics_summary.json").is_file()


@pytest.mark.parametrize("problem", ["no_pred_dir", "geometry", "unreadable"])
def test_cli_user_errors_exit_2_with_one_line(folders, tmp_path, capsys, problem):
    pred_dir, gt_dir, _ = folders
    if problem == "no_pred_dir":
        pred_dir, expected = tmp_path / "nowhere", "nowhere"
    elif problem == "geometry":
        write_mask(pred_dir / "half.nii.gz", cube(4, 8), spacing=(1.0, 0.6, 2.5))
        expected = "half (spacing"
    else:
        (pred_dir / "perfect.nii.gz").write_bytes(b"not an image")
        expected = "perfect.nii.gz"
    assert main(["--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_report_keeps_lightning_module_rows(tmp_path, capsys):
    """Rows from the LightningModule (no 'missing' key, possibly NaN) still report."""
    rows = [{"case": "a", "dsc": 0.5, "nsd": 0.7, "reference_ml": 1.0, "predicted_ml": 2.0, "healthy_false_positive": False},
            {"case": "b", "dsc": float("nan"), "nsd": float("nan"), "reference_ml": 0.0, "predicted_ml": 0.1,
             "healthy_false_positive": True}]
    summary = write_reports(rows, tmp_path)
    assert summary == build_summary(rows)
    assert summary["dsc"]["mean"] == 0.5 and summary["missing_predictions"] == [] and "tolerance_mm" not in summary
    assert summary["healthy_cases_with_false_positives"] == 1
    assert (tmp_path / "metrics_per_case.csv").read_text().splitlines()[1:] == ["a,0.5,0.7,1.0,2.0,False,2.0,False",
                                                                               "b,nan,nan,0.0,0.1,True,,False"]
    assert "DSC: mean 0.5000" in format_table(rows)
    print_test_table({"summary": {"dsc": 0.5}, "cases": rows})
    assert "healthy, false positive" in capsys.readouterr().out


def test_volume_ratio_per_case_and_median_over_lesion_cases(tmp_path):
    """pred / ref per lesion case (healthy cases have none), the median over lesion cases and how many lie
    within 0.8-1.25, in the CSV, the summary and the table."""
    def row(case, ref, pred):
        return {"case": case, "dsc": 0.5, "nsd": 0.5, "reference_ml": ref, "predicted_ml": pred,
                "healthy_false_positive": ref == 0 and pred > 0}

    rows = [row("over", 10.0, 40.0), row("good", 20.0, 22.0), row("under", 8.0, 6.0), row("miss", 5.0, 0.0),
            row("healthy", 0.0, 3.0)]
    summary = write_reports(rows, tmp_path)
    # ratios 4.0, 1.1, 0.75, 0.0 -> median (0.75 + 1.1) / 2; only 1.1 lies within 0.8-1.25
    assert summary["volume_ratio"] == {"median": pytest.approx(0.925), "q1": pytest.approx(0.5625),
                                       "q3": pytest.approx(1.825), "lesion_cases": 4, "within_goal": 1}
    lines = (tmp_path / "metrics_per_case.csv").read_text().splitlines()
    assert [line.split(",")[6] for line in lines[1:]] == ["4.0", "1.1", "0.75", "0.0", ""]
    table = format_table(rows, summary)
    assert "Predicted / reference volume over 4 lesion cases: median 0.925 (IQR 0.562-1.825), 1 within 0.8-1.25" in table
    assert "pred/ref" in table.splitlines()[0] and "   4.000" in table.splitlines()[2]
    assert build_summary([row("healthy", 0.0, 0.0)])["volume_ratio"]["lesion_cases"] == 0
    assert "no lesion case" in format_table([row("healthy", 0.0, 0.0)])


def test_metric_keeps_case_volumes_and_the_median_ratio():
    """FlareMetrics (validation) records each case's predicted and reference volume once per case."""
    from lightning_flare.metrics import FlareMetrics
    from lightning_flare.report import case_volume_table

    metric = FlareMetrics()
    ref, pred = np.zeros((6, 6, 6), np.uint8), np.zeros((6, 6, 6), np.uint8)
    ref[1:3, 1:3, 1:3] = 1  # 8 voxels of 2 x 2 x 2.5 mm = 0.08 ml
    pred[1:3, 1:3, 1:4] = 1  # 12 voxels
    metric.update(pred, ref, (2.0, 2.0, 2.5), 1)
    metric.update(ref, ref, (2.0, 2.0, 2.5), 0)
    metric.update(pred, ref, (2.0, 2.0, 2.5), 1)  # a repeat (DDP padding) counts once
    metric.update(pred, np.zeros_like(ref), (2.0, 2.0, 2.5), 2)  # healthy: no ratio
    metric.add_placeholder()
    assert float(metric.compute()["volume_ratio_median"]) == pytest.approx((1.0 + 1.5) / 2)
    index, predicted, reference = metric.case_volumes()
    assert index.tolist() == [0, 1, 2]
    assert predicted.tolist() == pytest.approx([0.08, 0.12, 0.12]) and reference.tolist() == pytest.approx([0.08, 0.08, 0])
    table = case_volume_table(metric, ["a", "b", "c"])
    assert table["columns"] == ["case", "dsc", "reference_ml", "predicted_ml", "volume_ratio"]
    assert [r[0] for r in table["data"]] == ["a", "b", "c"] and table["data"][1][4] == pytest.approx(1.5)
    assert math.isnan(table["data"][2][4])


@pytest.fixture
def ignore_folders(tmp_path):
    """A raw-dataset layout (dataset.json beside labelsTr) whose labels mark slab x 8..11 as nnU-Net's ignore label 2."""
    gt_dir, pred_dir = tmp_path / "raw" / "labelsTr", tmp_path / "pred"
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "tumour": 1, "ignore": 2}}))
    label = cube(2, 6)
    label[8:12] = 2
    healthy = np.zeros(SHAPE, np.uint8)
    healthy[8:12] = 2
    inside = cube(2, 6)
    inside[9:11, 3:7, 3:7] = 1  # a false positive, but in the unknown region
    outside_k = cube(2, 6)
    outside_k[0, 0, 0] = 2  # the ignore label predicted where the label is known
    cases = {"tumour": (label, inside), "healthy": (healthy, healthy.clip(0, 1)), "k_inside": (label, label),
             "k_outside": (label, outside_k)}
    for case, (gt, pred) in cases.items():
        write_mask(gt_dir / f"{case}.nii.gz", gt)
        write_mask(pred_dir / f"{case}.nii.gz", pred)
    return pred_dir, gt_dir


def test_ignore_label_is_left_out_of_scores_and_volumes(ignore_folders):
    pred_dir, gt_dir = ignore_folders
    by_case = {r["case"]: r for r in evaluate_folders(pred_dir, gt_dir, ignore_label=2)[0]}
    assert (by_case["tumour"]["dsc"], by_case["tumour"]["nsd"]) == (1.0, 1.0)
    assert by_case["tumour"]["reference_ml"] == by_case["tumour"]["predicted_ml"] == pytest.approx(64 * VOXEL_ML)
    assert by_case["healthy"]["reference_ml"] == by_case["healthy"]["predicted_ml"] == 0
    assert by_case["healthy"]["healthy_false_positive"] is False and by_case["healthy"]["dsc"] == 1.0
    assert (by_case["k_inside"]["dsc"], by_case["k_inside"]["nsd"]) == (1.0, 1.0)  # a predicted K there: left out
    assert (by_case["k_outside"]["dsc"], by_case["k_outside"]["nsd"]) == (0.0, 0.0)  # a value outside {0, 1}
    unaware = {r["case"]: r for r in evaluate_folders(pred_dir, gt_dir)[0]}
    assert unaware["tumour"]["dsc"] < 1 and unaware["healthy"]["reference_ml"] > 0  # K counted as tumour before


@pytest.mark.parametrize("how", ["beside_labels", "dataset_json", "ignore_label"])
def test_cli_reads_the_ignore_label(ignore_folders, tmp_path, how):
    pred_dir, gt_dir = ignore_folders
    extra = {"beside_labels": [], "dataset_json": ["--dataset-json", str(gt_dir.parent / "dataset.json")],
             "ignore_label": ["--ignore-label", "2"]}[how]
    if how == "dataset_json":  # labels elsewhere: dataset.json is not beside them
        gt_dir = gt_dir.rename(tmp_path / "labels")
    elif how == "ignore_label":
        (gt_dir.parent / "dataset.json").unlink()
    assert main(["--pred", str(pred_dir), "--gt", str(gt_dir), *extra]) == 0
    summary = json.loads((pred_dir / "metrics_summary.json").read_text())
    assert summary["healthy_cases"] == 1 and summary["healthy_cases_with_false_positives"] == 0


@pytest.mark.parametrize("labels", [{"0": "background", "1": "tumour"},  # the Medical Decathlon's layout
                                    {"background": 0, "liver": [1, 2]}])  # an nnU-Net region
def test_a_dataset_json_beside_the_labels_without_an_ignore_label_changes_nothing(tmp_path, labels):
    """GT_DIR/../dataset.json is read only for its 'ignore' label: a labels mapping this package would not train on
    (Decathlon's value -> name, regions) does not stop the scorer, which scored such folders before."""
    gt_dir, pred_dir = tmp_path / "Task01" / "labelsTr", tmp_path / "pred"
    write_mask(gt_dir / "a.nii.gz", cube(2, 6))
    write_mask(pred_dir / "a.nii.gz", cube(2, 6))
    (tmp_path / "Task01" / "dataset.json").write_text(json.dumps({"labels": labels}))
    assert main(["--pred", str(pred_dir), "--gt", str(gt_dir)]) == 0
    assert json.loads((pred_dir / "metrics_summary.json").read_text())["num_cases"] == 1
