"""Windows of air: the predictor's ``inference.skip_air`` modes against the whole window grid, with the same
trained checkpoint, on full-field-of-view CT. ``true`` keeps the whole grid's windows that touch the body's box
(inside the box the logits are the whole grid's bit for bit); ``box_grid`` lays a fresh grid over the box (fewer
windows, but they move). Prints, per scan and mode: windows run / of the grid, network seconds (side by side,
this run), Dice between the mode's mask and the whole grid's, tumour voxels of the whole-grid mask the mode lost
(all, and those outside the body box: beyond the margin), the plan-grid voxels inside the box whose argmax differs
from the whole grid's (0 where the mode is exact there), voxels it gained, and each mask's DSC against the
reference when there is one.

    .venv/bin/python benchmarks/skip_air.py [--ckpt runs/demo/checkpoints/last.ckpt] [--config configs/demo.yaml]
        [--modes true box_grid] [--scans demo lung wholebody wholebody_air] [--air-mm 100] [--quick]

Scans: the demo's synthetic test cases, the shared lung CT (512 x 512 x 48) and a synthetic whole-body scan with
arms down and a patient table (written by ``common.synthetic_ct``); ``wholebody_air`` (not by default): that scan
with ``--air-mm`` of air on every side in x and y, a wider field of view; ``--quick``: two demo test cases and a small
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


def whole_body(work: Path, shape, air_mm: float = 0.0) -> tuple[str, Path, Path]:
    """The synthetic whole-body scan (arms down, a table), with ``air_mm`` of air added on every side in x and y
    (a wider field of view: windows of air that the whole grid's own windows can skip)."""
    spacing, pad = (0.9, 0.9, 3.0), int(round(air_mm / 0.9))
    tag = "WHOLEBODY" + "x".join(str(int(n)) for n in shape) + (f"AIR{pad}" if pad else "")  # one file per shape
    image, label = work / f"{tag}_0000.nii.gz", work / f"{tag}.nii.gz"
    if not image.exists():
        hu, mask = synthetic_ct(shape, spacing, seed=7, arms=True, table=True)
        around = ((pad, pad), (pad, pad), (0, 0))
        write_nifti(np.pad(hu, around, constant_values=-1000), spacing, image)
        write_nifti(np.pad(mask, around), spacing, label)
    size = "x".join(str(n) for n in (shape[0] + 2 * pad, shape[1] + 2 * pad, shape[2]))
    return f"WHOLEBODY {size} (arms, table{f', {air_mm:g} mm of air' if pad else ''})", image, label


def scans(work: Path, demo_data: Path, quick: bool, which: list[str], air_mm: float,
          shape=None) -> list[tuple[str, Path, Path | None]]:
    found = []
    for image in sorted((demo_data / "imagesTs").glob("*_0000.nii.gz"))[: 2 if quick else None] if "demo" in which else []:
        found.append((image.name[:-12], image, demo_data / "labelsTs" / image.name.replace("_0000", "")))
    lung = SHARED_DATA / "Dataset002_LungCT"
    for image in sorted((lung / "imagesTs").glob("*_0000.nii.gz")) if "lung" in which and not quick else []:
        found.append((image.name[:-12], image, lung / "labelsTs" / image.name.replace("_0000", "")))
    shape = shape or ((256, 256, 48) if quick else (512, 512, 160))
    if "wholebody" in which:
        found.append(whole_body(work, shape))
    if "wholebody_air" in which:
        found.append(whole_body(work, shape, air_mm))
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


def inside_box(mask: np.ndarray, box) -> np.ndarray:
    """The part of ``mask`` (on the plan's grid) inside ``box`` (all of it when there is no box)."""
    return mask[box] if box is not None else mask


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(REPO / "runs" / "demo" / "checkpoints" / "last.ckpt"))
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    p.add_argument("--demo-data", default=str(REPO / "data" / "Dataset900_Synthetic"), help="the demo's dataset folder")
    p.add_argument("--set", action="append", default=["tta=false"], help="inference settings (default: tta=false)")
    p.add_argument("--modes", nargs="+", default=["true", "box_grid"], choices=["true", "box_grid"],
                   help="skip_air modes compared with the whole grid")
    p.add_argument("--quick", action="store_true", help="smoke run: two demo test cases, a 256 x 256 x 48 whole-body scan")
    p.add_argument("--scans", nargs="+", default=["demo", "lung", "wholebody"],
                   choices=["demo", "lung", "wholebody", "wholebody_air"], help="which scans (wholebody_air: the "
                   "whole-body scan with --air-mm of air on every side in x and y: a wider field of view)")
    p.add_argument("--air-mm", type=float, default=100.0, help="air added around the wholebody_air scan")
    p.add_argument("--wholebody-shape", type=int, nargs=3, default=None,
                   help="the synthetic whole-body scan's voxels (default 512 512 160; --quick: 256 256 48)")
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
    header = ["scan", "mode", "windows run/grid", "mask s", "/ whole", "Dice vs whole", "tumour voxels lost",
              "lost outside box (plan grid)", "argmax differs inside box (plan grid)", "gained", "DSC vs reference"]
    for name, image_path, label_path in scans(work, Path(args.demo_data), args.quick, args.scans, args.air_mm,
                                                 args.wholebody_shape):
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
                         int(inside_box(grid["whole grid"] != grid[mode], box).sum()),
                         int((masks[mode] & ~masks["whole grid"]).sum()),
                         float(dice(masks[mode], reference)) if reference is not None else float("nan")])
            print(" | ".join(str(v) for v in rows[-1]), flush=True)  # as measured (the table follows at the end)
    print(format_table(header, rows,
                       title="skip_air modes vs the whole window grid (same checkpoint and settings; seconds: mask())"))
    print("goal (issue 14): Dice vs whole >= 0.999 and no tumour voxel lost beyond the margin (outside the box)")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
