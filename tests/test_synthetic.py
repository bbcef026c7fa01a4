"""Tests for the synthetic CT generator (lightning_flare.synthetic); small sizes, fast."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from lightning_flare import synthetic as syn

SIZE = 64  # tiny in-plane matrix for speed


def _case(seed: int, healthy: bool = False, **kw) -> syn.SyntheticCase:
    return syn.make_case(np.random.default_rng(seed), healthy, SIZE, **kw)


def _q2(case: syn.SyntheticCase, les: syn.Lesion) -> np.ndarray:
    """Squared normalised radius of every voxel w.r.t. a lesion ellipsoid."""
    idx = np.indices(case.image.shape, dtype=float)
    return sum(((idx[i] - les.centre_vox[i]) * case.spacing[i] / les.radii_mm[i]) ** 2 for i in range(3))


def _read(path) -> tuple[np.ndarray, sitk.Image]:
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img).transpose(2, 1, 0), img  # back to (x, y, z)


def test_deterministic_and_seed_dependent():
    a, b, c = _case(3), _case(3), _case(4)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert (a.spacing, a.origin, a.lesions) == (b.spacing, b.origin, b.lesions)
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)


def test_geometry_dtypes_and_ranges():
    for seed in range(10):
        case = _case(seed, healthy=seed % 3 == 0)
        sx, sy, sz = case.spacing
        assert 0.7 <= sx <= 1.0 and sx == sy and 2.5 <= sz <= 5.0 and sz > 2 * sx
        nx, ny, nz = case.image.shape
        assert (nx, ny) == (SIZE, SIZE) and 115 <= nz * sz <= 205
        assert case.image.dtype == np.int16 and case.label.dtype == np.uint8
        assert case.label.shape == case.image.shape and set(np.unique(case.label)) <= {0, 1}
        assert case.direction == syn.DIRECTIONS["identity"] and len(case.origin) == 3


def test_hu_plausible_and_lesions_contrast():
    for seed in range(8):
        case = _case(seed)
        img = case.image.astype(float)
        assert abs(np.median(img[:3, :3]) + 1000) < 10  # air in the corners
        centre = img[SIZE // 2 - 4:SIZE // 2 + 4, SIZE // 2 - 4:SIZE // 2 + 4]
        assert -150 < np.median(centre) < 150  # soft tissue / organs in the middle of the body
        assert img.max() > 250  # bone
        for les in case.lesions:
            q2 = _q2(case, les)
            # shell within the generator's halo (HALO x radii), which is host or soft tissue only
            core, shell = img[q2 <= 0.5 ** 2].mean(), img[(q2 >= 1.15 ** 2) & (q2 <= syn.HALO ** 2)].mean()
            assert abs(core - shell) >= 30, (seed, les)
            assert np.sign(core - shell) == np.sign(les.contrast_hu)
            assert 40 <= abs(les.contrast_hu) <= 100
            lesion_hu = case.tissue_hu[les.host] + les.contrast_hu  # no organ has the lesion's intensity
            assert min(abs(lesion_hu - case.tissue_hu[t]) for t in syn.PARENCHYMA) >= syn.MIN_CONTRAST_HU


def test_healthy_and_lesion_labels():
    for seed in range(6):
        healthy = _case(seed, healthy=True)
        assert healthy.label.sum() == 0 and healthy.lesions == []
        sick = _case(seed)
        assert sick.label.sum() > 0 and 1 <= len(sick.lesions) <= 3
        assert sick.label.astype(bool).sum() == sum((_q2(sick, les) <= 1).sum() for les in sick.lesions)


@pytest.mark.parametrize("size", [SIZE, 192])
def test_lesion_volume_matches_radii(size):
    for seed in range(3):
        case = syn.make_case(np.random.default_rng(seed), False, size)
        vol = case.label.sum() * float(np.prod(case.spacing))
        expected = sum(4 / 3 * math.pi * np.prod(les.radii_mm) for les in case.lesions)
        assert 0.7 * expected <= vol <= 1.3 * expected
        for les in case.lesions:
            assert all(syn.MIN_RADIUS_MM <= r <= syn.RADIUS_MM[1] for r in les.radii_mm)
            if size == 192:
                assert min(les.radii_mm) >= syn.RADIUS_MM[0] * 0.8  # default size: ~8-25 mm lesions
        n = len(case.lesions)
        assert n * 4 / 3 * math.pi * syn.MIN_RADIUS_MM ** 3 * 0.7 <= vol <= n * 4 / 3 * math.pi * 25 ** 3


def test_healthy_schedule():
    for f in (0.1, 0.2, 0.5, 1.0):
        flags = [syn.is_healthy(k, f) for k in range(40)]
        assert all(any(flags[:n]) for n in range(3, 41))  # >= 1 healthy whenever there are >= 3 cases
        assert abs(sum(flags) - f * 40) <= 1
    assert not any(syn.is_healthy(k, 0.0) for k in range(40))


def test_write_dataset_layout_geometry_and_noop(tmp_path):
    out = syn.write_dataset(tmp_path / "ds", num_train=3, num_test=3, seed=5, in_plane_size=SIZE)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"} and meta["labels"] == {"background": 0, "tumor": 1}
    assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"
    assert meta["name"] == "Dataset900_Synthetic" and "synthetic" in meta["description"]
    assert not list(out.rglob(".tmp*"))
    for split in ("Tr", "Ts"):
        assert len(list((out / f"images{split}").iterdir())) == 3
        n_healthy = 0
        for k in range(3):
            cid, case = syn.dataset_case(5, split, k, 0.2, SIZE)
            image, img = _read(out / f"images{split}" / f"{cid}_0000.nii.gz")
            label, lab = _read(out / f"labels{split}" / f"{cid}.nii.gz")
            assert np.array_equal(image, case.image) and np.array_equal(label, case.label)
            for im in (img, lab):
                assert np.allclose(im.GetSpacing(), case.spacing, atol=1e-5)
                assert np.allclose(im.GetOrigin(), case.origin, atol=1e-3)
                assert np.allclose(im.GetDirection(), case.direction, atol=1e-6)
            n_healthy += int(label.sum() == 0)
        assert n_healthy >= 1
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    syn.write_dataset(tmp_path / "ds", num_train=3, num_test=3, seed=5, in_plane_size=SIZE)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes
    # different parameters: rewritten, stale cases removed
    syn.write_dataset(tmp_path / "ds", num_train=2, num_test=1, seed=5, in_plane_size=SIZE)
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["SYN_000.nii.gz", "SYN_001.nii.gz"]
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 2


def test_refuses_to_overwrite_a_real_dataset(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "real", "numTraining": 24}))
    with pytest.raises(FileExistsError):
        syn.write_dataset(tmp_path, num_train=1, num_test=0, in_plane_size=SIZE)
    assert json.loads((tmp_path / "dataset.json").read_text())["name"] == "real"


def test_case_independent_of_dataset_size(tmp_path):
    a = syn.write_dataset(tmp_path / "a", num_train=2, num_test=0, seed=1, in_plane_size=SIZE)
    b = syn.write_dataset(tmp_path / "b", num_train=1, num_test=0, seed=1, in_plane_size=SIZE)
    name = "imagesTr/SYN_000_0000.nii.gz"
    assert np.array_equal(_read(a / name)[0], _read(b / name)[0])


@pytest.mark.parametrize("direction", ["flipped", "permuted"])
def test_non_identity_direction_round_trips(tmp_path, direction):
    ref, case = _case(7), _case(7, direction=direction)
    assert np.array_equal(ref.image, case.image) and case.direction == syn.DIRECTIONS[direction]
    out = syn.write_dataset(tmp_path / direction, num_train=1, num_test=0, seed=2, in_plane_size=SIZE,
                            direction=direction)
    _, case = syn.dataset_case(2, "Tr", 0, in_plane_size=SIZE, direction=direction)
    label, img = _read(out / "labelsTr" / "SYN_000.nii.gz")
    assert np.allclose(img.GetDirection(), syn.DIRECTIONS[direction], atol=1e-6)
    assert np.array_equal(label, case.label)
    # the lesion centre maps to origin + D @ (index * spacing)
    idx = [int(v) for v in case.lesions[0].centre_vox]
    d = np.array(case.direction).reshape(3, 3)
    expected = np.array(case.origin) + d @ (np.array(idx) * case.spacing)
    assert np.allclose(img.TransformIndexToPhysicalPoint(idx), expected, atol=1e-3)
    assert label[tuple(idx)] == 1


def test_cli(tmp_path):
    syn.main([str(tmp_path / "cli"), "--num-train", "1", "--num-test", "1", "--in-plane-size", str(SIZE)])
    meta = json.loads((tmp_path / "cli" / "dataset.json").read_text())
    assert meta["synthetic_params"]["num_test"] == 1
    assert (tmp_path / "cli" / "imagesTs" / "SYN_T000_0000.nii.gz").is_file()
