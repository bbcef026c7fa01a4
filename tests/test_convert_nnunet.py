"""nnU-Net v2 results folder -> Lightning checkpoint: axis handling, both plans styles, errors, CLI predict."""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from lightning_flare.convert_nnunet import ConversionError, choose_configuration, convert, main, net_kwargs_from_plans
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
                  "--trainer.accelerator", "cpu", "--writer.output_dir", str(out),
                  "--trainer.default_root_dir", str(tmp_path)])
    cli.main(["predict", "--config", str(ROOT / "configs" / "flare24.yaml"), "--ckpt_path", str(ckpt),
              "--data.predict_dir", str(images), "--data.num_workers", "0", "--writer.output_dir", str(out),
              "--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.precision", "32",
              "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--model.inference.autocast", "false",
              "--trainer.default_root_dir", str(tmp_path), *plan_args])
    mask = sitk.ReadImage(str(out / "CASE.nii.gz"))
    assert mask.GetSize() == image.GetSize()
    assert set(np.unique(sitk.GetArrayFromImage(mask))) <= {0, 1}


# ------------------------------------------------------------- the published FLARE24 results folder's structure
FLARE24 = Path(__file__).resolve().parent / "data" / "flare24_results"
FLARE24_CONFIGURATION = "3d_fullres_S4D2W32"
FLARE24_FOLDER = f"nnUNetTrainer_Epoch2000_Lr1e3__nnUNetPlans__{FLARE24_CONFIGURATION}"


def make_flare24_results(root: Path, init_configuration: str | None = FLARE24_CONFIGURATION,
                         with_dataset_json: bool = True) -> Path:
    """The FLARE24 plans.json / dataset.json / dataset_fingerprint.json copies and a fold_all checkpoint as
    nnU-Net writes it (init_args: configuration, fold, dataset_json with string labels), random weights."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet as Reference

    dataset = json.loads((FLARE24 / "dataset.json").read_text())
    root.mkdir(parents=True)
    names = ("plans.json", "dataset.json", "dataset_fingerprint.json") if with_dataset_json else ("plans.json",)
    for name in names:
        (root / name).write_bytes((FLARE24 / name).read_bytes())
    torch.manual_seed(0)
    net = Reference(1, 4, [32, 64, 128, 256], nn.Conv3d, [[3, 3, 3]] * 4, [[1, 1, 1]] + [[2, 2, 2]] * 3,
                    [2, 2, 2, 2], 2, [2, 2, 2], conv_bias=True, norm_op=nn.InstanceNorm3d,
                    norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                    nonlin_kwargs={"inplace": True}, deep_supervision=True)
    init_args = {"plans": json.loads((FLARE24 / "plans.json").read_text()), "fold": "all", "dataset_json": dataset}
    if init_configuration is not None:
        init_args["configuration"] = init_configuration
    (root / "fold_all").mkdir()
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer_Epoch2000_Lr1e3",
                "init_args": init_args, "current_epoch": 2000}, root / "fold_all" / "checkpoint_final.pth")
    return root


def _assert_flare24_network(checkpoint: dict) -> None:
    from lightning_flare.network import count_parameters

    net = PlainConvUNet(**checkpoint["net_init_args"])
    net.load_state_dict({k[len("net."):]: v for k, v in checkpoint["state_dict"].items()}, strict=True)
    assert count_parameters(net) == 5_602_950
    plan = Plan.from_dict(checkpoint["plan"])
    assert plan.target_spacing == (2.0, 2.0, 3.0) and plan.patch_size == (128, 128, 96)
    assert plan.labels == {"background": 0, "tumor": 1} and all(type(v) is int for v in plan.labels.values())
    assert (plan.intensity.clip_low, plan.intensity.clip_high) == (-900.0, 619.0)


def test_flare24_folder_converts_as_trained(tmp_path, capsys):
    """String labels and the configuration '3d_fullres_S4D2W32' come from the folder itself: no flag needed."""
    root = make_flare24_results(tmp_path / FLARE24_FOLDER)
    out = tmp_path / "model.ckpt"
    assert main([str(root), "--fold", "all", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"configuration '{FLARE24_CONFIGURATION}' (as trained: the checkpoint's init_args)" in printed
    checkpoint = torch.load(out, map_location="cpu", weights_only=True)
    _assert_flare24_network(checkpoint)
    assert checkpoint["nnunet"]["configuration"] == FLARE24_CONFIGURATION
    assert checkpoint["nnunet"]["trainer_name"] == "nnUNetTrainer_Epoch2000_Lr1e3"
    assert convert(root, configuration=FLARE24_CONFIGURATION)["net_init_args"] == checkpoint["net_init_args"]


def test_flare24_disagreeing_configuration_is_an_error(tmp_path, capsys):
    root = make_flare24_results(tmp_path / FLARE24_FOLDER)
    with pytest.raises(ConversionError, match=f"trained with configuration '{FLARE24_CONFIGURATION}', not '3d_fullres'"):
        convert(root, configuration="3d_fullres")
    assert main([str(root), "--configuration", "3d_fullres", "--output", str(tmp_path / "x.ckpt")]) == 1
    assert "checkpoint_final.pth: trained with configuration" in capsys.readouterr().err
    assert not (tmp_path / "x.ckpt").exists()


def test_configuration_from_folder_name_then_default(tmp_path):
    """No configuration in the checkpoint: the folder name's TRAINER__PLANS__CONFIGURATION, else 3d_fullres."""
    named = make_flare24_results(tmp_path / FLARE24_FOLDER, init_configuration=None)
    checkpoint = convert(named)
    assert checkpoint["nnunet"]["configuration"] == FLARE24_CONFIGURATION
    assert "folder name" in checkpoint["nnunet"]["configuration_source"]
    _assert_flare24_network(checkpoint)
    unnamed = make_flare24_results(tmp_path / "model", init_configuration=None)
    with pytest.raises(ConversionError, match="weights do not fit"):  # 3d_fullres: the 6-stage network
        convert(unnamed)
    assert net_kwargs_from_plans(json.loads((unnamed / "plans.json").read_text()), "3d_fullres")["strides"][-1] == [2, 2, 1]
    assert convert(unnamed, configuration=FLARE24_CONFIGURATION)["nnunet"]["configuration_source"] == "--configuration"
    known = ["3d_fullres", FLARE24_CONFIGURATION]
    choose = lambda requested, trained, folder: choose_configuration(requested, trained, tmp_path / folder,  # noqa: E731
                                                                     known=known, source="ckpt")[0]
    assert choose(None, None, "T__P__3d_lowres") == "3d_fullres"  # a suffix plans.json lacks is no configuration
    assert choose(None, None, f"T__P__{FLARE24_CONFIGURATION}") == FLARE24_CONFIGURATION
    assert choose(None, "3d_fullres", f"T__P__{FLARE24_CONFIGURATION}") == "3d_fullres"  # the checkpoint wins
    assert choose("3d_fullres", None, f"T__P__{FLARE24_CONFIGURATION}") == "3d_fullres"  # so does the user


def test_dataset_json_from_checkpoint_when_absent(tmp_path, capsys):
    """The published model folder holds plans.json and fold_all/ only; the checkpoint carries dataset.json."""
    root = make_flare24_results(tmp_path / FLARE24_FOLDER, with_dataset_json=False)
    out = tmp_path / "model.ckpt"
    assert main([str(root), "--output", str(out)]) == 0
    assert "init_args['dataset_json']" in capsys.readouterr().out
    _assert_flare24_network(torch.load(out, map_location="cpu", weights_only=True))


def test_unsupported_labels_name_dataset_json(tmp_path, capsys):
    root = make_flare24_results(tmp_path / FLARE24_FOLDER)
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": "0", "tumor": ["1", "2"]},
                                                   "channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}))
    assert main([str(root), "--output", str(tmp_path / "x.ckpt")]) == 1
    err = capsys.readouterr().err
    assert f"{root / 'dataset.json'}: label 'tumor' has the value ['1', '2']" in err and "region" in err


def test_cli_predict_flare24_yaml_without_flags(tmp_path, monkeypatch):
    """``cli.py predict --config configs/flare24.yaml --ckpt_path model.ckpt`` with only the input and output
    folders: the converted plan and network match the paper's YAML. One 128 x 128 x 96 window on the CPU."""
    import cli

    root = make_flare24_results(tmp_path / FLARE24_FOLDER)
    ckpt = tmp_path / "model.ckpt"
    assert main([str(root), "--output", str(ckpt)]) == 0
    images, out = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(-200, 300, (24, 50, 50)).astype(np.int16))
    image.SetSpacing((1.6, 1.6, 2.5))  # 40 x 40 x 20 voxels at 2 x 2 x 3 mm: one window
    image.SetOrigin((-40.0, 12.5, 300.0))
    sitk.WriteImage(image, str(images / "FLARE_0001_0000.nii.gz"))
    monkeypatch.chdir(tmp_path)  # the YAML's run folders (runs/flare24/...) are relative
    cli.main(["predict", "--config", str(ROOT / "configs" / "flare24.yaml"), "--ckpt_path", str(ckpt),
              "--data.predict_dir", str(images), "--writer.output_dir", str(out)])
    mask, image = sitk.ReadImage(str(out / "FLARE_0001.nii.gz")), sitk.ReadImage(str(images / "FLARE_0001_0000.nii.gz"))
    assert mask.GetSize() == image.GetSize() and mask.GetSpacing() == image.GetSpacing()
    assert mask.GetOrigin() == image.GetOrigin() and mask.GetDirection() == image.GetDirection()
    assert set(np.unique(sitk.GetArrayFromImage(mask))) <= {0, 1}
