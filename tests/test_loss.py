"""Soft Dice + CE loss, deep-supervision weights and target downsampling, against hand computations."""
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_flare.loss import (DeepSupervisionLoss, DiceCELoss, SoftDiceLoss, deep_supervision_weights,
                                  downsample_targets)

# Two voxels, two classes: voxel 0 has logits (0, 1) and label 1, voxel 1 has logits (2, 0) and label 0.
LOGITS = torch.tensor([[0.0, 2.0], [1.0, 0.0]]).reshape(1, 2, 2, 1, 1)
LABELS = torch.tensor([1, 0]).reshape(1, 1, 2, 1, 1)


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def test_soft_dice_by_hand():
    p0, p1 = sigmoid(1.0), sigmoid(-2.0)  # foreground probability of each voxel
    s = 1e-5
    expected = -(2 * p0 + s) / (p0 + p1 + 1 + s)  # I = p0, P = p0 + p1, G = 1
    got = SoftDiceLoss()(LOGITS, LABELS)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # target without channel axis gives the same value
    assert SoftDiceLoss()(LOGITS, LABELS[:, 0]).item() == pytest.approx(expected, rel=1e-6)


def test_background_included_averages_both_classes():
    p0, p1 = sigmoid(1.0), sigmoid(-2.0)
    s = 1e-5
    fg = (2 * p0 + s) / (p0 + p1 + 1 + s)
    bg = (2 * (1 - p1) + s) / ((1 - p0) + (1 - p1) + 1 + s)
    got = SoftDiceLoss(include_background=True)(LOGITS, LABELS)
    assert got.item() == pytest.approx(-(fg + bg) / 2, rel=1e-6)


def test_dice_ce_by_hand():
    p0, p1 = sigmoid(1.0), sigmoid(-2.0)
    ce = -(math.log(p0) + math.log(1 - p1)) / 2
    dice = -(2 * p0 + 1e-5) / (p0 + p1 + 1 + 1e-5)
    assert DiceCELoss()(LOGITS, LABELS).item() == pytest.approx(ce + dice, rel=1e-6)
    assert DiceCELoss(weight_dice=0.5, weight_ce=2.0)(LOGITS, LABELS).item() == pytest.approx(
        2 * ce + 0.5 * dice, rel=1e-6)
    assert DiceCELoss(weight_dice=0.0)(LOGITS, LABELS).item() == pytest.approx(ce, rel=1e-6)


def test_batch_vs_per_sample_dice():
    # Sample 0 has all-foreground prediction and label; sample 1 predicts foreground with no label.
    logits = torch.tensor([[-9.0, 9.0], [-9.0, 9.0]]).reshape(2, 2, 1, 1, 1).expand(2, 2, 2, 1, 1).contiguous()
    labels = torch.tensor([[1, 1], [0, 0]]).reshape(2, 1, 2, 1, 1)
    p = sigmoid(18.0)
    s = 1e-5
    batch = -(2 * 2 * p + s) / (4 * p + 2 + s)  # pooled over both samples
    per_sample = -((2 * 2 * p + s) / (2 * p + 2 + s) + s / (2 * p + s)) / 2
    assert SoftDiceLoss(batch_dice=True)(logits, labels).item() == pytest.approx(batch, rel=1e-5)
    assert SoftDiceLoss(batch_dice=False)(logits, labels).item() == pytest.approx(per_sample, rel=1e-5)
    assert abs(batch - per_sample) > 0.1


def test_smooth_on_empty_foreground():
    # No foreground anywhere, prediction all background: dice = smooth / (P + smooth) -> ~1 with P ~ 0
    logits = torch.tensor([30.0, -30.0]).reshape(1, 2, 1, 1, 1).expand(1, 2, 4, 1, 1).contiguous()
    labels = torch.zeros(1, 4, 1, 1, dtype=torch.long)
    p = 4 * sigmoid(-60.0)
    assert SoftDiceLoss(smooth=1e-5)(logits, labels).item() == pytest.approx(-1e-5 / (p + 1e-5), rel=1e-6)
    assert SoftDiceLoss(smooth=1e-5)(logits, labels).item() < -0.99
    assert SoftDiceLoss(smooth=0.0)(logits, labels).item() == 0.0  # 0 / clamp(P, 1e-8)


def test_deep_supervision_weights():
    assert deep_supervision_weights(3) == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert deep_supervision_weights(4) == pytest.approx([4 / 7, 2 / 7, 1 / 7, 0.0])
    assert deep_supervision_weights(1) == [1.0]
    with pytest.raises(ValueError):
        deep_supervision_weights(0)


def test_deep_supervision_loss_is_weighted_sum():
    torch.manual_seed(0)
    outputs = [torch.randn(2, 2, 8, 8, 8), torch.randn(2, 2, 4, 4, 4), torch.randn(2, 2, 2, 2, 2)]
    targets = [torch.randint(0, 2, (2, 1, *o.shape[2:])) for o in outputs]
    base = DiceCELoss()
    w = deep_supervision_weights(3)
    expected = w[0] * base(outputs[0], targets[0]) + w[1] * base(outputs[1], targets[1])
    # the zero-weight term is skipped: a target that would fail is never evaluated
    targets_bad = targets[:2] + [torch.zeros(1)]
    ds = DeepSupervisionLoss(base, w)
    torch.testing.assert_close(ds(outputs, targets), expected)
    torch.testing.assert_close(ds(outputs, targets_bad), expected)
    with pytest.raises(ValueError):
        ds(outputs[:2], targets[:2])


def test_downsample_targets_nearest():
    target = torch.arange(4 * 4 * 2).reshape(1, 1, 4, 4, 2)
    full, half = downsample_targets(target, [(1, 1, 1), (0.5, 0.5, 1.0)])
    assert full is target
    assert half.shape == (1, 1, 2, 2, 2) and half.dtype == torch.long
    # 'nearest-exact' takes the voxel whose centre is nearest, ties to the upper one: 1, 3
    torch.testing.assert_close(half, target[:, :, 1::2, 1::2, :])
    # labels stay from the original set, also without a channel axis and with uint8
    labels = torch.randint(0, 3, (2, 8, 8, 8), dtype=torch.uint8)
    outs = downsample_targets(labels, [(1, 1, 1), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)])
    assert [tuple(o.shape) for o in outs] == [(2, 8, 8, 8), (2, 4, 4, 4), (2, 2, 2, 2)]
    assert all(o.dtype == torch.uint8 and set(o.unique().tolist()) <= {0, 1, 2} for o in outs)


def test_gradient_flows_and_matches_autograd_reference():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    labels = torch.randint(0, 3, (2, 1, 4, 4, 4))
    loss = DiceCELoss()(logits, labels)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # straightforward re-implementation
    x = logits.detach().requires_grad_()
    p = torch.softmax(x, 1)[:, 1:]
    g = F.one_hot(labels[:, 0], 3).permute(0, 4, 1, 2, 3).float()[:, 1:]
    dc = (2 * (p * g).sum((0, 2, 3, 4)) + 1e-5) / (p.sum((0, 2, 3, 4)) + g.sum((0, 2, 3, 4)) + 1e-5)
    ref = F.cross_entropy(x, labels[:, 0]) - dc.mean()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(logits.grad, x.grad)


def test_autocast_computes_in_float32():
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 4, 4, 4)
    labels = torch.randint(0, 2, (1, 4, 4, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = DiceCELoss()(logits.bfloat16(), labels)
    assert amp.dtype == torch.float32
    torch.testing.assert_close(amp, DiceCELoss()(logits.bfloat16().float(), labels))


def test_bad_target_shape():
    with pytest.raises(ValueError):
        SoftDiceLoss()(LOGITS, torch.zeros(1, 1, 3, 1, 1, dtype=torch.long))


# ----------------------------------------------------------------- the ignore label (nnU-Net's, K = number of classes)
# LOGITS / LABELS plus two voxels labelled 2 = ignore: voxel 2 has logits (0, 3), voxel 3 logits (4, 0).
IGNORED_LOGITS = torch.tensor([[0.0, 2.0, 0.0, 4.0], [1.0, 0.0, 3.0, 0.0]]).reshape(1, 2, 4, 1, 1)
IGNORED_LABELS = torch.tensor([1, 0, 2, 2]).reshape(1, 1, 4, 1, 1)


def test_ignored_voxels_take_part_in_neither_term_by_hand():
    p0, p1 = sigmoid(1.0), sigmoid(-2.0)  # the two known voxels, as in test_dice_ce_by_hand
    ce = -(math.log(p0) + math.log(1 - p1)) / 2  # mean over the 2 known voxels, not the 4
    dice = -(2 * p0 + 1e-5) / (p0 + p1 + 1 + 1e-5)  # P counts only the known voxels (voxel 2 alone has p = 0.95)
    got = DiceCELoss(ignore_label=2)(IGNORED_LOGITS, IGNORED_LABELS)
    assert got.item() == pytest.approx(ce + dice, rel=1e-6)
    assert SoftDiceLoss(ignore_label=2)(IGNORED_LOGITS, IGNORED_LABELS).item() == pytest.approx(dice, rel=1e-6)
    # the ignored voxels' logits get no gradient
    logits = IGNORED_LOGITS.clone().requires_grad_()
    DiceCELoss(ignore_label=2)(logits, IGNORED_LABELS).backward()
    assert logits.grad[:, :, 2:].abs().sum() == 0 and logits.grad[:, :, :2].abs().sum() > 0


def test_ignore_label_matches_nnunet_loss_mask_formula():
    """nnU-Net's DC_and_CE_loss(ignore_label=K): CE with ignore_index (mean over the known voxels); Dice
    (MemoryEfficientSoftDiceLoss, do_bg False, batch Dice) with the reference's K set to 0 and
    intersect = sum(x * y * mask), sum_pred = sum(x * mask), sum_gt = sum(y * mask). Written out here on 2 x 3 x 2 x 2."""
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 3, 2, 2)
    labels = torch.randint(0, 4, (2, 1, 3, 2, 2))  # 3 classes + ignore 3
    labels[0, 0, 0, 0, 0], labels[1, 0, 1, 1, 1] = 3, 3  # some ignored voxels in each sample
    mask = (labels != 3).float()
    y = F.one_hot(torch.where(labels == 3, 0, labels)[:, 0], 3).permute(0, 4, 1, 2, 3).float()
    x = torch.softmax(logits, 1)
    axes = (0, 2, 3, 4)
    intersect, sum_pred, sum_gt = [(t * mask)[:, 1:].sum(axes) for t in (x * y, x, y)]
    dc = (2 * intersect + 1e-5) / torch.clip(sum_gt + sum_pred + 1e-5, 1e-8)
    ce = F.cross_entropy(logits, labels[:, 0], ignore_index=3)
    torch.testing.assert_close(DiceCELoss(ignore_label=3)(logits, labels), ce - dc.mean())
    assert not torch.isclose(DiceCELoss(ignore_label=3)(logits, labels), DiceCELoss()(logits, labels.clamp(max=2)))


def test_everything_ignored_gives_no_cross_entropy():
    labels = torch.full((1, 1, 4, 1, 1), 2)
    got = DiceCELoss(ignore_label=2)(IGNORED_LOGITS, labels)  # CE 0 (nnU-Net skips it); Dice smooth / smooth = 1
    assert got.item() == pytest.approx(-1.0) and torch.isfinite(got)


def test_deep_supervision_keeps_the_ignore_value_and_passes_it_to_the_loss():
    target = torch.zeros(1, 1, 4, 4, 2, dtype=torch.uint8)
    target[:, :, 2:, 2:] = 2  # a 2 x 2 block of ignore
    target[:, :, :2, :2] = 1
    half = downsample_targets(target, [(0.5, 0.5, 1.0)])[0]
    assert half[0, 0, :, :, 0].tolist() == [[1, 0], [0, 2]]  # nearest neighbour: the value K survives
    ds = DeepSupervisionLoss(DiceCELoss(), [0.5, 0.5], ignore_label=2)
    assert ds.ignore_label == 2 and ds.loss.ignore_label == 2
    assert ds.with_ignore_label(2) is ds and ds.with_ignore_label(None).ignore_label is None
    torch.manual_seed(0)
    outputs = [torch.randn(1, 2, 4, 4, 2), torch.randn(1, 2, 2, 2, 2)]
    targets = downsample_targets(target, [(1, 1, 1), (0.5, 0.5, 1.0)])
    expected = sum(0.5 * DiceCELoss(ignore_label=2)(o, t) for o, t in zip(outputs, targets))
    torch.testing.assert_close(ds(outputs, targets), expected)


def test_without_ignore_label_the_loss_is_unchanged():
    loss = DiceCELoss(ignore_label=None)
    assert loss.with_ignore_label(None) is loss
    torch.testing.assert_close(loss(LOGITS, LABELS), DiceCELoss()(LOGITS, LABELS), rtol=0, atol=0)
