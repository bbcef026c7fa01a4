"""Per-case preprocessing (resample to the plan's spacing, CT normalisation) and its on-disk cache."""
from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .io import Geometry, read_image, remove_stale_temporaries, to_array, write_npy, write_text
from .plan import IntensityStats, Plan
from .raw_dataset import Case, source_signature
from .grid_guard import check_target_grid
from .resample import _interpolate, new_shape_for_spacing, resample_image, resample_label

MAX_FOREGROUND_LOCATIONS = 10_000


def normalize_ct(array: np.ndarray, stats: IntensityStats, inplace: bool = False) -> np.ndarray:
    """Clip to [clip_low, clip_high], then (x - mean) / max(std, 1e-8); ``inplace`` reuses a float32 array (no copies)."""
    out = array if inplace and array.dtype == np.float32 else np.array(array, dtype=np.float32)
    np.clip(out, stats.clip_low, stats.clip_high, out=out)
    out -= np.float32(stats.mean)
    out /= np.float32(max(stats.std, 1e-8))
    return out


def preprocess_image(image: sitk.Image, plan: Plan) -> np.ndarray:
    """(x, y, z) float32 array at the plan's spacing, normalised."""
    check_target_grid(image.GetSize(), image.GetSpacing(), plan.target_spacing)  # before a grid too large for memory
    array = normalize_ct(to_array(image), plan.intensity, inplace=True)  # normalise first, as nnU-Net
    return resample_image(array, image.GetSpacing(), plan.target_spacing, plan.resampling, plan.anisotropy_threshold,
                          anti_aliasing=plan.anti_aliasing)


def preprocess_tensor(image: torch.Tensor, spacing: Sequence[float], plan: Plan,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """``preprocess_image`` in torch on ``device`` for a (1, x, y, z) HU tensor: the same CT normalisation and
    trilinear resampling as the loader path of ``resampling: fast`` (nnU-Net's cubic spline is scipy, CPU only).
    The caller's tensor is left as it is (the test step's panels show it in HU): another dtype (int16 CT) is
    converted after the copy to ``device``, there; a float32 tensor already on ``device`` is copied once."""
    if plan.resampling != "fast":
        raise ValueError(f"preprocessing on the device needs the plan's resampling 'fast' (torch), got "
                         f"{plan.resampling!r}; use data.preprocess_on: loader")
    if plan.anti_aliasing:
        raise ValueError("preprocessing on the device does not implement anti_aliasing; use data.preprocess_on: loader")
    check_target_grid(image.shape[1:], spacing, plan.target_spacing)
    x = image.to(device if device is not None else image.device)
    x = x.float() if x.dtype != torch.float32 else (x.clone() if x.data_ptr() == image.data_ptr() else x)
    stats = plan.intensity
    x.clamp_(stats.clip_low, stats.clip_high).sub_(stats.mean).div_(max(stats.std, 1e-8))
    new_shape = new_shape_for_spacing(x.shape[1:], spacing, plan.target_spacing)
    return _interpolate(x, new_shape)


def preprocess_label(label: sitk.Image, plan: Plan, new_shape: Sequence[int]) -> np.ndarray:
    """Resampled label values; the ignore label (= num_classes) is resampled like one more class, so it is kept."""
    array = to_array(label, np.int16)
    values = plan.num_classes + (plan.ignore_label is not None)
    return resample_label(array, label.GetSpacing(), plan.target_spacing, values, plan.resampling, plan.anisotropy_threshold, new_shape)


def check_label(label: sitk.Image, image: sitk.Image, case: Case, plan: Plan) -> None:
    if label.GetSize() != image.GetSize():
        raise ValueError(f"{case.label}: label size {label.GetSize()} differs from image size {image.GetSize()} ({case.image})")
    if not np.allclose(label.GetSpacing(), image.GetSpacing(), atol=1e-3):
        raise ValueError(f"{case.label}: label spacing {label.GetSpacing()} differs from image spacing {image.GetSpacing()}")
    values = np.unique(sitk.GetArrayViewFromImage(label))
    allowed = set(plan.labels.values()) | ({plan.ignore_label} if plan.ignore_label is not None else set())
    unknown = sorted(set(values.tolist()) - allowed)
    if unknown:
        ignore = f" (ignore label {plan.ignore_label})" if plan.ignore_label is not None else ""
        raise ValueError(f"{case.label}: label values {unknown} are not in dataset.json's labels {plan.labels}{ignore}")


def foreground_locations(label: np.ndarray, rng: np.random.Generator, max_count: int = MAX_FOREGROUND_LOCATIONS,
                         ignore_label: int | None = None) -> np.ndarray:
    """Up to ``max_count`` (x, y, z) voxel indices of the foreground, for oversampling; the ignore label is no
    foreground (nnU-Net's foreground classes leave it out too)."""
    foreground = label > 0 if ignore_label is None else (label > 0) & (label != ignore_label)
    locations = np.argwhere(foreground).astype(np.int32)
    if len(locations) > max_count:
        locations = locations[rng.choice(len(locations), max_count, replace=False)]
    return locations


@dataclass(frozen=True)
class CachedCase:
    case_id: str
    image: Path  # float32 (x, y, z) .npy
    label: Path  # uint8 (x, y, z) .npy
    foreground: Path  # int32 (n, 3) .npy
    meta: Path  # .json, written last: marks the entry complete

    def load_meta(self) -> dict:
        return json.loads(self.meta.read_text())


class PreprocessedCache:
    """``root/<dataset>_<plan key>/``: one set of memory-mappable .npy files per case."""

    def __init__(self, root: str | Path, plan: Plan, dataset_name: str = "dataset"):
        self.plan = plan
        self.dir = Path(root) / f"{dataset_name}_{plan.cache_key()}"

    def entry(self, case_id: str) -> CachedCase:
        d = self.dir
        return CachedCase(case_id, d / f"{case_id}_image.npy", d / f"{case_id}_label.npy", d / f"{case_id}_fg.npy", d / f"{case_id}.json")

    def is_complete(self, case_id: str, case: Case | None = None) -> bool:
        """Entry fully written (and, given the ``case``, made from its current source files)."""
        e = self.entry(case_id)
        if not (e.meta.is_file() and e.image.is_file() and e.label.is_file() and e.foreground.is_file()):
            return False
        if case is None:
            return True
        try:
            return e.load_meta().get("sources") == source_signature(case)
        except (json.JSONDecodeError, OSError):
            return False

    def build(self, cases: Sequence[Case], num_workers: int = 0, progress: bool = True) -> list[CachedCase]:
        """Preprocess the cases not cached yet (in parallel); return the entries of all cases."""
        self.dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.dir)  # left by a run killed mid-write
        if not (self.dir / "plan.json").is_file():
            write_text(self.dir / "plan.json", json.dumps(self.plan.to_dict(), indent=1))
        todo = [c for c in cases if not self.is_complete(c.case_id, c)]  # new or changed sources
        if todo:
            self._run(todo, num_workers, progress)
        return [self.entry(c.case_id) for c in cases]

    def _run(self, todo: list[Case], num_workers: int, progress: bool) -> None:
        from rich.progress import Progress

        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task(f"Preprocessing {len(todo)} cases", total=len(todo))
            if num_workers > 0:
                with ProcessPoolExecutor(num_workers) as pool:
                    futures = [pool.submit(preprocess_into_cache, c, self.plan, self.dir) for c in todo]
                    for future in as_completed(futures):
                        future.result()
                        bar.advance(task)
            else:
                for case in todo:
                    preprocess_into_cache(case, self.plan, self.dir)
                    bar.advance(task)


def preprocess_into_cache(case: Case, plan: Plan, directory: Path) -> None:
    """Write one cache entry: arrays first (each atomically), the JSON marker last."""
    image = read_image(case.image)
    try:
        array = preprocess_image(image, plan)
    except ValueError as err:
        raise ValueError(f"{case.image}: {err}") from err
    if case.label is not None:
        label = read_image(case.label)
        check_label(label, image, case, plan)
        seg = preprocess_label(label, plan, array.shape)
    else:
        seg = np.zeros(array.shape, np.uint8)
    seed = int.from_bytes(case.case_id.encode()[-8:].rjust(8, b"\0"), "little") % (2**32)
    fg = foreground_locations(seg, np.random.default_rng(seed), ignore_label=plan.ignore_label)
    write_npy(directory / f"{case.case_id}_image.npy", array)
    write_npy(directory / f"{case.case_id}_label.npy", seg)
    write_npy(directory / f"{case.case_id}_fg.npy", fg)
    meta = {"case_id": case.case_id, "source": str(case.image), "shape": list(array.shape),
            "original": Geometry.of(image).to_dict(), "num_foreground": int(((seg > 0) & (seg != (plan.ignore_label or 0))).sum()),
            "pid": os.getpid(),
            "sources": source_signature(case)}
    write_text(directory / f"{case.case_id}.json", json.dumps(meta))
