"""The batched intensity ops: each transforms every row (one (sample, channel) image) of ``x`` (K, X, Y, Z) with
that row's own parameter, as the CPU transforms of ``lightning_flare.augmentation`` do one image at a time."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _reflect_index(size: int, radius: int, device) -> torch.Tensor:
    """Indices ``-radius .. size - 1 + radius`` reflected into ``[0, size)`` (torch 'reflect': d c b | a b c d)."""
    index = torch.arange(-radius, size + radius, device=device).abs()
    index = torch.where(index > size - 1, 2 * (size - 1) - index, index)
    return index.clamp(0, size - 1)


def _blur_rows(x: torch.Tensor, sigma: torch.Tensor, radius: Sequence[int]) -> torch.Tensor:
    """Separable Gaussian blur of each row of ``x`` (K, X, Y, Z) with its own ``sigma`` (K, 3) (voxels), as one
    grouped ``conv3d`` per axis. ``radius[a]``: the largest ``ceil(3 sigma)`` on axis a (known on the host); rows
    with a smaller sigma get zero weights beyond their own radius, so each row matches the CPU kernel."""
    k = x.shape[0]
    out = x[None]  # (1, K, X, Y, Z): one group per row
    for axis in range(3):
        r = int(radius[axis])
        taps = torch.arange(-r, r + 1, device=x.device, dtype=torch.float32)
        s = sigma[:, axis:axis + 1]
        weights = torch.exp(-0.5 * (taps / s) ** 2) * (taps.abs() <= torch.ceil(3 * s))
        weights = weights / weights.sum(1, keepdim=True)
        shape = [k, 1, 1, 1, 1]
        shape[2 + axis] = 2 * r + 1
        dim = 2 + axis
        padded = out.index_select(dim, _reflect_index(out.shape[dim], r, x.device))
        out = F.conv3d(padded, weights.reshape(shape), groups=k)
    return out[0]


def _contrast_rows(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``(x - mean) * factor + mean`` per row, clipped to the row's original ``[min, max]``."""
    dims = (1, 2, 3)
    mean = x.mean(dims, keepdim=True)
    low, high = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
    out = x * factor + mean * (1 - factor)
    return torch.minimum(torch.maximum(out, low), high)


def _gamma_rows(x: torch.Tensor, gamma: torch.Tensor, invert: bool) -> torch.Tensor:
    """nnU-Net's ``augment_gamma`` with retained statistics, per row (see ``RescaledGamma``)."""
    dims = (1, 2, 3)
    if invert:
        x = -x
    mean, std = x.mean(dims, keepdim=True), x.std(dims, keepdim=True)
    low = x.amin(dims, keepdim=True)
    scale = (x.amax(dims, keepdim=True) - low).clamp(min=1e-7)
    out = ((x - low) / scale).pow(gamma) * scale + low
    out = (out - out.mean(dims, keepdim=True)) * (std / out.std(dims, keepdim=True).clamp(min=1e-7)) + mean
    return -out if invert else out


def _low_resolution_rows(x: torch.Tensor, zoom: Sequence[float]) -> torch.Tensor:
    """Nearest-neighbour down to ``round(shape * zoom)``, trilinear back (per row: the small shapes differ)."""
    shape = tuple(x.shape[1:])
    out = x.clone()
    for row, z in enumerate(zoom):
        small = tuple(max(1, round(n * z)) for n in shape)
        if small == shape:
            continue
        down = F.interpolate(x[row][None, None], size=small, mode="nearest-exact")
        out[row] = F.interpolate(down, size=shape, mode="trilinear")[0, 0]
    return out
