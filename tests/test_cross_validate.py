"""benchmarks/cross_validate.py (commands, pooling, one real fold end to end), data.test_split, data.fold all."""
import json
import logging
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY_NET, tiny_cli_args

import cli
from lightning_flare.component_confidence import THRESHOLDS
from lightning_flare.datamodule import FlareDataModule
from lightning_flare.raw_dataset import load_raw_dataset, select_fold

sys.path.insert(0, str(ROOT / "benchmarks"))
import cross_validate as cv  # noqa: E402


def test_overrides_and_fold_commands(tmp_path):
    overrides = cv.overrides_from(["data.patch_size=[96,96,48]"], ["--trainer.max_epochs", "20", "--data.fold=3"])
    assert overrides == ["--data.patch_size", "[96,96,48]", "--trainer.max_epochs", "20", "--data.fold=3"]
    with pytest.raises(ValueError, match=r"--set needs KEY=VALUE .* got 'lr'"):
        cv.overrides_from(["lr"], [])
    with pytest.raises(ValueError, match=r"unknown arguments \['--epochs'\]"):
        cv.overrides_from([], ["--epochs", "3"])
    fold_dir = tmp_path / "cv" / "x" / "fold_2"
    fit, test = cv.fold_commands(ROOT / "configs" / "ibsi_cpu.yaml", 2, "x", fold_dir, ["--trainer.max_epochs", "20"])
    assert fit[2:7] == ["fit", "--config", str(ROOT / "configs" / "ibsi_cpu.yaml"), "--data.fold", "2"]
    assert fit[fit.index("--trainer.default_root_dir") + 1] == str(fold_dir)
    assert fit[fit.index("--trainer.logger.init_args.name") + 1] == "x_fold2"  # the config logs to W&B (base.yaml)
    assert json.loads(fit[fit.index("--trainer.callbacks+") + 1])["class_path"] == "lightning_flare.fit_timer.FitTimer"
    assert fit[-2:] == test[-2:] == ["--trainer.max_epochs", "20"]  # overrides last: they win
    assert test[test.index("--data.test_split") + 1] == "val"
    assert test[test.index("--ckpt_path") + 1] == str(fold_dir / "checkpoints" / "last.ckpt")
    assert test[test.index("--model.report_dir") + 1] == str(fold_dir / "test")
    quiet = tmp_path / "quiet.yaml"
    quiet.write_text("trainer:\n  logger: false\n")
    assert not any("logger" in a for a in cv.fold_commands(quiet, 0, "q", fold_dir, [])[0])
    layered, _ = cv.fold_commands([ROOT / "configs" / "demo.yaml", quiet], 1, "l", fold_dir, [])
    assert layered[2:8] == ["fit", "--config", str(ROOT / "configs" / "demo.yaml"), "--config", str(quiet), "--data.fold"]
    assert not any("logger" in a for a in layered)  # the later config's logger: false wins
    assert cv.uses_logger([quiet, ROOT / "configs" / "ibsi_cpu.yaml"])  # ibsi_cpu sets a logger of its own


def _fold(fold, cases, plain, largest, seconds, iterations=10):
    """A fold as read_fold gives it: (dsc, nsd, reference_ml, predicted_ml) per case, the validation scores."""
    return {"fold": fold, "cases": [{"case": f"c{fold}{i}", "dsc": d, "nsd": n, "reference_ml": r, "predicted_ml": p}
                                    for i, (d, n, r, p) in enumerate(cases)],
            "fit_s": seconds, "timing": {"seconds_per_iteration": seconds / iterations, "iterations": iterations,
                                         "precision": "32-true", "cpu": "Test CPU"},
            "postprocessing": {"min_component_ml": 0.0, "largest_component_only": False,
                               "val_dsc_by_min_component_ml": plain,
                               "val_dsc_largest_component_by_min_component_ml": largest}}


def test_summary_pools_every_case_and_the_postprocessing_scores():
    # fold 0 alone would keep the largest component (0.9 > 0.75), fold 1 alone nothing; pooled over the 3 cases:
    # plain {0: (2 * 0.5 + 1) / 3, 1: (2 * 0.75 + 1) / 3 = 0.8333}, largest (2 * 0.9 + 0.4) / 3 = 0.7333: 1 ml, no largest
    folds = [_fold(0, [(0.6, 0.5, 10.0, 20.0), (0.8, 0.7, 10.0, 9.0)], {"0.0": 0.5, "1.0": 0.75},
                   {"0.0": 0.9, "1.0": 0.9}, 100.0),
             _fold(1, [(1.0, 0.9, 0.0, 0.0)], {"0.0": 1.0, "1.0": 1.0}, {"0.0": 0.4, "1.0": 0.4}, 50.0)]
    summary = cv.summarize(folds)
    assert [r["dsc"] for r in summary["folds"]] == pytest.approx([0.7, 1.0])
    assert summary["folds"][0]["volume_ratio_median"] == pytest.approx((2.0 + 0.9) / 2)
    pooled = summary["pooled"]
    assert pooled["cases"] == 3 and pooled["dsc"] == pytest.approx(0.8) and pooled["nsd"] == pytest.approx(0.7)
    assert pooled["volume_ratio"]["lesion_cases"] == 2 and pooled["volume_ratio"]["within_goal"] == 1
    assert pooled["fit_s"] == 150.0 and pooled["seconds_per_iteration"] == pytest.approx(7.5)
    assert summary["postprocessing"] == {"min_component_ml": 1.0, "largest_component_only": False,
                                         "val_dsc_postprocessed": pytest.approx(0.833333), "healthy_decision": None}
    assert summary["cpu"] == ["Test CPU"] and summary["precision"] == ["32-true"]
    text = cv.format_summary(summary, "x")
    cv_row = next(line for line in text.splitlines() if line.startswith("| CV"))
    assert [c.strip() for c in cv_row.strip("|").split("|")][:7] == ["CV", "3", "0.8000", "0.7000", "1.450", "150", "7.500"]
    assert "--model.inference.min_component_ml 1 --model.inference.largest_component false" in text
    assert "CPU: Test CPU; precision: 32-true" in text
    folds[1]["postprocessing"] = None  # a fold without a whole-volume validation: no pooled choice
    assert cv.summarize(folds)["postprocessing"] is None


def test_retest_tests_the_fitted_folds_again_and_pools_them(tmp_path, capsys):
    """--retest LABEL: no fit; each fold's test command gets the overrides and writes into fold_K/test_LABEL; the
    pooled summary reads those reports (not fold_K/test) and goes to cv_summary_LABEL.json. An unfitted fold is
    named; a label that is no folder name is refused."""
    root = tmp_path / "cv" / "x"
    for fold, dsc in ((0, 0.5), (1, 0.9)):
        fold_dir = root / f"fold_{fold}"
        (fold_dir / "checkpoints").mkdir(parents=True)
        torch.save({"postprocessing": None}, fold_dir / "checkpoints" / "last.ckpt")
        (fold_dir / "fit_time.json").write_text(json.dumps({"fit_s": 10.0 * (fold + 1), "iterations": 5,
                                                            "seconds_per_iteration": 2.0, "precision": "32-true",
                                                            "cpu": "Test CPU"}))
        (fold_dir / "test").mkdir()  # the first test's reports: not read by the re-test
        (fold_dir / "test" / "metrics_per_case.csv").write_text("case,dsc,nsd,reference_ml,predicted_ml\nold,0.0,0.0,1,1\n")
    commands = []

    def run(command):
        commands.append(list(command))
        report = command[command.index("--model.report_dir") + 1]
        fold = int(command[command.index("--data.fold") + 1])
        (tmp_path / report).mkdir(parents=True, exist_ok=True)
        (tmp_path / report / "metrics_per_case.csv").write_text(
            f"case,dsc,nsd,reference_ml,predicted_ml\nc{fold},{0.5 + 0.4 * fold},0.5,10,12\n")

    quiet = tmp_path / "quiet.yaml"
    quiet.write_text("trainer:\n  logger: false\n")
    argv = ["--config", str(quiet), "--name", "x", "--out", str(tmp_path / "cv"), "--folds", "0", "1",
            "--retest", "tta", "--set", "model.inference.tta=true"]
    assert cv.main(argv, run=run) == 0
    assert [c[2] for c in commands] == ["test", "test"]  # nothing fitted again
    assert all(c[-2:] == ["--model.inference.tta", "true"] for c in commands)
    assert commands[1][commands[1].index("--model.report_dir") + 1] == str(root / "fold_1" / "test_tta")
    summary = json.loads((root / "cv_summary_tta.json").read_text())
    assert [c["case"] for f in summary["cases"].values() for c in f] == ["c0", "c1"]
    assert summary["pooled"]["dsc"] == pytest.approx(0.7) and summary["pooled"]["fit_s"] == 30.0
    assert not (root / "cv_summary.json").exists() and "re-test 'tta'" in capsys.readouterr().out
    (root / "fold_1" / "checkpoints" / "last.ckpt").unlink()
    with pytest.raises(SystemExit, match="fold 1 is not fitted"):
        cv.main(argv, run=run)
    with pytest.raises(SystemExit):
        cv.main([*argv[:-4], "--retest", "../up"], run=run)


def test_revalidate_chooses_again_then_tests_and_reads_the_new_checkpoint(tmp_path):
    """--retest LABEL --revalidate: per fold, ``cli.py validate`` of the checkpoint writing
    checkpoints/revalidated_last.ckpt (ValidationChoiceCheckpoint), then the test of that one, whose choice the summary
    reads; --reuse keeps a revalidated checkpoint already there; without --retest it is refused."""
    root = tmp_path / "cv" / "x"
    fold_dir = root / "fold_0"
    (fold_dir / "checkpoints").mkdir(parents=True)
    torch.save({"postprocessing": {"min_component_ml": 1.0}}, fold_dir / "checkpoints" / "last.ckpt")
    (fold_dir / "fit_time.json").write_text(json.dumps({"fit_s": 10.0, "iterations": 5, "seconds_per_iteration": 2.0,
                                                        "precision": "32-true", "cpu": "Test CPU"}))
    commands = []

    def run(command):
        commands.append(list(command))
        if command[2] == "validate":
            callback = json.loads(command[command.index("--trainer.callbacks+") + 1])
            assert callback["class_path"] == "lightning_flare.validation_choice.ValidationChoiceCheckpoint"
            assert command[command.index("--ckpt_path") + 1] == str(fold_dir / "checkpoints" / "last.ckpt")
            torch.save({"postprocessing": {"min_component_ml": 4.0}}, callback["init_args"]["path"])
            return
        report = Path(command[command.index("--model.report_dir") + 1])
        report.mkdir(parents=True, exist_ok=True)
        (report / "metrics_per_case.csv").write_text("case,dsc,nsd,reference_ml,predicted_ml\nc0,0.5,0.5,10,12\n")

    quiet = tmp_path / "quiet.yaml"
    quiet.write_text("trainer:\n  logger: false\n")
    argv = ["--config", str(quiet), "--name", "x", "--out", str(tmp_path / "cv"), "--folds", "0", "--retest", "re",
            "--revalidate"]
    assert cv.main(argv, run=run) == 0
    assert [c[2] for c in commands] == ["validate", "test"]
    assert commands[1][commands[1].index("--ckpt_path") + 1] == str(fold_dir / "checkpoints" / "revalidated_last.ckpt")
    summary = json.loads((root / "cv_summary_re.json").read_text())
    assert summary["folds"][0]["min_component_ml"] == 4.0  # the new choice, not the fit's 1.0
    commands.clear()
    assert cv.main([*argv, "--reuse"], run=run) == 0 and commands == []  # both done already
    with pytest.raises(SystemExit):
        cv.main([*argv[:-3], "--revalidate"], run=run)  # --revalidate without --retest


def test_summary_shows_what_the_healthy_decision_saves_and_costs():
    """Reports with the figures before the decision: healthy false positives and lesion-case DSC with and without it,
    pooled over the folds (by hand: 2 healthy scans, one cleared by the decision; 2 lesion cases, one lost)."""
    def case(name, ref, pred, dsc, pred_alone, dsc_alone):
        return {"case": name, "dsc": dsc, "nsd": dsc, "reference_ml": ref, "predicted_ml": pred,
                "predicted_ml_components_only": pred_alone, "dsc_components_only": dsc_alone}

    folds = [_fold(k, [], {"0.0": 1.0}, {"0.0": 1.0}, 10.0) for k in (0, 1)]
    folds[0]["cases"] = [case("h0", 0.0, 0.0, 1.0, 3.0, 0.0), case("l0", 5.0, 5.0, 0.8, 5.0, 0.8)]
    folds[1]["cases"] = [case("h1", 0.0, 2.0, 0.0, 2.0, 0.0), case("l1", 4.0, 0.0, 0.0, 4.0, 0.6)]
    pooled = cv.summarize(folds)["pooled"]
    assert pooled["healthy_false_positives"] == 1 and pooled["healthy_cases_with_false_positives_components_only"] == 2
    assert pooled["dsc_lesion_cases"] == pytest.approx(0.4)
    assert pooled["dsc_lesion_cases_components_only"] == pytest.approx(0.7)
    text = cv.format_summary(cv.summarize(folds), "x")
    assert ("Healthy scans (empty reference): 2, with a false positive: 1 (small-component removal alone: 2); "
            "mean DSC of the lesion cases 0.4000 (alone: 0.7000)") in text
    del folds[1]["cases"][0]["dsc_components_only"]  # an older report: no figures before the decision
    assert cv.summarize(folds)["pooled"]["dsc_lesion_cases_components_only"] is None


def _rows(*cases):
    """validation_rows of candidates [0, 1] ml: per case (healthy, mass_ml, mean_probability, dsc), the same at
    both candidates, largest-component DSC = DSC."""
    return {"candidates_ml": [0.0, 1.0],
            "rows": [[float(h), m, m, p, p, d, d, d, d] for h, m, p, d in cases]}


def test_healthy_decision_is_chosen_on_the_folds_pooled_rows():
    # fold 0: a healthy scan with a false positive (mean probability 0.75) and a lesion found at 0.97; fold 1: a
    # healthy scan left empty and a lesion at 0.95. Pooled mean probabilities 0 < 0.75 < 0.95 < 0.97: threshold
    # 0.85 empties the false positive only: mean DSC (1 + 0.8 + 1 + 0.7) / 4 = 0.875, against
    # (0 + 0.8 + 1 + 0.7) / 4 = 0.625 off
    folds = [_fold(0, [(0.0, 0.0, 0.0, 2.0), (0.8, 0.7, 10.0, 9.0)], {"0.0": 0.4, "1.0": 0.4},
                   {"0.0": 0.4, "1.0": 0.4}, 100.0),
             _fold(1, [(1.0, 1.0, 0.0, 0.0), (0.7, 0.6, 5.0, 5.0)], {"0.0": 0.85, "1.0": 0.85},
                   {"0.0": 0.85, "1.0": 0.85}, 100.0)]
    folds[0]["postprocessing"]["healthy_decision"] = {"validation_rows": _rows((1, 2.0, 0.75, 0.0), (0, 10.0, 0.97, 0.8))}
    folds[1]["postprocessing"]["healthy_decision"] = {"validation_rows": _rows((1, 0.0, 0.0, 1.0), (0, 5.0, 0.95, 0.7))}
    decision = cv.summarize(folds)["postprocessing"]["healthy_decision"]
    assert decision["feature"] == "mean_probability" and decision["mean_probability"] == pytest.approx(0.85)
    assert decision["val_dsc"] == pytest.approx(0.875) and decision["val_dsc_off"] == pytest.approx(0.625)
    assert decision["healthy_cases"] == 2 and decision["healthy_fp_off"] == 1 and decision["healthy_fp"] == 0
    assert decision["setting"] == "mean_probability:0.85"
    pooled = cv.summarize(folds)["pooled"]
    assert pooled["healthy_cases"] == 2 and pooled["healthy_false_positives"] == 1  # fold 0's 2 ml on an empty reference
    text = cv.format_summary(cv.summarize(folds), "x")
    assert "--model.inference.healthy_decision mean_probability:0.85" in text
    assert "Healthy scans (empty reference): 2, with a false positive: 1" in text
    folds[1]["postprocessing"]["healthy_decision"]["validation_rows"]["rows"] = []  # a fold without cases: the rest
    assert cv.summarize(folds)["postprocessing"]["healthy_decision"]["healthy_cases"] == 1
    del folds[1]["postprocessing"]["healthy_decision"]  # a checkpoint written before the rows were kept
    assert cv.summarize(folds)["postprocessing"]["healthy_decision"] is None


def _with_component_columns(rows: dict, dsc_by_threshold) -> dict:
    """``_rows`` with the component rule's columns: per block (every component, the largest) and candidate, the
    case's DSC at each threshold from ``dsc_by_threshold(case index, threshold)``."""
    g = len(THRESHOLDS)
    out = [r + [dsc_by_threshold(i, t) for _ in range(4) for t in THRESHOLDS] for i, r in enumerate(rows["rows"])]
    assert all(len(r) == 9 + 4 * g for r in out)
    return {**rows, "component_thresholds": list(THRESHOLDS), "rows": out}


def test_pooled_rows_choose_the_component_rule_and_fall_back_when_a_fold_predates_it(capsys):
    # fold 0's lesion case has a 0.6 look-alike beside its 0.97 lesion: the component rule above 0.6 lifts it from
    # 0.8 to 1.0 and empties the healthy scan's 0.75 false positive above 0.75; fold 1 as before
    folds = [_fold(0, [(0.0, 0.0, 0.0, 2.0), (0.8, 0.7, 10.0, 9.0)], {"0.0": 0.4, "1.0": 0.4},
                   {"0.0": 0.4, "1.0": 0.4}, 100.0),
             _fold(1, [(1.0, 1.0, 0.0, 0.0), (0.7, 0.6, 5.0, 5.0)], {"0.0": 0.85, "1.0": 0.85},
                   {"0.0": 0.85, "1.0": 0.85}, 100.0)]
    fold0 = [lambda t: 0.0 if t <= 0.75 else 1.0, lambda t: 0.8 if t <= 0.6 else (1.0 if t <= 0.97 else 0.0)]
    fold1 = [lambda t: 1.0, lambda t: 0.7 if t <= 0.95 else 0.0]
    folds[0]["postprocessing"]["healthy_decision"] = {"validation_rows": _with_component_columns(
        _rows((1, 2.0, 0.75, 0.0), (0, 10.0, 0.97, 0.8)), lambda i, t: fold0[i](t))}
    folds[1]["postprocessing"]["healthy_decision"] = {"validation_rows": _with_component_columns(
        _rows((1, 0.0, 0.0, 1.0), (0, 5.0, 0.95, 0.7)), lambda i, t: fold1[i](t))}
    decision = cv.summarize(folds)["postprocessing"]["healthy_decision"]
    # (1 + 1 + 1 + 0.7) / 4 = 0.925 from 0.76 up to 0.95, against the scan-level rule's 0.875
    assert decision["feature"] == "component_probability" and decision["component_probability"] == pytest.approx(0.76)
    assert decision["val_dsc"] == pytest.approx(0.925) and decision["setting"] == "component_probability:0.76"
    folds[1]["postprocessing"]["healthy_decision"] = {"validation_rows": _rows((1, 0.0, 0.0, 1.0), (0, 5.0, 0.95, 0.7))}
    decision = cv.summarize(folds)["postprocessing"]["healthy_decision"]  # fold 1 validated before the rule
    assert decision["feature"] == "mean_probability" and decision["val_dsc"] == pytest.approx(0.875)
    assert "scan-level rules only" in capsys.readouterr().out


def test_one_fold_end_to_end(tiny_dataset, tmp_path, capsys):
    """fit + test of fold 1 (in this process: cli.main instead of a fresh python): the fold's validation cases
    scored, the table printed, the JSON."""
    args = tiny_cli_args(tiny_dataset, tmp_path / "cache", tmp_path / "unused")
    keep = {"--data.data_dir", "--data.cache_dir", "--data.patch_size", "--data.target_spacing",
            "--data.iterations_per_epoch", "--data.num_workers", "--trainer.logger", "--trainer.enable_progress_bar"}
    raw = [*TINY_NET, *[v for i in range(0, len(args) - 1) if args[i] in keep for v in args[i:i + 2]]]
    raw += ["--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1", "--model.inference.tta", "false"]
    assert cv.main(["--config", str(ROOT / "configs" / "demo.yaml"), "--name", "tiny", "--folds", "1",
                    "--out", str(tmp_path / "cv"), *raw], run=lambda command: cli.main(list(command[2:]))) == 0
    root = tmp_path / "cv" / "tiny"
    summary = json.loads((root / "cv_summary.json").read_text())
    dataset = load_raw_dataset(tiny_dataset)
    _, val = select_fold(dataset, dataset.cases("Tr"), 1)
    assert [c["case"] for c in summary["cases"]["1"]] == [c.case_id for c in val]  # not imagesTs
    (row,) = summary["folds"]
    assert row["iterations"] == 2 and row["fit_s"] > 0 and row["precision"] in ("32-true", "bf16-mixed")
    assert summary["postprocessing"] is not None and summary["pooled"]["cases"] == len(val)
    assert "| CV" in capsys.readouterr().out
    timing = json.loads((root / "fold_1" / "fit_time.json").read_text())
    assert timing["iterations"] == 2 and timing["cpu"]


def test_test_split_options(tiny_dataset):
    with pytest.raises(ValueError, match="test_split must be 'auto', 'test' or 'val', got 'train'"):
        FlareDataModule(data_dir=str(tiny_dataset), test_split="train")
    with pytest.raises(ValueError, match="test_split 'val' with fold 'all'"):
        FlareDataModule(data_dir=str(tiny_dataset), fold="all", test_split="val")


def test_fold_all_through_the_cli(tiny_dataset, tmp_path, caplog):
    """data.fold all trains on every case; the final model's recipe skips validation (limit_val_batches 0): no
    'auto' postprocessing chosen on training cases. Validating on 'all' warns that it measures the fit."""
    args = tiny_cli_args(tiny_dataset, tmp_path / "cache", tmp_path / "out")
    result = cli.main(["fit", *args, "--data.fold", "all", "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0"])
    dm = result.datamodule
    assert dm.fold == "all" and len(dm._fold_cases()[0]) == len(dm.dataset.cases("Tr")) == 6
    checkpoint = torch.load(tmp_path / "out" / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2 and "postprocessing" not in checkpoint
    with caplog.at_level(logging.WARNING, logger="lightning_flare.datamodule"):
        dm.val_dataloader()
    assert "fold 'all': the validation cases are the training cases" in caplog.text


def test_fit_timer_leaves_out_the_warmup_iterations(tmp_path):
    from types import SimpleNamespace

    from lightning_flare.fit_timer import FitTimer

    timer = FitTimer(path="t.json", warmup=2)
    timer.on_fit_start(None, None)
    timer.times = [5.0, 3.0, 1.0, 2.0]  # two slow first iterations (oneDNN primitive creation)
    timer.epochs = [0, 0, 1, 1]
    trainer = SimpleNamespace(precision="32-true", is_global_zero=True, default_root_dir=str(tmp_path))
    timer.on_fit_end(trainer, None)
    record = json.loads((tmp_path / "t.json").read_text())
    assert record["seconds_per_iteration"] == 1.5 and record["iteration_s"] == 11.0 and record["iterations"] == 4
    assert record["precision"] == "32-true" and record["fit_s"] >= 0
    assert record["epoch_seconds_per_iteration"] == {"0": 4.0, "1": 1.5}  # every iteration, warm-up included
    with pytest.raises(ValueError, match="warmup must be an integer >= 0, got -1"):
        FitTimer(warmup=-1)
