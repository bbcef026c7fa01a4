"""ONNX / TorchScript export: same logits as eager PyTorch, dynamic shapes, plan metadata, net-args sources."""
import json

import pytest
import torch
import yaml

from conftest import ROOT
from lightning_flare.export import ExportError, infer_net_kwargs, load_for_export, main, net_differences
from lightning_flare.network import PlainConvUNet
from lightning_flare.plan import IntensityStats, Plan

TINY = {"in_channels": 1, "num_classes": 2, "features_per_stage": [4, 8, 16], "kernel_sizes": [[3, 3, 1], 3, 3],
        "strides": [[1, 1, 1], [2, 2, 1], [2, 2, 2]], "n_conv_per_stage": 2, "n_conv_per_stage_decoder": [1, 2],
        "deep_supervision": True}
PLAN = Plan((2.0, 2.0, 3.0), (32, 32, 16), IntensityStats(-900.0, 619.0, -52.232, 268.799))


def _checkpoint(path, with_args=True, with_plan=True) -> PlainConvUNet:
    torch.manual_seed(0)
    net = PlainConvUNet(**TINY)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    checkpoint = {"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                  "hyper_parameters": {"lr": 1e-3}}
    if with_args:
        checkpoint["net_init_args"] = TINY
    if with_plan:
        checkpoint["plan"] = PLAN.to_dict()
    torch.save(checkpoint, path)
    net.deep_supervision = False
    return net.eval()


def test_onnx_and_torchscript_match_eager(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    ckpt = tmp_path / "model.ckpt"
    net = _checkpoint(ckpt)
    assert main(["--ckpt", str(ckpt), "--format", "onnx", "--output", str(tmp_path / "m.onnx")]) == 0
    assert main(["--ckpt", str(ckpt), "--format", "torchscript"]) == 0  # default output: model.pt
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(tmp_path / "model.pt"), map_location="cpu")
    for shape in [(1, 1, 16, 16, 16), (2, 1, 8, 24, 12)]:  # dynamic batch and spatial sizes
        x = torch.randn(shape)
        with torch.no_grad():
            expected = net(x)
            traced = scripted(x)
        (got,) = session.run(None, {"image": x.numpy()})
        assert expected.shape == (shape[0], 2, *shape[2:]) == got.shape == traced.shape
        assert abs(got - expected.numpy()).max() < 1e-3
        assert (traced - expected).abs().max() < 1e-3

    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert Plan.from_dict(json.loads(props["lightning_flare_plan"])) == PLAN
    model = json.loads(props["lightning_flare_model"])
    assert model["size_divisor"] == [4, 4, 2] and model["net_args_source"] == "checkpoint"
    extra = {"plan.json": "", "model.json": ""}
    torch.jit.load(str(tmp_path / "model.pt"), _extra_files=extra)
    assert Plan.from_dict(json.loads(extra["plan.json"])) == PLAN
    assert json.loads(extra["model.json"])["net_init_args"]["deep_supervision"] is False


def test_net_args_from_config_or_weights(tmp_path):
    ckpt = tmp_path / "bare.ckpt"
    _checkpoint(ckpt, with_args=False)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": {"net": {"class_path": "lightning_flare.network.PlainConvUNet",
                                                        "init_args": TINY}}}))
    _, _, info = load_for_export(ckpt, config)
    assert info["net_args_source"] == str(config)
    net, plan, info = load_for_export(ckpt)
    assert info["net_args_source"] == "inferred from the weight shapes" and plan == PLAN
    assert net_differences(info["net_init_args"], TINY) == []

    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump({"model": {"net": {"init_args": {**TINY, "features_per_stage": [8, 16, 32]}}}}))
    with pytest.raises(ExportError, match="weights do not fit.*wrong.yaml"):
        load_for_export(ckpt, wrong)
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"model": {"net": {"class_path": "monai.networks.nets.UNet"}}}))
    with pytest.raises(ExportError, match="monai.networks.nets.UNet"):
        load_for_export(ckpt, other)


def test_checkpoint_without_plan_is_refused(tmp_path, capsys):
    ckpt = tmp_path / "noplan.ckpt"
    _checkpoint(ckpt, with_plan=False)
    assert main(["--ckpt", str(ckpt), "--format", "onnx"]) == 1
    assert "no plan" in capsys.readouterr().err and not (tmp_path / "noplan.onnx").exists()


def test_infer_net_kwargs_default_net():
    kwargs = infer_net_kwargs(PlainConvUNet(features_per_stage=[4, 8, 16, 32]).state_dict())
    assert net_differences(kwargs, {"features_per_stage": [4, 8, 16, 32]}) == []


def test_network_args_of_a_shipped_config_come_through_the_base(tmp_path):
    """configs/*.yaml leave model.net to configs/base.yaml, as cli.py composes them; a config's own init_args
    update the base's."""
    from lightning_flare.checkpoint import net_kwargs_from_config
    from lightning_flare.network import count_parameters

    flare24 = net_kwargs_from_config(ROOT / "configs" / "flare24.yaml")
    assert count_parameters(PlainConvUNet(**flare24)) == 5_602_950
    own = tmp_path / "own.yaml"
    own.write_text("model:\n  net:\n    init_args:\n      features_per_stage: [4, 8, 16, 32]\n")
    assert net_kwargs_from_config(own) == {**flare24, "features_per_stage": [4, 8, 16, 32]}
