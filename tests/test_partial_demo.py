"""benchmarks/partial_labels.py: the goal checks of issue 16 on hand-made rows."""
import importlib.util
import math
from pathlib import Path

SPEC = importlib.util.spec_from_file_location("partial_labels_demo", Path(__file__).parents[1] / "benchmarks" / "partial_labels.py")
demo = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(demo)


def _row(arm, dsc, recall, fp, fp_alone, lesion_dsc=0.8, lesion_dsc_alone=0.8):
    return {"arm": arm, "dsc": dsc, "nsd": dsc, "dsc_lesion_cases": lesion_dsc, "lesion_recall": recall,
            "lesion_precision": 0.5, "healthy_fp_rate": fp, "healthy_fp_rate_components_only": fp_alone,
            "dsc_lesion_cases_components_only": lesion_dsc_alone, "wall_s": 10.0}


def test_goals_met_and_missed_by_hand():
    rows = {"a": _row("a", 0.60, 0.50, 0.50, 0.50),
            "b": _row("b", 0.64, 0.55, 0.25, 0.50, lesion_dsc=0.795),  # half the FP rate at 0.005 DSC: met
            "c": _row("c", 0.66, 0.66, 0.30, 0.50)}  # recall +0.16: met; FP 0.30 > 0.25: missed
    lines = demo.goal_lines(rows)
    assert lines[0].endswith("met") and "0.660 >= (a) 0.500 + 0.15" in lines[0]
    assert lines[1].endswith("met") and "0.6600" in lines[1]  # best of (b), (c) = 0.66 >= 0.60 + 0.05
    assert lines[2].endswith("MISSED")  # (a): 0.5 > 0.25
    assert lines[3].endswith("met")
    assert lines[4].endswith("MISSED")
    rows["c"]["lesion_recall"] = 0.64  # +0.14 < 0.15
    rows["b"]["dsc"] = rows["c"]["dsc"] = 0.64  # +0.04 < 0.05
    lines = demo.goal_lines(rows)
    assert lines[0].endswith("MISSED") and lines[1].endswith("MISSED")


def test_no_false_positive_to_remove_is_not_shown_not_met():
    rows = {"a": _row("a", 0.9, 0.9, 0.0, 0.0), "b": _row("b", 0.9, 0.9, 0.0, 0.0625), "c": _row("c", 0.9, 0.9, 0.0625, 0.0625)}
    lines = demo.goal_lines(rows)
    assert lines[2].endswith("NOT SHOWN (no healthy false positive to remove)")  # 0 <= 0 / 2 proves nothing
    assert lines[3].endswith("met") and lines[4].endswith("MISSED")


def test_undefined_scores_read_missed_and_print_na():
    rows = {k: _row(k, 0.6, 0.5, None, None) for k in "abc"}
    assert all(line.endswith("MISSED") for line in demo.goal_lines(rows)[2:])
    assert "n/a" in demo.format_rows(rows)
    assert math.isnan(demo._defined(rows["a"])["healthy_fp_rate"])


def test_an_arm_without_healthy_test_cases_keeps_the_keys_as_none():
    cases = [{"case": "a", "dsc": 0.8, "nsd": 0.9, "reference_ml": 2.0, "predicted_ml": 1.5,
              "healthy_false_positive": False}]
    row = demo.arm_summary({"summary": {"dsc": 0.8, "nsd": 0.9}, "cases": cases})
    assert row["healthy_fp_rate"] is None and row["healthy_fp_rate_components_only"] is None
    assert row["dsc_lesion_cases"] == 0.8 and row["lesion_recall"] is None  # rows without lesion counts
    rows = {k: {"arm": k, **row, "wall_s": 1.0} for k in "abc"}
    assert all(line.endswith("MISSED") for line in demo.goal_lines(rows))  # no KeyError


def test_teacher_is_the_arm_with_the_higher_validation_dsc():
    nan = float("nan")
    assert demo.choose_teacher({"a": {"val_dsc": 0.86}, "b": {"val_dsc": 0.93}}) == "b"
    assert demo.choose_teacher({"a": {"val_dsc": 0.93}, "b": {"val_dsc": 0.86}}) == "a"
    assert demo.choose_teacher({"a": {"val_dsc": 0.9}, "b": {"val_dsc": 0.9}}) == "a"  # a tie: the seed's way
    assert demo.choose_teacher({"a": {"val_dsc": nan}, "b": {"val_dsc": 0.5}}) == "b"
    assert demo.choose_teacher({"a": {"val_dsc": 0.5}, "b": {"val_dsc": nan}}) == "a"
    assert demo.choose_teacher({"a": {}, "b": {}}) == "a"


def test_validation_dsc_is_the_checkpoint_s_postprocessed_score(tmp_path):
    import torch

    torch.save({"postprocessing": {"val_dsc_postprocessed": 0.9338, "min_component_ml": 0.25}}, tmp_path / "b.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "none.ckpt")  # fitted without a whole-volume validation
    assert demo.validation_dsc(tmp_path / "b.ckpt") == 0.9338
    assert math.isnan(demo.validation_dsc(tmp_path / "none.ckpt"))


def test_rounds_chain_teacher_previous_and_wall_time(tmp_path, monkeypatch):
    import json

    import lightning_flare.cli
    import lightning_flare.pseudo_label

    calls, fitted = [], []

    def fit_and_test(name, out, extra):
        fitted.append((name, extra))
        val = {"a_partial_as_complete": 0.8, "b_partial_label_loss": 0.9}.get(name, 0.95)
        return {**_row(name, 0.9, 0.9, 0.0, 0.0), "fit_s": 100.0 + len(fitted), "val_dsc": val}

    monkeypatch.setattr(demo, "_fit_and_test", fit_and_test)
    monkeypatch.setattr(lightning_flare.cli, "main", lambda argv: None)
    monkeypatch.setattr(lightning_flare.pseudo_label, "main", lambda argv: calls.append(argv) or 0)
    assert demo.main(["--out", str(tmp_path), "--rounds", "2"]) == 0
    teachers = [a[a.index("--teacher") + 1] for a in calls]
    assert teachers == [str(tmp_path / "b_partial_label_loss" / "checkpoints" / "last.ckpt"),  # (b): higher validation
                        str(tmp_path / "c_teacher_pseudo_student" / "checkpoints" / "last.ckpt")]
    assert "--previous" not in calls[0] and calls[1][calls[1].index("--previous") + 1] == str(tmp_path / "round1")
    assert [n for n, _ in fitted] == ["a_partial_as_complete", "b_partial_label_loss", "c_teacher_pseudo_student",
                                      "c2_round2_student"]
    assert fitted[3][1][fitted[3][1].index("--data.data_dir") + 1] == str(tmp_path / "round2")
    rows = json.loads((tmp_path / "partial_labels_summary.json").read_text())
    assert list(rows) == ["a", "b", "c1", "c"] and rows["c"]["teacher"] == "c_teacher_pseudo_student"
    assert rows["c1"]["teacher"] == "b_partial_label_loss" and rows["c"]["rounds"] == 2
    # (c)'s wall time: its first teacher's fit (b: 102), the students' fits (103, 104) and the two rounds (> 0 s)
    assert 309.0 < rows["c"]["wall_s"] < 309.0 + 5 and 205.0 < rows["c1"]["wall_s"] < 205.0 + 5
