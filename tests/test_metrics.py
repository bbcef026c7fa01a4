"""Tests for lightning_flare.metrics: FLARE24 rules, hand-computed cases, the reference."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from lightning_flare.metrics import (
    FlareMetrics,
    dice,
    flare_case_scores,
    normalized_surface_dice,
    summarize,
    surface_distances,
    surfel_area_table,
)

SPACINGS = [(0.7, 0.8, 3.0), (1.0, 1.0, 1.0), (2.5, 0.6, 0.9)]
TOLERANCES = [1.0, 2.0, 5.0]


def cube(shape=(12, 12, 12), lo=(2, 2, 2), size=4) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(a, a + size) for a in lo)] = True
    return mask


# ---------------------------------------------------------------- FLARE24 rules
def test_rule_prediction_values_above_one_score_zero():
    gt = cube().astype(np.uint8)
    pred = gt.copy()
    pred[0, 0, 0] = 2
    assert flare_case_scores(pred, gt, (1, 1, 1)) == (0.0, 0.0)
    assert flare_case_scores(gt.astype(np.int16) * -1, gt, (1, 1, 1)) == (0.0, 0.0)


def test_rule_both_empty_scores_one():
    empty = np.zeros((8, 8, 8), np.uint8)
    assert flare_case_scores(empty, empty, (0.7, 0.8, 3.0)) == (1.0, 1.0)


def test_rule_exactly_one_empty_scores_zero():
    empty, mask = np.zeros((12, 12, 12), np.uint8), cube().astype(np.uint8)
    assert flare_case_scores(mask, empty, (1, 1, 1)) == (0.0, 0.0)
    assert flare_case_scores(empty, mask, (1, 1, 1)) == (0.0, 0.0)


def test_rule_low_dice_sets_nsd_to_zero():
    gt, pred = cube(lo=(2, 2, 2)), cube(lo=(5, 5, 2))  # overlap 1x1x4 of 64 voxels
    dsc, nsd = flare_case_scores(pred, gt, (1, 1, 1), tolerance_mm=2.0)
    assert dsc == pytest.approx(2 * 4 / 128) and dsc < 0.2
    assert nsd == 0.0
    assert normalized_surface_dice(pred, gt, (1, 1, 1), 2.0) > 0.0  # rule 4, not the geometry


def test_rule_regular_case_and_torch_inputs():
    gt, pred = cube(lo=(2, 2, 2)), cube(lo=(3, 2, 2))
    dsc, nsd = flare_case_scores(torch.from_numpy(pred.astype(np.int64)),
                                 torch.from_numpy(gt.astype(np.uint8)), torch.tensor([1.0, 1, 1]))
    assert dsc == pytest.approx(0.75)
    assert nsd == pytest.approx(normalized_surface_dice(pred, gt, (1, 1, 1), 2.0)) == 1.0


# ---------------------------------------------------------------- hand-computed cases
def test_dice_of_tiny_masks():
    pred, gt = np.zeros((3, 3, 3), bool), np.zeros((3, 3, 3), bool)
    pred[0, 0, :2] = True
    gt[0, 0, 1:] = True
    gt[2, 2, 2] = True
    assert dice(pred, gt) == pytest.approx(2 * 1 / 5)
    assert dice(np.zeros_like(pred), np.zeros_like(gt)) == 1.0


@pytest.mark.parametrize("spacing", SPACINGS)
def test_nsd_of_identical_masks_is_one(spacing):
    rng = np.random.default_rng(0)
    mask = _blob(rng, (16, 16, 10), 2.0, 0.3)
    assert normalized_surface_dice(mask, mask, spacing, 0.1) == pytest.approx(1.0)


def test_shifted_cube_by_hand():
    """Cube of n voxels shifted by one voxel along axis 0, unit spacing.

    Every surfel lies within 1 mm of the other surface, so NSD(1 mm) = 1. Below 1 mm only
    the coincident surfels count. Surfel areas at unit spacing: flat face point 1, edge
    point sqrt(2)/2, cube corner sqrt(3)/8. Per cube: S = 6(n-1)^2 + 6 sqrt2 (n-1) + sqrt3;
    coincident part (the four side faces for x in [1, n]): Z = 4(n-1)^2 + 4 sqrt2 (n-1) + sqrt3/2.
    """
    n = 4
    gt, pred = cube(size=n, lo=(2, 2, 2)), cube(size=n, lo=(3, 2, 2))
    total = 6 * (n - 1) ** 2 + 6 * math.sqrt(2) * (n - 1) + math.sqrt(3)
    zero = 4 * (n - 1) ** 2 + 4 * math.sqrt(2) * (n - 1) + math.sqrt(3) / 2
    sd = surface_distances(pred, gt, (1, 1, 1))
    assert sd.areas_gt.sum() == pytest.approx(total) and sd.areas_pred.sum() == pytest.approx(total)
    assert set(np.unique(sd.dist_gt_to_pred)) == {0.0, 1.0}
    assert normalized_surface_dice(pred, gt, (1, 1, 1), 1.0) == pytest.approx(1.0)
    assert normalized_surface_dice(pred, gt, (1, 1, 1), 0.5) == pytest.approx(zero / total)
    assert dice(pred, gt) == pytest.approx((n - 1) / n)
    # same shift along the 3 mm axis: all surfels within 3 mm but not within 2.9 mm
    gt_z, pred_z = cube(size=n, lo=(2, 2, 2)), cube(size=n, lo=(2, 2, 3))
    assert normalized_surface_dice(pred_z, gt_z, (0.7, 0.8, 3.0), 3.0) == pytest.approx(1.0)
    assert normalized_surface_dice(pred_z, gt_z, (0.7, 0.8, 3.0), 2.9) < 1.0


def test_empty_surfaces():
    empty, mask = np.zeros((6, 6, 6), bool), cube((6, 6, 6), (1, 1, 1), 2)
    sd = surface_distances(empty, mask, (1, 1, 1))
    assert len(sd.dist_pred_to_gt) == 0 and np.isinf(sd.dist_gt_to_pred).all()
    assert normalized_surface_dice(empty, mask, (1, 1, 1)) == 0.0
    assert normalized_surface_dice(empty, empty, (1, 1, 1)) == 1.0


def test_summarize():
    stats = summarize([0.0, 0.5, 1.0, 1.0])
    assert stats["mean"] == pytest.approx(0.625) and stats["median"] == pytest.approx(0.75)
    assert stats["std"] == pytest.approx(np.std([0.0, 0.5, 1.0, 1.0]))
    assert (stats["q1"], stats["q3"]) == pytest.approx((0.375, 1.0))
    assert math.isnan(summarize([])["mean"])


# ---------------------------------------------------------------- reference cross-check
def _blob(rng, shape, sigma=2.0, level=1.0):
    """Smoothed noise (unit std) above `level`: level 1 fills ~16 %, level 2 ~2 %."""
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
    return field / field.std() > level


def _random_pairs():
    """(name, pred, gt) pairs: blobs, thin structures, border-touching masks, single voxels."""
    rng = np.random.default_rng(1234)
    shape = (24, 22, 14)
    pairs = []
    for i in range(4):
        gt = _blob(rng, shape)
        pred = np.roll(gt, rng.integers(-2, 3, 3), axis=(0, 1, 2)) ^ _blob(rng, shape, 1.5, 2.0)
        pairs.append((f"blob{i}", pred, gt))
    plane, line = np.zeros(shape, bool), np.zeros(shape, bool)
    plane[5:20, 3:18, 7] = True
    line[2:22, 10, 6] = True
    pairs.append(("planes", plane, np.roll(plane, 1, axis=2) | np.roll(plane, 2, axis=0)))
    pairs.append(("lines", line, np.roll(line, (1, 1), axis=(1, 2))))
    pairs.append(("plane_vs_line", plane, line))
    full = np.ones(shape, bool)
    border = full.copy()
    border[3:, :, 5:] = False
    pairs.append(("border", border, _blob(rng, shape, 3.0, -0.3)))
    pairs.append(("full_vs_blob", full, _blob(rng, shape)))
    for i in range(3):
        a, b = np.zeros(shape, bool), np.zeros(shape, bool)
        a[tuple(rng.integers(0, s) for s in shape)] = True
        b[tuple(rng.integers(0, s) for s in shape)] = True
        pairs.append((f"voxels{i}", a, b))  # far apart
    voxel = np.zeros(shape, bool)
    voxel[10, 10, 7] = True
    for shift in [(1, 0, 0), (0, 0, 1), (1, 1, 0), (1, -1, 1), (2, 0, 0)]:
        pairs.append((f"near_voxels{shift}", voxel, np.roll(voxel, shift, axis=(0, 1, 2))))
    corner = np.zeros(shape, bool)
    corner[0, 0, 0] = corner[-1, -1, -1] = True
    pairs.append(("corner_voxels", corner, np.roll(corner, 1, axis=0)))
    return pairs


@pytest.mark.parametrize("spacing", SPACINGS + [(0.55, 1.3, 2.2)])
def test_area_table_matches_reference(spacing):
    lookup = pytest.importorskip("surface_distance.lookup_tables")
    reference = lookup.create_table_neighbour_code_to_surface_area(spacing)
    np.testing.assert_allclose(surfel_area_table(spacing), reference, rtol=0, atol=1e-12)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_nsd_matches_reference(spacing):
    sd_ref = pytest.importorskip("surface_distance")
    for name, pred, gt in _random_pairs():
        ref = sd_ref.compute_surface_distances(gt, pred, spacing)
        ours = surface_distances(pred, gt, spacing)
        np.testing.assert_allclose(np.sort(ours.dist_gt_to_pred), ref["distances_gt_to_pred"],
                                   atol=1e-9, err_msg=name)
        np.testing.assert_allclose(np.sort(ours.dist_pred_to_gt), ref["distances_pred_to_gt"],
                                   atol=1e-9, err_msg=name)
        assert ours.areas_gt.sum() == pytest.approx(ref["surfel_areas_gt"].sum(), abs=1e-9), name
        assert ours.areas_pred.sum() == pytest.approx(ref["surfel_areas_pred"].sum(), abs=1e-9)
        for tol in TOLERANCES:
            expected = sd_ref.compute_surface_dice_at_tolerance(ref, tol)
            assert abs(normalized_surface_dice(pred, gt, spacing, tol) - expected) <= 1e-4, (name, tol)
        assert dice(pred, gt) == pytest.approx(sd_ref.compute_dice_coefficient(gt, pred))


# ---------------------------------------------------------------- FlareMetrics
def _cases():
    rng = np.random.default_rng(7)
    cases = []
    for i in range(5):
        gt = _blob(rng, (20, 18, 12), 2.0, 0.5).astype(np.uint8)
        pred = np.roll(gt, i % 3, axis=0)
        cases.append((pred, gt, (0.8, 0.8, 2.5)))
    cases.append((np.zeros((8, 8, 8), np.uint8), np.zeros((8, 8, 8), np.uint8), (1.0, 1.0, 1.0)))
    return cases


def test_flare_metrics_means_medians_and_duplicates():
    cases = _cases()
    expected = np.array([flare_case_scores(p, g, s) for p, g, s in cases])
    metric = FlareMetrics(tolerance_mm=2.0)
    for index, (pred, gt, spacing) in enumerate(cases):
        metric.update(torch.from_numpy(pred)[None], torch.from_numpy(gt), spacing, index)
    pred, gt, spacing = cases[0]
    metric.update(torch.from_numpy(pred), torch.from_numpy(gt), spacing, 0)  # padded repeat
    out = metric.compute()
    assert int(out["num_cases"]) == len(cases)
    assert float(out["dsc"]) == pytest.approx(expected[:, 0].mean())
    assert float(out["nsd"]) == pytest.approx(expected[:, 1].mean())
    assert float(out["dsc_median"]) == pytest.approx(np.median(expected[:, 0]))
    assert float(out["nsd_median"]) == pytest.approx(np.median(expected[:, 1]))
    index, dsc, nsd = metric.per_case()
    assert index.tolist() == list(range(len(cases)))
    np.testing.assert_allclose(dsc.numpy(), expected[:, 0])
    np.testing.assert_allclose(nsd.numpy(), expected[:, 1])
    metric.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # compute() before update()
        assert int(metric.compute()["num_cases"]) == 0
    assert len(metric.per_case()[0]) == 0


STATES = ("dsc", "nsd", "case_index", "predicted_ml", "reference_ml")  # FlareMetrics' add_state order


def test_flare_metrics_sync_concatenates_cases():
    """Two simulated ranks; rank 1 repeats case 0 as a DistributedSampler would."""
    cases = _cases()[:4]
    other: list[torch.Tensor] = []

    def gather(tensor, group=None):  # states arrive in add_state order: dsc, nsd, case_index, volumes
        return [tensor, other.pop(0)]

    rank0 = FlareMetrics(dist_sync_fn=gather, distributed_available_fn=lambda: True)
    rank1 = FlareMetrics()
    for index in (0, 2):
        rank0.update(torch.from_numpy(cases[index][0]), torch.from_numpy(cases[index][1]),
                     cases[index][2], index)
    for index in (1, 3, 0):
        rank1.update(torch.from_numpy(cases[index][0]), torch.from_numpy(cases[index][1]),
                     cases[index][2], index)
    other += [torch.cat(getattr(rank1, name)) for name in STATES]
    out = rank0.compute()
    expected = np.array([flare_case_scores(p, g, s) for p, g, s in cases])
    assert int(out["num_cases"]) == 4
    volumes = [float((p > 0).sum()) * float(np.prod(s)) / 1000 for p, _, s in cases]
    assert rank0.case_volumes()[1].tolist() == pytest.approx(volumes)  # rank 1's repeat of case 0 dropped
    assert float(out["dsc"]) == pytest.approx(expected[:, 0].mean())
    assert float(out["nsd"]) == pytest.approx(expected[:, 1].mean())
    assert rank0.per_case()[0].tolist() == [0, 1, 2, 3]
    assert len(rank0.case_index) == 2  # local states are restored after the synced compute


def test_device_nearest_surfel_search_matches_the_kd_tree():
    """The GPU path (brute-force nearest surfel in torch) gives the same NSD; checked here with device='cpu'."""
    from lightning_flare.metrics.functional import normalized_surface_dice

    rng = np.random.default_rng(5)
    for spacing, tol in [((0.7, 0.8, 3.0), 2.0), ((1.0, 1.0, 1.0), 1.0), ((2.5, 0.6, 0.9), 5.0)]:
        a = ndimage.gaussian_filter(rng.random((30, 28, 20)), 2) > 0.5
        b = ndimage.gaussian_filter(rng.random((30, 28, 20)), 2) > 0.5
        cpu = normalized_surface_dice(a, b, spacing, tol)
        assert normalized_surface_dice(a, b, spacing, tol, device="cpu") == pytest.approx(cpu, abs=1e-12)


def test_device_surfel_search_stays_within_its_memory_budget(monkeypatch):
    """Each chunk's distance matrix (float64, rows x targets) and cdist's temporaries fit the byte budget, for
    any surface size; the chunked search equals one unchunked pass and the k-d tree."""
    from lightning_flare.metrics import functional

    budget = functional.SEARCH_BUDGET_BYTES
    assert budget <= 256 * 2**20
    for targets in (10, 4_096, 100_000, 2_000_000):
        rows = functional.search_chunk_rows(targets)
        assert rows >= 1 and 2 * 8 * rows * targets <= budget
    rng = np.random.default_rng(3)
    source, target = rng.integers(0, 40, (700, 3)), rng.integers(0, 40, (900, 3))
    spacing = (0.7, 0.8, 3.0)
    sizes = []
    cdist = torch.cdist

    def spy(a, b, *args, **kwargs):
        sizes.append(a.shape[0] * b.shape[0] * 8)
        return cdist(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "cdist", spy)
    small = 50 * 900 * 16  # a budget of 50 rows
    chunked = functional._nearest_distances_torch(source, target, spacing, "cpu", budget_bytes=small)
    assert len(sizes) == 14 and 2 * max(sizes) <= small
    whole = functional._nearest_distances_torch(source, target, spacing, "cpu", budget_bytes=2**40)
    assert len(sizes) == 15
    np.testing.assert_array_equal(chunked, whole)
    np.testing.assert_array_equal(chunked, functional._nearest_distances(source, target, spacing))


def test_placeholder_rows_of_a_rank_without_cases_are_dropped():
    """A rank whose only item was padding adds a placeholder row: the gathered states keep their dtypes and the
    result counts the real cases only."""
    cases = _cases()[:2]
    other: list[torch.Tensor] = []

    def gather(tensor, group=None):
        return [tensor, other.pop(0)]

    rank0 = FlareMetrics(dist_sync_fn=gather, distributed_available_fn=lambda: True)
    rank1 = FlareMetrics()
    for index, (pred, gt, spacing) in enumerate(cases):
        rank0.update(torch.from_numpy(pred), torch.from_numpy(gt), spacing, index)
    rank1.add_placeholder()
    assert [getattr(rank1, name)[0].dtype for name in STATES] == [getattr(rank0, name)[0].dtype for name in STATES]
    other += [torch.cat(getattr(rank1, name)) for name in STATES]
    out = rank0.compute()
    expected = np.array([flare_case_scores(p, g, s) for p, g, s in cases])
    assert int(out["num_cases"]) == 2 and rank0.per_case()[0].tolist() == [0, 1]
    assert float(out["dsc"]) == pytest.approx(expected[:, 0].mean())
    assert int(rank1.compute()["num_cases"]) == 0
