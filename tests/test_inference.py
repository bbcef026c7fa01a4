import numpy as np
import pytest
import torch

from lightning_flare.inference import gaussian_window, nnunet_steps, sliding_window_logits, window_batch_size


def test_nnunet_steps_hand_computed():
    assert nnunet_steps(97, 48, 0.5) == [0, 16, 33, 49]  # ceil(49 / 24) + 1 = 4 starts, evenly spaced
    assert nnunet_steps(60, 32, 0.5) == [0, 14, 28]
    assert nnunet_steps(48, 48, 0.5) == [0] and nnunet_steps(20, 48, 0.5) == [0]


def test_gaussian_window_peaks_at_the_centre_and_has_no_zeros():
    w = gaussian_window((16, 12, 8))
    assert w.shape == (16, 12, 8) and w[8, 6, 4] == 1.0 and float(w.min()) > 0
    assert w[8, 6, 0] == pytest.approx(np.exp(-(4 ** 2) / (2 * 1.0 ** 2)), rel=1e-6)  # sigma = 8 / 8 along z


class _Toy(torch.nn.Module):
    """Position-dependent output, so that window placement and weighting matter."""

    def forward(self, x):
        ramp = torch.linspace(0, 1, x.shape[2]).view(1, 1, -1, 1, 1)
        return torch.cat([x, x * ramp], 1)


@pytest.mark.parametrize("shape", [(37, 29, 20), (16, 16, 8)])
def test_nnunet_mode_equals_a_direct_weighted_average(shape):
    torch.manual_seed(0)
    image, patch = torch.randn(1, *shape), (16, 12, 8)
    out = sliding_window_logits(_Toy(), image, patch, 0.5, batch_size=3, autocast=False, device="cpu",
                                weighting="gaussian", steps="nnunet")
    weight = gaussian_window(patch).double()
    total, norm = torch.zeros(2, *shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
    for i in nnunet_steps(shape[0], 16, 0.5):
        for j in nnunet_steps(shape[1], 12, 0.5):
            for k in nnunet_steps(shape[2], 8, 0.5):
                box = (slice(i, i + 16), slice(j, j + 12), slice(k, k + 8))
                total[(slice(None), *box)] += _Toy()(image[(slice(None), *box)][None])[0].double() * weight
                norm[box] += weight
    torch.testing.assert_close(out.double(), total / norm, rtol=1e-5, atol=1e-5)
    # TorchIO's grid with a Hann window is another (valid) weighted average: not the same numbers
    hann = sliding_window_logits(_Toy(), image, patch, 0.5, batch_size=3, autocast=False, device="cpu")
    assert hann.shape == out.shape
    if shape[0] > patch[0]:  # several windows along the ramp's axis: placement and weights change the values
        assert not torch.allclose(hann, out)


@pytest.mark.parametrize("shape", [(37, 29, 20), (16, 12, 8)])
def test_default_mode_equals_torchio_grid_aggregator(shape):
    """Our device-resident aggregator reproduces TorchIO's own GridAggregator(overlap_mode='hann')."""
    import torchio as tio

    from lightning_flare.inference import grid_overlap

    torch.manual_seed(1)
    image, patch = torch.randn(1, *shape), (16, 12, 8)
    ours = sliding_window_logits(_Toy(), image, patch, 0.5, batch_size=2, autocast=False, device="cpu")
    sampler = tio.GridSampler(tio.Subject(image=tio.ScalarImage(tensor=image)), patch, grid_overlap(patch, 0.5))
    reference = tio.inference.GridAggregator(sampler, overlap_mode="hann")
    for batch in torch.utils.data.DataLoader(sampler, batch_size=2):
        reference.add_batch(_Toy()(batch["image"][tio.DATA]), batch[tio.LOCATION])
    torch.testing.assert_close(ours, reference.get_output_tensor(), rtol=1e-5, atol=1e-6)


def test_bad_sliding_window_options_are_named():
    with pytest.raises(ValueError, match="sw_weighting"):
        sliding_window_logits(_Toy(), torch.zeros(1, 8, 8, 8), (8, 8, 8), weighting="box", device="cpu")
    with pytest.raises(ValueError, match="sw_steps"):
        sliding_window_logits(_Toy(), torch.zeros(1, 8, 8, 8), (8, 8, 8), steps="dense", device="cpu")


def test_window_batch_size_auto_and_bad_values():
    assert window_batch_size("auto", "cpu") == 1
    assert window_batch_size("auto", torch.device("cuda")) == 2  # resolving needs no GPU
    assert window_batch_size(3, "cpu") == 3
    for bad in (0, -1, "two", 1.5, True):
        with pytest.raises(ValueError, match="sw_batch_size"):
            window_batch_size(bad, "cpu")


def test_channels_last_windows_equal_contiguous_windows():
    from lightning_flare.inference import use_channels_last
    from lightning_flare.network import PlainConvUNet

    torch.manual_seed(0)
    net = PlainConvUNet(features_per_stage=(8, 16, 32), strides=(1, 2, 2), deep_supervision=False).eval()
    image = torch.randn(1, 37, 29, 20)
    kwargs = dict(patch_size=(16, 12, 8), overlap=0.5, batch_size=2, autocast=False, device="cpu",
                  mirror_axes=(0,))
    contiguous = sliding_window_logits(net, image, channels_last=False, **kwargs)
    channels_last = sliding_window_logits(net, image, channels_last=True, **kwargs)
    torch.testing.assert_close(channels_last, contiguous, rtol=1e-4, atol=1e-4)
    assert use_channels_last("auto", "cpu") and use_channels_last("auto", torch.device("cuda"))
    assert not use_channels_last("auto", "mps") and use_channels_last(False, torch.device("cuda")) is False
    assert use_channels_last(False, "cpu") is False
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="channels_last"):
            use_channels_last(bad, "cpu")


def test_validation_mirrors_per_val_tta_and_prediction_per_tta(monkeypatch):
    import lightning_flare.module as module_file
    import lightning_flare.predictor as predictor_file
    from lightning_flare.network import PlainConvUNet
    from lightning_flare.plan import IntensityStats, Plan

    calls = []

    def fake(net, image, *args, mirror_axes=(), **kwargs):
        calls.append((tuple(mirror_axes), kwargs["channels_last"]))
        return torch.zeros(2, *image.shape[1:])

    monkeypatch.setattr(predictor_file, "sliding_window_logits", fake)
    net = PlainConvUNet(features_per_stage=[4, 8, 16, 32])
    from lightning_flare.volumes import VolumeItem

    batch = VolumeItem(0, "A", image=torch.zeros(1, 8, 8, 8), label=torch.zeros(8, 8, 8, dtype=torch.uint8),
                       spacing=(1.0, 1.0, 1.0))
    for tta, val_tta, expected in [(True, False, ()), (True, None, (0, 1, 2)), (False, True, (0, 1, 2)), (False, None, ())]:
        module = module_file.FlareSegmentationModule(net, inference={"tta": tta, "sw_channels_last": False}, val_tta=val_tta)
        module.plan = Plan((1, 1, 1), (8, 8, 8), IntensityStats(-100.0, 100.0, 0.0, 50.0))
        calls.clear()
        module.validation_step(batch, 0)
        module.predict_logits(batch.image)
        assert calls == [(expected, False), ((0, 1, 2) if tta else (), False)], (tta, val_tta)
    with pytest.raises(ValueError, match="val_tta"):
        module_file.FlareSegmentationModule(net, val_tta="yes")
    with pytest.raises(ValueError, match="channels_last"):
        module_file.FlareSegmentationModule(net, inference={"sw_channels_last": "fast"})


BF16, FP16 = torch.bfloat16, torch.float16


@pytest.mark.parametrize("device, setting, precision, expected", [
    # the CPU: true is bf16 whatever the trainer says ("auto" is measured: test_cpu_auto_follows_the_measurement)
    ("cpu", True, None, BF16), ("cpu", True, "32-true", BF16),
    ("cpu", False, "bf16-mixed", None), ("cpu", "fp16", None, FP16),
    # CUDA: the trainer's 16-bit dtype (a bf16-trained model predicts in bf16)
    ("cuda", True, "bf16-mixed", BF16), ("cuda", "auto", "bf16-mixed", BF16), ("cuda", "auto", "bf16-true", BF16),
    ("cuda", True, "16-mixed", FP16), ("cuda", "auto", "16-mixed", FP16),
    # CUDA, full-precision or no trainer: auto follows it, true forces fp16
    ("cuda", "auto", "32-true", None), ("cuda", "auto", "64-true", None), ("cuda", True, "32-true", FP16),
    ("cuda", True, None, FP16), ("cuda", "auto", None, FP16),
    # explicit settings win
    ("cuda", "bf16", "16-mixed", BF16), ("cuda", "fp16", "bf16-mixed", FP16), ("cuda", False, "16-mixed", None),
])
def test_autocast_dtype_rule(device, setting, precision, expected):
    from lightning_flare.inference import autocast_dtype

    assert autocast_dtype(device, setting, precision) == expected


@pytest.mark.parametrize("faster", [True, False])
@pytest.mark.parametrize("precision", [None, "32-true", "bf16-mixed"])
def test_cpu_auto_follows_the_measurement(monkeypatch, faster, precision):
    import lightning_flare.cpu_precision as cpu_precision
    from lightning_flare.inference import autocast_dtype

    monkeypatch.setattr(cpu_precision, "cpu_bf16_is_faster", lambda: faster)
    assert autocast_dtype("cpu", "auto", precision) == (BF16 if faster else None)
    assert autocast_dtype("cpu", True, precision) == BF16  # an explicit setting is not second-guessed


def test_autocast_bad_values_and_full_precision_inside_lightnings_autocast():
    from lightning_flare.inference import autocast_context, autocast_dtype
    from lightning_flare.module import FlareSegmentationModule
    from lightning_flare.network import PlainConvUNet

    for bad in (1, 0, "yes", None, "bf16-mixed"):
        with pytest.raises(ValueError, match="autocast must be"):
            autocast_dtype("cpu", bad)
    with pytest.raises(ValueError, match="autocast must be"):
        FlareSegmentationModule(PlainConvUNet(features_per_stage=[4, 8, 16, 32]), inference={"autocast": "half"})
    a = torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as Lightning's precision plugin wraps every step
        assert (a @ a).dtype == torch.bfloat16
        with autocast_context("cpu", False):
            assert (a @ a).dtype == torch.float32  # autocast: false means full precision, not "leave it on"
        with autocast_context("cpu", "fp16"):
            assert (a @ a).dtype == torch.float16


def test_module_hands_the_trainers_precision_to_inference(monkeypatch):
    import lightning as L

    import lightning_flare.module as module_file
    import lightning_flare.predictor as predictor_file
    from lightning_flare.network import PlainConvUNet
    from lightning_flare.plan import IntensityStats, Plan

    seen = []

    def fake(net, image, *args, **kwargs):
        seen.append((args[3], kwargs["precision"]))  # (autocast setting, trainer precision)
        return torch.zeros(2, *image.shape[1:])

    monkeypatch.setattr(predictor_file, "sliding_window_logits", fake)
    module = module_file.FlareSegmentationModule(PlainConvUNet(features_per_stage=[4, 8, 16, 32]))
    module.plan = Plan((1, 1, 1), (8, 8, 8), IntensityStats(-100.0, 100.0, 0.0, 50.0))
    module.predict_logits(torch.zeros(1, 8, 8, 8))
    module.trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, enable_progress_bar=False)
    module.predict_logits(torch.zeros(1, 8, 8, 8))
    assert seen == [("auto", None), ("auto", "bf16-mixed")]
