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
