import numpy as np
import pytest
import torch

from lightning_flare.module import poly_lr_factor
from lightning_flare.preprocessing import CachedCase
from lightning_flare.sampling import EpochSubjectSampler, PatchSampler, build_patch_loader, crop_with_padding


def test_crop_with_padding_hand_computed():
    a = np.arange(4 * 3 * 2).reshape(4, 3, 2)
    out = crop_with_padding(a, (-1, 1, 0), (3, 3, 2), pad_value=-7)
    assert out.shape == (3, 3, 2)
    assert (out[0] == -7).all()  # x = -1 is outside
    np.testing.assert_array_equal(out[1:, :2], a[:2, 1:])
    assert (out[:, 2] == -7).all()  # y = 3 is outside
    assert (crop_with_padding(a, (10, 10, 10), (2, 2, 2), 5) == 5).all()


def _entry(tmp_path, shape=(40, 30, 20), fg_box=((30, 34), (3, 6), (15, 18))) -> CachedCase:
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    (x0, x1), (y0, y1), (z0, z1) = fg_box
    label[x0:x1, y0:y1, z0:z1] = 1
    e = CachedCase("c", tmp_path / "i.npy", tmp_path / "l.npy", tmp_path / "f.npy", tmp_path / "c.json")
    np.save(e.image, image)
    np.save(e.label, label)
    np.save(e.foreground, np.argwhere(label > 0).astype(np.int32))
    e.meta.write_text("{}")
    return e


def _queue(entry, batch_size, patches, oversample=0.33, seed=0, patch=(12, 10, 8), workers=0, transform=None, margin=0):
    sampler = PatchSampler(patch, batch_size, oversample, transform=transform, margin=margin)
    return build_patch_loader([entry], sampler, (1, 1, 1), patches // batch_size, num_workers=workers, seed=seed)


def test_foreground_rule_per_batch_position(tmp_path):
    """nnU-Net: the last round(B * 0.33) samples of each batch are foreground-centred, the rest uniform."""
    entry = _entry(tmp_path)
    batch_size = 3
    loader = _queue(entry, batch_size, patches=3 * 1000)
    forced, batches = [], 0
    for batch in loader:
        batches += 1
        assert batch["image"].shape == (batch_size, 1, 12, 10, 8)
        assert batch["label"].shape == (batch_size, 1, 12, 10, 8)
        assert batch["foreground_forced"].tolist() == [False, False, True]
        # a forced patch really contains the tumour
        assert batch["label"][-1].sum() > 0
        forced += batch["foreground_forced"].tolist()
    assert batches == 1000
    assert abs(np.mean(forced) - 0.33) <= 0.02


def test_batch_of_two_has_exactly_one_forced_patch(tmp_path):
    loader = _queue(_entry(tmp_path), batch_size=2, patches=2 * 50)
    for batch in loader:
        assert batch["foreground_forced"].tolist() == [False, True]


def test_uniform_patches_stay_inside_and_reach_the_borders(tmp_path):
    """nnU-Net's get_bbox for the final patch: random crops lie inside the image (no zero filling) and reach every
    border; along an axis shorter than the patch the patch is centred (start -ceil(d/2) or -floor(d/2))."""
    entry = _entry(tmp_path, shape=(10, 9, 5))
    loader = _queue(entry, batch_size=2, patches=2 * 200, oversample=0.0, patch=(6, 6, 8), margin=2)
    starts, images = [], []
    for batch in loader:
        starts.append(batch["location"][:, :3].numpy())
        images.append(batch["image"])
    starts = np.concatenate(starts)
    assert starts.min(0).tolist() == [0, 0, -2]  # z: 5 voxels in an 8-voxel patch, d = 3
    assert starts.max(0).tolist() == [4, 3, -1]
    assert (np.concatenate([batch["location"][:, 3:].numpy() - batch["location"][:, :3].numpy()
                            for batch in loader]) == [6, 6, 8]).all()
    image = np.load(entry.image)
    for batch in loader:  # the x / y extent is all image: no zero-filled voxels there
        for b in range(2):
            x0, y0, z0 = batch["location"][b, :3].tolist()
            np.testing.assert_array_equal(batch["image"][b, 0, :, :, -z0:-z0 + 5].numpy(),
                                          image[x0:x0 + 6, y0:y0 + 6, :])


def test_case_without_foreground_falls_back_to_uniform(tmp_path):
    entry = _entry(tmp_path)
    np.save(entry.foreground, np.zeros((0, 3), np.int32))
    loader = _queue(entry, batch_size=2, patches=20)
    for batch in loader:
        assert not batch["foreground_forced"].any()


def test_patches_are_reproducible_with_any_number_of_workers(tmp_path):
    """A patch is a function of (seed, epoch, draw): 0 or 2 workers give the same batches, with augmentation."""
    from lightning_flare.augmentation import basic_augmentation

    entry = _entry(tmp_path)
    runs = []
    for workers in (0, 2):
        loader = _queue(entry, 2, patches=8, workers=workers, transform=basic_augmentation(), margin=2)
        loader.sampler.set_epoch(3)
        runs.append([b["image"] for b in loader])
    assert len(runs[0]) == 4
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b)
    loader.sampler.set_epoch(4)
    assert not torch.equal(next(iter(loader))["image"], runs[1][0])


def test_epoch_subject_sampler_balanced_and_reshuffled():
    s = EpochSubjectSampler(num_subjects=5, samples_per_epoch=10, seed=1)
    first = [code % 5 for code in s]
    assert [code // 5 for code in s] == list(range(10))  # draw numbers
    assert len(first) == 10 and sorted(first) == sorted(list(range(5)) * 2)
    s.set_epoch(1)
    assert s.subjects() != first
    s.set_epoch(0)
    assert s.subjects() == first
    # two ranks: disjoint halves of the same draw sequence
    r0 = EpochSubjectSampler(4, 2, seed=2, rank=0, world_size=2)
    r1 = EpochSubjectSampler(4, 2, seed=2, rank=1, world_size=2)
    assert sorted(r0.subjects() + r1.subjects()) == [0, 1, 2, 3]


def test_poly_lr_matches_formula():
    lr0, epochs = 1e-3, 2000
    for epoch in (0, 1, 500, 1000, 1999):
        assert lr0 * poly_lr_factor(epoch, epochs) == pytest.approx(lr0 * (1 - epoch / epochs) ** 0.9)
    assert poly_lr_factor(0, epochs) == 1.0
    assert poly_lr_factor(1000, epochs) == pytest.approx(0.5**0.9)


def test_optimizer_and_scheduler_follow_the_recipe():
    import lightning as L

    from lightning_flare.module import FlareSegmentationModule
    from lightning_flare.network import PlainConvUNet

    module = FlareSegmentationModule(PlainConvUNet(features_per_stage=(2, 4, 8, 16)), lr=1e-3)
    trainer = L.Trainer(max_epochs=2000, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    module.trainer = trainer
    config = module.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    group = opt.param_groups[0]
    assert group["momentum"] == 0.99 and group["nesterov"] and group["weight_decay"] == 3e-5
    lrs = []
    for epoch in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1e-3 * (1 - e / 2000) ** 0.9 for e in range(3)])


def test_uniform_patches_with_context_place_the_inner_patch_inside(tmp_path):
    """GPU spatial mode: the workers cut patch + 2 * context and the batch augmentation crops the context away;
    the uniform rule applies to that inner patch (the network's), so it reaches the borders and stays inside."""
    entry = _entry(tmp_path, shape=(10, 9, 8))
    sampler = PatchSampler((10, 10, 10), 2, 0.0, context=2)
    loader = build_patch_loader([entry], sampler, (1, 1, 1), 200)
    inner = np.concatenate([batch["location"][:, :3].numpy() + 2 for batch in loader])
    assert inner.min(0).tolist() == [0, 0, 0]
    assert inner.max(0).tolist() == [4, 3, 2]
    with pytest.raises(ValueError, match="context"):
        PatchSampler((6, 6, 6), 2, context=3)
