"""Windows of air: the predictor with ``inference.skip_air`` (only windows touching the body's box) against the
whole window grid, with the same trained checkpoint, on full-field-of-view CT. Prints, per scan: windows run /
of the grid, network seconds of both (side by side, this run), Dice between the two masks, tumour voxels of the
whole-grid mask outside the box (lost), and each mask's DSC against the reference when there is one.

    .venv/bin/python benchmarks/skip_air.py [--ckpt runs/demo/checkpoints/last.ckpt] [--config configs/demo.yaml]

Scans: the demo's synthetic test cases, the shared lung CT (512 x 512 x 48) and a synthetic whole-body scan with
arms down and a patient table (written by ``common.synthetic_ct``). Project venv; no nnU-Net needed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SHARED_DATA, format_table, synthetic_ct, write_nifti  # noqa: E402
from lightning_flare.cpu_precision import cpu_model  # noqa: E402  (lscpu's Model name)

from lightning_flare.io import read_image, to_array  # noqa: E402
from lightning_flare.metrics.functional import dice  # noqa: E402
from lightning_flare.predict import load_predictor, settings_from  # noqa: E402
from lightning_flare.raw_dataset import Case  # noqa: E402
from lightning_flare.volumes import RawVolumes  # noqa: E402


def scans(work: Path) -> list[tuple[str, Path, Path | None]]:
    found = []
    synthetic = REPO / "data" / "Dataset900_Synthetic"
    for image in sorted((synthetic / "imagesTs").glob("*_0000.nii.gz")):
        found.append((image.name[:-12], image, synthetic / "labelsTs" / image.name.replace("_0000", "")))
    lung = SHARED_DATA / "Dataset002_LungCT"
    for image in sorted((lung / "imagesTs").glob("*_0000.nii.gz")):
        found.append((image.name[:-12], image, lung / "labelsTs" / image.name.replace("_0000", "")))
    body = work / "WHOLEBODY_0000.nii.gz"
    if not body.exists():
        hu, label = synthetic_ct((512, 512, 160), (0.9, 0.9, 3.0), seed=7, arms=True, table=True)
        write_nifti(hu, (0.9, 0.9, 3.0), body)
        write_nifti(label, (0.9, 0.9, 3.0), work / "WHOLEBODY.nii.gz")
    found.append(("WHOLEBODY (arms, table)", body, work / "WHOLEBODY.nii.gz"))
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(REPO / "runs" / "demo" / "checkpoints" / "last.ckpt"))
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    p.add_argument("--set", action="append", default=["tta=false"], help="inference settings (default: tta=false)")
    p.add_argument("--work-dir", default=str(REPO / "cache" / "benchmarks" / "skip_air"))
    args = p.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_model()}; {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}")
    settings = settings_from(args.config, args.set)
    whole = load_predictor(args.ckpt, replace(settings, skip_air=False), torch.device("cpu"))
    skipping = load_predictor(args.ckpt, replace(settings, skip_air=True), torch.device("cpu"))
    print(f"checkpoint {args.ckpt}; plan: spacing {whole.plan.target_spacing}, patch {whole.plan.patch_size}; "
          f"settings {settings}")
    rows = []
    for name, image_path, label_path in scans(work):
        item = RawVolumes([Case(name, image_path)], whole.plan, with_labels=False)[0]
        size, spacing = item.geometry.size, item.geometry.spacing
        masks, seconds = {}, {}
        for key, predictor in (("whole", whole), ("skip", skipping)):
            timings: dict[str, float] = {}
            with torch.inference_mode():
                start = time.perf_counter()
                masks[key] = predictor.mask(item.image, spacing, size, timings=timings)
                seconds[key] = time.perf_counter() - start
        counts = skipping.counts
        reference = to_array(read_image(label_path), np.uint8) if label_path and label_path.exists() else None
        outside = int(((masks["whole"] > 0) & (masks["skip"] == 0)).sum())
        agreement = dice(masks["whole"] > 0, masks["skip"] > 0) if masks["whole"].any() or masks["skip"].any() else 1.0
        rows.append([name, f"{counts['windows']}/{counts['windows_total']}", seconds["whole"], seconds["skip"],
                     seconds["skip"] / seconds["whole"], float(agreement), outside,
                     float(dice(masks["whole"] > 0, reference > 0)) if reference is not None else float("nan"),
                     float(dice(masks["skip"] > 0, reference > 0)) if reference is not None else float("nan")])
    print(format_table(["scan", "windows run/grid", "whole s", "skip_air s", "ratio", "Dice skip vs whole",
                        "tumour voxels lost", "DSC whole", "DSC skip"], rows,
                       title="skip_air vs the whole window grid (same checkpoint and settings; seconds: mask())"))
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
