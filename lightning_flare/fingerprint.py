"""Dataset fingerprint: spacings, shapes and CT intensity statistics of the foreground."""
from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from .io import read_image, to_array, write_text
from .raw_dataset import Case, source_signature

NUM_FOREGROUND_SAMPLES = int(10e7)  # nnU-Net's constant, written 10e7 there too (= 1e8 voxels in all)
FINGERPRINT_VERSION = 2  # 2: source file signatures


def _case_fingerprint(case: Case, num_samples: int, seed: int, ignore_label: int | None = None) -> dict:
    image = read_image(case.image)
    array = to_array(image)
    label = to_array(read_image(case.label), np.int16) if case.label is not None else np.zeros(array.shape, np.int16)
    if label.shape != array.shape:
        raise ValueError(f"{case.label}: label size {label.shape} differs from image size {array.shape} ({case.image})")
    # the ignore label marks unknown voxels, no foreground (nnU-Net's ``segmentation > 0`` would count them)
    foreground = array[(label > 0) if ignore_label is None else (label > 0) & (label != ignore_label)]
    rng = np.random.RandomState(seed)
    sampled = rng.choice(foreground, num_samples, replace=True) if len(foreground) else np.zeros(0, np.float32)
    return {
        "case_id": case.case_id,
        "spacing": list(image.GetSpacing()),
        "shape": list(array.shape),
        "samples": sampled.astype(np.float32),
    }


def compute_fingerprint(cases: Sequence[Case], num_workers: int = 0, seed: int = 1234,
                        ignore_label: int | None = None) -> dict:
    """Foreground intensities: up to 1e8 / n_cases voxels sampled per case (with replacement, as nnU-Net); voxels of
    the ``ignore_label`` are not foreground."""
    if not cases:
        raise ValueError("cannot compute a fingerprint without training cases")
    per_case = max(1, NUM_FOREGROUND_SAMPLES // len(cases))
    args = [(c, per_case, seed, ignore_label) for c in cases]
    if num_workers > 0:
        with ProcessPoolExecutor(num_workers) as pool:
            results = list(pool.map(_case_fingerprint, *zip(*args)))
    else:
        results = [_case_fingerprint(*a) for a in args]
    samples = np.concatenate([r.pop("samples") for r in results])
    if samples.size == 0:
        raise ValueError("no foreground voxel in any training label: cannot compute CT normalisation statistics")
    samples = samples.astype(np.float64)
    extra = {} if ignore_label is None else {"ignore_label": int(ignore_label)}  # absent: files of before stay valid
    return {
        **extra,
        "version": FINGERPRINT_VERSION,
        "case_ids": [r["case_id"] for r in results],
        "sources": {c.case_id: source_signature(c) for c in cases},
        "spacings": [r["spacing"] for r in results],
        "shapes": [r["shape"] for r in results],
        "median_spacing": np.median([r["spacing"] for r in results], axis=0).tolist(),
        "intensity": {
            "mean": float(samples.mean()),
            "std": float(samples.std()),
            "median": float(np.median(samples)),
            "min": float(samples.min()),
            "max": float(samples.max()),
            "percentile_00_5": float(np.percentile(samples, 0.5)),
            "percentile_99_5": float(np.percentile(samples, 99.5)),
        },
    }


def load_or_compute_fingerprint(path: Path, cases: Sequence[Case], num_workers: int = 0,
                                ignore_label: int | None = None) -> dict:
    """Reuse ``path`` if it describes exactly these cases, files and ignore label, else compute and save it
    (atomically)."""
    sources = {c.case_id: source_signature(c) for c in cases}
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved.get("version") == FINGERPRINT_VERSION and saved.get("sources") == sources and \
                    saved.get("ignore_label") == ignore_label:
                return saved
        except json.JSONDecodeError:
            pass
    fingerprint = compute_fingerprint(cases, num_workers, ignore_label=ignore_label)
    write_text(path, json.dumps(fingerprint, indent=1))
    return fingerprint
