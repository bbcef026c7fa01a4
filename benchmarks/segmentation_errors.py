"""Where a model's tumour masks go wrong: per validation case, predicted / reference volume, connected components,
false-positive volume and how much of it lies within 10 mm of the reference tumour (leakage into the neighbouring
tissue) or farther (separate components), the mean HU of false-positive / true-positive / missed voxels, and a PNG
per case (three axial slices through the reference tumour: reference green, prediction red, both yellow).

    .venv/bin/python benchmarks/segmentation_errors.py CKPT --data ../shared/data/Dataset001_IBSISTS --fold 0 \
        --out runs/errors [--set tta=true ...]

The model predicts with its checkpoint's inference settings (``--set`` as in ``python -m lightning_flare.predict``)
on the fold's validation cases, on the original grid (raw image and label files).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from PIL import Image
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_flare.cpu_precision import cpu_model  # noqa: E402
from lightning_flare.postprocessing import flare_dsc  # noqa: E402
from lightning_flare.predict import load_predictor, settings_from  # noqa: E402
from lightning_flare.raw_dataset import load_raw_dataset, select_fold  # noqa: E402
from lightning_flare.volumes import RawVolumes  # noqa: E402

NEAR_MM = 10.0


def case_errors(mask: np.ndarray, ref: np.ndarray, image: np.ndarray, spacing_zyx) -> dict:
    """The error figures of one case (arrays in SimpleITK's z, y, x order)."""
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    fp, fn, tp = mask & ~ref, ref & ~mask, mask & ref
    near = ndimage.distance_transform_edt(~ref, sampling=spacing_zyx) <= NEAR_MM if ref.any() else np.zeros_like(ref)
    labels, n = ndimage.label(mask, np.ones((3, 3, 3)))
    sizes = sorted((ndimage.sum(mask, labels, range(1, n + 1)) * voxel_ml).tolist(), reverse=True) if n else []

    def hu(region):
        return round(float(image[region].mean()), 1) if region.any() else None

    return {"dsc": round(flare_dsc(mask, ref), 4), "reference_ml": round(ref.sum() * voxel_ml, 1),
            "predicted_ml": round(mask.sum() * voxel_ml, 1), "ratio": round(mask.sum() / max(ref.sum(), 1), 3),
            "components": int(n), "largest_components_ml": [round(s, 1) for s in sizes[:4]],
            "false_positive_ml": round(fp.sum() * voxel_ml, 1), "missed_ml": round(fn.sum() * voxel_ml, 1),
            "false_positive_within_10mm": round(float((fp & near).sum() / max(fp.sum(), 1)), 3),
            "hu_false_positive": hu(fp), "hu_true_positive": hu(tp), "hu_missed": hu(fn)}


def slices_png(image: np.ndarray, ref: np.ndarray, mask: np.ndarray, spacing_zyx, path: Path) -> None:
    z = int(ndimage.center_of_mass(ref)[0]) if ref.any() else image.shape[0] // 2
    tiles = []
    for k in (max(z - 6, 0), z, min(z + 6, image.shape[0] - 1)):
        grey = np.clip((image[k] + 160.0) / 400.0, 0, 1)
        rgb = np.stack([grey] * 3, -1)
        r_edge = ref[k] & ~ndimage.binary_erosion(ref[k])
        p_edge = mask[k] & ~ndimage.binary_erosion(mask[k])
        rgb[r_edge], rgb[p_edge], rgb[r_edge & p_edge] = (0, 1, 0), (1, 0, 0), (1, 1, 0)
        tiles.append((rgb * 255).astype(np.uint8))
    picture = Image.fromarray(np.concatenate(tiles, 1))
    aspect = spacing_zyx[1] / spacing_zyx[2]
    picture.resize((picture.width * 2, int(picture.height * 2 * aspect))).save(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt")
    parser.add_argument("--data", default="../shared/data/Dataset001_IBSISTS")
    parser.add_argument("--fold", default="0")
    parser.add_argument("--out", default="runs/errors")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = load_raw_dataset(args.data)
    _, cases = select_fold(dataset, dataset.cases("Tr"), args.fold)
    predictor = load_predictor(args.ckpt, settings_from(None, args.set), torch.device("cpu"))
    volumes = RawVolumes(cases, predictor.plan, with_labels=False)
    print(f"CPU: {cpu_model()}; {args.ckpt} on fold {args.fold}'s {len(cases)} validation cases")
    rows = []
    with torch.inference_mode():
        for index, case in enumerate(cases):
            item = volumes[index]
            mask = np.asarray(predictor.mask(item.image, item.geometry.spacing, item.geometry.size))
            label_image = sitk.ReadImage(str(case.label))
            ref = sitk.GetArrayFromImage(label_image) > 0
            image = sitk.GetArrayFromImage(sitk.ReadImage(str(case.image))).astype(np.float32)
            mask = (np.transpose(mask, (2, 1, 0)) if mask.shape != ref.shape else mask) > 0  # ours: x, y, z
            spacing = tuple(float(s) for s in label_image.GetSpacing()[::-1])
            rows.append({"case": case.case_id, **case_errors(mask, ref, image, spacing)})
            slices_png(image, ref, mask, spacing, out / f"{case.case_id}.png")
            print(json.dumps(rows[-1]))
    ratios = [r["ratio"] for r in rows if r["reference_ml"] > 0]
    print(f"mean DSC {np.mean([r['dsc'] for r in rows]):.4f}; median predicted / reference volume "
          f"{np.median(ratios):.3f}; false positives within {NEAR_MM:g} mm of the tumour: "
          f"{np.mean([r['false_positive_within_10mm'] for r in rows]):.2f} (mean share)")
    (out / "errors.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
