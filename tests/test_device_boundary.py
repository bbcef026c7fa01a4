"""Host/device handling of the module's steps without a GPU: batches moved by Lightning's own transfer function
onto a stand-in accelerator (tests/standin_device.py), which refuses host conversions and device mixing as CUDA
does. ``test_cuda_*`` run the same on a real GPU (skipped without one; benchmarks/gpu_check.py runs them)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from standin_device import StandInDevice, on_device

from lightning_flare.datamodule import FlareDataModule
from lightning_flare.module import FlareSegmentationModule
from lightning_flare.predictor import InferenceSettings
from lightning_flare.network import PlainConvUNet
from lightning_flare.volumes import VolumeItem

HOST = torch.device("cpu")


@pytest.fixture(scope="module")
def items(tiny_dataset, tmp_path_factory):
    """One validation item (cached grid), one test item and one raw-HU test item (preprocess_on: device)."""
    cache = tmp_path_factory.mktemp("boundary_cache")
    dm = FlareDataModule(data_dir=str(tiny_dataset), cache_dir=str(cache), patch_size=(16, 16, 16),
                         target_spacing=(4.0, 4.0, 5.0), resampling="fast", num_workers=0, verify=False)
    dm.plan = dm.plan_from_data()
    val = next(iter(dm.val_dataloader()))
    test = next(iter(dm.test_dataloader()))
    dm.preprocess_on = "device"
    raw = next(iter(dm.test_dataloader()))
    assert not raw.preprocessed and int(test.label.sum()) > 0
    return dm.plan, val, test, raw


def make_module(plan, **kwargs) -> FlareSegmentationModule:
    torch.manual_seed(0)
    net = PlainConvUNet(in_channels=1, num_classes=2, features_per_stage=[4, 8, 16, 32], strides=[1, 2, 2, 2],
                        deep_supervision=True)
    # sw_channels_last false: what 'auto' means on an accelerator
    inference = InferenceSettings(sw_channels_last=False, autocast=False, **kwargs.pop("inference", {}))
    module = FlareSegmentationModule(net, inference=inference, **kwargs)
    module.plan = plan
    return module


def on_standin(module, batch):
    """``module`` and ``batch`` placed as Lightning places them (LightningModule.to, transfer_batch_to_device)."""
    module.to(HOST)
    return move_data_to_device(batch, HOST)


def copy(item: VolumeItem) -> VolumeItem:
    """The item with its own tensors and timings (the steps write into them)."""
    fresh = {}
    for field in dataclasses.fields(item):
        value = getattr(item, field.name)
        if isinstance(value, (torch.Tensor, dict)):
            fresh[field.name] = value.clone() if isinstance(value, torch.Tensor) else dict(value)
    return dataclasses.replace(item, **fresh)


def test_test_step_on_the_device_equals_the_host(items):
    plan, _, test, _ = items
    host = make_module(plan)
    host.test_step(copy(test), 0)
    device = make_module(plan)
    with StandInDevice():
        device.test_step(on_standin(device, copy(test)), 0)
    for module in (host, device):
        module.test_metrics.compute()
    assert [t.tolist() for t in device.test_metrics.per_case()] == [t.tolist() for t in host.test_metrics.per_case()]
    assert device.test_rows == host.test_rows


def test_validation_with_postprocessing_scores_prediction_and_label_on_one_side(items, monkeypatch):
    plan, val, _, _ = items
    module = make_module(plan, inference={"min_component_ml": 0.5})
    seen = []
    update = module.val_metrics.update

    def spy(pred, target, *args, **kwargs):
        seen.append((on_device(pred), on_device(target), type(pred), type(target)))
        return update(pred, target, *args, **kwargs)

    monkeypatch.setattr(module.val_metrics, "update", spy)
    with StandInDevice():
        out = module.validation_step(on_standin(module, copy(val)), 0)
    assert len(seen) == 1 and seen[0][0] == seen[0][1] and seen[0][2] is seen[0][3], seen
    assert out["prediction"].shape == val.label.shape
    host = make_module(plan, inference={"min_component_ml": 0.5})
    host.validation_step(copy(val), 0)
    assert float(module.val_metrics.compute()["dsc"]) == float(host.val_metrics.compute()["dsc"])


def test_pseudo_dice_on_the_device_equals_the_host(items):
    plan, val, _, _ = items
    host = make_module(plan, pseudo_val_patches=3)
    host._pseudo_dice_update(copy(val))
    device = make_module(plan, pseudo_val_patches=3)
    with StandInDevice():
        device._pseudo_dice_update(on_standin(device, copy(val)))
    assert device._pseudo_counts.cpu().tolist() == host._pseudo_counts.tolist() and float(host._pseudo_counts.sum()) > 0


@pytest.mark.parametrize("which", ["test", "raw"])
def test_predict_step_on_the_device_equals_the_host(items, which):
    plan, _, test, raw = items
    item = test if which == "test" else raw
    host = make_module(plan).predict_step(copy(item), 0)
    device = make_module(plan)
    with StandInDevice():
        out = device.predict_step(on_standin(device, copy(item)), 0)
    assert isinstance(out.mask, np.ndarray)
    np.testing.assert_array_equal(out.mask, host.mask)


DEVICES = ["standin", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_fit_validate_test_predict_through_lightning(device, tiny_dataset, tmp_path):
    """The CLI's stages with Lightning placing model and batches: on the stand-in device here, on a GPU where
    there is one. Fit: a pseudo-Dice epoch, then a full-volume one with component postprocessing; test with
    preprocessing on the device; predict with preprocessing in the loader."""
    import contextlib

    import cli
    from conftest import tiny_cli_args

    args = tiny_cli_args(tiny_dataset, tmp_path / "cache", tmp_path / "out")
    args += ["--data.resampling", "fast", "--data.anti_aliasing", "false", "--model.inference.sw_channels_last", "false"]
    if device == "cuda":
        args += ["--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.precision", "bf16-mixed"]
    else:
        args += ["--trainer.accelerator", "cpu"]
    ckpt = tmp_path / "out" / "ckpt" / "last.ckpt"
    with StandInDevice() if device == "standin" else contextlib.nullcontext():
        fit = cli.main(["fit", *args, "--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "1",
                        "--model.full_val_every_n_epochs", "2", "--model.inference.min_component_ml", "0.05"])
        test = cli.main(["test", *args, "--ckpt_path", str(ckpt), "--data.preprocess_on", "device"])
        out = tmp_path / "masks"
        cli.main(["predict", *args, "--ckpt_path", str(ckpt), "--data.predict_dir", str(tiny_dataset / "imagesTs"),
                  "--writer.output_dir", str(out)])
    metrics = fit.trainer.callback_metrics
    assert all(torch.isfinite(metrics[k]) for k in ("val/pseudo_dsc", "val/dsc", "val/nsd"))
    assert len(test.model.test_results["cases"]) == len(list((tiny_dataset / "imagesTs").glob("*.nii.gz")))
    import csv

    rows = [r for r in csv.DictReader(open(out / "efficiency.csv")) if r["case"] != "(start-up)"]
    assert len(rows) == len(test.model.test_results["cases"]) and all(float(r["transfer"]) >= 0 for r in rows)
    if device == "cuda":
        assert all(float(r["peak_gpu_mb"]) > 0 for r in rows)
