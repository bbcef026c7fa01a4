"""Checkpoints written by an earlier version (tests/data/checkpoints/README.md) still load for test and predict."""
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from conftest import tiny_cli_args

import cli
from lightning_flare.network import PlainConvUNet

OLD = Path(__file__).resolve().parent / "data" / "checkpoints" / "tiny_e5ca6fb.ckpt"


def _saved_net_weights() -> dict[str, torch.Tensor]:
    state = torch.load(OLD, map_location="cpu", weights_only=True)["state_dict"]
    return {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}


def _assert_loaded(module) -> None:
    assert isinstance(module.net, PlainConvUNet) and module.net.init_args["features_per_stage"] == [4, 8, 16, 32]
    loaded = module.net.state_dict()
    saved = _saved_net_weights()
    assert sorted(loaded) == sorted(saved)
    assert all(torch.equal(loaded[k].cpu(), v) for k, v in saved.items())
    assert module.plan.target_spacing == (4.0, 4.0, 5.0) and module.plan.patch_size == (16, 16, 16)


def test_old_checkpoint_tests(tiny_dataset, tmp_path, capsys):
    """healthy_decision auto: the checkpoint predates the decision, so none applies (masks as before)."""
    result = cli.main(["test", *tiny_cli_args(tiny_dataset, tmp_path / "cache", tmp_path), "--ckpt_path", str(OLD),
                       "--model.inference.healthy_decision", "auto"])
    _assert_loaded(result.model)
    metrics = result.trainer.callback_metrics
    assert 0 <= float(metrics["test/dsc"]) <= 1 and 0 <= float(metrics["test/nsd"]) <= 1
    cases = result.model.test_results["cases"]
    assert len(cases) == len(list((tiny_dataset / "imagesTs").glob("*.nii.gz")))
    assert "Healthy-scan decision: none (auto: no validation choice in the checkpoint)" in capsys.readouterr().out
    assert all(c["predicted_ml_components_only"] == c["predicted_ml"] and "decision_mass_ml" not in c for c in cases)


def test_old_checkpoint_predicts(tiny_dataset, tmp_path):
    args = tiny_cli_args(tiny_dataset, tmp_path / "cache", tmp_path)
    args[args.index("--data.data_dir") + 1] = str(tmp_path / "no_dataset")  # the checkpoint's plan is enough
    out = tmp_path / "masks"
    result = cli.main(["predict", *args, "--ckpt_path", str(OLD), "--data.predict_dir", str(tiny_dataset / "imagesTs"),
                       "--writer.output_dir", str(out)])
    _assert_loaded(result.model)
    images = sorted((tiny_dataset / "imagesTs").glob("*_0000.nii.gz"))
    assert [m.name for m in sorted(out.glob("*.nii.gz"))] == [i.name.replace("_0000", "") for i in images]
    for image_path in images:
        image = sitk.ReadImage(str(image_path))
        mask = sitk.ReadImage(str(out / image_path.name.replace("_0000", "")))
        assert mask.GetSize() == image.GetSize() and mask.GetSpacing() == image.GetSpacing()
        assert set(np.unique(sitk.GetArrayFromImage(mask))) <= {0, 1}


def test_old_checkpoint_exports(tmp_path):
    from lightning_flare.export import load_for_export

    net, plan, info = load_for_export(OLD)
    assert info["net_args_source"] == "checkpoint" and plan.patch_size == (16, 16, 16)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in _saved_net_weights().items())
