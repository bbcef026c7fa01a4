"""The batched intensity ops: each transforms every row (one (sample, channel) image) of ``x`` (K, X, Y, Z) with
that row's own parameter. The arithmetic is the per-patch executor's (``lightning_flare.augmentation.intensity``:
contrast, gamma and low resolution work on rows there too); only the blur has a batched form of its own here."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..augmentation.intensity import _reflect_index, contrast_rows, gamma_rows, gaussian_weights, simulate_low_resolution

_contrast_rows = contrast_rows  # (x, factor (K, 1, 1, 1)): clipped to each row's range
_gamma_rows = gamma_rows  # (x, gamma (K, 1, 1, 1), invert): mean and std retained


def _blur_rows(x: torch.Tensor, sigma: torch.Tensor, radius: Sequence[int]) -> torch.Tensor:
    """Separable Gaussian blur of each row of ``x`` (K, X, Y, Z) with its own ``sigma`` (K, 3) (voxels), as one
    grouped ``conv3d`` per axis. ``radius[a]``: the largest ``blur_radius`` on axis a (known on the host); rows
    with a smaller sigma get zero weights beyond their own radius, so each row gets the per-patch kernel."""
    k = x.shape[0]
    out = x[None]  # (1, K, X, Y, Z): one group per row
    for axis in range(3):
        r = int(radius[axis])
        taps = torch.arange(-r, r + 1, device=x.device, dtype=torch.float32)
        s = sigma[:, axis:axis + 1]
        weights = gaussian_weights(taps, s, torch.ceil(3 * s))
        shape = [k, 1, 1, 1, 1]
        shape[2 + axis] = 2 * r + 1
        dim = 2 + axis
        padded = out.index_select(dim, _reflect_index(out.shape[dim], r, x.device))
        out = F.conv3d(padded, weights.reshape(shape), groups=k)
    return out[0]


def _low_resolution_rows(x: torch.Tensor, zoom: Sequence[float]) -> torch.Tensor:
    """``simulate_low_resolution`` of each row with its own zoom (the same for the three axes); a loop, as the
    down-sampled shapes differ."""
    out = x.clone()
    for row, z in enumerate(zoom):
        out[row] = simulate_low_resolution(x[row:row + 1], (z, z, z))[0]
    return out
