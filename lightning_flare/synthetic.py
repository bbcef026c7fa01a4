"""Deterministic synthetic abdominal CT with ellipsoid "tumours", written as an nnU-Net raw dataset.

Embedded demo data (no downloads) and test data. Arrays are (x, y, z) = SimpleITK / TorchIO order.
Optionally (issue 16) partially labelled training cases (only the largest lesion marked, listed in dataset.json
"partially_labelled"), unlabelled scans (``imagesUnlabelled/``), a test split with its own healthy fraction, and
lesion mimics: unlabelled lesion-shaped blobs of weaker contrast (cysts and the like, what a healthy scan's false
positives are made of); the defaults write exactly the dataset of before.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from .synthetic_lesions import (AIR, AORTA, BONE, CORTEX, FAT, HALO, KIDNEY, LIVER, LUNG, MIMIC_CONTRAST_HU,  # noqa: F401
                                MIN_CONTRAST_HU, MIN_RADIUS_MM, PARENCHYMA, RADIUS_MM, SOFT, SPLEEN, Lesion,
                                ellipsoid_box, ellipsoid_q2, mimic_contrast, place_lesion)
from .synthetic_schedule import is_healthy, is_partial, largest_lesion

GENERATOR_VERSION = 2  # 2: lesion HU >= 40 HU from every parenchymal organ of the case
DIRECTIONS = {  # row-major 3x3, columns = physical direction of array axes x, y, z
    "identity": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    "flipped": (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),  # x and y reversed (RAS-like)
    "permuted": (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0),  # array x->phys y, y->z, z->x
}
Direction = str | Sequence[float]  # a DIRECTIONS key or 9 floats
HU_RANGES = [(-1000, -1000), (-110, -90), (40, 50), (55, 70), (45, 58),  # (low, high) HU per id,
             (25, 35), (300, 450), (600, 750), (-870, -830), (40, 200)]  # drawn once per case


@dataclass
class SyntheticCase:
    image: np.ndarray  # int16 HU, (x, y, z)
    label: np.ndarray  # uint8 0/1, (x, y, z)
    spacing: tuple[float, float, float]  # (x, y, z) mm
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 floats, row-major as SimpleITK
    lesions: list[Lesion] = field(default_factory=list)
    mimics: list[Lesion] = field(default_factory=list)  # unlabelled look-alikes (not in ``label``)
    tissue_hu: dict[int, float] = field(default_factory=dict)  # clean HU of each tissue id in this case


def make_case(rng: np.random.Generator, healthy: bool, in_plane_size: int = 192,
              direction: Direction = "identity", lesions_per_case: Sequence[int] = (1, 3),
              mimics_per_case: Sequence[int] = (0, 0)) -> SyntheticCase:
    """One synthetic abdominal CT (body scaled to the field of view) with 0 (healthy) or ``lesions_per_case``
    (min, max; as many as fit) lesions, and ``mimics_per_case`` (min, max) mimics in every case, healthy or not:
    lesion-sized ellipsoids in the same hosts at 25-40 HU from their host, left out of the label. Mimics are drawn
    after everything else the default draws, so (0, 0) gives the case of before."""
    lo, hi = (int(v) for v in lesions_per_case)
    if not 1 <= lo <= hi:
        raise ValueError(f"lesions_per_case must be (min, max) with 1 <= min <= max, got {lesions_per_case!r}")
    mlo, mhi = (int(v) for v in mimics_per_case)
    if not 0 <= mlo <= mhi:
        raise ValueError(f"mimics_per_case must be (min, max) with 0 <= min <= max, got {mimics_per_case!r}")
    n = in_plane_size
    s, dz = round(float(rng.uniform(0.7, 1.0)), 3), round(float(rng.uniform(2.5, 5.0)), 2)
    nz = max(8, round(rng.uniform(120, 200) / dz))
    spacing = np.array([s, s, dz])
    axes = [np.arange(n) * s, np.arange(n) * s, np.arange(nz) * dz]  # voxel centres, mm
    fov, hz = n * s, nz * dz / 2
    cx, cy, cz = (n - 1) * s / 2, (n - 1) * s / 2 + rng.uniform(-0.03, 0.03) * fov, (nz - 1) * dz / 2
    bx, by = fov * rng.uniform(0.42, 0.47), fov * rng.uniform(0.32, 0.37)  # body semi-axes
    hu = [float(rng.uniform(lo, hi)) for lo, hi in HU_RANGES]
    tissue, inf = np.full((n, n, nz), AIR, np.int8), np.inf

    def paint(t: int, c, r, inside: tuple[int, ...] | None = (SOFT,)) -> None:
        box = ellipsoid_box(axes, c, r)
        m, sub = ellipsoid_q2(axes, c, r, box) <= 1, tissue[box]  # sub is a view
        sub[m & np.isin(sub, inside) if inside else m] = t

    def organ(u, v, w, ru, rv, rw):  # body-normalised placement + jitter -> (centre, radii) in mm
        j = rng.uniform(-0.04, 0.04, 3)
        return ((cx + (u + j[0]) * bx, cy + (v + j[1]) * by, cz + (w + j[2]) * hz),
                np.array([ru * bx, rv * by, rw * hz]) * rng.uniform(0.9, 1.1, 3))

    rim = fov * rng.uniform(0.03, 0.06)  # subcutaneous fat
    paint(FAT, (cx, cy, cz), (bx, by, inf), None)
    paint(SOFT, (cx, cy, cz), (bx - rim, by - rim, inf), None)
    vert, rv = (cx, cy + 0.62 * by, cz), 0.12 * bx  # spine: cortex ring around cancellous bone
    paint(CORTEX, vert, (rv, rv, inf))
    paint(BONE, vert, (0.75 * rv, 0.75 * rv, inf), (CORTEX,))
    paint(AORTA, (cx + 0.12 * bx, cy + 0.32 * by, cz), (0.07 * bx, 0.07 * bx, inf))
    paint(LIVER, *organ(-0.42, -0.05, 0.25, 0.38, 0.55, 0.6))
    paint(SPLEEN, *organ(0.5, 0.2, 0.3, 0.17, 0.28, 0.35))
    for side in (-1, 1):  # kidneys; lung bases in the top slices, over the liver dome
        paint(KIDNEY, *organ(0.36 * side, 0.42, -0.2, 0.13, 0.2, 0.35))
        paint(LUNG, *organ(0.42 * side, 0.05, 1.2, 0.38, 0.7, 0.6), (SOFT, LIVER, SPLEEN))
    soft = np.flatnonzero(tissue == SOFT)
    for _ in range(int(rng.integers(3, 8))):  # bowel gas / fat lobules as distractors
        c = np.array(np.unravel_index(rng.choice(soft), tissue.shape)) * spacing
        paint(AIR if rng.random() < 0.3 else FAT, c, rng.uniform(3, 8, 3))
    label, lesions = np.zeros(tissue.shape, np.uint8), []
    target, tries = (0 if healthy else int(rng.integers(lo, hi + 1))), 0
    while len(lesions) < target and tries < max(60, 20 * target):  # a failed placement retries with another host
        les, tries = place_lesion(rng, tissue, label, axes, spacing, hu), tries + 1
        lesions += [les] if les else []
    if target and not lesions:
        raise RuntimeError("could not place a lesion; in_plane_size too small?")
    mimics, occupied = [], label.copy()  # a mimic keeps clear of the lesions and of the other mimics
    for _ in range(int(rng.integers(mlo, mhi + 1)) if mhi else 0):
        m = place_lesion(rng, tissue, occupied, axes, spacing, hu, mimic_contrast)
        mimics += [m] if m else []
    clean = np.asarray(hu, np.float32)[tissue]
    for les in lesions + mimics:  # soft-edged intensity; the label stays the hard ellipsoid
        c, r = np.asarray(les.centre_vox) * spacing, np.asarray(les.radii_mm)
        box = ellipsoid_box(axes, c, r, 2.0)
        dist = (1 - np.sqrt(ellipsoid_q2(axes, c, r, box))) * float(np.exp(np.log(r).mean()))  # ~mm inside
        w = (1 / (1 + np.exp(-dist / 0.6))).astype(np.float32)
        clean[box] += w * (hu[les.host] + les.contrast_hu - clean[box])
    img = gaussian_filter(clean, (0.5 / s, 0.5 / s, 0.3))  # slight blur
    noise = gaussian_filter(rng.standard_normal(clean.shape, dtype=np.float32), (0.6, 0.6, 0.3))
    img += noise * np.float32(rng.uniform(10, 20) / noise.std())
    origin = tuple(round(float(v), 2) for v in rng.uniform([-260, -260, -900], [-60, -60, -100]))
    d = tuple(float(v) for v in (DIRECTIONS[direction] if isinstance(direction, str) else direction))
    if len(d) != 9:
        raise ValueError("direction needs 9 values")
    return SyntheticCase(np.clip(np.rint(img), -1024, 3071).astype(np.int16), label,
                         (s, s, dz), origin, d, lesions, mimics, dict(enumerate(hu)))


SPLITS = ("Tr", "Ts", "Unlabelled")  # imagesTr, imagesTs, imagesUnlabelled


def case_id(split: str, k: int) -> str:
    """Case identifier: SYN_000... for imagesTr, SYN_T000... for imagesTs, SYN_U000... for imagesUnlabelled."""
    return {"Tr": f"SYN_{k:03d}", "Ts": f"SYN_T{k:03d}", "Unlabelled": f"SYN_U{k:03d}"}[split]


def dataset_case(seed: int, split: str, k: int, healthy_fraction: float = 0.2, in_plane_size: int = 192,
                 direction: Direction = "identity", lesions_per_case: Sequence[int] = (1, 3),
                 mimics_per_case: Sequence[int] = (0, 0)) -> tuple[str, SyntheticCase]:
    """Case k of split "Tr", "Ts" or "Unlabelled": its id and content depend only on (seed, split, k, settings)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), k])
    return case_id(split, k), make_case(rng, is_healthy(k, healthy_fraction), in_plane_size, direction,
                                        lesions_per_case, mimics_per_case)


def _write(arr: np.ndarray, case: SyntheticCase, path: Path) -> None:
    """Write an (x, y, z) array with the case geometry, atomically (temp file + os.replace)."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
    img.SetSpacing(case.spacing), img.SetOrigin(case.origin), img.SetDirection(case.direction)
    tmp = path.with_name(f".tmp{os.getpid()}_{path.name}")  # SimpleITK needs the .nii.gz ending
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        sitk.WriteImage(img, str(tmp), True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


_EXTRA_DEFAULTS = {"test_healthy_fraction": None, "partial_fraction": 0.0, "num_unlabelled": 0,
                   "lesions_per_case": [1, 3], "mimics_per_case": [0, 0]}  # issue 16's options: stored in synthetic_params only when set


def synthetic_params(num_train: int = 16, num_test: int = 6, healthy_fraction: float = 0.2, seed: int = 0,
                     in_plane_size: int = 192, name: str = "Dataset900_Synthetic", direction: Direction = "identity",
                     test_healthy_fraction: float | None = None, partial_fraction: float = 0.0,
                     num_unlabelled: int = 0, lesions_per_case: Sequence[int] = (1, 3),
                     mimics_per_case: Sequence[int] = (0, 0)) -> dict:
    """The settings stored in a generated dataset.json (``synthetic_params``); same defaults as ``write_dataset``.
    The options of issue 16 appear only when they differ from their defaults, so the defaults' dataset.json is the
    one of before."""
    params = {"version": GENERATOR_VERSION, "name": name, "num_train": num_train, "num_test": num_test,
              "healthy_fraction": healthy_fraction, "seed": seed, "in_plane_size": in_plane_size,
              "direction": direction if isinstance(direction, str) else [float(v) for v in direction]}
    extra = {"test_healthy_fraction": test_healthy_fraction, "partial_fraction": float(partial_fraction),
             "num_unlabelled": int(num_unlabelled), "lesions_per_case": [int(v) for v in lesions_per_case],
             "mimics_per_case": [int(v) for v in mimics_per_case]}
    params |= {k: v for k, v in extra.items() if v != _EXTRA_DEFAULTS[k]}
    if "mimics_per_case" in params:  # a dataset of other mimics is another dataset
        params["mimic_contrast_hu"] = list(MIMIC_CONTRAST_HU)
    return params


def write_dataset(out_dir: str | os.PathLike, num_train: int = 16, num_test: int = 6,
                  healthy_fraction: float = 0.2, seed: int = 0, in_plane_size: int = 192,
                  name: str = "Dataset900_Synthetic", direction: Direction = "identity", *,
                  test_healthy_fraction: float | None = None, partial_fraction: float = 0.0,
                  num_unlabelled: int = 0, lesions_per_case: Sequence[int] = (1, 3),
                  mimics_per_case: Sequence[int] = (0, 0)) -> Path:
    """Write (or reuse) an nnU-Net raw dataset in out_dir; dataset.json, written last, marks it complete.

    ``test_healthy_fraction``: healthy fraction of imagesTs (None: ``healthy_fraction``); ``partial_fraction``: this
    fraction of the lesion training cases keeps only its largest lesion in labelsTr (dataset.json
    "partially_labelled" lists them; imagesTs labels stay complete); ``num_unlabelled``: scans written to
    imagesUnlabelled/ without label (healthy as ``healthy_fraction``); ``lesions_per_case``: (min, max) lesions of a
    lesion case (several lesions make the partial labels partial; one lesion is marked whole);
    ``mimics_per_case``: (min, max) unlabelled lesion look-alikes per case, healthy or not (``make_case``)."""
    out = Path(out_dir)
    if not 0 <= partial_fraction <= 1 or num_unlabelled < 0:
        raise ValueError(f"partial_fraction must be in [0, 1] and num_unlabelled >= 0, got {partial_fraction!r}, "
                         f"{num_unlabelled!r}")
    params = synthetic_params(num_train, num_test, healthy_fraction, seed, in_plane_size, name, direction,
                              test_healthy_fraction, partial_fraction, num_unlabelled, lesions_per_case,
                              mimics_per_case)
    splits = {"Tr": num_train, "Ts": num_test, "Unlabelled": num_unlabelled}
    healthy = {"Tr": healthy_fraction, "Unlabelled": healthy_fraction,
               "Ts": healthy_fraction if test_healthy_fraction is None else test_healthy_fraction}
    expected = {out / f"{kind}{sp}" / (case_id(sp, k) + ("_0000" if kind == "images" else "") + ".nii.gz")
                for sp, num in splits.items() for k in range(num) for kind in ("images", "labels")
                if kind == "images" or sp != "Unlabelled"}
    partial = [case_id("Tr", k) for k in range(num_train) if is_partial(k, healthy_fraction, partial_fraction)]
    meta = out / "dataset.json"
    if meta.is_file():  # written atomically, so never half-written
        stored = json.loads(meta.read_text()).get("synthetic_params")
        if stored is None:
            raise FileExistsError(f"{out} holds a non-synthetic dataset; not overwriting it")
        if stored == params and all(p.is_file() for p in expected):
            return out
        meta.unlink()  # mark incomplete while rewriting
    for sp, num in splits.items():
        for k in range(num):
            cid, case = dataset_case(seed, sp, k, healthy[sp], in_plane_size, direction, lesions_per_case,
                                     mimics_per_case)
            _write(case.image, case, out / f"images{sp}" / f"{cid}_0000.nii.gz")
            if sp != "Unlabelled":
                _write(largest_lesion(case.label) if cid in partial else case.label, case, out / f"labels{sp}" / f"{cid}.nii.gz")
    for p in set(out.glob("*/SYN_*.nii.gz")) - expected:  # stale cases of an earlier, larger dataset
        p.unlink()
    info = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "tumor": 1},
            "numTraining": num_train, "numTest": num_test, "file_ending": ".nii.gz", "name": name,
            "description": "synthetic abdominal CT with ellipsoid lesions (lightning_flare.synthetic); "
                           "no patient data", "synthetic_params": params}
    if partial_fraction > 0:
        info["partially_labelled"] = partial
    tmp = meta.with_name(f".tmp{os.getpid()}_dataset.json")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, meta)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write the synthetic nnU-Net raw dataset.")
    ap.add_argument("out_dir")
    for opt, default in (("--num-train", 16), ("--num-test", 6), ("--seed", 0), ("--in-plane-size", 192),
                         ("--num-unlabelled", 0)):
        ap.add_argument(opt, type=int, default=default)
    ap.add_argument("--healthy-fraction", type=float, default=0.2)
    ap.add_argument("--test-healthy-fraction", type=float, default=None, help="default: --healthy-fraction")
    ap.add_argument("--partial-fraction", type=float, default=0.0,
                    help="fraction of the lesion training cases labelled with their largest lesion only")
    ap.add_argument("--lesions-per-case", type=int, nargs=2, default=[1, 3], metavar=("MIN", "MAX"))
    ap.add_argument("--mimics-per-case", type=int, nargs=2, default=[0, 0], metavar=("MIN", "MAX"),
                    help="unlabelled lesion look-alikes (25-40 HU from their host) in every case")
    ap.add_argument("--name", default="Dataset900_Synthetic")
    ap.add_argument("--direction", default="identity", choices=sorted(DIRECTIONS))
    a = ap.parse_args(argv)
    print(write_dataset(a.out_dir, a.num_train, a.num_test, a.healthy_fraction, a.seed, a.in_plane_size, a.name,
                        a.direction, test_healthy_fraction=a.test_healthy_fraction,
                        partial_fraction=a.partial_fraction, num_unlabelled=a.num_unlabelled,
                        lesions_per_case=a.lesions_per_case, mimics_per_case=a.mimics_per_case))


if __name__ == "__main__":
    main()
