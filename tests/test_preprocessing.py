import json

import numpy as np
import pytest
import SimpleITK as sitk

from lightning_flare.fingerprint import compute_fingerprint, load_or_compute_fingerprint
from lightning_flare.io import Geometry, from_array, read_image, to_array, write_image
from lightning_flare.plan import IntensityStats, Plan
from lightning_flare.preprocessing import PreprocessedCache, normalize_ct
from lightning_flare.raw_dataset import Case, DatasetError, kfold_splits, load_raw_dataset, select_fold
from lightning_flare.resample import lowres_axis, new_shape_for_spacing, resample_image, resample_label

STATS = IntensityStats(-900.0, 619.0, -52.232, 268.799)


def test_plan_roundtrip_and_cache_key():
    plan = Plan((2, 2, 3), (128, 128, 96), STATS)
    again = Plan.from_dict(plan.to_dict())
    assert again == plan
    assert plan.num_classes == 2
    assert Plan((2, 2, 3), (64, 64, 32), STATS).cache_key() == plan.cache_key()  # patch size does not change the cache
    assert Plan((2, 2, 2), (128, 128, 96), STATS).cache_key() != plan.cache_key()
    assert "target_spacing" in plan.differences(Plan((2, 2, 2), (128, 128, 96), STATS))[0]
    with pytest.raises(ValueError, match="target_spacing"):
        Plan((2, 2), (1, 1, 1), STATS)
    with pytest.raises(ValueError, match="clip_low"):
        IntensityStats(10, 0, 0, 1)


def test_normalize_ct_hand_computed():
    stats = IntensityStats(-100, 100, 10, 20)
    out = normalize_ct(np.array([-1000.0, 0.0, 50.0, 1000.0]), stats)
    np.testing.assert_allclose(out, [(-100 - 10) / 20, -0.5, 2.0, (100 - 10) / 20])


def test_new_shape_and_lowres_axis():
    assert new_shape_for_spacing((512, 512, 100), (0.8, 0.8, 2.5), (2, 2, 3)) == (205, 205, 83)
    assert lowres_axis((0.7, 0.7, 5.0)) == 2
    assert lowres_axis((1, 1, 2)) is None
    assert lowres_axis((5, 5, 1)) is None  # two low-resolution axes: no separate axis (nnU-Net)


def test_resample_image_preserves_constant_and_linear_ramp():
    ramp = np.broadcast_to(np.arange(20, dtype=np.float32)[:, None, None], (20, 8, 6)).copy()
    out = resample_image(ramp, (1, 1, 1), (2, 1, 1))
    assert out.shape == (10, 8, 6)
    # pixel-extent convention: output voxel i covers input voxels 2i, 2i+1 -> centre 2i + 0.5
    np.testing.assert_allclose(out[2:-2, 0, 0], np.arange(2, 8) * 2 + 0.5, atol=1e-3)
    const = np.full((9, 9, 4), 7.0, np.float32)
    for method in ("nnunet", "fast"):
        np.testing.assert_allclose(resample_image(const, (0.7, 0.7, 5), (2, 2, 3), method), 7.0, atol=1e-4)


def test_resample_label_linear_argmax_keeps_labels():
    label = np.zeros((20, 20, 10), np.uint8)
    label[4:14, 4:14, 2:8] = 1
    out = resample_label(label, (1, 1, 1), (2, 2, 2), num_classes=2)
    assert out.shape == (10, 10, 5) and set(np.unique(out)) == {0, 1}
    # output voxel i samples input position 2i + 0.5: x/y voxels 2..6 and z voxels 1..3 are inside
    expected = np.zeros((10, 10, 5), np.uint8)
    expected[2:7, 2:7, 1:4] = 1
    np.testing.assert_array_equal(out, expected)


def test_kfold_matches_nnunet_splits():
    """nnU-Net: sklearn KFold(5, shuffle=True, random_state=12345) on sorted keys; train/val sorted."""
    keys = [f"case_{i:02d}" for i in range(12)]
    splits = kfold_splits(keys)
    assert len(splits) == 5
    vals = [v for s in splits for v in s["val"]]
    assert sorted(vals) == keys  # every case validated exactly once
    assert [len(s["val"]) for s in splits] == [3, 3, 2, 2, 2]
    for s in splits:
        assert sorted(s["train"] + s["val"]) == keys and s["val"] == sorted(s["val"])
    sklearn = pytest.importorskip("sklearn.model_selection")
    ref = [sorted(np.array(keys)[v].tolist()) for _, v in sklearn.KFold(5, shuffle=True, random_state=12345).split(keys)]
    assert [s["val"] for s in splits] == ref


def test_raw_dataset_errors(tmp_path):
    with pytest.raises(DatasetError, match="dataset.json"):
        load_raw_dataset(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="JSON"):
        load_raw_dataset(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "tumor": 1}, "file_ending": ".nii.gz"}))
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    img = from_array(np.zeros((4, 4, 4), np.int16), Geometry((4, 4, 4), (1, 1, 1), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    write_image(img, tmp_path / "imagesTr" / "A_0000.nii.gz")
    ds = load_raw_dataset(tmp_path)
    with pytest.raises(DatasetError, match="A_0000.nii.gz: no label"):
        ds.cases("Tr")
    write_image(img, tmp_path / "labelsTr" / "A.nii.gz")
    write_image(img, tmp_path / "labelsTr" / "B.nii.gz")
    with pytest.raises(DatasetError, match="B.nii.gz: label without image"):
        ds.cases("Tr")


def test_io_roundtrip_non_identity_direction(tmp_path):
    direction = (0, 1, 0, -1, 0, 0, 0, 0, 1)
    geom = Geometry((5, 6, 7), (0.7, 0.9, 3.3), (10.0, -5.0, 2.5), direction)
    array = np.random.default_rng(0).integers(0, 100, (5, 6, 7)).astype(np.int16)
    path = write_image(from_array(array, geom), tmp_path / "x.nii.gz")
    back = read_image(path)
    assert Geometry.of(back).size == geom.size
    np.testing.assert_allclose(back.GetDirection(), direction)
    np.testing.assert_array_equal(to_array(back, np.int16), array)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_read_image_errors(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ValueError, match="broken.nii.gz"):
        read_image(bad)
    flat = sitk.Image(8, 8, sitk.sitkInt16)
    sitk.WriteImage(flat, str(tmp_path / "flat.nii.gz"))
    with pytest.raises(ValueError, match="expected a 3D image"):
        read_image(tmp_path / "flat.nii.gz")


def test_fingerprint_and_cache_reuse(tiny_dataset, tmp_path, monkeypatch):
    ds = load_raw_dataset(tiny_dataset)
    cases = ds.cases("Tr")
    fp = load_or_compute_fingerprint(tmp_path / "fp.json", cases)
    inten = fp["intensity"]
    assert inten["percentile_00_5"] < inten["mean"] < inten["percentile_99_5"] and inten["std"] > 0
    # foreground statistics only: the air (-1000 HU) outside the body must not enter them
    assert inten["percentile_00_5"] > -500
    # the saved fingerprint is reused
    monkeypatch.setattr("lightning_flare.fingerprint.compute_fingerprint", lambda *a, **k: pytest.fail("recomputed"))
    assert load_or_compute_fingerprint(tmp_path / "fp.json", cases) == json.loads((tmp_path / "fp.json").read_text())

    plan = Plan((4, 4, 5), (16, 16, 16), STATS)
    cache = PreprocessedCache(tmp_path / "cache", plan, ds.name)
    entries = cache.build(cases[:2], progress=False)
    image = np.load(entries[0].image, mmap_mode="r")
    label = np.load(entries[0].label)
    assert image.dtype == np.float32 and image.shape == label.shape
    original = read_image(cases[0].image)
    assert image.shape == new_shape_for_spacing(original.GetSize(), original.GetSpacing(), (4, 4, 5))
    mtimes = [e.image.stat().st_mtime_ns for e in entries]
    monkeypatch.setattr("lightning_flare.preprocessing.preprocess_into_cache", lambda *a: pytest.fail("preprocessed again"))
    again = cache.build(cases[:2], progress=False)
    assert [e.image.stat().st_mtime_ns for e in again] == mtimes
    # a half-written entry (no JSON marker) is not used: it would be rebuilt
    entries[1].meta.unlink()
    assert not cache.is_complete(entries[1].case_id)
    # another spacing is another cache folder
    assert PreprocessedCache(tmp_path / "cache", Plan((3, 3, 5), (16, 16, 16), STATS), ds.name).dir != cache.dir


def test_select_fold_all_and_bad_fold(tiny_dataset):
    ds = load_raw_dataset(tiny_dataset)
    cases = ds.cases("Tr")
    train, val = select_fold(ds, cases, "all")
    assert train == cases and val == cases
    train, val = select_fold(ds, cases, 0)
    assert not {c.case_id for c in train} & {c.case_id for c in val}
    with pytest.raises(ValueError, match="fold"):
        select_fold(ds, cases, 7)


def test_resample_to_mask_equals_full_trilinear_argmax():
    import torch

    from lightning_flare.resample import resample_probabilities, resample_to_mask

    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(3, 7, 9, 5) * 3, 0)
    for shape in [(20, 23, 17), (7, 9, 5), (5, 30, 3)]:
        full = resample_probabilities(probs, shape).argmax(0).numpy()
        for slab in (1, 4, 64):
            np.testing.assert_array_equal(resample_to_mask(probs, shape, slab=slab), full)


def test_resample_to_mask_two_classes_and_nearest_axis_match_nnunet_style_reference():
    """Two classes (sign of the difference) = full argmax; ``nearest_axis`` = per-slice linear, then nearest
    along that axis (nnU-Net's probability resampling for anisotropic spacing), on any axis."""
    import torch

    from lightning_flare.resample import _resample_nnunet, probability_axis, resample_probabilities, resample_to_mask

    torch.manual_seed(1)
    probs = torch.softmax(torch.randn(2, 7, 9, 5) * 3, 0)
    for shape in [(20, 23, 17), (5, 30, 3)]:
        full = resample_probabilities(probs, shape).argmax(0).numpy()
        np.testing.assert_array_equal(resample_to_mask(probs, shape, slab=4), full)
    for classes in (2, 3):
        probs = torch.softmax(torch.randn(classes, 7, 9, 5) * 3, 0)
        for axis, shape in [(2, (14, 18, 13)), (0, (17, 18, 10)), (1, (14, 4, 10))]:
            reference = np.stack([_resample_nnunet(p.numpy(), shape, axis, order=1, order_z=0) for p in probs]).argmax(0)
            np.testing.assert_array_equal(resample_to_mask(probs, shape, slab=3, nearest_axis=axis), reference)
    # which axis: nnU-Net's separate z of the plan's or the original spacing (threshold 3), only for "nnunet"
    assert probability_axis((3.0, 3.0, 4.0), (0.8, 0.8, 2.5)) == 2
    assert probability_axis((2.0, 2.0, 3.0), (0.57, 0.57, 1.6)) is None
    assert probability_axis((3.0, 3.0, 4.0), (0.8, 0.8, 2.5), method="fast") is None


def test_separate_axis_resampling_is_per_slice_then_nearest():
    """Anisotropic spacing: in-plane cubic per slice, then nearest along the low-resolution axis (nnU-Net)."""
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(30, 30, 6)).astype(np.float32)
    out = resample_image(volume, (0.7, 0.7, 5.0), (1.4, 1.4, 2.5))  # z: 6 slices at 5 mm -> 12 at 2.5 mm
    assert out.shape == (15, 15, 12)
    # nearest along z: every output slice is the in-plane resampling of one input slice
    np.testing.assert_allclose(out[..., 0], out[..., 1])
    np.testing.assert_allclose(out[..., 2], resample_image(volume[..., 1:2], (0.7, 0.7, 5.0), (1.4, 1.4, 5.0))[..., 0], rtol=1e-5, atol=1e-5)


def test_cubic_resampling_stays_within_the_input_range():
    """A saturated step rings under a cubic spline; like skimage ``resize(clip=True)`` the output is clipped."""
    step = np.zeros((4, 4, 8), np.float32)
    step[..., 4:] = 1.0
    out = resample_image(step, (1.0, 1.0, 1.0), (1.0, 1.0, 0.3))
    assert out.min() == 0.0 and out.max() == 1.0
    assert 0.0 < out[0, 0, 13] < 1.0  # the edge itself is still interpolated


def test_nearest_indices_break_ties_like_nnunet():
    """83.5 * 200 / 167 is exactly 100, but nnU-Net computes 200 / 167 * 83.5 - 0.5 = 99.49999999999999 and
    ``map_coordinates(order=0)`` rounds that to 99: the same plane must be picked."""
    from lightning_flare.resample import _nearest_indices

    assert _nearest_indices(200, 167)[83] == 99
    np.testing.assert_array_equal(_nearest_indices(4, 8), [0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(_nearest_indices(8, 4), [1, 3, 5, 7])


def _nnunet_style_resample(volume: np.ndarray, new_shape, axis):
    """nnU-Net's image resampling, written from its documented behaviour: skimage ``resize(order=3, mode='edge',
    anti_aliasing=False)`` in float64 (whole volume, or slice by slice across ``axis``), then order-0
    ``map_coordinates`` (mode 'nearest') along ``axis``."""
    from scipy.ndimage import map_coordinates
    from skimage.transform import resize

    data = volume.astype(float)
    if axis is None:
        return resize(data, new_shape, order=3, mode="edge", anti_aliasing=False)
    planes = [resize(p, [n for i, n in enumerate(new_shape) if i != axis], order=3, mode="edge", anti_aliasing=False)
              for p in np.moveaxis(data, axis, 0)]
    inplane = np.moveaxis(np.stack(planes), 0, axis)
    grids = np.mgrid[tuple(slice(0, n) for n in new_shape)].astype(float)
    coords = [float(o) / n * (g + 0.5) - 0.5 for g, o, n in zip(grids, inplane.shape, new_shape)]
    return map_coordinates(inplane, np.array(coords), order=0, mode="nearest")


def test_resampling_matches_nnunet_on_saturated_ct_like_volumes():
    """Cross-check with skimage (nnU-Net's resize): isotropic-ish spacing (3D cubic) and anisotropic spacing
    (separate z, including the 200 -> 167 slice tie), on volumes clipped like CT normalisation clips them."""
    pytest.importorskip("skimage")
    rng = np.random.default_rng(3)
    for shape, spacing, target in [((23, 19, 17), (0.57, 0.57, 1.6), (2.0, 2.0, 3.0)),
                                   ((12, 10, 200), (0.8, 0.8, 2.5), (2.0, 2.0, 2.994))]:
        volume = np.clip(rng.normal(size=shape) * 2, -1.5, 1.5).astype(np.float32)  # saturated voxels, as CT after clipping
        new_shape = new_shape_for_spacing(shape, spacing, target)
        axis = lowres_axis(spacing)
        ours = resample_image(volume, spacing, target)
        np.testing.assert_allclose(ours, _nnunet_style_resample(volume, new_shape, axis), atol=1e-5)
    assert new_shape[2] == 167 and axis == 2


def test_cubic_resampling_in_slabs_equals_the_whole_volume():
    """Large volumes are resampled slab by slab (bounded memory) with the same result as one ndimage.zoom."""
    from scipy import ndimage

    from lightning_flare.resample import _zoom

    volume = np.random.default_rng(1).normal(size=(30, 26, 41)).astype(np.float32)
    for shape in [(12, 11, 17), (45, 30, 60), (30, 26, 13)]:
        whole = ndimage.zoom(volume, [n / o for n, o in zip(shape, volume.shape)], order=3, mode="nearest", grid_mode=True)
        slabs = _zoom(volume, shape, order=3, chunk_voxels=30 * 26 * 5)  # a few planes per slab
        np.testing.assert_allclose(slabs, whole, atol=1e-5)


def test_preprocess_on_device_equals_the_loader_path(tiny_dataset):
    """``data.preprocess_on: device`` (torch on the model's device, here the CPU) gives the loader's arrays and the
    same predicted mask; it needs the torch resampling and says so otherwise."""
    import torch

    from lightning_flare.module import FlareSegmentationModule
    from lightning_flare.network import PlainConvUNet
    from lightning_flare.predictor import InferenceSettings
    from lightning_flare.preprocessing import preprocess_image, preprocess_tensor
    from lightning_flare.volumes import RawVolumes

    rng = np.random.default_rng(0)
    image = from_array(rng.normal(0, 300, (37, 29, 11)).astype(np.float32), Geometry((37, 29, 11), (0.8, 0.9, 3.3), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    plan = Plan((2.0, 2.0, 4.0), (16, 16, 8), STATS, resampling="fast")
    on_device = preprocess_tensor(torch.from_numpy(to_array(image))[None], image.GetSpacing(), plan, "cpu")
    np.testing.assert_allclose(on_device[0].numpy(), preprocess_image(image, plan), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="resampling 'fast'"):
        preprocess_tensor(torch.zeros(1, 4, 4, 4), (1, 1, 1), Plan((2.0, 2.0, 4.0), (16, 16, 8), STATS), "cpu")

    cases = load_raw_dataset(tiny_dataset).cases("Ts")[:1]
    torch.manual_seed(0)
    module = FlareSegmentationModule(PlainConvUNet(features_per_stage=[4, 8, 16, 32]),
                                     inference=InferenceSettings(sw_batch_size=2)).eval()
    module.plan = plan
    loader_item, device_item = RawVolumes(cases, plan, False)[0], RawVolumes(cases, plan, False, on_device=True)[0]
    assert not device_item.preprocessed and device_item.image.shape[1:] == device_item.geometry.size
    np.testing.assert_array_equal(module.predict_original_grid(device_item), module.predict_original_grid(loader_item))
    assert device_item.timings["preprocess"] > 0


def test_raw_voxels_keep_compact_dtypes_and_preprocess_alike():
    """The raw volume handed to the device keeps int16 (half the transfer) in SimpleITK's memory order, holds the
    same voxels as ``to_array``, and preprocesses to the same values; float64 becomes float32."""
    import torch

    from lightning_flare.preprocessing import preprocess_tensor
    from lightning_flare.volumes import raw_voxels

    rng = np.random.default_rng(1)
    geometry = Geometry((23, 17, 9), (0.7, 0.9, 2.5), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    hu = rng.integers(-1024, 2000, (23, 17, 9)).astype(np.int16)
    image = from_array(hu, geometry)
    raw = raw_voxels(image)
    assert raw.dtype == torch.int16 and raw.shape == (1, 23, 17, 9) and not raw.is_contiguous()
    np.testing.assert_array_equal(raw[0].numpy(), to_array(image, np.int16))
    plan = Plan((1.4, 1.4, 3.0), (16, 16, 8), STATS, resampling="fast")
    expected = preprocess_tensor(torch.from_numpy(to_array(image))[None], geometry.spacing, plan, "cpu")
    np.testing.assert_allclose(preprocess_tensor(raw, geometry.spacing, plan, "cpu").numpy(), expected.numpy(),
                               rtol=1e-6, atol=1e-6)
    assert raw.dtype == torch.int16 and raw[0, 3, 4, 5] == hu[3, 4, 5]  # the HU input is left as it was
    assert raw_voxels(from_array(hu.astype(np.float64), geometry)).dtype == torch.float32
    as_float = torch.from_numpy(to_array(image))[None]  # a CT stored as float32: kept in HU too
    preprocess_tensor(as_float, geometry.spacing, plan, "cpu")
    assert as_float[0, 3, 4, 5] == float(hu[3, 4, 5])


def test_preprocess_on_device_rejects_nnunet_resampling():
    from lightning_flare.datamodule import FlareDataModule

    with pytest.raises(ValueError, match="preprocess_on: device needs resampling: fast"):
        FlareDataModule(preprocess_on="device", resampling="nnunet")
    with pytest.raises(ValueError, match="preprocess_on must be"):
        FlareDataModule(preprocess_on="gpu")


def test_anti_aliasing_low_passes_only_downsampled_axes():
    from lightning_flare.resample import anti_alias

    flat = np.full((12, 12, 6), 7.0, np.float32)
    assert anti_alias(flat, (12, 12, 12)) is flat  # no axis gets coarser: untouched
    np.testing.assert_allclose(anti_alias(flat, (4, 4, 6)), flat)  # a constant stays constant
    noise = np.random.default_rng(0).normal(0, 20, (96, 96, 12)).astype(np.float32)
    plain = resample_image(noise, (0.8, 0.8, 3.0), (3.2, 3.2, 3.0))
    smooth = resample_image(noise, (0.8, 0.8, 3.0), (3.2, 3.2, 3.0), anti_aliasing=True)
    assert plain.shape == smooth.shape == (24, 24, 12)
    assert smooth.std() < 0.4 * plain.std()  # sigma 1.5 voxels in-plane: noise averaged, not aliased
    # the plan carries the setting (checkpoint round trip) and it changes the cache key
    plan = Plan((3, 3, 4), (16, 16, 16), STATS, anti_aliasing=True)
    assert Plan.from_dict(plan.to_dict()) == plan
    assert plan.cache_key() != Plan((3, 3, 4), (16, 16, 16), STATS).cache_key()


def test_changed_source_files_invalidate_cache_and_fingerprint(tiny_dataset, tmp_path):
    import os
    import shutil

    root = tmp_path / "Dataset905_Copy"
    shutil.copytree(tiny_dataset, root)
    cases = load_raw_dataset(root).cases("Tr")[:2]
    fp = load_or_compute_fingerprint(tmp_path / "fp.json", cases)
    cache = PreprocessedCache(tmp_path / "cache", Plan((4, 4, 5), (16, 16, 16), STATS), "copy")
    first = [e.image.stat().st_mtime_ns for e in cache.build(cases, progress=False)]
    assert all(cache.is_complete(c.case_id, c) for c in cases)
    # replace case 0's image by case 1's (another size and content): its entry and the fingerprint are stale
    shutil.copy(cases[1].image, cases[0].image)
    shutil.copy(cases[1].label, cases[0].label)
    os.utime(cases[0].image, ns=(1, 1))
    assert not cache.is_complete(cases[0].case_id, cases[0]) and cache.is_complete(cases[1].case_id, cases[1])
    again = cache.build(cases, progress=False)
    assert again[0].image.stat().st_mtime_ns != first[0] and again[1].image.stat().st_mtime_ns == first[1]
    assert np.load(again[0].image).shape == np.load(again[1].image).shape
    assert load_or_compute_fingerprint(tmp_path / "fp.json", cases)["shapes"] != fp["shapes"]


def test_prepare_data_creates_an_absent_synthetic_dataset_and_never_rewrites_one(tmp_path, caplog):
    from lightning_flare.datamodule import FlareDataModule

    root = tmp_path / "Dataset906_Syn"
    settings = {"num_train": 2, "num_test": 1, "in_plane_size": 48}
    FlareDataModule(data_dir=str(root), synthetic=settings).prepare_data()
    assert len(list((root / "imagesTr").glob("*.nii.gz"))) == 2
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    FlareDataModule(data_dir=str(root), synthetic=settings | {"num_train": 3}).prepare_data()
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before  # kept as it is ...
    assert "delete the folder to regenerate" in caplog.text  # ... with a warning naming the difference
    real = tmp_path / "Dataset907_Real"
    real.mkdir()
    (real / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "tumor": 1}}))
    FlareDataModule(data_dir=str(real), synthetic=settings).prepare_data()
    assert sorted(p.name for p in real.iterdir()) == ["dataset.json"]


def test_volume_loaders_use_workers_only_when_there_is_a_next_volume_to_read():
    """Workers overlap reading the next volume with compute: a single volume gets none (no extra process)."""
    from torch.utils.data import Dataset

    from lightning_flare.datamodule import FlareDataModule

    class Volumes(Dataset):
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            return i

    dm = FlareDataModule(num_workers=8)
    assert [dm._volume_loader(Volumes(n)).num_workers for n in (0, 1, 2, 5, 20)] == [0, 0, 1, 4, 8]
