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


# ----------------------------------------------------------------- issue 16: partial labels, unlabelled scans
def _content_hash(root) -> str:
    """sha256 over every file: NIfTI voxels, dtype and geometry; other files' bytes (gzip bytes may differ by zlib)."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode())
        if p.name.endswith(".nii.gz"):
            img = sitk.ReadImage(str(p))
            arr = sitk.GetArrayFromImage(img)
            h.update(str((arr.dtype.str, arr.shape, img.GetSpacing(), img.GetOrigin(), img.GetDirection())).encode())
            h.update(arr.tobytes())
        else:
            h.update(p.read_bytes())
    return h.hexdigest()


def test_default_generation_is_unchanged(tmp_path):
    """The demo dataset and its cached results depend on it: the hash of this dataset made before the options of
    issue 16 existed (commit bf18425)."""
    out = syn.write_dataset(tmp_path / "ds", num_train=3, num_test=1, seed=4, in_plane_size=SIZE)
    assert _content_hash(out) == "f6732d4dc02f3d277b534fe9f8b8a37697270d0db2d9316231d4e4d5d28f33c3"
    assert syn.synthetic_params() == {"version": 2, "name": "Dataset900_Synthetic", "num_train": 16, "num_test": 6,
                                      "healthy_fraction": 0.2, "seed": 0, "in_plane_size": 192, "direction": "identity"}


def test_largest_lesion_by_hand():
    label = np.zeros((6, 1, 1), np.uint8)
    label[[0, 1, 3, 4, 5], 0, 0] = 1  # components of 2 and 3 voxels
    assert syn.largest_lesion(label)[:, 0, 0].tolist() == [0, 0, 0, 1, 1, 1]
    assert syn.largest_lesion(np.zeros((2, 2, 2), np.uint8)).sum() == 0


def test_partial_schedule_by_hand():
    # healthy_fraction 0.2: case 2 is healthy; lesion cases 0, 1, 3, 4, 5 -> every 2nd of them (0.5): 1 and 4
    assert [k for k in range(6) if syn.is_partial(k, 0.2, 0.5)] == [1, 4]
    assert [k for k in range(6) if syn.is_partial(k, 0.2, 1.0)] == [0, 1, 3, 4, 5]
    assert not any(syn.is_partial(k, 0.2, 0.0) for k in range(6))


def test_lesions_per_case():
    for seed in range(3):
        assert 2 <= len(_case(seed, lesions_per_case=(2, 4)).lesions) <= 4
    with pytest.raises(ValueError, match="lesions_per_case"):
        _case(0, lesions_per_case=(0, 2))


def test_partial_labels_unlabelled_scans_and_test_healthy_fraction(tmp_path):
    from lightning_flare.raw_dataset import load_raw_dataset
    from lightning_flare.verify import verify_dataset

    kw = dict(num_train=6, num_test=3, seed=5, in_plane_size=SIZE, partial_fraction=0.5, num_unlabelled=2,
              test_healthy_fraction=0.5, lesions_per_case=(2, 3))
    out = syn.write_dataset(tmp_path / "ds", **kw)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["partially_labelled"] == ["SYN_001", "SYN_004"]
    assert {k: meta["synthetic_params"][k] for k in ("partial_fraction", "num_unlabelled", "test_healthy_fraction",
                                                     "lesions_per_case")} == {"partial_fraction": 0.5, "num_unlabelled": 2,
                                                                              "test_healthy_fraction": 0.5, "lesions_per_case": [2, 3]}
    for k in range(6):
        cid, case = syn.dataset_case(5, "Tr", k, 0.2, SIZE, lesions_per_case=(2, 3))
        label = _read(out / "labelsTr" / f"{cid}.nii.gz")[0]
        if cid in meta["partially_labelled"]:
            assert len(case.lesions) >= 2 and 0 < label.sum() < case.label.sum()
            assert np.array_equal(label, syn.largest_lesion(case.label))
        else:
            assert np.array_equal(label, case.label)
    for k in range(3):  # complete test labels, healthy as test_healthy_fraction 0.5 says (case 1; 0.2 would be case 2)
        cid, case = syn.dataset_case(5, "Ts", k, 0.5, SIZE, lesions_per_case=(2, 3))
        assert np.array_equal(_read(out / "labelsTs" / f"{cid}.nii.gz")[0], case.label)
        assert (case.label.sum() == 0) == (k == 1)
    assert sorted(p.name for p in (out / "imagesUnlabelled").iterdir()) == ["SYN_U000_0000.nii.gz", "SYN_U001_0000.nii.gz"]
    assert not (out / "labelsUnlabelled").exists()
    _, unlabelled = syn.dataset_case(5, "Unlabelled", 1, 0.2, SIZE, lesions_per_case=(2, 3))
    assert np.array_equal(_read(out / "imagesUnlabelled" / "SYN_U001_0000.nii.gz")[0], unlabelled.image)
    ds = load_raw_dataset(out)
    assert ds.partially_labelled == {"SYN_001", "SYN_004"} and len(ds.unlabelled_cases()) == 2
    report = verify_dataset(out)
    assert report.ok, report.errors
    assert report.counts == {"labelled": 4, "partially_labelled": 2, "unlabelled": 2}
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    syn.write_dataset(tmp_path / "ds", **kw)  # same settings: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes
    syn.write_dataset(tmp_path / "ds", **{**kw, "num_unlabelled": 1, "partial_fraction": 0.0})
    assert [p.name for p in (out / "imagesUnlabelled").iterdir()] == ["SYN_U000_0000.nii.gz"]  # stale scan removed
    assert "partially_labelled" not in json.loads((out / "dataset.json").read_text())


def test_cli_partial_and_unlabelled_options(tmp_path):
    syn.main([str(tmp_path / "cli"), "--num-train", "3", "--num-test", "1", "--in-plane-size", str(SIZE),
              "--partial-fraction", "1", "--num-unlabelled", "1", "--test-healthy-fraction", "1",
              "--lesions-per-case", "2", "3"])
    meta = json.loads((tmp_path / "cli" / "dataset.json").read_text())
    assert meta["partially_labelled"] == ["SYN_000", "SYN_001"]  # case 2 is healthy (healthy_fraction 0.2)
    assert meta["synthetic_params"]["lesions_per_case"] == [2, 3]
    assert (tmp_path / "cli" / "imagesUnlabelled" / "SYN_U000_0000.nii.gz").is_file()
    assert _read(tmp_path / "cli" / "labelsTs" / "SYN_T000.nii.gz")[0].sum() == 0  # test_healthy_fraction 1


def test_mimics_are_unlabelled_weaker_look_alikes(tmp_path):
    """Mimics: in healthy and lesion cases, never in the label, clear of the lesions, 25-40 HU from their host
    (lesions: 40-100); the same case without them draws the same lesions."""
    placed = 0
    for seed in range(4):
        for healthy in (True, False):
            case, plain = _case(seed, healthy, mimics_per_case=(1, 2)), _case(seed, healthy)
            assert np.array_equal(case.label, plain.label) and case.lesions == plain.lesions and plain.mimics == []
            assert len(case.mimics) <= 2
            placed += len(case.mimics)
            img = case.image.astype(float)
            for m in case.mimics:
                q2 = _q2(case, m)
                assert not case.label[q2 <= syn.HALO ** 2].any()  # its halo is clear of every lesion
                assert 25 <= abs(m.contrast_hu) <= 40
                core = img[q2 <= 0.5 ** 2].mean()  # its intensity: the host's plus its contrast (noise averages out)
                assert abs(core - case.tissue_hu[m.host] - m.contrast_hu) < 12, (seed, m)  # 4 mm ones: few voxels
            assert not np.array_equal(case.image, plain.image) or not case.mimics
    assert placed >= 6  # nearly every case gets at least one
    with pytest.raises(ValueError, match="mimics_per_case"):
        _case(0, mimics_per_case=(2, 1))
    out = syn.write_dataset(tmp_path / "ds", num_train=2, num_test=0, seed=4, in_plane_size=SIZE, mimics_per_case=(1, 1))
    params = json.loads((out / "dataset.json").read_text())["synthetic_params"]
    assert params["mimics_per_case"] == [1, 1] and params["mimic_contrast_hu"] == [25.0, 40.0]
    syn.main([str(tmp_path / "cli"), "--num-train", "2", "--num-test", "0", "--in-plane-size", str(SIZE),
              "--mimics-per-case", "0", "1"])
    assert json.loads((tmp_path / "cli" / "dataset.json").read_text())["synthetic_params"]["mimics_per_case"] == [0, 1]
