"""`python -m lightning_flare.predict`: the FLARE submission path, without Lightning."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import ROOT, tiny_cli_args

import cli
from lightning_flare.predict import main, settings_from

CKPT = ROOT / "tests" / "data" / "checkpoints" / "tiny_e5ca6fb.ckpt"


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lightning_flare.predict", *map(str, args)], cwd=ROOT, text=True,
                          capture_output=True, timeout=300, env={**os.environ, **(env or {})})


def test_imports_no_lightning_torchmetrics_or_wandb():
    code = ("import sys, lightning_flare.predict; "
            "print([m for m in ('lightning', 'torchmetrics', 'wandb', 'jsonargparse', 'torchvision', 'scipy.spatial') "
            "if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, text=True, capture_output=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_writes_masks_on_the_inputs_grid_with_a_start_up_row(tiny_dataset, tmp_path):
    out = tmp_path / "outputs"
    result = _run("--ckpt", CKPT, "-i", tiny_dataset / "imagesTs", "-o", out, "--config", ROOT / "configs" / "demo.yaml")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"written": 2, "output": str(out)}
    for image_path in sorted((tiny_dataset / "imagesTs").glob("*_0000.nii.gz")):
        image, mask = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(out / image_path.name.replace("_0000", "")))
        assert mask.GetSize() == image.GetSize() and mask.GetOrigin() == image.GetOrigin()
        assert mask.GetDirection() == image.GetDirection() and set(np.unique(sitk.GetArrayFromImage(mask))) <= {0, 1}
    rows = list(csv.DictReader(open(out / "efficiency.csv")))
    assert rows[0]["case"] == "(start-up)" and float(rows[0]["total_s"]) > 0
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (tiny_dataset / "imagesTs").glob("*_0000.nii.gz"))
    assert sorted(r["case"] for r in rows[1:]) == cases and all(float(r["network"]) > 0 for r in rows[1:])


def test_same_masks_as_the_lightning_cli(tiny_dataset, tmp_path):
    """The same Predictor behind both: with the demo config's inference settings the masks are identical."""
    lean, lightning = tmp_path / "lean", tmp_path / "lightning"
    assert main(["--ckpt", str(CKPT), "-i", str(tiny_dataset / "imagesTs"), "-o", str(lean),
                 "--config", str(ROOT / "configs" / "demo.yaml")]) == 0
    args = tiny_cli_args(tiny_dataset, tmp_path / "cache", tmp_path)
    cli.main(["predict", *args, "--ckpt_path", str(CKPT), "--data.predict_dir", str(tiny_dataset / "imagesTs"),
              "--writer.output_dir", str(lightning)])
    names = sorted(p.name for p in lean.glob("*.nii.gz"))
    assert names and names == sorted(p.name for p in lightning.glob("*.nii.gz"))
    for name in names:
        a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(folder / name))) for folder in (lean, lightning))
        np.testing.assert_array_equal(a, b)


def test_a_broken_input_is_reported_after_the_others_are_written(tiny_dataset, tmp_path):
    images = tmp_path / "inputs"
    images.mkdir()
    good = sorted((tiny_dataset / "imagesTs").glob("*.nii.gz"))[0]
    (images / good.name).write_bytes(good.read_bytes())
    (images / "BROKEN_0000.nii.gz").write_bytes(b"not a NIfTI file")
    result = _run("--ckpt", CKPT, "-i", images, "-o", tmp_path / "outputs")
    assert result.returncode == 1 and "BROKEN_0000.nii.gz" in result.stderr
    assert (tmp_path / "outputs" / good.name.replace("_0000", "")).is_file()


def test_the_checkpoints_healthy_decision_applies_with_auto(tiny_dataset, tmp_path):
    """A checkpoint whose validation chose a (huge) healthy-scan threshold: --set healthy_decision=auto empties
    every mask; off (YAML's false) keeps them as before."""
    import torch

    checkpoint = torch.load(CKPT, map_location="cpu", weights_only=True)
    checkpoint["postprocessing"] = {**(checkpoint.get("postprocessing") or {}),
                                    "healthy_decision": {"mass_ml": 1e9, "after_min_component_ml": 0.0}}
    torch.save(checkpoint, tmp_path / "decided.ckpt")
    masks = {}
    for setting in ("auto", "off"):
        out = tmp_path / setting
        assert main(["--ckpt", str(tmp_path / "decided.ckpt"), "-i", str(tiny_dataset / "imagesTs"), "-o", str(out),
                     "--set", f"healthy_decision={setting}"]) == 0
        masks[setting] = [sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(out.glob("*.nii.gz"))]
    assert len(masks["off"]) == 2 and all(m.any() for m in masks["off"])  # the old model predicts tumour here
    assert len(masks["auto"]) == 2 and not any(m.any() for m in masks["auto"])


def test_settings_from_config_and_overrides(tmp_path):
    settings = settings_from(str(ROOT / "configs" / "demo.yaml"), ["tta=false", "sw_batch_size=2"])
    assert settings.tta is False and settings.sw_batch_size == 2 and settings.min_component_ml == "auto"
    assert settings.healthy_decision == "off"  # demo.yaml's `off`, which YAML reads as false
    with pytest.raises(ValueError, match="unknown inference settings"):
        settings_from(None, ["windows=3"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        settings_from(None, ["tta"])


def test_the_container_entry_script(tiny_dataset, tmp_path):
    """docker/predict.sh (the Dockerfile's CMD) with the folders and model moved through its environment."""
    out = tmp_path / "outputs"
    env = {**os.environ, "MODEL": str(CKPT), "INPUTS": str(tiny_dataset / "imagesTs"), "OUTPUTS": str(out),
           "CONFIG": str(ROOT / "configs" / "demo.yaml"), "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    result = subprocess.run(["sh", str(ROOT / "docker" / "predict.sh")], cwd=ROOT, env=env, text=True,
                            capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list(out.glob("*.nii.gz"))) == 2 and (out / "efficiency.csv").is_file()
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'CMD ["sh", "predict.sh"]' in dockerfile and "COPY docker/predict.sh ./predict.sh" in dockerfile
