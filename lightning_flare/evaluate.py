"""Standalone FLARE24 scorer: any model's CASE masks against CASE labels, with the training code's metrics.

    python -m lightning_flare.evaluate --pred PRED_DIR --gt GT_DIR [--tolerance 2] [--out DIR] [--num-workers N]
        [--dataset-json FILE | --ignore-label K]

Writes ``metrics_per_case.csv`` and ``metrics_summary.json`` (default: into PRED_DIR) and prints a
table in the form of the paper's Table 5. A label without a prediction scores DSC = NSD = 0, as in
FLARE; predictions without a label are ignored; both are listed. Exit status 2 on user errors.

nnU-Net's ignore label K (``"ignore": K`` in dataset.json's labels; read from ``--dataset-json``, else from
GT_DIR/../dataset.json when there is one, or given as ``--ignore-label``): label voxels of value K are unknown and
left out of DSC, NSD and both volumes, as the in-training metrics leave them out (``partial_labels.without_ignored``).
A prediction of K outside that region is a value outside {0, 1} and scores 0 under FLARE's rule.
"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .io import Geometry, ImageReadError, read_image, to_array
from .metrics.functional import flare_case_scores
from .partial_labels import without_ignored
from .raw_dataset import DatasetError, parse_ignore_label
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


def dataset_ignore_label(dataset_json: str | Path) -> int | None:
    """The ``"ignore"`` label of a dataset.json (None without one); DatasetError on an unreadable file. Without an
    ``"ignore"`` entry the other labels are not checked (a Decathlon or region dataset.json beside the labels)."""
    try:
        meta = json.loads(Path(dataset_json).read_text())
    except (OSError, ValueError) as err:
        raise DatasetError(f"{dataset_json}: unreadable dataset.json ({err})") from err
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if isinstance(labels, dict) and "ignore" not in labels:
        return None
    return parse_ignore_label(labels, dataset_json)


def score_case(case: str, pred_path: str | Path | None, gt_path: str | Path, tolerance_mm: float = 2.0,
               ignore_label: int | None = None) -> dict:
    """One per-case row; ``pred_path=None`` is a missing prediction (DSC = NSD = 0).

    NSD uses the label's spacing ((x, y, z), matching the (x, y, z) arrays); volumes are voxel
    counts of nonzero voxels times the label's voxel volume. Voxels whose label is ``ignore_label``
    count in neither mask."""
    gt_image = read_image(gt_path)
    spacing = tuple(gt_image.GetSpacing())
    voxel_ml = float(np.prod(spacing)) / 1000.0
    raw = to_array(gt_image, dtype=None)
    gt = without_ignored(raw, raw, ignore_label)[1]
    reference_ml = int(np.count_nonzero(gt)) * voxel_ml
    if pred_path is None:
        return {"case": case, "dsc": 0.0, "nsd": 0.0, "reference_ml": reference_ml, "predicted_ml": 0.0,
                "healthy_false_positive": False, "missing": True}
    pred = to_array(read_image(pred_path), dtype=None)  # native dtype: values > 1 must stay visible
    pred = without_ignored(pred, raw, ignore_label)[0]
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
                     num_workers: int = 0, ignore_label: int | None = None) -> tuple[list[dict], dict]:
    """Score ``pred_dir/CASE.*`` against ``gt_dir/CASE.*`` under the FLARE24 rules.

    Returns ``(rows, summary)``: rows in case order with the report columns plus ``missing``;
    the summary of ``report.build_summary`` with ``missing_predictions`` and ``extra_predictions``.
    ``num_workers > 0`` scores cases in a process pool of that size; ``ignore_label``: see ``score_case``.
    Nothing is written."""
    if not tolerance_mm >= 0:
        raise ValueError(f"tolerance must be >= 0 mm, got {tolerance_mm}")
    pairs, extra = match_cases(pred_dir, gt_dir)
    jobs = [(case, pred, gt, float(tolerance_mm), ignore_label) for case, pred, gt in pairs]
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
    ignore = parser.add_mutually_exclusive_group()
    ignore.add_argument("--dataset-json", type=Path, default=None,
                        help="dataset.json whose 'ignore' label is left out (default: GT_DIR/../dataset.json if any)")
    ignore.add_argument("--ignore-label", type=int, default=None, help="label value left out of the scores")
    return parser


def _ignore_label(args: argparse.Namespace) -> int | None:
    if args.ignore_label is not None:
        if args.ignore_label < 1:
            raise ValueError(f"--ignore-label must be >= 1, got {args.ignore_label}")
        return args.ignore_label
    found = Path(args.gt).absolute().parent / "dataset.json"
    path = args.dataset_json if args.dataset_json is not None else (found if found.is_file() else None)
    return None if path is None else dataset_ignore_label(path)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0, got {args.num_workers}")
        rows, summary = evaluate_folders(args.pred, args.gt, args.tolerance, args.num_workers, _ignore_label(args))
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
