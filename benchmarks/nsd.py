"""Time our NSD against DeepMind's reference (`surface-distance`) on a 512x512x300 case.

Usage: python benchmarks/nsd.py [--repeats 3] [--blobs 4] [--seed 0]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage

from lightning_flare.metrics.functional import flare_case_scores, normalized_surface_dice

SHAPE = (512, 512, 300)
SPACING = (0.8, 0.8, 2.5)  # mm, same axis order as the arrays
TOLERANCE = 2.0


def make_pair(n_blobs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth with a few noisy ellipsoidal tumours, prediction = perturbed copy."""
    rng = np.random.default_rng(seed)
    gt, pred = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    for _ in range(n_blobs):
        radius = rng.uniform(10, 40) * np.array([1.0, 1.0, SPACING[0] / SPACING[2]])
        half = np.ceil(radius * 1.6).astype(int) + 4
        centre = [rng.integers(h, n - h) for h, n in zip(half, SHAPE)]
        box = tuple(slice(c - h, c + h) for c, h in zip(centre, half))
        grid = np.meshgrid(*[np.arange(-h, h, dtype=float) for h in half], indexing="ij")
        for mask, shift, scale in ((gt, 0.0, 1.0), (pred, rng.uniform(-2, 2), rng.uniform(0.9, 1.1))):
            dist = sum(((g - shift) / (r * scale)) ** 2 for g, r in zip(grid, radius))
            noise = ndimage.gaussian_filter(rng.normal(size=dist.shape), 3) * 3.0
            mask[box] |= dist + noise < 1.0
    return pred, gt


def reference_nsd(pred: np.ndarray, gt: np.ndarray) -> float:
    import surface_distance as sd  # dev extra

    dists = sd.compute_surface_distances(gt, pred, SPACING)
    return float(sd.compute_surface_dice_at_tolerance(dists, TOLERANCE))


def best_time(fn, repeats: int) -> tuple[float, float]:
    """(fastest wall time in s, result) over `repeats` runs."""
    times, value = [], float("nan")
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return min(times), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--blobs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pred, gt = make_pair(args.blobs, args.seed)
    print(f"shape {SHAPE}, spacing {SPACING} mm, tolerance {TOLERANCE} mm, "
          f"gt voxels {gt.sum()}, pred voxels {pred.sum()}, best of {args.repeats}")
    t_ref, v_ref = best_time(lambda: reference_nsd(pred, gt), args.repeats)
    t_ours, v_ours = best_time(lambda: normalized_surface_dice(pred, gt, SPACING, TOLERANCE),
                               args.repeats)
    t_case, (dsc, v_case) = best_time(
        lambda: flare_case_scores(pred.astype(np.uint8), gt.astype(np.uint8), SPACING, TOLERANCE),
        args.repeats)
    print(f"{'method':<34}{'seconds':>9}{'ratio':>8}{'NSD':>10}{'|diff|':>10}")
    rows = [("reference (surface-distance 0.1)", t_ref, v_ref),
            ("ours normalized_surface_dice", t_ours, v_ours),
            ("ours flare_case_scores (uint8)", t_case, v_case)]
    for name, t, v in rows:
        print(f"{name:<34}{t:>9.3f}{t / t_ref:>8.2f}{v:>10.6f}{abs(v - v_ref):>10.1e}")
    print(f"DSC {dsc:.4f}")


if __name__ == "__main__":
    main()
