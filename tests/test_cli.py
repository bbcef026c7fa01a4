"""One smoke run per CLI subcommand on a tiny synthetic dataset, plus geometry and plan checks."""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import ROOT, tiny_cli_args

import cli
from lightning_flare.checkpoint import network_spec
from lightning_flare.healthy_choice import row_width


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    """A 1-epoch fit (2 iterations) that leaves a checkpoint."""
    out = tmp_path_factory.mktemp("run")
    args = tiny_cli_args(tiny_dataset, out / "cache", out)
    result = cli.main(["fit", *args, "--trainer.max_epochs", "3", "--trainer.check_val_every_n_epoch", "1",
                       "--model.full_val_every_n_epochs", "2"])
    ckpt = out / "ckpt" / "last.ckpt"
    assert ckpt.is_file()
    return args, ckpt, out, result


def test_fit_fast_dev_run(tiny_dataset, tmp_path):
    args = tiny_cli_args(tiny_dataset, tmp_path / "cache", tmp_path)
    result = cli.main(["fit", *args, "--trainer.fast_dev_run", "2"])
    assert result.trainer.state.finished
    assert result.trainer.global_step == 2


def test_fit_saves_plan_and_metrics(trained):
    args, ckpt, out, result = trained
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    plan = checkpoint["plan"]
    assert plan["target_spacing"] == [4.0, 4.0, 5.0] and plan["patch_size"] == [16, 16, 16]
    assert plan["labels"] == {"background": 0, "tumor": 1}
    fingerprint = checkpoint["fingerprint"]  # the dataset fingerprint travels with the model
    assert plan["intensity"]["mean"] == fingerprint["intensity"]["mean"] and len(fingerprint["spacings"]) == 6
    metrics = result.trainer.callback_metrics
    # epochs 1 and 2 (the last) score whole volumes; epoch 0 scores patches (pseudo Dice)
    for key in ("train/loss_epoch", "val/dsc", "val/nsd", "val/pseudo_dsc"):
        assert key in metrics and torch.isfinite(metrics[key])
    assert checkpoint["epoch"] == 2 and checkpoint["global_step"] == 6


def test_validate_fast_dev_run(trained):
    args, ckpt, _, _ = trained
    result = cli.main(["validate", *args, "--ckpt_path", str(ckpt), "--trainer.fast_dev_run", "1"])
    assert "val/dsc" in result.trainer.callback_metrics


def test_validate_chooses_the_postprocessing_again_into_a_new_checkpoint(trained, tmp_path):
    """``validate`` always scores whole volumes (whatever ``full_val_every_n_epochs``), and the callback writes the
    model with that validation's choice: the weights unchanged, the rows of the current decision."""
    args, ckpt, _, _ = trained
    out = tmp_path / "revalidated.ckpt"
    callback = {"class_path": "lightning_flare.validation_choice.ValidationChoiceCheckpoint", "init_args": {"path": str(out)}}
    cli.main(["validate", *args, "--ckpt_path", str(ckpt), "--model.full_val_every_n_epochs", "50",
              "--trainer.callbacks+", json.dumps(callback)])
    old, new = torch.load(ckpt, map_location="cpu", weights_only=False), torch.load(out, map_location="cpu", weights_only=False)
    assert new["state_dict"].keys() == old["state_dict"].keys()
    assert all(torch.equal(new["state_dict"][k], v) for k, v in old["state_dict"].items())
    assert new["plan"] == old["plan"] and network_spec(new) == network_spec(old) is not None
    rows = new["postprocessing"]["healthy_decision"]["validation_rows"]
    assert len(rows["rows"]) == 2 and all(len(r) == row_width(len(rows["candidates_ml"])) for r in rows["rows"])
    # the rest is the old checkpoint's: its epoch (also the choice's), its training hyper-parameters (not the 50)
    assert new["epoch"] == old["epoch"] == new["postprocessing"]["epoch"] and new["global_step"] == old["global_step"]
    assert new["hyper_parameters"] == old["hyper_parameters"] and "optimizer_states" in new
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary file left
    with pytest.raises(ValueError, match="is the checkpoint being validated"):
        same = {**callback, "init_args": {"path": str(out)}}
        cli.main(["validate", *args, "--ckpt_path", str(out), "--trainer.callbacks+", json.dumps(same)])
    with pytest.raises(RuntimeError, match="made no postprocessing choice"):
        cli.main(["validate", *args, "--ckpt_path", str(ckpt), "--trainer.limit_val_batches", "0",
                  "--trainer.callbacks+", json.dumps({**callback, "init_args": {"path": str(tmp_path / "none.ckpt")}})])
    assert not (tmp_path / "none.ckpt").exists()


def test_test_reports_per_case(trained, tiny_dataset, capsys):
    args, ckpt, _, _ = trained
    result = cli.main(["test", *args, "--ckpt_path", str(ckpt)])
    metrics = result.trainer.callback_metrics
    assert 0 <= float(metrics["test/dsc"]) <= 1 and 0 <= float(metrics["test/nsd"]) <= 1
    cases = result.model.test_results["cases"]
    assert sorted(c["case"] for c in cases) == sorted(p.name[:-12] for p in (tiny_dataset / "imagesTs").glob("*_0000.nii.gz"))
    printed = capsys.readouterr().out
    assert "DSC: mean" in printed and "median" in printed
    report_dir = Path(result.model.test_results["report_dir"])
    csv_lines = (report_dir / "metrics_per_case.csv").read_text().splitlines()
    assert csv_lines[0].startswith("case,dsc,nsd,reference_ml,predicted_ml,healthy_false_positive")
    assert len(csv_lines) == 1 + len(cases)
    summary = json.loads((report_dir / "metrics_summary.json").read_text())
    assert summary["num_cases"] == len(cases)
    assert summary["dsc"]["mean"] == pytest.approx(float(metrics["test/dsc"]), abs=1e-6)


def test_test_reports_healthy_decision_and_lesion_scores(trained):
    """Full validation chose the healthy-scan decision (or said why not) after min_component_ml; a test run with a
    threshold that empties every scan reports the new keys, and small-component removal alone scores as a run
    without the decision."""
    from lightning_flare.report import HEADLINE_KEYS

    args, ckpt, _, _ = trained
    postprocessing = torch.load(ckpt, map_location="cpu", weights_only=True)["postprocessing"]
    record = postprocessing["healthy_decision"]
    assert record["reason"] in ("chosen", "no_healthy_cases", "no_lesion_cases", "no_gain")
    # demo.yaml: min_component_ml auto, largest_component false: the volume applied without the largest component
    from lightning_flare.predictor import InferenceSettings, chosen_min_component_ml

    applied = chosen_min_component_ml(InferenceSettings(min_component_ml="auto"), postprocessing)
    assert record["after_min_component_ml"] == applied
    if not postprocessing["largest_component_only"]:
        assert applied == postprocessing["min_component_ml"]
    assert (record["feature"] is None) == (record["reason"] != "chosen")
    assert record["feature"] is None or record[record["feature"]] is not None
    runs = {}
    for setting in ("off", "1e9"):
        result = cli.main(["test", *args, "--ckpt_path", str(ckpt), "--model.inference.healthy_decision", setting,
                           "--model.report_dir", str(ckpt.parent / f"report_{setting}")])
        summary = json.loads((ckpt.parent / f"report_{setting}" / "metrics_summary.json").read_text())
        assert set(HEADLINE_KEYS) <= set(summary) and "lesion_counts" in summary
        assert summary["healthy_decision"]["feature"] == (None if setting == "off" else "mass_ml")
        runs[setting] = (summary, result.model.test_results["cases"], result.trainer.callback_metrics)
    (off, off_cases, off_metrics), (emptied, emptied_cases, _) = runs["off"], runs["1e9"]
    assert off_metrics["test/dsc_lesion_cases"] == pytest.approx(off["dsc_lesion_cases"])
    assert off["healthy_fp_rate_components_only"] == off["healthy_fp_rate"]  # no decision: the same masks
    assert all(c["predicted_ml"] == 0 and c["components_predicted"] == 0 for c in emptied_cases)
    assert [c["predicted_ml_components_only"] for c in emptied_cases] == pytest.approx([c["predicted_ml"] for c in off_cases])
    assert emptied["dsc_lesion_cases_components_only"] == pytest.approx(off["dsc_lesion_cases"], abs=1e-6)
    assert emptied["lesion_counts"]["lesions_reference"] == off["lesion_counts"]["lesions_reference"] > 0
    assert emptied["lesion_recall"] == 0.0 and emptied["lesion_precision"] is None  # nothing predicted at all


def test_predict_writes_masks_on_the_input_grid(trained, tmp_path):
    """Non-identity direction and odd spacing: the mask has exactly the input's geometry, values 0/1."""
    args, ckpt, out, _ = trained
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    array = rng.normal(40, 30, (23, 17, 9)).astype(np.int16)  # SimpleITK array order (z, y, x)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.83, 1.37, 4.1))
    image.SetOrigin((-12.5, 33.0, 7.25))
    image.SetDirection((0, -1, 0, 1, 0, 0, 0, 0, 1))
    sitk.WriteImage(image, str(images / "ODD_0000.nii.gz"))
    sitk.WriteImage(image, str(images / "OTHER.nrrd"))
    out_dir = tmp_path / "masks"
    cli.main(["predict", *args, "--ckpt_path", str(ckpt), "--data.predict_dir", str(images), "--writer.output_dir", str(out_dir)])
    assert sorted(p.name for p in out_dir.glob("*.nii.gz")) == ["ODD.nii.gz", "OTHER.nii.gz"]
    mask = sitk.ReadImage(str(out_dir / "ODD.nii.gz"))
    assert mask.GetSize() == image.GetSize()
    np.testing.assert_allclose(mask.GetSpacing(), image.GetSpacing())
    np.testing.assert_allclose(mask.GetOrigin(), image.GetOrigin())
    np.testing.assert_allclose(mask.GetDirection(), image.GetDirection())
    assert mask.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayFromImage(mask))) <= {0, 1}


def test_predict_needs_only_the_checkpoint_plan(trained, tiny_dataset, tmp_path):
    """predict without a dataset: preprocessing comes from the plan stored in the checkpoint."""
    args, ckpt, _, _ = trained
    no_data = [a for a in args]
    no_data[no_data.index("--data.data_dir") + 1] = str(tmp_path / "does_not_exist")
    out_dir = tmp_path / "masks"
    cli.main(["predict", *no_data, "--ckpt_path", str(ckpt), "--data.predict_dir", str(tiny_dataset / "imagesTs"),
              "--writer.output_dir", str(out_dir)])
    assert len(list(out_dir.glob("*.nii.gz"))) == len(list((tiny_dataset / "imagesTs").glob("*.nii.gz")))


def test_predict_empty_folder_is_a_clear_error(trained, tmp_path):
    args, ckpt, _, _ = trained
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images found"):
        cli.main(["predict", *args, "--ckpt_path", str(ckpt), "--data.predict_dir", str(tmp_path / "empty")])


def test_fit_on_a_broken_dataset_lists_every_problem_before_training(tiny_dataset, tmp_path):
    import shutil

    from lightning_flare.raw_dataset import DatasetError

    broken = tmp_path / "Dataset902_Broken"
    shutil.copytree(tiny_dataset, broken)
    labels = sorted((broken / "labelsTr").glob("*.nii.gz"))
    labels[0].unlink()  # image without label
    bad = sitk.ReadImage(str(labels[1]))
    sitk.WriteImage(bad * 3, str(labels[1]))  # label value 3 is not in dataset.json
    args = tiny_cli_args(broken, tmp_path / "cache", tmp_path)
    with pytest.raises(DatasetError) as err:
        cli.main(["fit", *args, "--trainer.fast_dev_run", "1"])
    message = str(err.value)
    assert labels[0].name.replace(".nii.gz", "_0000.nii.gz") in message
    assert labels[1].name in message and "3" in message
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*/*.npy"))


def test_predict_skips_existing_reports_bad_cases_and_efficiency(trained, tiny_dataset, tmp_path):
    import shutil

    args, ckpt, _, _ = trained
    images = tmp_path / "images"
    shutil.copytree(tiny_dataset / "imagesTs", images)
    good = sorted(images.glob("*.nii.gz"))
    (images / "BROKEN_0000.nii.gz").write_bytes(b"this is not a NIfTI file")
    out_dir = tmp_path / "masks"
    run = ["predict", *args, "--ckpt_path", str(ckpt), "--data.predict_dir", str(images), "--writer.output_dir", str(out_dir)]
    with pytest.raises(RuntimeError, match="BROKEN_0000.nii.gz"):
        cli.main(run)
    # the bad case did not stop the others
    masks = sorted(out_dir.glob("*.nii.gz"))
    assert [m.name for m in masks] == [g.name.replace("_0000", "") for g in good]
    lines = (out_dir / "efficiency.csv").read_text().splitlines()
    assert lines[0] == "case,read,preprocess,transfer,network,postprocess,write,total_s,peak_rss_mb,peak_gpu_mb,gpu_memory_area_mb_s"
    assert len(lines) == 2 + len(good) and lines[1].startswith("(start-up),")  # then one row per case
    row = dict(zip(lines[0].split(","), lines[2].split(",")))
    assert float(row["network"]) > 0 and float(row["peak_rss_mb"]) > 0
    # a second run keeps existing masks and does no work for them; overwrite redoes them
    (images / "BROKEN_0000.nii.gz").unlink()
    mtimes = [m.stat().st_mtime_ns for m in masks]
    cli.main(run)
    assert [m.stat().st_mtime_ns for m in masks] == mtimes
    cli.main(run + ["--writer.overwrite", "true"])
    assert all(m.stat().st_mtime_ns != t for m, t in zip(masks, mtimes))


def test_predict_into_unwritable_folder_is_a_clear_error(trained, tiny_dataset, tmp_path):
    args, ckpt, _, _ = trained
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="output folder"):
        cli.main(["predict", *args, "--ckpt_path", str(ckpt), "--data.predict_dir", str(tiny_dataset / "imagesTs"),
                  "--writer.output_dir", str(blocker / "sub")])


def test_checkpoint_plan_mismatch_names_the_value(trained, tiny_dataset, tmp_path):
    args, ckpt, _, _ = trained
    with pytest.raises(ValueError, match=r"data.target_spacing: checkpoint \(4.0, 4.0, 5.0\) != config \(3.0, 3.0, 5.0\)"):
        cli.main(["predict", *args, "--ckpt_path", str(ckpt), "--data.predict_dir", str(tiny_dataset / "imagesTs"),
                  "--writer.output_dir", str(tmp_path / "m"), "--data.target_spacing", "[3.0, 3.0, 5.0]"])


@pytest.mark.parametrize("name, dataset", [("partial_demo", "Dataset903_SyntheticPartial"),
                                           ("healthy_demo", "Dataset905_SyntheticMimics")])
def test_layered_demo_configs_compose(name, dataset, tmp_path, monkeypatch):
    """Issue 16's demonstration configs, read after demo.yaml, name a synthetic dataset the generator accepts."""
    from lightning_flare.synthetic import synthetic_params

    monkeypatch.chdir(tmp_path)
    built = cli.main(["--config", str(ROOT / "configs" / "demo.yaml"), "--config", str(ROOT / "configs" / f"{name}.yaml")],
                     run=False)
    dm = built.datamodule
    assert dm.data_dir.name == dataset and dm.synthetic["name"] == dataset
    assert synthetic_params(**dm.synthetic)["name"] == dataset
    assert built.trainer.logger is None and built.trainer.default_root_dir == f"runs/{name}"
    assert built.model.inference.healthy_decision == "auto"


@pytest.mark.parametrize("name", ["demo", "flare24", "ibsi_cpu"])
def test_shipped_configs_compose_with_the_base(name, tmp_path, monkeypatch):
    """configs/base.yaml holds the shared trainer, logger, callbacks and network; each config adds its own."""
    monkeypatch.chdir(tmp_path)
    built = cli.main(["--config", str(ROOT / "configs" / f"{name}.yaml"), "--trainer.logger", "false"], run=False)
    trainer = built.trainer
    assert trainer.gradient_clip_val == 12 and trainer.gradient_clip_algorithm == "norm"
    assert type(trainer.strategy.checkpoint_io).__name__ == "AtomicCheckpointIO"
    checkpoints = [c for c in trainer.callbacks if type(c).__name__ == "RunCheckpoint"]
    assert [c.filename for c in checkpoints] == ["best-epoch{epoch:04d}", "last"]
    assert any(type(c).__name__ == "PreemptionCheckpoint" for c in trainer.callbacks)
    assert sum(p.numel() for p in built.model.net.parameters()) == 5_602_950
    assert trainer.default_root_dir == f"runs/{name}" and trainer.max_epochs > 1


def test_flare_console_script_is_the_cli():
    """`flare ...` (pyproject's [project.scripts]) and `python cli.py ...` run the same entry point."""
    from importlib.metadata import entry_points

    import lightning_flare.cli

    (script,) = entry_points(group="console_scripts", name="flare")
    assert script.load() is lightning_flare.cli.console_main is cli.console_main
    assert "console_main()" in (ROOT / "cli.py").read_text().split('if __name__ == "__main__":')[1]


def test_console_bad_input_is_one_error_line_per_case_without_traceback(trained, tmp_path, monkeypatch, capsys):
    args, ckpt, _, _ = trained
    images = tmp_path / "images"
    images.mkdir()
    (images / "BROKEN_0000.nii.gz").write_bytes(b"this is not a NIfTI file")
    monkeypatch.setattr("sys.argv", ["cli.py", "predict", *args, "--ckpt_path", str(ckpt), "--data.predict_dir",
                                     str(images), "--writer.output_dir", str(tmp_path / "masks")])
    with pytest.raises(SystemExit) as exit_info:
        cli.console_main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "error: 1 case(s) could not be predicted:\n  " in err and "BROKEN_0000.nii.gz: unreadable" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("faster, expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_cpu_configs_train_in_the_measured_precision_unless_told(monkeypatch, tmp_path, faster, expected):
    import lightning_flare.precision as precision

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(precision, "cpu_bf16_is_faster", lambda: faster)
    config = ["--config", str(ROOT / "configs" / "demo.yaml"), "--trainer.logger", "false", "--trainer.accelerator", "cpu"]
    assert cli.main(config, run=False).trainer.precision == expected
    told = cli.main([*config, "--trainer.precision", "bf16-mixed"], run=False).trainer  # an explicit value wins
    assert told.precision == "bf16-mixed" and type(told.strategy.checkpoint_io).__name__ == "AtomicCheckpointIO"
