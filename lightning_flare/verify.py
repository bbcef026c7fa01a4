"""Dataset verification like nnU-Net's --verify_dataset_integrity: all problems, each message naming its file."""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .io import read_image
from .nifti_check import nifti_header
from .raw_dataset import IMAGE_SUFFIXES, DatasetError, parse_ignore_label, parse_labels

TOLERANCE = 1e-3  # mm for spacing/origin, unitless for direction cosines
MAX_SPACING_MM = 10.0
_fmt = lambda values: "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"  # noqa: E731


@dataclass
class VerificationReport:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    num_cases: int = 0
    # training scans by what their label says: completely labelled, partially labelled, unlabelled (imagesUnlabelled)
    counts: dict[str, int] = field(default_factory=lambda: {"labelled": 0, "partially_labelled": 0, "unlabelled": 0})

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_if_errors(self) -> None:
        """Raise ``DatasetError`` listing every error, one per line (each line starts with the file path)."""
        if self.errors:
            raise DatasetError("\n".join(self.errors))


def _check_meta(root: Path, report: VerificationReport) -> tuple[str, set[int] | None, int | None, list[str]]:
    """dataset.json -> (file_ending, label values (with the ignore label) or None when unusable, numTraining or
    None, the partially labelled case ids)."""
    path = root / "dataset.json"
    try:
        meta = json.loads(path.read_text())
        problem = None if isinstance(meta, dict) else f"must hold a JSON object, got {type(meta).__name__}"
    except FileNotFoundError:
        problem = "missing (an nnU-Net raw dataset needs dataset.json)"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        problem = f"cannot be parsed as JSON ({err})"
    error = lambda msg: report.errors.append(f"{path}: {msg}")  # noqa: E731
    if problem is not None:
        error(problem)
        return ".nii.gz", None, None, []
    file_ending = meta.get("file_ending")
    if not isinstance(file_ending, str) or not file_ending.startswith("."):
        error(f"needs 'file_ending' (e.g. \".nii.gz\"), got {file_ending!r}")
        file_ending = ".nii.gz"
    try:
        values = set(parse_labels(meta.get("labels"), source=path).values())
        values |= {parse_ignore_label(meta.get("labels"), source=path)} - {None}  # labelsTr may hold it
    except DatasetError as err:  # the message starts with the path
        report.errors.append(str(err))
        values = None
    partial = meta.get("partially_labelled", [])
    if not isinstance(partial, list) or not all(isinstance(c, str) for c in partial):
        error(f"'partially_labelled' must be a list of training case ids, got {partial!r}")
        partial = []
    channels = meta.get("channel_names", meta.get("modality"))
    if not isinstance(channels, dict) or not channels:
        error("needs 'channel_names' (e.g. {\"0\": \"CT\"})")
    elif list(channels) != ["0"]:
        error(f"channel_names {channels}: only single-channel CT is supported (exactly one channel \"0\")")
    elif str(channels["0"]).lower() != "ct":
        report.warnings.append(f"{path}: channel 0 is named {channels['0']!r}; this pipeline normalises it as CT (HU)")
    return file_ending, values, meta["numTraining"] if isinstance(meta.get("numTraining"), int) else None, partial


def _image_files(folder: Path, file_ending: str, report: VerificationReport) -> list[Path]:
    paths = [p for p in (sorted(folder.iterdir()) if folder.is_dir() else []) if p.is_file() and not p.name.startswith(".")]
    for path in paths:
        if not path.name.endswith(file_ending) and path.name.lower().endswith(IMAGE_SUFFIXES):
            report.warnings.append(f"{path}: ignored, its name does not end with dataset.json's file_ending {file_ending}")
    return [p for p in paths if p.name.endswith(file_ending)]


def _walk_split(root: Path, split: str, fe: str, report: VerificationReport, required: bool) -> tuple[list[tuple[Path, Path | None]], int]:
    """Pair images/labels of one split by file name -> ((image, label) pairs, #case ids); required: folders must exist."""
    images_dir, labels_dir = root / f"images{split}", root / f"labels{split}"
    groups: dict[str, dict[str, Path]] = {}  # case id -> channel ("0000", ... or "?" when unsuffixed) -> file
    for path in _image_files(images_dir, fe, report):
        stem = path.name[: -len(fe)]
        if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
            groups.setdefault(stem[:-5], {})[stem[-4:]] = path
        else:
            report.errors.append(f"{path}: image name must end with the channel suffix _0000{fe}")
            groups.setdefault(stem, {})["?"] = path
    labels = {p.name[: -len(fe)]: p for p in _image_files(labels_dir, fe, report)}
    for folder in (images_dir, labels_dir) if required else ():
        if not folder.is_dir():
            report.errors.append(f"{folder}: missing (training {folder.name[:-2]} folder)")
    pairs = []
    for case_id, channels in sorted(groups.items()):
        for channel, path in sorted(channels.items()):
            if channel not in ("0000", "?"):
                report.errors.append(f"{path}: extra channel _{channel}; only single-channel CT (_0000) is supported" if "0000" in channels
                                     else f"{path}: wrong channel suffix _{channel}; single-channel CT must be named {case_id}_0000{fe}")
        image, label = channels.get("0000"), labels.get(case_id)
        if image is not None and label is None and labels_dir.is_dir():
            report.errors.append(f"{image}: image without label: no {case_id}{fe} in {labels_dir}")
        if image is not None:
            pairs.append((image, label))
    for case_id, label in sorted(labels.items()):
        if case_id not in groups:
            report.errors.append(f"{label}: label without image: no {case_id}_0000{fe} in {images_dir}")
    return pairs, len(groups)


def _scan_nifti(path: Path) -> tuple[str | None, int, int]:
    """(problem, #NaN, #inf) from raw bytes: ITK reads truncated NIfTI without complaint and turns NaN/inf into 0."""
    total, nan, inf, header, pending, name = 0, 0, 0, None, b"", path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return None, 0, 0
    try:
        with (gzip.open if name.endswith(".gz") else open)(path, "rb") as f:
            while chunk := f.read(1 << 22):
                total += len(chunk)
                if header is None:  # the first chunk (4 MiB or the whole file) holds the header
                    header = nifti_header(chunk) or (0, 0, None)
                    chunk = chunk[header[0]:]
                if header[2] is not None:
                    pending += chunk
                    usable = len(pending) - len(pending) % header[2].itemsize
                    values = np.frombuffer(pending[:usable], header[2])
                    nan, inf, pending = nan + int(np.isnan(values).sum()), inf + int(np.isinf(values).sum()), pending[usable:]
    except (OSError, EOFError, zlib.error) as err:
        return f"{path}: unreadable or truncated file ({err})", 0, 0
    if header is not None and total < header[0] + header[1]:
        return f"{path}: truncated file: {total} bytes of the {header[0] + header[1]} its NIfTI header promises", 0, 0
    return None, nan, inf


def _read(path: Path, errors: list[str]) -> sitk.Image | None:
    try:
        problem, nan, inf = _scan_nifti(path)
        if nan or inf:
            errors.append(f"{path}: {nan} NaN and {inf} inf voxels")
        if problem is None:
            return read_image(path)  # ImageReadError: unreadable, non-3D, multi-component; message names the file
        errors.append(problem)
    except Exception as err:  # noqa: BLE001 - one bad file must not stop the walk
        errors.append(str(err) if str(err).startswith(str(path)) else f"{path}: cannot be read ({type(err).__name__}: {err})")
    return None


def _check_intensities(path: Path, image: sitk.Image, errors: list[str], warnings: list[str]) -> None:
    arr = sitk.GetArrayViewFromImage(image)
    if arr.dtype.kind == "f" and not (finite := np.isfinite(arr)).all():
        nan = int(np.isnan(arr).sum())
        errors.append(f"{path}: {nan} NaN and {arr.size - int(finite.sum()) - nan} inf voxels")  # formats other than NIfTI
        arr = arr[finite]
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (-1000.0, 0.0)
    if lo >= 0 and hi <= 1:
        warnings.append(f"{path}: intensities in [{lo:g}, {hi:g}] look rescaled to [0, 1], not Hounsfield units (CT air is about -1000 HU)")
    elif lo > -200:
        warnings.append(f"{path}: minimum intensity {lo:g} > -200 (no air or fat): not HU? (raw stored values without rescale intercept?)")
    elif hi < 0:
        warnings.append(f"{path}: maximum intensity {hi:g} < 0 (no soft tissue or bone): do these look like HU?")


def _check_case(image_path: Path, label_path: Path | None, label_values: set[int] | None) -> tuple[list[str], list[str]]:
    errors, warnings = [], []
    image, label = _read(image_path, errors), (_read(label_path, errors) if label_path is not None else None)
    if image is not None:
        _check_intensities(image_path, image, errors, warnings)
        if max(image.GetSpacing()) > MAX_SPACING_MM:
            warnings.append(f"{image_path}: spacing {_fmt(image.GetSpacing())} mm exceeds {MAX_SPACING_MM:g} mm")
    if label is not None and image is not None:
        if image.GetSize() != label.GetSize():
            errors.append(f"{label_path}: size {label.GetSize()} differs from image {image_path.name} {image.GetSize()}")
        for what in ("Spacing", "Origin", "Direction"):
            a, b = np.array(getattr(image, f"Get{what}")()), np.array(getattr(label, f"Get{what}")())
            if np.max(np.abs(a - b)) > TOLERANCE:
                errors.append(f"{label_path}: {what.lower()} {_fmt(b)} differs from image {image_path.name} {_fmt(a)} (tolerance {TOLERANCE:g})")
    if label is not None and label_values is not None:
        arr = sitk.GetArrayViewFromImage(label)
        small = arr.dtype.kind in "ui" and arr.dtype.itemsize <= 4 and arr.size and arr.min() >= 0 and arr.max() < 65536
        found = (np.flatnonzero(np.bincount(arr.ravel())) if small else np.unique(arr)).tolist()  # bincount: fast path
        if bad := [v for v in found if v not in label_values]:
            errors.append(f"{label_path}: label values {bad[:10]} not in dataset.json labels {sorted(label_values)}")
    return errors, warnings


def verify_dataset(root: str | Path, splits: Sequence[str] = ("Tr", "Ts", "Unlabelled"),
                   num_workers: int = 0) -> VerificationReport:
    """Check dataset.json, file pairing/naming and every case; collects all problems (never stops at the first).
    Split "Unlabelled" is ``imagesUnlabelled/`` (scans without labels: read and geometry checks only)."""
    root, report = Path(root), VerificationReport()
    if not root.is_dir():
        return VerificationReport([f"{root}: dataset folder does not exist"])
    file_ending, label_values, num_training, partial = _check_meta(root, report)
    pairs: list[tuple[Path, Path | None]] = []
    for split in splits:
        split_pairs, num_ids = _walk_split(root, split, file_ending, report, split == "Tr" and num_training != 0)
        if split == "Tr" and num_training is not None and num_training != num_ids:
            report.warnings.append(f"{root / 'dataset.json'}: numTraining is {num_training} but imagesTr holds {num_ids} cases")
        if split == "Tr":
            labelled = {label.name[: -len(file_ending)] for _, label in split_pairs if label is not None}
            for case_id in (c for c in partial if c not in labelled):
                report.errors.append(f"{root / 'dataset.json'}: 'partially_labelled' lists {case_id!r}, which is no "
                                     f"training case with a label in {root / 'imagesTr'} and {root / 'labelsTr'}")
            report.counts["partially_labelled"] = len(labelled & set(partial))
            report.counts["labelled"] = len(labelled - set(partial))
        if split == "Unlabelled":
            report.counts["unlabelled"] = len(split_pairs)
        pairs += split_pairs
    report.num_cases = len(pairs)
    if num_workers > 0 and len(pairs) > 1:
        with ProcessPoolExecutor(min(num_workers, len(pairs))) as pool:
            results = list(pool.map(_check_case, *zip(*pairs), [label_values] * len(pairs)))
    else:
        results = [_check_case(i, lab, label_values) for i, lab in pairs]
    report.errors += [e for errors, _ in results for e in errors]
    report.warnings += [w for _, warnings in results for w in warnings]
    return report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lightning_flare.verify", description="Verify an nnU-Net raw dataset folder.")
    ap.add_argument("dataset_dir", type=Path)
    ap.add_argument("--splits", nargs="+", default=["Tr", "Ts", "Unlabelled"],
                    help="splits to check (imagesTr/labelsTr, ..., imagesUnlabelled)")
    ap.add_argument("--num-workers", type=int, default=0, help="processes for the per-case checks (0: in-process)")
    args = ap.parse_args(argv)
    report = verify_dataset(args.dataset_dir, args.splits, args.num_workers)
    for kind, msg in [("ERROR", m) for m in report.errors] + [("WARNING", m) for m in report.warnings]:
        print(f"{kind}: {msg}")
    counts = report.counts
    print(f"{args.dataset_dir}: {'OK' if report.ok else 'FAILED'}: {report.num_cases} cases checked, "
          f"{len(report.errors)} error(s), {len(report.warnings)} warning(s); training scans: {counts['labelled']} "
          f"labelled, {counts['partially_labelled']} partially labelled, {counts['unlabelled']} unlabelled")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
