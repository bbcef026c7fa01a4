"""Deterministic intensity transforms: they act on the selected channels of every intensity image (labels are never
touched).

The arithmetic of each lives in a function on rows ``(K, x, y, z)`` (one image per row, per-row statistics; the
parameter a number or a ``(K, 1, 1, 1)`` tensor): ``contrast_rows``, ``gamma_rows``, ``simulate_low_resolution``,
and for the blur ``gaussian_weights`` / ``blur_radius`` / ``_reflect_index``. The transforms here and the batched
executor (``lightning_flare.gpu_augmentation``) both call them."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchio as tio
from torchio.transforms.intensity_transform import IntensityTransform

from ._checks import _channels, _number, _triplet


class _ChannelIntensityTransform(IntensityTransform):
    """Base: ``_apply`` maps the selected channels (a float ``(c, x, y, z)`` tensor) to new values.

    ``channels``: channel indices to modify (``None``: all). Non-float images are converted to float32.
    """

    def __init__(self, channels: Sequence[int] | int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.channels = _channels(channels)

    def _apply(self, data: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        for image in self.get_images(subject):
            data = image.data
            if not data.is_floating_point():
                data = data.float()
            if self.channels is None or self.channels == tuple(range(data.shape[0])):
                out = self._apply(data)
            else:
                if self.channels[-1] >= data.shape[0]:
                    raise ValueError(f"channels {self.channels} out of range for {data.shape[0]} channels")
                index = list(self.channels)
                out = data.clone()
                out[index] = self._apply(data[index])
            image.set_data(out)
        return subject


def _per_channel(function, data: torch.Tensor) -> torch.Tensor:
    """Apply ``function`` (rows -> rows, with per-row statistics) to each channel of ``data`` on its own."""
    if data.shape[0] == 1:
        return function(data)
    return torch.cat([function(data[c:c + 1]) for c in range(data.shape[0])])


class MultiplyIntensity(_ChannelIntensityTransform):
    """Deterministic: multiply the intensities by ``factor``."""

    def __init__(self, factor: float, channels: Sequence[int] | int | None = None, **kwargs):
        super().__init__(channels, **kwargs)
        self.factor = _number(factor, "factor")
        self.args_names = ["factor", "channels"]

    def _apply(self, data: torch.Tensor) -> torch.Tensor:
        return data * self.factor


def contrast_rows(x: torch.Tensor, factor, preserve_range: bool = True) -> torch.Tensor:
    """``(x - mean) * factor + mean`` per row; with ``preserve_range`` clipped to the row's original ``[min, max]``
    (nnU-Net's ``ContrastTransform(preserve_range=True)``). A new tensor."""
    dims = tuple(range(1, x.ndim))
    out = x * factor
    out += x.mean(dims, keepdim=True) * (1 - factor)
    if preserve_range:
        out = torch.clamp(out, x.amin(dims, keepdim=True), x.amax(dims, keepdim=True))
    return out


def gamma_rows(x: torch.Tensor, gamma, invert: bool = False, retain_stats: bool = True) -> torch.Tensor:
    """nnU-Net's ``augment_gamma`` per row: rescaled to [0, 1] with the row's min and range, raised to ``gamma``,
    rescaled back; with ``retain_stats`` the row's mean and (unbiased) std are then set back to the values before;
    with ``invert`` the row is negated before and after (gamma acts on the bright end). A new tensor."""
    dims = tuple(range(1, x.ndim))
    if invert:
        x = -x
    if retain_stats:
        mean, std = x.mean(dims, keepdim=True), x.std(dims, keepdim=True)
    low = x.amin(dims, keepdim=True)
    scale = (x.amax(dims, keepdim=True) - low).clamp(min=1e-7)
    out = x - low
    out /= scale
    out.pow_(gamma)
    out *= scale
    out += low
    if retain_stats:
        out -= out.mean(dims, keepdim=True)
        out *= std / out.std(dims, keepdim=True).clamp(min=1e-7)
        out += mean
    if invert:
        out.neg_()
    return out


def simulate_low_resolution(x: torch.Tensor, zoom: Sequence[float], upsampling: str = "linear") -> torch.Tensor:
    """Rows ``(K, x, y, z)`` down to ``round(shape * zoom)`` (nearest neighbour), then back to their shape with
    ``upsampling`` ('linear': trilinear, or 'nearest'). A new tensor."""
    shape = tuple(x.shape[1:])
    small = tuple(max(1, round(n * z)) for n, z in zip(shape, zoom))
    if small == shape:
        return x.clone()
    down = F.interpolate(x[None], size=small, mode="nearest-exact")
    mode = "trilinear" if upsampling == "linear" else "nearest-exact"
    return F.interpolate(down, size=shape, mode=mode)[0]


class Contrast(_ChannelIntensityTransform):
    """Deterministic: ``contrast_rows`` per channel: ``(x - mean) * factor + mean``, with ``preserve_range`` clipped
    to the channel's original ``[min, max]``. The mean is kept exactly when nothing is clipped (``factor <= 1``)."""

    def __init__(self, factor: float, preserve_range: bool = True, channels: Sequence[int] | int | None = None,
                 **kwargs):
        super().__init__(channels, **kwargs)
        self.factor = _number(factor, "factor")
        if self.factor < 0:
            raise ValueError(f"factor must be >= 0, got {factor!r}")
        self.preserve_range = bool(preserve_range)
        self.args_names = ["factor", "preserve_range", "channels"]

    def _apply(self, data: torch.Tensor) -> torch.Tensor:
        return _per_channel(lambda x: contrast_rows(x, self.factor, self.preserve_range), data)


class RescaledGamma(_ChannelIntensityTransform):
    """Deterministic: nnU-Net's ``augment_gamma`` per channel (``gamma_rows``), ``invert``: of the inverted
    channel; ``retain_stats``: its mean and std kept."""

    def __init__(self, gamma: float, invert: bool = False, retain_stats: bool = True,
                 channels: Sequence[int] | int | None = None, **kwargs):
        super().__init__(channels, **kwargs)
        self.gamma = _number(gamma, "gamma")
        if self.gamma <= 0:
            raise ValueError(f"gamma must be positive, got {gamma!r}")
        self.invert = bool(invert)
        self.retain_stats = bool(retain_stats)
        self.args_names = ["gamma", "invert", "retain_stats", "channels"]

    def _apply(self, data: torch.Tensor) -> torch.Tensor:
        return _per_channel(lambda x: gamma_rows(x, self.gamma, self.invert, self.retain_stats), data)


def blur_radius(sigma: float) -> int:
    """The Gaussian kernel's radius in voxels: ``ceil(3 sigma)``, at least 1."""
    return max(1, math.ceil(3 * sigma))


def gaussian_weights(offsets: torch.Tensor, sigma, radius=None) -> torch.Tensor:
    """Gaussian weights at integer ``offsets`` (last axis), normalised to sum 1 along it; ``radius`` (optional,
    broadcast like ``sigma``): zero weight beyond it (a row's own radius inside a longer common kernel)."""
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    if radius is not None:
        weights = weights * (offsets.abs() <= radius)
    return weights / weights.sum(-1, keepdim=True)


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = blur_radius(sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    return gaussian_weights(x, sigma).float()


def _reflect_index(size: int, radius: int, device=None) -> torch.Tensor:
    """Indices ``-radius .. size - 1 + radius`` reflected into ``[0, size)`` (torch 'reflect': d c b | a b c d)."""
    index = torch.arange(-radius, size + radius, device=device).abs()
    index = torch.where(index > size - 1, 2 * (size - 1) - index, index)
    return index.clamp(0, size - 1)  # only matters when radius >= size (tiny images)


def gaussian_blur(data: torch.Tensor, sigma: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of a ``(c, x, y, z)`` tensor; ``sigma`` per spatial axis in voxels (0: no blur).

    Kernel radius ``ceil(3 sigma)``, reflected borders. Each axis is one weighted sum of shifted views (the kernel
    is symmetric), which on CPU is several times faster than ``conv3d`` with a 1-D kernel.
    """
    out = data
    for axis, s in enumerate(sigma):
        if s <= 0:
            continue
        kernel = _gaussian_kernel(s)
        radius = (len(kernel) - 1) // 2
        dim = axis + 1
        size = out.shape[dim]
        padded = out.index_select(dim, _reflect_index(size, radius))
        blurred = out * float(kernel[radius])
        pair = torch.empty_like(blurred)
        for i in range(1, radius + 1):
            torch.add(padded.narrow(dim, radius - i, size), padded.narrow(dim, radius + i, size), out=pair)
            blurred.add_(pair, alpha=float(kernel[radius + i]))
        out = blurred
    return out if out is not data else data.clone()


class GaussianBlur(_ChannelIntensityTransform):
    """Deterministic: Gaussian blur with ``sigma`` in voxels (a number or one per spatial axis)."""

    def __init__(self, sigma: float | Sequence[float], channels: Sequence[int] | int | None = None, **kwargs):
        super().__init__(channels, **kwargs)
        self.sigma = _triplet(sigma, "sigma", min_value=0)
        self.args_names = ["sigma", "channels"]

    def _apply(self, data: torch.Tensor) -> torch.Tensor:
        return gaussian_blur(data, self.sigma)


class SimulateLowResolution(_ChannelIntensityTransform):
    """Deterministic: downsample to ``round(shape * zoom)`` with nearest neighbour, then back to the original shape
    with ``upsampling`` ('linear': trilinear, as nnU-Net v2; torch has no 3-D cubic; or 'nearest').
    """

    def __init__(self, zoom: float | Sequence[float], upsampling: str = "linear",
                 channels: Sequence[int] | int | None = None, **kwargs):
        super().__init__(channels, **kwargs)
        self.zoom = _triplet(zoom, "zoom", positive=True, max_value=1)
        if upsampling not in ("linear", "nearest"):
            raise ValueError(f"upsampling must be 'linear' or 'nearest', got {upsampling!r}")
        self.upsampling = upsampling
        self.args_names = ["zoom", "upsampling", "channels"]

    def _apply(self, data: torch.Tensor) -> torch.Tensor:
        return simulate_low_resolution(data, self.zoom, self.upsampling)
