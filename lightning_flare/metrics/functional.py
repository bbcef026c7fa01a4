"""FLARE24 Task 1 metrics as pure functions (NumPy or torch in, floats out).

Surfaces follow DeepMind's ``surface-distance``: marching-cubes surfels on the voxel
corner grid, weighted by their area at the (anisotropic) spacing. Surfel-to-surface
distances equal the reference's EDT values but come from a k-d tree on surfels only.
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Any, NamedTuple, Sequence

import numpy as np

from lightning_flare.device import to_host

SEARCH_BUDGET_BYTES = 256 * 2**20  # working memory of one chunk of the brute-force surfel search on a device

Corner = tuple[int, ...]  # a corner (0/1, 0/1, 0/1) of the 2x2x2 neighbourhood
_CORNERS: list[Corner] = list(itertools.product((0, 1), repeat=3))
_SHIFT = {c: 7 - (4 * c[0] + 2 * c[1] + c[2]) for c in _CORNERS}  # bit in the code; (0,0,0): 128


def _flip(corner: Corner, axis: int) -> Corner:
    return tuple(v ^ (i == axis) for i, v in enumerate(corner))


def _surface_loops(inside: dict[Corner, bool]) -> list[list[np.ndarray]]:
    """Iso-surface polygons of one cube, vertices at the midpoints of crossed edges.

    Inside corners that only touch diagonally (ambiguous faces) are kept apart."""
    edges = [(p, _flip(p, k), k) for p in _CORNERS for k in range(3)
             if inside[p] and not inside[_flip(p, k)]]
    links: dict[tuple, list[tuple]] = {(p, q): [] for p, q, _ in edges}
    for p, q, k in edges:
        for m in (m for m in range(3) if m != k):  # the two faces holding edge p-q
            cur, axis = p, m
            while inside[_flip(cur, axis)]:  # walk the face cycle away from q over inside corners
                cur, axis = _flip(cur, axis), (k if axis == m else m)
            links[(p, q)].append((cur, _flip(cur, axis)))
    loops: list[list[np.ndarray]] = []
    seen: set[tuple] = set()
    for cur in links:
        if cur not in seen:  # follow an unvisited loop back to its start
            loops.append([])
            while cur not in seen:
                seen.add(cur)
                loops[-1].append(np.add(cur[0], cur[1]) / 2.0)
                cur = next((e for e in links[cur] if e not in seen), cur)
    return loops


def _triangulations(vertices: list[int]) -> list[list[tuple[int, int, int]]]:
    """All triangulations of a polygon given by its vertex indices."""
    if len(vertices) < 3:
        return [[]]
    first, last = vertices[0], vertices[-1]
    return [left + right + [(first, vertices[m], last)]
            for m in range(1, len(vertices) - 1)
            for left in _triangulations(vertices[:m + 1])
            for right in _triangulations(vertices[m:])]


@functools.lru_cache(maxsize=1)
def _surfel_normals() -> tuple[np.ndarray, np.ndarray]:
    """(code, area vector at unit spacing) of every surfel triangle of the 256 codes.

    Codes with over four inside corners use their complement; each polygon takes its
    largest-area triangulation, which reproduces the reference's lookup table."""
    codes, normals = [], []
    for code in range(256):
        inside = {c: bool(code >> _SHIFT[c] & 1) for c in _CORNERS}
        if sum(inside.values()) > 4:
            inside = {c: not v for c, v in inside.items()}
        for loop in _surface_loops(inside):
            tris = np.array(_triangulations(list(range(len(loop)))))  # (options, n - 2, 3)
            a, b, c = (np.array(loop)[tris[..., i]] for i in range(3))
            vectors = np.cross(b - a, c - a) / 2  # triangle area vectors
            best = vectors[np.linalg.norm(vectors, axis=-1).sum(axis=1).argmax()]
            codes += [code] * len(best)
            normals += list(best)
    return np.array(codes), np.array(normals)


@functools.lru_cache(maxsize=64)
def surfel_area_table(spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """Surfel area (mm^2) of each of the 256 neighbour codes for this spacing."""
    s0, s1, s2 = spacing_mm
    codes, normals = _surfel_normals()
    scaled = normals * np.array([s1 * s2, s0 * s2, s0 * s1])
    return np.bincount(codes, weights=np.linalg.norm(scaled, axis=1), minlength=256)


to_numpy = to_host  # NumPy view of an array or a (possibly CUDA) torch tensor


def bounding_box(*masks: np.ndarray) -> tuple[slice, ...] | None:
    """Joint bounding box of 3D boolean masks, or None when all are empty."""
    box = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        proj = np.zeros(masks[0].shape[axis], bool)
        for mask in masks:
            proj |= mask.any(axis=others)
        idx = np.flatnonzero(proj)
        if idx.size == 0:
            return None
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)


def dice(pred: Any, gt: Any) -> float:
    """Volumetric Dice of two boolean masks; 1.0 when both are empty."""
    pred, gt = (to_numpy(x).astype(bool, copy=False) for x in (pred, gt))
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(gt))
    return 1.0 if total == 0 else float(2.0 * np.count_nonzero(pred & gt) / total)


class SurfaceDistances(NamedTuple):
    """Per-surfel distances (mm) to the other surface and surfel areas (mm^2)."""
    dist_gt_to_pred: np.ndarray
    dist_pred_to_gt: np.ndarray
    areas_gt: np.ndarray
    areas_pred: np.ndarray


def _surfels(mask: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Corner-grid coordinates (N, 3) and areas (N,) of the surfels of a cropped mask.

    Surfels are corners with a mixed 2x2x2 neighbourhood (found by separable OR / AND
    passes); their 8-bit neighbour codes are then gathered at those corners only."""
    padded = np.pad(mask, 1)  # one background voxel on every side
    any_in, all_in = padded, padded
    for axis in range(3):
        lo, hi = [slice(None)] * 3, [slice(None)] * 3
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        any_in = any_in[tuple(lo)] | any_in[tuple(hi)]
        all_in = all_in[tuple(lo)] & all_in[tuple(hi)]
    mixed = np.flatnonzero(any_in ^ all_in)  # C order; much faster than np.argwhere
    points = np.stack(np.unravel_index(mixed, any_in.shape), axis=1)
    codes = np.zeros(len(points), np.uint8)
    for (a, b, c), shift in _SHIFT.items():
        codes |= padded[points[:, 0] + a, points[:, 1] + b, points[:, 2] + c].view(np.uint8) << shift
    return points, table[codes]


def _nearest_distances(source: np.ndarray, target: np.ndarray,
                       spacing: tuple[float, float, float]) -> np.ndarray:
    """Distance (mm) from each source surfel to the closest target surfel.

    A k-d tree finds the exact nearest neighbour; the distance is evaluated from the index
    offset with the floating-point steps of ``ndimage.distance_transform_edt(sampling=...)``,
    so comparisons with the tolerance agree with the reference exactly."""
    if len(target) == 0:
        return np.full(len(source), np.inf)
    if len(source) == 0:
        return np.zeros(0)
    scale = np.asarray(spacing, np.float64)  # points are in index units, the tree in mm
    from scipy.spatial import cKDTree  # here, not at import: predict needs no surface distances (start-up)

    _, nearest = cKDTree(target * scale).query(source * scale)
    offset = (target[nearest] - source).astype(np.float64) * scale
    offset *= offset
    return np.sqrt((offset[:, 0] + offset[:, 1]) + offset[:, 2])


def search_chunk_rows(num_target: int, budget_bytes: int = SEARCH_BUDGET_BYTES) -> int:
    """Source surfels per chunk of the brute-force search: the chunk's (rows x targets) float64 distance matrix
    and as much again for ``cdist``'s temporaries stay within ``budget_bytes`` (at least one row)."""
    return max(1, int(budget_bytes) // (2 * 8 * max(int(num_target), 1)))


def _nearest_distances_torch(source: np.ndarray, target: np.ndarray, spacing: tuple[float, float, float],
                             device: Any, budget_bytes: int = SEARCH_BUDGET_BYTES) -> np.ndarray:
    """Same as ``_nearest_distances``, the nearest-neighbour search done by chunked brute force on ``device``
    (a GPU) in float64, each chunk within ``budget_bytes`` (``search_chunk_rows``); the distance is then evaluated
    exactly as on the CPU path."""
    import torch

    if len(target) == 0:
        return np.full(len(source), np.inf)
    if len(source) == 0:
        return np.zeros(0)
    scale = torch.tensor(spacing, dtype=torch.float64, device=device)
    tgt = torch.from_numpy(target).to(device=device, dtype=torch.float64) * scale
    src = torch.from_numpy(source).to(device=device, dtype=torch.float64) * scale
    rows = search_chunk_rows(len(target), budget_bytes)
    nearest = to_host(torch.cat([torch.cdist(src[i : i + rows], tgt).argmin(1) for i in range(0, len(src), rows)]))
    offset = (target[nearest] - source).astype(np.float64) * np.asarray(spacing, np.float64)
    offset *= offset
    return np.sqrt((offset[:, 0] + offset[:, 1]) + offset[:, 2])


def surface_distances(pred: Any, gt: Any, spacing_mm: Sequence[float], device: Any = None) -> SurfaceDistances:
    """Surfel distances and areas like ``surface_distance.compute_surface_distances``.

    Unlike the reference, the outputs are not sorted (pairs stay aligned) and an
    empty mask yields ``inf`` distances for the other surface instead of failing.
    With ``device`` (or CUDA tensors as input) the nearest-surfel search runs there (GPU)."""
    if device is None and getattr(pred, "is_cuda", False):
        device = pred.device
    spacing = tuple(float(s) for s in to_numpy(spacing_mm).reshape(3))
    pred, gt = (to_numpy(x).astype(bool, copy=False) for x in (pred, gt))
    if pred.ndim != 3 or pred.shape != gt.shape:
        raise ValueError(f"need two 3D masks of one shape, got {pred.shape} and {gt.shape}")
    box = bounding_box(pred, gt)
    if box is None:
        return SurfaceDistances(*[np.zeros(0)] * 4)
    table = surfel_area_table(spacing)
    points_gt, areas_gt = _surfels(gt[box], table)
    points_pred, areas_pred = _surfels(pred[box], table)
    if device is not None:
        nearest = lambda a, b: _nearest_distances_torch(a, b, spacing, device)  # noqa: E731
    else:
        nearest = lambda a, b: _nearest_distances(a, b, spacing)  # noqa: E731
    return SurfaceDistances(nearest(points_gt, points_pred), nearest(points_pred, points_gt), areas_gt, areas_pred)


def surface_dice_from_distances(sd: SurfaceDistances, tolerance_mm: float) -> float:
    """Surface Dice at a tolerance (``compute_surface_dice_at_tolerance``); 1.0 if no surfaces."""
    total = sd.areas_gt.sum() + sd.areas_pred.sum()
    if total == 0:  # both masks empty
        return 1.0
    overlap = (sd.areas_gt[sd.dist_gt_to_pred <= tolerance_mm].sum()
               + sd.areas_pred[sd.dist_pred_to_gt <= tolerance_mm].sum())
    return float(overlap / total)


def normalized_surface_dice(pred: Any, gt: Any, spacing_mm: Sequence[float],
                            tolerance_mm: float = 2.0, device: Any = None) -> float:
    """Normalized surface Dice (NSD) of two 3D masks at ``tolerance_mm``."""
    return surface_dice_from_distances(surface_distances(pred, gt, spacing_mm, device), tolerance_mm)


def _foreground(label_map: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    if label_map.dtype == bool and tuple(labels) == (1,):
        return label_map
    return label_map == labels[0] if len(labels) == 1 else np.isin(label_map, labels)


def _valid_prediction(pred: np.ndarray, labels: Sequence[int]) -> bool:
    """True when every predicted value is background (0) or one of ``labels``."""
    if pred.dtype == bool or pred.size == 0:
        return True
    if tuple(labels) == (1,) and pred.dtype.kind in "iu":
        return bool(pred.min() >= 0 and pred.max() <= 1)
    return bool(np.isin(pred, (0, *labels)).all())


def flare_case_scores(pred: Any, gt: Any, spacing_mm: Sequence[float],
                      tolerance_mm: float = 2.0,
                      labels: Sequence[int] = (1,), device: Any = None) -> tuple[float, float]:
    """(DSC, NSD) of one case under the FLARE24 Task 1 rules.

    1. a predicted value outside {0} and ``labels`` -> (0, 0);
    2. ground truth and prediction both empty -> (1, 1);
    3. exactly one empty -> (0, 0);
    4. otherwise DSC, and NSD at ``tolerance_mm`` (ground-truth spacing) unless DSC < 0.2.
    CUDA tensors (or ``device``) run the nearest-surfel search on that GPU."""
    if device is None and getattr(pred, "is_cuda", False):
        device = pred.device
    pred, gt = to_numpy(pred), to_numpy(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ")
    if not _valid_prediction(pred, labels):
        return 0.0, 0.0
    pred_mask, gt_mask = _foreground(pred, labels), _foreground(gt, labels)
    box = bounding_box(pred_mask, gt_mask)
    if box is None:
        return 1.0, 1.0
    pred_mask, gt_mask = pred_mask[box], gt_mask[box]  # everything below runs on the crop
    if not pred_mask.any() or not gt_mask.any():
        return 0.0, 0.0
    dsc = dice(pred_mask, gt_mask)
    if dsc < 0.2:
        return dsc, 0.0
    return dsc, normalized_surface_dice(pred_mask, gt_mask, spacing_mm, tolerance_mm, device)


def summarize(values: Any) -> dict[str, float]:
    """Mean, std (population), median and quartiles of per-case scores (Table-5 style)."""
    v = to_numpy(values).astype(np.float64).reshape(-1)
    if v.size == 0:
        return dict.fromkeys(("mean", "std", "median", "q1", "q3"), float("nan"))
    q1, median, q3 = np.percentile(v, [25, 50, 75])
    return {"mean": float(v.mean()), "std": float(v.std()), "median": float(median),
            "q1": float(q1), "q3": float(q3)}


VOLUME_RATIO_GOAL = (0.8, 1.25)  # predicted / reference volume of the median lesion case (issue 13's goal)


def volume_ratio_summary(predicted_ml: Sequence[float], reference_ml: Sequence[float]) -> dict[str, float]:
    """Predicted / reference volume over the lesion cases (reference > 0; healthy cases have no ratio): median,
    quartiles, the number of lesion cases and how many lie within ``VOLUME_RATIO_GOAL`` (bounds included)."""
    ratios = np.array([p / r for p, r in zip(predicted_ml, reference_ml) if r > 0 and not math.isnan(p)], np.float64)
    low, high = VOLUME_RATIO_GOAL
    q1, median, q3 = np.percentile(ratios, [25, 50, 75]) if ratios.size else (float("nan"),) * 3
    return {"median": float(median), "q1": float(q1), "q3": float(q3), "lesion_cases": int(ratios.size),
            "within_goal": int(((ratios >= low) & (ratios <= high)).sum())}
