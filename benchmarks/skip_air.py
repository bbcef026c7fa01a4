"""Windows of air: the predictor's ``inference.skip_air`` modes against the whole window grid, with the same
trained checkpoint, on full-field-of-view CT. ``true`` keeps the whole grid's windows that touch the body's box
(inside the box the logits are the whole grid's bit for bit); ``box_grid`` lays a fresh grid over the box (fewer
windows, but they move). Prints, per scan and mode: windows run / of the grid, network seconds (side by side,
this run), Dice between the mode's mask and the whole grid's, tumour voxels of the whole-grid mask the mode lost
(all, and those outside the body box: beyond the margin), voxels it gained, and each mask's DSC against the
reference when there is one.

    .venv/bin/python benchmarks/skip_air.py [--ckpt runs/demo/checkpoints/last.ckpt] [--config configs/demo.yaml]
        [--modes true box_grid] [--quick]

Scans: the demo's synthetic test cases, the shared lung CT (512 x 512 x 48) and a synthetic whole-body scan with
arms down and a patient table (written by ``common.synthetic_ct``); ``--quick``: two demo test cases and a small
whole-body scan (256 x 256 x 48), for a smoke run. Project venv; no nnU-Net needed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SHARED_DATA, format_table, synthetic_ct, write_nifti  # noqa: E402
from lightning_flare.cpu_precision import cpu_model  # noqa: E402  (lscpu's Model name)

from lightning_flare.body_box import body_box, body_threshold  # noqa: E402
from lightning_flare.io import read_image, to_array  # noqa: E402
from lightning_flare.metrics.functional import dice  # noqa: E402
from lightning_flare.predict import load_predictor, settings_from  # noqa: E402
from lightning_flare.raw_dataset import Case  # noqa: E402
from lightning_flare.volumes import RawVolumes  # noqa: E402


def scans(work: Path, demo_data: Path, quick: bool) -> list[tuple[str, Path, Path | None]]:
    found = []
    for image in sorted((demo_data / "imagesTs").glob("*_0000.nii.gz"))[: 2 if quick else None]:
        found.append((image.name[:-12], image, demo_data / "labelsTs" / image.name.replace("_0000", "")))
    lung = SHARED_DATA / "Dataset002_LungCT"
    for image in [] if quick else sorted((lung / "imagesTs").glob("*_0000.nii.gz")):
        found.append((image.name[:-12], image, lung / "labelsTs" / image.name.replace("_0000", "")))
    shape = (256, 256, 48) if quick else (512, 512, 160)
    body = work / f"WHOLEBODY{shape[0]}_0000.nii.gz"
    if not body.exists():
        hu, label = synthetic_ct(shape, (0.9, 0.9, 3.0), seed=7, arms=True, table=True)
        write_nifti(hu, (0.9, 0.9, 3.0), body)
        write_nifti(label, (0.9, 0.9, 3.0), work / f"WHOLEBODY{shape[0]}.nii.gz")
    found.append((f"WHOLEBODY {shape[0]}x{shape[1]}x{shape[2]} (arms, table)", body, work / f"WHOLEBODY{shape[0]}.nii.gz"))
    return found


def capture_logits(predictor) -> list:
    """A list that receives the logits (on the plan's grid) of the predictor's next ``mask()``."""
    captured, logits = [], type(predictor).logits

    def capture(image, tta=None):
        captured.append(logits(predictor, image, tta))
        return captured[-1]

    predictor.logits = capture
    return captured


def outside_box(mask: np.ndarray, box) -> np.ndarray:
    """``mask`` (on the plan's grid) with the voxels inside ``box`` cleared."""
    out = mask.copy()
    if box is not None:
        out[box] = False
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(REPO / "runs" / "demo" / "checkpoints" / "last.ckpt"))
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    p.add_argument("--demo-data", default=str(REPO / "data" / "Dataset900_Synthetic"), help="the demo's dataset folder")
    p.add_argument("--set", action="append", default=["tta=false"], help="inference settings (default: tta=false)")
    p.add_argument("--modes", nargs="+", default=["true", "box_grid"], choices=["true", "box_grid"],
                   help="skip_air modes compared with the whole grid")
    p.add_argument("--quick", action="store_true", help="smoke run: two demo test cases, a 256 x 256 x 48 whole-body scan")
    p.add_argument("--work-dir", default=str(REPO / "cache" / "benchmarks" / "skip_air"))
    args = p.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_model()}; {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}")
    settings = settings_from(args.config, args.set)
    modes = {"whole grid": False, **{f"skip_air {m}": yaml.safe_load(m) for m in args.modes}}
    predictors = {name: load_predictor(args.ckpt, replace(settings, skip_air=mode), torch.device("cpu"))
                  for name, mode in modes.items()}
    whole = predictors["whole grid"]
    print(f"checkpoint {args.ckpt}; plan: spacing {whole.plan.target_spacing}, patch {whole.plan.patch_size}; "
          f"settings {settings}")
    rows = []
    for name, image_path, label_path in scans(work, Path(args.demo_data), args.quick):
        item = RawVolumes([Case(name, image_path)], whole.plan, with_labels=False)[0]
        size, spacing = item.geometry.size, item.geometry.spacing
        reference = to_array(read_image(label_path), np.uint8) > 0 if label_path and label_path.exists() else None
        box = body_box(item.image, body_threshold(whole.plan.intensity), whole.plan.target_spacing,
                       settings.body_margin_mm)
        masks, seconds, counts, grid = {}, {}, {}, {}
        for mode, predictor in predictors.items():
            logits = capture_logits(predictor)
            with torch.inference_mode():
                start = time.perf_counter()
                masks[mode] = predictor.mask(item.image, spacing, size) > 0
                seconds[mode] = time.perf_counter() - start
            grid[mode] = logits.pop().argmax(0).cpu().numpy() > 0  # the plan's grid: voxels outside the box
            counts[mode] = dict(predictor.counts)
        for mode in predictors:
            both = masks["whole grid"].any() or masks[mode].any()
            rows.append([name, mode, f"{counts[mode]['windows']}/{counts[mode]['windows_total']}", seconds[mode],
                         seconds[mode] / seconds["whole grid"],
                         float(dice(masks["whole grid"], masks[mode])) if both else 1.0,
                         int((masks["whole grid"] & ~masks[mode]).sum()),
                         int(outside_box(grid["whole grid"] & ~grid[mode], box).sum()),
                         int((masks[mode] & ~masks["whole grid"]).sum()),
                         float(dice(masks[mode], reference)) if reference is not None else float("nan")])
    print(format_table(["scan", "mode", "windows run/grid", "mask s", "/ whole", "Dice vs whole",
                        "tumour voxels lost", "lost outside box (plan grid)", "gained", "DSC vs reference"], rows,
                       title="skip_air modes vs the whole window grid (same checkpoint and settings; seconds: mask())"))
    print("goal (issue 14): Dice vs whole >= 0.999 and no tumour voxel lost beyond the margin (outside the box)")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
