"""Standalone FLARE24 scorer: any model's CASE masks against CASE labels, with the training code's metrics.

    python -m lightning_flare.evaluate --pred PRED_DIR --gt GT_DIR [--tolerance 2] [--out DIR] [--num-workers N]

Writes ``metrics_per_case.csv`` and ``metrics_summary.json`` (default: into PRED_DIR) and prints a
table in the form of the paper's Table 5. A label without a prediction scores DSC = NSD = 0, as in
FLARE; predictions without a label are ignored; both are listed. Exit status 2 on user errors.
"""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .io import Geometry, ImageReadError, read_image, to_array
from .metrics.functional import flare_case_scores
from .report import CSV_NAME, SUMMARY_NAME, build_summary, format_table, write_reports

EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")
GEOMETRY_TOLERANCE = 1e-3  # mm for spacing and origin, absolute for direction cosines


def case_files(folder: str | Path, role: str) -> dict[str, Path]:
    """``{case: path}`` of the image files in ``folder`` (hidden and other files are skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{role} folder {folder} does not exist or is not a folder")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        ext = next((e for e in EXTENSIONS if path.name.lower().endswith(e)), None)
        if ext is None or path.name.startswith(".") or not path.is_file():
            continue
        case = path.name[:-len(ext)]
        if case in found:
            raise ValueError(f"{role} case {case} has two files: {found[case].name} and {path.name}")
        found[case] = path
    return found


def read_geometry(path: Path) -> Geometry:
    """Grid of an image from its header only (no voxel data read)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        usable = reader.GetDimension() == 3 and reader.GetNumberOfComponents() == 1
    except RuntimeError:
        usable = False
    if not usable:
        read_image(path)  # raises ImageReadError with the precise problem
        raise ImageReadError(f"{path}: unreadable image header")
    return Geometry(tuple(reader.GetSize()), tuple(reader.GetSpacing()),
                    tuple(reader.GetOrigin()), tuple(reader.GetDirection()))


def geometry_differences(pred: Geometry, gt: Geometry, tolerance: float = GEOMETRY_TOLERANCE) -> list[str]:
    """What differs between a prediction's grid and its label's: exact size, the rest within ``tolerance``."""
    diffs = []
    if tuple(pred.size) != tuple(gt.size):
        diffs.append(f"size {tuple(pred.size)} vs {tuple(gt.size)}")
    for name in ("spacing", "origin", "direction"):
        a, b = np.asarray(getattr(pred, name), float), np.asarray(getattr(gt, name), float)
        if a.shape != b.shape or np.abs(a - b).max() > tolerance:
            diffs.append(f"{name} {tuple(round(float(v), 6) for v in a)} vs {tuple(round(float(v), 6) for v in b)}")
    return diffs


def score_case(case: str, pred_path: str | Path | None, gt_path: str | Path, tolerance_mm: float = 2.0) -> dict:
    """One per-case row; ``pred_path=None`` is a missing prediction (DSC = NSD = 0).

    NSD uses the label's spacing ((x, y, z), matching the (x, y, z) arrays); volumes are voxel
    counts of nonzero voxels times the label's voxel volume."""
    gt_image = read_image(gt_path)
    spacing = tuple(gt_image.GetSpacing())
    voxel_ml = float(np.prod(spacing)) / 1000.0
    gt = to_array(gt_image, dtype=None)
    reference_ml = int(np.count_nonzero(gt)) * voxel_ml
    if pred_path is None:
        return {"case": case, "dsc": 0.0, "nsd": 0.0, "reference_ml": reference_ml, "predicted_ml": 0.0,
                "healthy_false_positive": False, "missing": True}
    pred = to_array(read_image(pred_path), dtype=None)  # native dtype: values > 1 must stay visible
    dsc, nsd = flare_case_scores(pred, gt, spacing, tolerance_mm)
    predicted_ml = int(np.count_nonzero(pred)) * voxel_ml
    return {"case": case, "dsc": float(dsc), "nsd": float(nsd), "reference_ml": reference_ml,
            "predicted_ml": predicted_ml, "healthy_false_positive": reference_ml == 0 and predicted_ml > 0,
            "missing": False}


def _score_job(job: tuple) -> dict:
    return score_case(*job)


def match_cases(pred_dir: str | Path, gt_dir: str | Path) -> tuple[list[tuple[str, Path | None, Path]], list[str]]:
    """``([(case, pred path or None, label path)], extra prediction cases)``; fails on grid mismatches.

    Every matched pair's header is checked before any voxel is read; the error lists all
    mismatched cases."""
    labels = case_files(gt_dir, "ground-truth")
    if not labels:
        raise ValueError(f"no label files ({', '.join(EXTENSIONS)}) in {gt_dir}")
    preds = case_files(pred_dir, "prediction")
    pairs = [(case, preds.get(case), path) for case, path in labels.items()]
    mismatched = []
    for case, pred_path, gt_path in pairs:
        if pred_path is not None:
            diffs = geometry_differences(read_geometry(pred_path), read_geometry(gt_path))
            if diffs:
                mismatched.append(f"{case} ({'; '.join(diffs)})")
    if mismatched:
        raise ValueError(f"prediction grid differs from the label for {len(mismatched)} case(s): "
                         + ", ".join(mismatched))
    return pairs, sorted(set(preds) - set(labels))


def evaluate_folders(pred_dir: str | Path, gt_dir: str | Path, tolerance_mm: float = 2.0,
                     num_workers: int = 0) -> tuple[list[dict], dict]:
    """Score ``pred_dir/CASE.*`` against ``gt_dir/CASE.*`` under the FLARE24 rules.

    Returns ``(rows, summary)``: rows in case order with the report columns plus ``missing``;
    the summary of ``report.build_summary`` with ``missing_predictions`` and ``extra_predictions``.
    ``num_workers > 0`` scores cases in a process pool of that size. Nothing is written."""
    if not tolerance_mm >= 0:
        raise ValueError(f"tolerance must be >= 0 mm, got {tolerance_mm}")
    pairs, extra = match_cases(pred_dir, gt_dir)
    jobs = [(case, pred, gt, float(tolerance_mm)) for case, pred, gt in pairs]
    if num_workers > 0 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(num_workers, len(jobs))) as pool:
            rows = list(pool.map(_score_job, jobs))
    else:
        rows = [_score_job(job) for job in jobs]
    return rows, build_summary(rows, extra, tolerance_mm)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_flare.evaluate",
        description="Score CASE masks against CASE labels with the FLARE24 Task 1 rules (DSC, NSD).")
    parser.add_argument("--pred", required=True, type=Path, help="folder of predicted masks CASE.nii.gz")
    parser.add_argument("--gt", required=True, type=Path, help="folder of ground-truth labels CASE.nii.gz")
    parser.add_argument("--tolerance", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: PRED_DIR)")
    parser.add_argument("--num-workers", type=int, default=0, help="processes for scoring (default 0: in-process)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0, got {args.num_workers}")
        rows, summary = evaluate_folders(args.pred, args.gt, args.tolerance, args.num_workers)
        out = args.out if args.out is not None else args.pred
        write_reports(rows, out, summary["extra_predictions"], args.tolerance)
    except (ValueError, OSError) as err:
        message = " ".join(str(err).split())
        print(f"error: {message}", file=sys.stderr)
        return 2
    missing, extra = summary["missing_predictions"], summary["extra_predictions"]
    if missing:
        print(f"warning: {len(missing)} label(s) without a prediction, scored DSC = NSD = 0: "
              f"{', '.join(missing)}", file=sys.stderr)
    if extra:
        print(f"warning: {len(extra)} prediction(s) without a label, ignored: {', '.join(extra)}", file=sys.stderr)
    print(format_table(rows, summary))
    print(f"wrote {Path(out) / CSV_NAME} and {Path(out) / SUMMARY_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
