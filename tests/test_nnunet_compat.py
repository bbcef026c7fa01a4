"""Our checkpoint -> nnU-Net v2 results folder -> our checkpoint: identical weights, plan and labels; the written
folder builds nnU-Net's own network with the same outputs."""
import itertools
import json
import os
import pydoc
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_flare.checkpoint import net_differences
from lightning_flare.convert_nnunet import ConversionError, convert, export_results_folder
from lightning_flare.network import PlainConvUNet
from lightning_flare.nnunet_compat import (architecture_from_net_kwargs, axis_map, inverse, net_kwargs_from_plans,
                                           reorder, weights_from_nnunet, weights_to_nnunet)
from lightning_flare.plan import IntensityStats, Plan

OLD = Path(__file__).resolve().parent / "data" / "checkpoints" / "tiny_e5ca6fb.ckpt"
# anisotropic on every axis, so that a wrong axis order cannot go unnoticed
NET = {"in_channels": 1, "num_classes": 3, "features_per_stage": [4, 8, 16, 24], "kernel_sizes": [[5, 3, 1], 3, [3, 3, 1], 3],
       "strides": [[1, 1, 1], [2, 2, 1], [2, 1, 2], [1, 2, 2]], "n_conv_per_stage": [1, 2, 2, 1],
       "n_conv_per_stage_decoder": [1, 2, 1], "deep_supervision": True, "norm_eps": 1e-4, "negative_slope": 0.02}
PLAN = Plan((0.8, 1.2, 3.0), (32, 24, 16), IntensityStats(-950.0, 600.0, -40.5, 250.25),
            {"background": 0, "liver": 1, "tumor": 2})


def _checkpoint(path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = PlainConvUNet(**NET)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    torch.save({"state_dict": {f"net.{k}": v for k, v in weights.items()}, "plan": PLAN.to_dict(),
                "net_init_args": NET, "fingerprint": {"case_ids": ["A", "B", "C"], "intensity": {
                    "max": 3000.0, "min": -1024.0, "median": -30.0, "mean": -40.5, "std": 250.25,
                    "percentile_00_5": -950.0, "percentile_99_5": 600.0}}}, path)
    return weights


def test_round_trip_gives_identical_weights_plan_and_labels(tmp_path):
    ckpt = tmp_path / "ours.ckpt"
    weights = _checkpoint(ckpt)
    folder = export_results_folder(ckpt, tmp_path / "Dataset990_RoundTrip" / "nnUNetTrainer__nnUNetPlans__3d_fullres",
                                   "Dataset990_RoundTrip")
    umask = os.umask(0)
    os.umask(umask)
    for name in ("plans.json", "dataset.json", "fold_all/checkpoint_final.pth"):  # atomic_write sets the mode
        assert (folder / name).stat().st_mode & 0o777 == 0o666 & ~umask
    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["labels"] == PLAN.labels and dataset["numTraining"] == 3
    plans = json.loads((folder / "plans.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    assert config["spacing"] == [3.0, 1.2, 0.8] and config["patch_size"] == [16, 24, 32]  # nnU-Net's (z, y, x)
    assert config["architecture"]["arch_kwargs"]["kernel_sizes"][0] == [1, 3, 5]
    assert plans["foreground_intensity_properties_per_channel"]["0"]["median"] == -30.0  # from the fingerprint
    nnunet = torch.load(folder / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert nnunet["init_args"]["configuration"] == "3d_fullres"

    back = convert(folder)
    assert back["nnunet"]["configuration_source"] == "as trained: the checkpoint's init_args"
    assert Plan.from_dict(back["plan"]) == PLAN
    assert net_differences(back["net_init_args"], NET) == []
    assert sorted(back["state_dict"]) == sorted(f"net.{k}" for k in weights)
    assert all(torch.equal(back["state_dict"][f"net.{k}"], v) for k, v in weights.items())


def test_written_folder_builds_nnunets_network(tmp_path):
    """plans.json's architecture, as nnU-Net instantiates it, takes the written weights and gives our logits."""
    pytest.importorskip("dynamic_network_architectures")
    from dynamic_network_architectures.architectures.unet import PlainConvUNet as Reference

    ckpt = tmp_path / "ours.ckpt"
    weights = _checkpoint(ckpt)
    folder = export_results_folder(ckpt, tmp_path / "results", "Dataset990_RoundTrip")
    arch = json.loads((folder / "plans.json").read_text())["configurations"]["3d_fullres"]["architecture"]
    kwargs = {k: pydoc.locate(v) if k in arch["_kw_requires_import"] and v else v
              for k, v in arch["arch_kwargs"].items()}
    reference = Reference(input_channels=1, num_classes=3, deep_supervision=False, **kwargs).eval()
    nnunet = torch.load(folder / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    reference.load_state_dict(nnunet["network_weights"], strict=True)
    ours = PlainConvUNet(**{**NET, "deep_supervision": False}).eval()
    ours.load_state_dict(weights, strict=True)
    x = torch.randn(1, 1, 16, 12, 8)  # (x, y, z), each divisible by its axis's stride product (4)
    with torch.no_grad():
        expected = ours(x)
        got = reference(x.permute(0, 1, 4, 3, 2)).permute(0, 1, 4, 3, 2)
    assert (expected - got).abs().max() < 1e-4


@pytest.mark.parametrize("transpose", list(itertools.permutations(range(3))))
def test_axis_mapping_inverts(transpose):
    """For every transpose_forward: nnU-Net -> ours -> nnU-Net is the identity (values, architecture, kernels)."""
    amap = axis_map({"transpose_forward": list(transpose)})
    assert reorder(reorder([10, 20, 30], amap), inverse(amap)) == [10, 20, 30]
    kernels, strides = [[1, 3, 5], [3, 5, 3]], [[1, 1, 1], [1, 2, 4]]
    plans = {"transpose_forward": list(transpose), "configurations": {"c": {"architecture": {
        "network_class_name": "PlainConvUNet",
        "arch_kwargs": {"n_stages": 2, "features_per_stage": [4, 8], "conv_op": "Conv3d", "kernel_sizes": kernels,
                        "strides": strides, "n_conv_per_stage": [2, 2], "n_conv_per_stage_decoder": [2],
                        "conv_bias": True, "norm_op": "InstanceNorm3d", "nonlin": "LeakyReLU"}}}}}
    arch = architecture_from_net_kwargs(net_kwargs_from_plans(plans, "c"), amap)["arch_kwargs"]
    assert arch["kernel_sizes"] == kernels and arch["strides"] == strides
    torch.manual_seed(0)
    nnunet = {"encoder.w": torch.randn(2, 3, 4, 5, 6), "bias": torch.randn(2)}
    ours = weights_from_nnunet({f"module.{k}": v for k, v in nnunet.items()}, amap)
    assert ours["encoder.w"].shape[2:] == tuple(nnunet["encoder.w"].shape[2 + i] for i in amap)
    back = weights_to_nnunet(ours, amap)
    assert all(torch.equal(back[k], v) for k, v in nnunet.items())


def test_plans_nnunet_cannot_reproduce_are_refused(tmp_path):
    """The old demo checkpoint low-passes before resampling (anti_aliasing): no nnU-Net folder, nothing written."""
    with pytest.raises(ConversionError, match="anti_aliasing True"):
        export_results_folder(OLD, tmp_path / "results")
    assert not (tmp_path / "results").exists()
