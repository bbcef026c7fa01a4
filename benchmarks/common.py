"""Helpers shared by the benchmark scripts (pipeline.py, predict.py): nnU-Net v2 plans / folders written from
our configuration (through ``lightning_flare.nnunet_compat`` / ``convert_nnunet``), a CT-like synthetic volume
generator, process-tree memory sampling and table printing.

Axis orders: our arrays are (x, y, z); nnU-Net's are (z, y, x) (``transpose_forward`` [0, 1, 2] on arrays read
with SimpleITK), so every shape / spacing / kernel written into nnU-Net files is reversed (by the package).

These scripts need the benchmark environment (``make bench-env`` -> ``.venv-bench``: nnunetv2, MONAI and this
package); see benchmarks/README.md.
"""
from __future__ import annotations

import json
import os
import sys
import subprocess
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# The published FLARE24 model's CT normalisation (SPEC.md): clip, mean, std of the foreground intensities.
FLARE24_STATS = {"clip_low": -900.0, "clip_high": 619.0, "mean": -52.232, "std": 268.799}
LABELS = {"background": 0, "tumor": 1}
NNUNET_CONFIGURATION = "3d_fullres"


# ----------------------------------------------------------------------------------------------- environment
def nnunet_environment(root: str | Path) -> dict[str, str]:
    """Point nnU-Net's three folders under ``root`` (in os.environ, before nnunetv2 is imported)."""
    root = Path(root).resolve()
    paths = {"nnUNet_raw": root / "nnUNet_raw", "nnUNet_preprocessed": root / "nnUNet_preprocessed",
             "nnUNet_results": root / "nnUNet_results"}
    for key, path in paths.items():
        path.mkdir(parents=True, exist_ok=True)
        os.environ[key] = str(path)
    return {k: str(v) for k, v in paths.items()}


def set_threads(n: int) -> None:
    """torch intra-op threads and SimpleITK's default thread count."""
    import SimpleITK as sitk
    import torch

    torch.set_num_threads(n)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)


def require_nnunet() -> None:
    try:
        import nnunetv2  # noqa: F401
    except ImportError as err:  # pragma: no cover - message for the wrong venv
        raise SystemExit(f"nnunetv2 is not importable ({err}); run this with the benchmark environment: "
                         "make bench-env && .venv-bench/bin/python benchmarks/...") from err


# ----------------------------------------------------------------------------------------------- nnU-Net files
# plans.json / dataset.json / results folders come from the package (lightning_flare.nnunet_compat and
# lightning_flare.convert_nnunet: the same axis mapping that convert_nnunet reads them back with).
def nnunet_plans(dataset_name: str, patch_xyz: Sequence[int] = (128, 128, 96),
                 spacing_xyz: Sequence[float] = (2.0, 2.0, 3.0), batch_size: int = 2,
                 median_shape_xyz: Sequence[int] = (205, 205, 167), stats: dict = FLARE24_STATS,
                 features: Sequence[int] = (32, 64, 128, 256)) -> dict:
    """An nnU-Net v2 ``nnUNetPlans.json`` with one ``3d_fullres`` configuration in the FLARE24 setting (our
    default ``PlainConvUNet`` with ``features`` per stage, strides 1, 2, 2, ...)."""
    from lightning_flare.nnunet_compat import plans_from_plan
    from lightning_flare.plan import IntensityStats, Plan

    plan = Plan(tuple(spacing_xyz), tuple(patch_xyz), IntensityStats(**stats), dict(LABELS), resampling="nnunet")
    net = {"features_per_stage": [int(f) for f in features], "strides": [1] + [2] * (len(features) - 1)}
    return plans_from_plan(plan, net, dataset_name, NNUNET_CONFIGURATION, batch_size, median_shape_xyz,
                           foreground={"max": 3071.0, "min": -1024.0, "median": stats["mean"]})


def nnunet_dataset_json(num_training: int) -> dict:
    from lightning_flare.nnunet_compat import dataset_json

    return dataset_json(LABELS, num_training)


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path


# ----------------------------------------------------------------------------------------------- synthetic CT
def synthetic_ct(shape_xyz: Sequence[int], spacing_xyz: Sequence[float], seed: int = 0,
                 num_lesions: int = 2, arms: bool = False, table: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like (x, y, z) int16 HU volume (air, fat rim, soft tissue, liver, spine, lungs, noise) and a uint8
    label with ``num_lesions`` ellipsoidal tumours. Cheap enough for 512 x 512 x 200 (a few seconds).
    ``arms``: a narrower torso with both arms down beside it; ``table``: the patient table under the body (a
    1 cm board and a 1 cm pad across the field of view, touching the body)."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = (int(s) for s in shape_xyz)
    sx, sy, sz = (float(s) for s in spacing_xyz)
    x = (np.arange(nx, dtype=np.float32) - (nx - 1) / 2) * sx
    y = (np.arange(ny, dtype=np.float32) - (ny - 1) / 2) * sy
    z = (np.arange(nz, dtype=np.float32) - (nz - 1) / 2) * sz
    fov_x, fov_y, fov_z = nx * sx, ny * sy, nz * sz
    ax, ay = (0.30 if arms else 0.44) * fov_x, 0.34 * fov_y
    body = (x[:, None] / ax) ** 2 + (y[None, :] / ay) ** 2  # (x, y), constant along z
    hu = np.full((nx, ny, nz), -1000.0, np.float32)
    hu[body <= 1.0] = -100.0  # fat
    hu[body <= 0.85] = 45.0  # soft tissue
    if arms:
        for side in (-1, 1):
            arm = ((x[:, None] - side * 1.3 * ax) / (0.17 * ax)) ** 2 + ((y[None, :] - 0.2 * ay) / (0.3 * ay)) ** 2
            hu[arm <= 1.0] = 45.0
            hu[arm <= 0.15] = 600.0  # humerus
    if table:
        pad = (y >= ay) & (y < ay + 10.0)
        hu[:, pad] = np.maximum(hu[:, pad], -100.0)  # the mattress, touching the back
        hu[:, (y >= ay + 10.0) & (y < ay + 20.0)] = 150.0  # the board
    spine = ((x[:, None]) / (0.12 * ax)) ** 2 + ((y[None, :] - 0.6 * ay) / (0.12 * ax)) ** 2
    hu[spine <= 1.0] = 400.0

    def ellipsoid(c, r):  # boolean mask of an ellipsoid (centre and radii in mm) restricted to its box
        idx = [np.flatnonzero(np.abs(a - ci) <= ri) for a, ci, ri in zip((x, y, z), c, r)]
        if any(len(i) == 0 for i in idx):
            return None, None
        box = tuple(slice(i[0], i[-1] + 1) for i in idx)
        q = (((x[box[0]] - c[0]) / r[0]) ** 2)[:, None, None] + (((y[box[1]] - c[1]) / r[1]) ** 2)[None, :, None] \
            + (((z[box[2]] - c[2]) / r[2]) ** 2)[None, None, :]
        return box, q <= 1.0

    box, m = ellipsoid((-0.4 * ax, -0.05 * ay, 0.1 * fov_z), (0.38 * ax, 0.55 * ay, 0.3 * fov_z))  # liver
    if box is not None:
        hu[box][m] = 60.0
    for side in (-1, 1):  # lungs in the upper third
        box, m = ellipsoid((0.42 * side * ax, 0.0, 0.45 * fov_z), (0.35 * ax, 0.7 * ay, 0.25 * fov_z))
        if box is not None:
            sub = hu[box]
            sub[m & (sub > -200)] = -850.0
    label = np.zeros((nx, ny, nz), np.uint8)
    for _ in range(num_lesions):
        r = rng.uniform(10, 30, 3)
        c = (rng.uniform(-0.5, 0.5) * ax, rng.uniform(-0.5, 0.3) * ay, rng.uniform(-0.3, 0.3) * fov_z)
        box, m = ellipsoid(c, r)
        if box is None:
            continue
        label[box][m] = 1
        sub = hu[box]
        sub[m] = sub[m] + rng.choice([-1, 1]) * rng.uniform(40, 90)
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(15.0)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), label


def write_nifti(array_xyz: np.ndarray, spacing_xyz: Sequence[float], path: str | Path,
                origin: Sequence[float] = (0.0, 0.0, 0.0)) -> Path:
    """``array_xyz`` as a compressed NIfTI with identity direction (the package's atomic image writer)."""
    from lightning_flare.io import Geometry, from_array, write_image

    geometry = Geometry(tuple(int(s) for s in array_xyz.shape), tuple(float(s) for s in spacing_xyz),
                        tuple(float(o) for o in origin), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return write_image(from_array(array_xyz, geometry), path)


def write_nnunet_model(model_dir: Path, state_xyz: dict, plans: dict, dataset: dict) -> Path:
    """A fresh nnU-Net v2 results folder (plans.json, dataset.json, fold_all/checkpoint_final.pth) holding our
    network's weights (``lightning_flare.convert_nnunet.write_results_folder``)."""
    import shutil

    from lightning_flare.convert_nnunet import write_results_folder

    shutil.rmtree(model_dir, ignore_errors=True)
    return write_results_folder(model_dir, state_xyz, plans, dataset, NNUNET_CONFIGURATION, fold="all")


def convert_and_compare(model_dir: Path, ckpt: Path, state_xyz: dict, env: dict, extra: Sequence[str] = ()) -> Path:
    """``python -m lightning_flare.convert_nnunet`` on ``model_dir``; the result must hold ``state_xyz`` exactly."""
    import torch
    from lightning_flare.checkpoint import load_checkpoint, net_weights

    result = run_measured([sys.executable, "-m", "lightning_flare.convert_nnunet", str(model_dir), "--fold", "all",
                           "--output", str(ckpt), *extra], env=env, cwd=REPO)
    if result["returncode"] != 0:
        raise SystemExit(f"convert_nnunet failed on {model_dir}:\n{result['output'][-3000:]}")
    converted = net_weights(load_checkpoint(ckpt))
    mismatch = [k for k, v in state_xyz.items() if not torch.equal(converted[k], v)]
    if mismatch:
        raise SystemExit(f"{ckpt}: converted weights differ from the written ones: {mismatch[:5]}")
    return ckpt


# ----------------------------------------------------------------------------------------------- processes
def _tree_memory_kib(root: int) -> tuple[int, int]:
    """(sum of VmRSS, sum of Pss) over ``root`` and its live descendants (Linux /proc).

    RSS counts pages shared by forked workers once per process; PSS splits each shared page between the
    processes that map it, so the PSS sum is the tree's real footprint."""
    rss, pss, todo, seen = 0, 0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/status") as f:
                rss += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
            with open(f"/proc/{pid}/smaps_rollup") as f:
                pss += next((int(line.split()[1]) for line in f if line.startswith("Pss:")), 0)
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError):
            continue
    return rss, pss


def run_measured(cmd: Sequence[str], env: dict | None = None, cwd: str | Path | None = None,
                 log: str | Path | None = None, interval: float = 0.1) -> dict:
    """Run ``cmd``; wall seconds, peak RSS of the whole process tree (sampled every ``interval`` s) and the
    largest single-process peak RSS (``wait4``); also the peak PSS sum of the tree. Output goes to ``log``
    (or is captured)."""
    if log:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "w") if log else subprocess.PIPE
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, text=True)
    peak, stop = [0, 0], threading.Event()

    def sample():
        while not stop.is_set():
            rss, pss = _tree_memory_kib(proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            stop.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    captured = proc.stdout.read() if out is subprocess.PIPE else ""
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if log:
        out.close()
        captured = Path(log).read_text()
    return {"seconds": seconds, "returncode": proc.returncode, "peak_tree_mb": peak[0] / 1024,
            "peak_tree_pss_mb": peak[1] / 1024, "peak_process_mb": usage.ru_maxrss / 1024, "output": captured}


# ----------------------------------------------------------------------------------------------- CLI overrides
def cli_overrides(items: Sequence[str], option: str = "--set") -> list[str]:
    """LightningCLI arguments (``--key value``) from ``KEY=VALUE`` items of ``option``; ValueError naming the item."""
    out: list[str] = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{option} needs KEY=VALUE (e.g. data.patch_size=[96,96,48]), got {item!r}")
        out += [f"--{key.strip().lstrip('-')}", value]
    return out


# ----------------------------------------------------------------------------------------------- tables
def format_table(headers: Sequence[str], rows: Sequence[Sequence], title: str | None = None) -> str:
    def cell(v):
        if isinstance(v, float):
            if v != v:
                return "n/a"
            return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
            for r in cells]
    return "\n".join(([f"\n{title}"] if title else []) + [line, sep, *body])
