"""nnU-Net v2 results folder -> Lightning checkpoint: axis handling, both plans styles, errors, CLI predict."""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from lightning_flare.convert_nnunet import ConversionError, convert, main, net_kwargs_from_plans
from lightning_flare.network import PlainConvUNet
from lightning_flare.plan import Plan

ROOT = Path(__file__).resolve().parents[1]
FEATURES = [4, 8, 16, 32]
KERNELS = [[1, 3, 5], [3, 3, 3], [3, 5, 3], [3, 3, 1]]  # nnU-Net (network) axis order
STRIDES = [[1, 1, 1], [1, 2, 2], [2, 2, 1], [2, 2, 2]]
NET_SHAPE = (8, 16, 12)  # divisible by the per-axis stride products (4, 8, 4)


def _configurations(style: str) -> dict:
    common = {"spacing": [3.0, 1.5, 1.0], "patch_size": [16, 32, 24], "normalization_schemes": ["CTNormalization"],
              "batch_size": 2}
    if style == "v2.2":
        arch = {"UNet_class_name": "PlainConvUNet", "UNet_base_num_features": 4, "unet_max_num_features": 32,
                "n_conv_per_stage_encoder": [2, 2, 2, 2], "n_conv_per_stage_decoder": [2, 2, 2],
                "pool_op_kernel_sizes": STRIDES, "conv_kernel_sizes": KERNELS}
    else:
        arch = {"architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": 4, "features_per_stage": FEATURES, "conv_op": "torch.nn.modules.conv.Conv3d",
                            "kernel_sizes": KERNELS, "strides": STRIDES, "n_conv_per_stage": [2, 2, 2, 2],
                            "n_conv_per_stage_decoder": [2, 2, 2], "conv_bias": True,
                            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}
    # "3d_fullres" inherits everything but the spacing from "base" (tests the merge)
    return {"base": {**common, **arch, "spacing": [9.0, 9.0, 9.0]},
            "3d_fullres": {"inherits_from": "base", "spacing": common["spacing"]}}


def _reference_net() -> nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet as Reference

    torch.manual_seed(0)
    net = Reference(1, 4, FEATURES, nn.Conv3d, KERNELS, STRIDES, [2, 2, 2, 2], 2, [2, 2, 2], conv_bias=True,
                    norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                    nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True)
    with torch.no_grad():  # non-trivial biases and norm affines, so that they are checked too
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net.eval()


def make_results(root: Path, style: str = "architecture", transpose=(0, 1, 2), fold: str = "all"):
    """A fake nnU-Net results folder with weights of the reference network, which is returned too."""
    plans = {"dataset_name": "Dataset999_Fake", "plans_name": "nnUNetPlans", "transpose_forward": list(transpose),
             "configurations": _configurations(style),
             "foreground_intensity_properties_per_channel": {"0": {
                 "max": 3000.0, "mean": -52.232, "median": -40.0, "min": -1024.0, "percentile_00_5": -900.0,
                 "percentile_99_5": 619.0, "std": 268.799}}}
    dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "tumor": 1}, "numTraining": 2,
               "file_ending": ".nii.gz"}
    root.mkdir(parents=True, exist_ok=True)
    (root / "plans.json").write_text(json.dumps(plans))
    (root / "dataset.json").write_text(json.dumps(dataset))
    net = _reference_net()
    (root / f"fold_{fold}").mkdir()
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer",
                "init_args": {"configuration": "3d_fullres", "fold": fold}},
               root / f"fold_{fold}" / "checkpoint_final.pth")
    return root, net


@pytest.mark.parametrize("style,transpose", [("architecture", (0, 1, 2)), ("v2.2", (0, 1, 2)),
                                             ("architecture", (2, 0, 1))])
def test_converted_weights_match_nnunet(tmp_path, style, transpose):
    root, reference = make_results(tmp_path / "results", style, transpose)
    checkpoint = convert(root, fold="all", configuration="3d_fullres")
    plans = json.loads((root / "plans.json").read_text())
    kwargs = net_kwargs_from_plans(plans, "3d_fullres", json.loads((root / "dataset.json").read_text()))
    assert kwargs == checkpoint["net_init_args"] == checkpoint["hyper_parameters"]["net"]["init_args"]
    assert kwargs["features_per_stage"] == FEATURES
    ours = PlainConvUNet(**kwargs).eval()
    ours.load_state_dict({k[4:]: v for k, v in checkpoint["state_dict"].items()}, strict=True)

    shape = [0, 0, 0]  # original (z, y, x) shape whose network-order view is NET_SHAPE
    for i, t in enumerate(transpose):
        shape[t] = NET_SHAPE[i]
    x = torch.randn(2, 1, *shape)
    back = [0, 1] + [2 + transpose.index(a) for a in range(3)]  # network order -> original order
    with torch.no_grad():
        expected = reference(x.permute(0, 1, *[2 + t for t in transpose]))
        got = ours(x.permute(0, 1, 4, 3, 2))
    assert len(expected) == len(got) == 3
    for e, g in zip(expected, got):
        e, g = e.permute(*back), g.permute(0, 1, 4, 3, 2)
        assert e.shape == g.shape
        assert (e - g).abs().max() < 1e-4

    plan = Plan.from_dict(checkpoint["plan"])
    if transpose == (0, 1, 2):  # spacing / patch (z, y, x) -> (x, y, z); kernels reversed too
        assert plan.target_spacing == (1.0, 1.5, 3.0) and plan.patch_size == (24, 32, 16)
        assert kwargs["kernel_sizes"][0] == [5, 3, 1] and kwargs["strides"][2] == [1, 2, 2]
    else:  # network axes (x, z, y)
        assert plan.target_spacing == (3.0, 1.0, 1.5) and plan.patch_size == (16, 24, 32)
    assert (plan.intensity.clip_low, plan.intensity.clip_high) == (-900.0, 619.0)
    assert plan.labels == {"background": 0, "tumor": 1}
    assert checkpoint["epoch"] == 0 and checkpoint["global_step"] == 0
    assert checkpoint["nnunet"]["configuration"] == "3d_fullres"


def test_unsupported_class_and_missing_fold(tmp_path):
    root, _ = make_results(tmp_path / "results", "v2.2")
    with pytest.raises(ConversionError, match="fold_3.*folds present: \\['fold_all'\\]"):
        convert(root, fold="3")
    plans = json.loads((root / "plans.json").read_text())
    plans["configurations"]["base"]["UNet_class_name"] = "ResidualEncoderUNet"
    (root / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ConversionError, match="ResidualEncoderUNet"):
        convert(root)
    with pytest.raises(ConversionError, match="'2d' not found"):
        convert(root, configuration="2d")


def test_unsupported_normalisation_and_norm_op(tmp_path):
    root, _ = make_results(tmp_path / "results")
    plans = json.loads((root / "plans.json").read_text())
    plans["configurations"]["base"]["architecture"]["arch_kwargs"]["norm_op"] = "torch.nn.BatchNorm3d"
    (root / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ConversionError, match="BatchNorm3d"):
        convert(root)
    plans["configurations"]["3d_fullres"]["normalization_schemes"] = ["ZScoreNormalization"]
    plans["configurations"]["base"]["architecture"]["arch_kwargs"]["norm_op"] = "torch.nn.InstanceNorm3d"
    (root / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ConversionError, match="ZScoreNormalization"):
        convert(root)


def test_module_loads_converted_checkpoint(tmp_path, capsys):
    from lightning_flare.module import FlareSegmentationModule

    root, _ = make_results(tmp_path / "results", fold="0")
    out = tmp_path / "model.ckpt"
    assert main([str(root), "--fold", "0", "--output", str(out)]) == 0
    assert "features_per_stage" in capsys.readouterr().out
    checkpoint = torch.load(out, map_location="cpu", weights_only=True)  # what LightningCLI does
    module = FlareSegmentationModule(net=PlainConvUNet(**checkpoint["net_init_args"]))
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    module.on_load_checkpoint(checkpoint)
    assert module.plan == Plan.from_dict(checkpoint["plan"])
    assert main([str(root), "--fold", "1", "--output", str(tmp_path / "x.ckpt")]) == 1
    assert "fold_1" in capsys.readouterr().err and not (tmp_path / "x.ckpt").exists()


def test_cli_predict_with_converted_checkpoint(tmp_path):
    """The checkpoint's hyper_parameters carry model.net: predict works with the paper's YAML (other net)."""
    import cli

    root, _ = make_results(tmp_path / "results")
    ckpt = tmp_path / "model.ckpt"
    assert main([str(root), "--output", str(ckpt)]) == 0
    images = tmp_path / "images"
    images.mkdir()
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(0, 200, (10, 20, 18)).astype(np.int16))
    image.SetSpacing((1.2, 1.4, 2.5))
    sitk.WriteImage(image, str(images / "CASE_0000.nii.gz"))
    out = tmp_path / "masks"
    # the converted plan (printed by the converter) must agree with the YAML: pass its spacing and window
    plan = torch.load(ckpt, map_location="cpu", weights_only=False)["plan"]
    plan_args = ["--data.target_spacing", str(list(plan["target_spacing"])), "--data.patch_size", str(list(plan["patch_size"]))]
    with pytest.raises(ValueError, match="data.target_spacing: checkpoint"):  # the paper's YAML alone disagrees
        cli.main(["predict", "--config", str(ROOT / "configs" / "flare24.yaml"), "--ckpt_path", str(ckpt),
                  "--data.predict_dir", str(images), "--trainer.logger", "false", "--trainer.callbacks", "[]",
                  "--trainer.accelerator", "cpu", "--writer.output_dir", str(out)])
    cli.main(["predict", "--config", str(ROOT / "configs" / "flare24.yaml"), "--ckpt_path", str(ckpt),
              "--data.predict_dir", str(images), "--data.num_workers", "0", "--writer.output_dir", str(out),
              "--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.precision", "32",
              "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--model.autocast", "false",
              "--trainer.default_root_dir", str(tmp_path), *plan_args])
    mask = sitk.ReadImage(str(out / "CASE.nii.gz"))
    assert mask.GetSize() == image.GetSize()
    assert set(np.unique(sitk.GetArrayFromImage(mask))) <= {0, 1}
