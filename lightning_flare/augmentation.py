"""Patch augmentation: random transforms sample parameters and delegate to deterministic ones (TorchIO style).

``build_augmentation("nnunet")`` is nnU-Net's default training augmentation (SPEC.md, "Augmentation"), applied
to one patch at a time, in nnU-Net's order, each transform with its own probability:

==================================  ===========================  ==========================================
transform                           probability                  parameters
==================================  ===========================  ==========================================
rotation (3 axes) / scaling         0.2 / 0.2, independent       angles U(-30, 30) deg; factor U(0.7, 1.4)
Gaussian noise                      0.1                          std U(0, 0.1)
Gaussian blur                       0.2, then 0.5 per channel    sigma U(0.5, 1.0) voxels, per axis
multiplicative brightness           0.15                         factor 0.75 - 1.25
contrast                            0.15                         factor 0.75 - 1.25, clipped to [min, max]
low-resolution simulation           0.25, then 0.5 per channel   zoom U(0.5, 1.0)
gamma of the inverted image         0.1                          gamma 0.7 - 1.5, mean and std retained
gamma                               0.3                          gamma 0.7 - 1.5, mean and std retained
mirroring                           0.5 per axis                 axes 0, 1, 2
==================================  ===========================  ==========================================

Brightness, contrast and gamma factors are drawn as nnU-Net's ``BGContrast`` does: with probability 0.5 from
``U(low, 1)``, otherwise from ``U(1, high)`` (so half the draws darken / flatten). Every random number comes from
torch's global generator, so ``torch.manual_seed`` makes a run reproducible.

Rotations and zoom-outs need context around the patch: crop ``spatial_margin(patch_size)`` more voxels per side
(nnU-Net also samples a larger patch first). Either centre-crop the result back to the patch, or pass the margin
as ``build_augmentation(name, crop=margin)``: then the spatial step itself returns only the patch and the later
transforms work on the patch instead of the enlarged crop (about 8x fewer voxels for a 128 x 128 x 96 patch).

Every deterministic transform here is an ``IntensityTransform`` (labels are never touched) except
``RotationScaling`` (a ``SpatialTransform``: image and label are resampled with the same grid, the label with
nearest neighbour so its values and dtype are kept).
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
import torchio as tio
from torchio.transforms.augmentation import RandomTransform
from torchio.transforms.intensity_transform import IntensityTransform
from torchio.transforms.spatial_transform import SpatialTransform

# --------------------------------------------------------------------------------------------------------------
# argument checking and sampling helpers
# --------------------------------------------------------------------------------------------------------------


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _probability(value, name: str) -> float:
    value = _number(value, name)
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return value


def _range(value, name: str, *, min_value: float | None = None, max_value: float | None = None,
           positive: bool = False) -> tuple[float, float]:
    """``(low, high)`` with ``low <= high`` within the given bounds; ``positive`` requires ``low > 0``."""
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}")
    low, high = (_number(v, name) for v in value)
    if low > high:
        raise ValueError(f"{name} must be (low, high) with low <= high, got {value!r}")
    if positive and low <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    if min_value is not None and low < min_value:
        raise ValueError(f"{name} must be >= {min_value}, got {value!r}")
    if max_value is not None and high > max_value:
        raise ValueError(f"{name} must be <= {max_value}, got {value!r}")
    return low, high


def _triplet(value, name: str, *, min_value: float | None = None, max_value: float | None = None,
             positive: bool = False) -> tuple[float, float, float]:
    """A number (same for the three axes) or three numbers."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != 3:
            raise ValueError(f"{name} must be a number or three numbers, got {value!r}")
        values = tuple(_number(v, name) for v in value)
    else:
        values = (_number(value, name),) * 3
    for v in values:
        if positive and v <= 0:
            raise ValueError(f"{name} must be positive, got {value!r}")
        if min_value is not None and v < min_value:
            raise ValueError(f"{name} must be >= {min_value}, got {value!r}")
        if max_value is not None and v > max_value:
            raise ValueError(f"{name} must be <= {max_value}, got {value!r}")
    return values  # type: ignore[return-value]


def _channels(value) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, Sequence) or not value or not all(
        isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c >= 0 for c in value
    ):
        raise ValueError(f"channels must be None or non-negative channel indices, got {value!r}")
    return tuple(sorted({int(c) for c in value}))


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high)) if high > low else float(low)


def _uniform_split_at_one(low: float, high: float) -> float:
    """nnU-Net's ``BGContrast`` draw: with probability 0.5 (if ``low < 1``) from U(low, 1),
    otherwise from U(max(low, 1), high)."""
    if float(torch.rand(1)) < 0.5 and low < 1:
        return _uniform(low, min(1.0, high))
    return _uniform(max(low, 1.0), high) if high >= 1 else _uniform(low, high)


def _coin(probability: float) -> bool:
    return probability >= 1 or (probability > 0 and float(torch.rand(1)) < probability)


# --------------------------------------------------------------------------------------------------------------
# deterministic intensity transforms (they act on the selected channels of every intensity image)
# --------------------------------------------------------------------------------------------------------------


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
    """Apply ``function`` (which needs per-channel statistics) to each channel of ``data``."""
    if data.shape[0] == 1:
        return function(data[0])[None]
    return torch.stack([function(channel) for channel in data])


class MultiplyIntensity(_ChannelIntensityTransform):
    """Deterministic: multiply the intensities by ``factor``."""

    def __init__(self, factor: float, channels: Sequence[int] | int | None = None, **kwargs):
        super().__init__(channels, **kwargs)
        self.factor = _number(factor, "factor")
        self.args_names = ["factor", "channels"]

    def _apply(self, data: torch.Tensor) -> torch.Tensor:
        return data * self.factor


class Contrast(_ChannelIntensityTransform):
    """Deterministic: ``(x - mean) * factor + mean`` per channel; with ``preserve_range`` the result is clipped to
    the channel's original ``[min, max]`` (nnU-Net's ``ContrastTransform(preserve_range=True)``).

    The mean is kept exactly when nothing is clipped (always the case for ``factor <= 1``).
    """

    def __init__(self, factor: float, preserve_range: bool = True, channels: Sequence[int] | int | None = None,
                 **kwargs):
        super().__init__(channels, **kwargs)
        self.factor = _number(factor, "factor")
        if self.factor < 0:
            raise ValueError(f"factor must be >= 0, got {factor!r}")
        self.preserve_range = bool(preserve_range)
        self.args_names = ["factor", "preserve_range", "channels"]

    def _channel(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean()
        out = x * self.factor
        out += mean * (1 - self.factor)
        if self.preserve_range:
            low, high = torch.aminmax(x)
            out.clamp_(low, high)
        return out

    def _apply(self, data: torch.Tensor) -> torch.Tensor:
        return _per_channel(self._channel, data)


class RescaledGamma(_ChannelIntensityTransform):
    """Deterministic: nnU-Net's ``augment_gamma`` per channel.

    The channel is rescaled to [0, 1] with its min and range, raised to ``gamma``, rescaled back; with
    ``retain_stats`` its mean and (unbiased) std are then set back to the values before. With ``invert`` the
    channel is negated before and after (gamma acts on the inverted image, i.e. on the bright end).
    """

    def __init__(self, gamma: float, invert: bool = False, retain_stats: bool = True,
                 channels: Sequence[int] | int | None = None, **kwargs):
        super().__init__(channels, **kwargs)
        self.gamma = _number(gamma, "gamma")
        if self.gamma <= 0:
            raise ValueError(f"gamma must be positive, got {gamma!r}")
        self.invert = bool(invert)
        self.retain_stats = bool(retain_stats)
        self.args_names = ["gamma", "invert", "retain_stats", "channels"]

    def _channel(self, x: torch.Tensor) -> torch.Tensor:
        if self.invert:
            x = -x
        if self.retain_stats:
            mean, std = x.mean(), x.std()
        low, high = torch.aminmax(x)
        scale = (high - low).clamp(min=1e-7)
        out = x - low
        out /= scale
        out.pow_(self.gamma)
        out *= scale
        out += low
        if self.retain_stats:
            out -= out.mean()
            out *= std / out.std().clamp(min=1e-7)
            out += mean
        if self.invert:
            out.neg_()
        return out

    def _apply(self, data: torch.Tensor) -> torch.Tensor:
        return _per_channel(self._channel, data)


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).float()


def _reflect_index(size: int, radius: int) -> torch.Tensor:
    """Indices ``-radius .. size - 1 + radius`` reflected into ``[0, size)`` (torch 'reflect': d c b | a b c d)."""
    index = torch.arange(-radius, size + radius).abs()
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
        shape = tuple(data.shape[1:])
        small = tuple(max(1, round(n * z)) for n, z in zip(shape, self.zoom))
        if small == shape:
            return data.clone()
        down = F.interpolate(data[None], size=small, mode="nearest-exact")
        mode = "trilinear" if self.upsampling == "linear" else "nearest-exact"
        return F.interpolate(down, size=shape, mode=mode)[0]


# --------------------------------------------------------------------------------------------------------------
# deterministic spatial transform: rotation and scaling in voxel space
# --------------------------------------------------------------------------------------------------------------

_SITK_INTERPOLATORS = {
    "nearest": sitk.sitkNearestNeighbor,
    "linear": sitk.sitkLinear,
    "bspline": sitk.sitkBSpline,
}


def rotation_scaling_matrix(degrees: Sequence[float], scale: Sequence[float]) -> np.ndarray:
    """nnU-Net's ``create_affine_matrix_3d``: ``Rz @ Ry @ Rx @ diag(scale)`` (angle i rotates about axis i)."""
    ax, ay, az = np.radians(np.asarray(degrees, float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx @ np.diag(np.asarray(scale, float))


def _crop_margin(value) -> tuple[int, int, int]:
    if isinstance(value, Sequence) and not isinstance(value, str):
        values = tuple(value)
    else:
        values = (value,) * 3
    if len(values) != 3 or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in values
    ):
        raise ValueError(f"crop must be a non-negative integer or three of them, got {value!r}")
    return tuple(int(v) for v in values)  # type: ignore[return-value]


class RotationScaling(SpatialTransform):
    """Deterministic: rotate and scale about the patch centre, in voxel coordinates (as nnU-Net; the spacing is
    ignored), keeping the shape, or, with ``crop``, returning only the central part (``crop`` voxels fewer per
    side; resampled directly into that smaller grid, which is cheaper; with no rotation or scaling it is a plain
    crop).

    The output voxel at offset ``v`` from the centre ``(n - 1) / 2`` is read from the input at
    ``rotation_scaling_matrix(degrees, scale) @ v``: nnU-Net's convention, a scale > 1 shows more context (objects
    look smaller), the opposite of ``tio.Affine``'s ``scales``. Points outside the input get ``default_pad_value``
    (image) or ``default_pad_label`` (label maps).

    Resampling uses SimpleITK in the voxel grid (about twice as fast on CPU as ``torch.grid_sample``). The image is
    interpolated linearly by default: nnU-Net v1 used cubic splines (order 3) for the data, v2 uses trilinear
    ``grid_sample``; linear is the accepted trade-off ('bspline' is available but ~10x slower). Label maps use
    nearest neighbour (nnU-Net v2 interpolates one-hot masks linearly; nearest keeps values exact and is cheaper)
    and keep their dtype.
    """

    def __init__(
        self,
        degrees: float | Sequence[float] = 0.0,
        scale: float | Sequence[float] = 1.0,
        image_interpolation: str = "linear",
        label_interpolation: str = "nearest",
        default_pad_value: float = 0.0,
        default_pad_label: float = 0,
        crop: int | Sequence[int] = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.degrees = _triplet(degrees, "degrees")
        self.scale = _triplet(scale, "scale", positive=True)
        for name, value in (("image_interpolation", image_interpolation), ("label_interpolation", label_interpolation)):
            if value not in _SITK_INTERPOLATORS:
                raise ValueError(f"{name} must be one of {sorted(_SITK_INTERPOLATORS)}, got {value!r}")
        self.image_interpolation = image_interpolation
        self.label_interpolation = label_interpolation
        self.default_pad_value = _number(default_pad_value, "default_pad_value")
        self.default_pad_label = _number(default_pad_label, "default_pad_label")
        self.crop = _crop_margin(crop)
        self.args_names = ["degrees", "scale", "image_interpolation", "label_interpolation",
                           "default_pad_value", "default_pad_label", "crop"]

    def is_identity(self) -> bool:
        return all(d == 0 for d in self.degrees) and all(s == 1 for s in self.scale)

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        if self.is_identity() and not any(self.crop):
            return subject
        subject.check_consistent_spatial_shape()
        shape = subject.spatial_shape
        out_shape = tuple(n - 2 * c for n, c in zip(shape, self.crop))
        if min(out_shape) < 1:
            raise ValueError(f"crop {self.crop} leaves nothing of an image of shape {shape}")
        if self.is_identity():
            region = tuple(slice(c, c + n) for c, n in zip(self.crop, out_shape))
            for image in self.get_images(subject):
                image.set_data(image.data[(slice(None), *region)].contiguous())
                self._shift_origin(image)
            return subject
        # numpy arrays (x, y, z) are read by SimpleITK as images of size (z, y, x): reverse the axes of the matrix.
        # The input grid has origin 0 and spacing 1 (physical point = voxel index); the output grid starts at
        # ``crop``, so it is the central part of the rotated input.
        matrix = rotation_scaling_matrix(self.degrees, self.scale)[::-1, ::-1]
        transform = sitk.AffineTransform(3)
        transform.SetMatrix(matrix.ravel().tolist())
        transform.SetCenter([(n - 1) / 2 for n in reversed(shape)])
        out_size = [int(n) for n in reversed(out_shape)]
        out_origin = [float(c) for c in reversed(self.crop)]
        for image in self.get_images(subject):
            is_label = isinstance(image, tio.LabelMap)
            interpolator = _SITK_INTERPOLATORS[self.label_interpolation if is_label else self.image_interpolation]
            pad = self.default_pad_label if is_label else self.default_pad_value
            data = image.data
            channels = []
            for channel in data:
                array = channel.numpy()
                if array.dtype == np.bool_:
                    array = array.astype(np.uint8)
                sitk_image = sitk.GetImageFromArray(array)
                resampled = sitk.Resample(sitk_image, out_size, transform, interpolator, out_origin,
                                          (1.0, 1.0, 1.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), pad,
                                          sitk_image.GetPixelID())
                channels.append(torch.from_numpy(sitk.GetArrayFromImage(resampled)))
            out = channels[0][None] if len(channels) == 1 else torch.stack(channels)
            image.set_data(out.to(data.dtype))
            self._shift_origin(image)
        return subject

    def _shift_origin(self, image: tio.Image) -> None:
        """After cropping, the first voxel is ``crop`` voxels further in (as ``tio.Crop`` does)."""
        if any(self.crop):
            affine = image.affine.copy()
            affine[:3, 3] = affine[:3, :3] @ np.asarray(self.crop, float) + affine[:3, 3]
            image.affine = affine


# --------------------------------------------------------------------------------------------------------------
# random transforms: sample parameters, delegate to the deterministic transforms above
# --------------------------------------------------------------------------------------------------------------


class _RandomChannelTransform(RandomTransform, IntensityTransform):
    """Base: with probability ``p`` (TorchIO's), each channel of each intensity image is then augmented with
    probability ``p_per_channel`` and its own sampled parameter (nnU-Net: ``synchronize_channels=False``)."""

    def __init__(self, p_per_channel: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.p_per_channel = _probability(p_per_channel, "p_per_channel")

    def _make(self, channel: int, include: list[str]) -> tio.Transform:
        raise NotImplementedError

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        for name, image in self.get_images_dict(subject).items():
            for channel in range(image.num_channels):
                if _coin(self.p_per_channel):
                    # the subject was already copied by this transform's __call__ (if ``copy``): no second copy
                    subject = self._make(channel, [name])(subject)
        return subject

    def _base(self, include: list[str]) -> dict:
        return {**self._get_base_args(), "copy": False, "keep": None, "include": include}


class RandomBrightness(_RandomChannelTransform):
    """Multiplicative brightness, factor from ``multiplier`` (nnU-Net: 0.75-1.25, p 0.15).

    ``split_at_one``: draw as nnU-Net's ``BGContrast`` (half the draws below 1); otherwise ``U(low, high)``.
    """

    def __init__(self, multiplier: tuple[float, float] = (0.75, 1.25), split_at_one: bool = False,
                 p_per_channel: float = 1.0, **kwargs):
        super().__init__(p_per_channel, **kwargs)
        self.multiplier = _range(multiplier, "multiplier", positive=True)
        self.split_at_one = bool(split_at_one)

    def _make(self, channel, include):
        draw = _uniform_split_at_one if self.split_at_one else _uniform
        return MultiplyIntensity(draw(*self.multiplier), channels=channel, **self._base(include))


class RandomContrast(_RandomChannelTransform):
    """nnU-Net's contrast augmentation: factor from ``factor`` drawn as ``BGContrast``, clipped to the range."""

    def __init__(self, factor: tuple[float, float] = (0.75, 1.25), preserve_range: bool = True,
                 split_at_one: bool = True, p_per_channel: float = 1.0, **kwargs):
        super().__init__(p_per_channel, **kwargs)
        self.factor = _range(factor, "factor", min_value=0)
        self.preserve_range = bool(preserve_range)
        self.split_at_one = bool(split_at_one)

    def _make(self, channel, include):
        draw = _uniform_split_at_one if self.split_at_one else _uniform
        return Contrast(draw(*self.factor), self.preserve_range, channels=channel, **self._base(include))


class RandomRescaledGamma(_RandomChannelTransform):
    """nnU-Net's gamma augmentation (``GammaTransform`` with ``p_retain_stats=1``): gamma from ``gamma`` drawn as
    ``BGContrast``; ``invert`` applies it to the inverted image."""

    def __init__(self, gamma: tuple[float, float] = (0.7, 1.5), invert: bool = False, retain_stats: bool = True,
                 split_at_one: bool = True, p_per_channel: float = 1.0, **kwargs):
        super().__init__(p_per_channel, **kwargs)
        self.gamma = _range(gamma, "gamma", positive=True)
        self.invert = bool(invert)
        self.retain_stats = bool(retain_stats)
        self.split_at_one = bool(split_at_one)

    def _make(self, channel, include):
        draw = _uniform_split_at_one if self.split_at_one else _uniform
        return RescaledGamma(draw(*self.gamma), self.invert, self.retain_stats, channels=channel, **self._base(include))


class RandomGaussianBlur(_RandomChannelTransform):
    """nnU-Net's blur: sigma (voxels) from U(``sigma``), drawn per axis unless ``synchronize_axes``."""

    def __init__(self, sigma: tuple[float, float] = (0.5, 1.0), synchronize_axes: bool = False,
                 p_per_channel: float = 0.5, **kwargs):
        super().__init__(p_per_channel, **kwargs)
        self.sigma = _range(sigma, "sigma", min_value=0)
        self.synchronize_axes = bool(synchronize_axes)

    def _make(self, channel, include):
        if self.synchronize_axes:
            sigma = (_uniform(*self.sigma),) * 3
        else:
            sigma = tuple(_uniform(*self.sigma) for _ in range(3))
        return GaussianBlur(sigma, channels=channel, **self._base(include))


class RandomLowResolution(_RandomChannelTransform):
    """nnU-Net's ``SimulateLowResolutionTransform``: one zoom from U(``zoom``) for all axes, per channel."""

    def __init__(self, zoom: tuple[float, float] = (0.5, 1.0), upsampling: str = "linear",
                 p_per_channel: float = 0.5, **kwargs):
        super().__init__(p_per_channel, **kwargs)
        self.zoom = _range(zoom, "zoom", positive=True, max_value=1)
        if upsampling not in ("linear", "nearest"):
            raise ValueError(f"upsampling must be 'linear' or 'nearest', got {upsampling!r}")
        self.upsampling = upsampling

    def _make(self, channel, include):
        return SimulateLowResolution(_uniform(*self.zoom), self.upsampling, channels=channel, **self._base(include))


class RandomRotationScaling(RandomTransform, SpatialTransform):
    """nnU-Net's spatial augmentation without elastic deformation: with probability ``p_rotation`` the three angles
    are drawn from U(``degrees``) (a number d means (-d, d)), independently with probability ``p_scaling`` one
    factor for all axes from U(``scaling``) (nnU-Net convention: > 1 zooms out). If either happens, one
    ``RotationScaling`` resamples image and label once; otherwise the subject is returned untouched.

    ``crop`` (voxels per side): return only the central part, always (see ``RotationScaling``); used by
    ``build_augmentation(..., crop=margin)`` so that the later transforms work on the patch, not the enlarged crop.
    """

    def __init__(
        self,
        degrees: float | tuple[float, float] = 30.0,
        scaling: tuple[float, float] = (0.7, 1.4),
        p_rotation: float = 0.2,
        p_scaling: float = 0.2,
        image_interpolation: str = "linear",
        label_interpolation: str = "nearest",
        default_pad_value: float = 0.0,
        default_pad_label: float = 0,
        crop: int | Sequence[int] = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(degrees, Sequence) and not isinstance(degrees, str):
            self.degrees = _range(degrees, "degrees")
        else:
            d = _number(degrees, "degrees")
            if d < 0:
                raise ValueError(f"degrees must be >= 0 when given as one number, got {degrees!r}")
            self.degrees = (-d, d)
        self.scaling = _range(scaling, "scaling", positive=True)
        self.p_rotation = _probability(p_rotation, "p_rotation")
        self.p_scaling = _probability(p_scaling, "p_scaling")
        # checked here so that a bad value fails at construction, not at the first rotated patch
        self._deterministic_args = dict(
            image_interpolation=image_interpolation, label_interpolation=label_interpolation,
            default_pad_value=default_pad_value, default_pad_label=default_pad_label, crop=_crop_margin(crop),
        )
        RotationScaling(**self._deterministic_args)
        if any(self._deterministic_args["crop"]) and self.probability < 1:
            raise ValueError(f"p must be 1 when crop is used (the crop must always happen), got {self.probability}")

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        rotate = _coin(self.p_rotation)
        scale = _coin(self.p_scaling)
        if not (rotate or scale or any(self._deterministic_args["crop"])):
            return subject
        degrees = tuple(_uniform(*self.degrees) for _ in range(3)) if rotate else (0.0, 0.0, 0.0)
        factor = _uniform(*self.scaling) if scale else 1.0
        transform = RotationScaling(degrees, factor, **self._deterministic_args,
                                    **{**self._get_base_args(), "copy": False, "keep": None})
        return transform(subject)


# --------------------------------------------------------------------------------------------------------------
# margin for the enlarged patch
# --------------------------------------------------------------------------------------------------------------


def spatial_margin(
    patch_size: Sequence[int],
    max_degrees: float = 30.0,
    max_scale: float = 1.4,
    all_axes_at_once: bool = False,
) -> tuple[int, int, int]:
    """Per-side margin (voxels) to crop around a patch so that ``RandomRotationScaling`` reads no padding for
    the central ``patch_size`` region.

    For a rotation matrix ``R`` and a scale ``s`` the central box with half-sizes ``h = (patch - 1) / 2`` reads
    the input up to ``s * sum_j |R_ij| h_j`` from the centre along axis i; the margin is that minus ``h_i``,
    rounded up, at the largest zoom-out ``max_scale`` (1.4: nnU-Net's upper scaling factor in its convention,
    where > 1 zooms out; for "objects scaled down to 0.7" in TorchIO's sense pass ``max_scale=1 / 0.7``).

    By default the bound covers a rotation by up to ``max_degrees`` about any *one* axis combined with the
    largest zoom-out (exact, closed form): the same notion as nnU-Net's ``get_patch_size``, which rotates per
    axis and divides by the smallest scale. The three angles are drawn together, and when all are near 30 deg
    and the scale near 1.4 a corner may still read some padding (value 0, as nnU-Net pads). With
    ``all_axes_at_once`` the bound covers every combination of three angles in ``[-max_degrees, max_degrees]``
    (evaluated on a 2.5 deg grid, plus one voxel of slack) at the price of a much larger crop.

    For (128, 128, 96): (58, 58, 55) -> crop (244, 244, 206); all_axes_at_once: (78, 79, 87) -> (284, 286, 270);
    scaling alone would need (26, 26, 19).
    """
    size = np.asarray([int(p) for p in patch_size], float)
    if size.shape != (3,) or np.any(size < 1):
        raise ValueError(f"patch_size must be three positive integers, got {patch_size!r}")
    max_degrees = _number(max_degrees, "max_degrees")
    if not 0 <= max_degrees <= 90:
        raise ValueError(f"max_degrees must be in [0, 90], got {max_degrees!r}")
    max_scale = _number(max_scale, "max_scale")
    if max_scale <= 0:
        raise ValueError(f"max_scale must be positive, got {max_scale!r}")
    half = (size - 1) / 2
    limit = math.radians(max_degrees)
    if all_axes_at_once:
        steps = max(2, int(math.ceil(max_degrees / 2.5)) * 2 + 1)
        angles = np.linspace(-max_degrees, max_degrees, steps)
        ax, ay, az = np.radians(np.meshgrid(angles, angles, angles, indexing="ij"))
        zero, one = np.zeros_like(ax), np.ones_like(ax)
        rx = np.stack([one, zero, zero, zero, np.cos(ax), -np.sin(ax), zero, np.sin(ax), np.cos(ax)], -1)
        ry = np.stack([np.cos(ay), zero, np.sin(ay), zero, one, zero, -np.sin(ay), zero, np.cos(ay)], -1)
        rz = np.stack([np.cos(az), -np.sin(az), zero, np.sin(az), np.cos(az), zero, zero, zero, one], -1)
        rotations = (rz.reshape(-1, 3, 3) @ ry.reshape(-1, 3, 3) @ rx.reshape(-1, 3, 3))  # as rotation_scaling_matrix
        extent = (np.abs(rotations) @ half).max(axis=0) + 1
    else:
        extent = half.copy()
        for i in range(3):
            for j in range(3):
                if i == j:
                    continue
                # rotation about the third axis mixes i and j: h_i |cos t| + h_j |sin t|, t in [0, limit]
                t = min(limit, math.atan2(half[j], half[i])) if half[i] > 0 else limit
                extent[i] = max(extent[i], half[i] * math.cos(t) + half[j] * math.sin(t))
    margin = np.ceil(np.maximum(extent * max(max_scale, 1.0) - half, 0) - 1e-9)
    return tuple(int(m) for m in margin)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------------------
# pipelines
# --------------------------------------------------------------------------------------------------------------


def basic_augmentation() -> tio.Compose:
    """Mirroring on each axis (p 0.5 per axis) plus nnU-Net's noise and brightness (issue 2's basic set)."""
    return tio.Compose([
        tio.RandomFlip(axes=(0, 1, 2), flip_probability=0.5),
        tio.RandomNoise(mean=0, std=(0, 0.1), p=0.1),
        RandomBrightness((0.75, 1.25), p=0.15),
    ])


def nnunet_transforms(
    forced: bool = False, copy: bool = True, crop: int | Sequence[int] = 0
) -> dict[str, tio.Transform]:
    """The transforms of nnU-Net's default augmentation, by name, in nnU-Net's order.

    ``forced``: every transform always applies (probabilities 1, also per channel / per axis): for timing.
    ``crop``: the spatial transform returns only the centre (``crop`` voxels fewer per side), see
    ``build_augmentation``.
    ``copy``: TorchIO's flag; with ``False`` a transform writes its results into the subject it is given
    (``nnunet_augmentation`` uses that inside a ``Compose`` that copies the subject once: a deep copy of a
    166 x 166 x 125 patch costs about as much as the whole intensity augmentation).
    """
    def p(value: float) -> float:
        return 1.0 if forced else value

    kw = {"copy": copy}
    return {
        "rotation_scaling": RandomRotationScaling(degrees=30.0, scaling=(0.7, 1.4), p_rotation=p(0.2),
                                                  p_scaling=p(0.2), default_pad_value=0.0, crop=crop, **kw),
        "noise": tio.RandomNoise(mean=0, std=(0, 0.1), p=p(0.1), **kw),
        "blur": RandomGaussianBlur(sigma=(0.5, 1.0), p_per_channel=p(0.5), p=p(0.2), **kw),
        "brightness": RandomBrightness((0.75, 1.25), split_at_one=True, p=p(0.15), **kw),
        "contrast": RandomContrast((0.75, 1.25), preserve_range=True, p=p(0.15), **kw),
        "low_resolution": RandomLowResolution(zoom=(0.5, 1.0), p_per_channel=p(0.5), p=p(0.25), **kw),
        "inverted_gamma": RandomRescaledGamma((0.7, 1.5), invert=True, retain_stats=True, p=p(0.1), **kw),
        "gamma": RandomRescaledGamma((0.7, 1.5), invert=False, retain_stats=True, p=p(0.3), **kw),
        "mirror": tio.RandomFlip(axes=(0, 1, 2), flip_probability=p(0.5), **kw),
    }


NNUNET_INTENSITY_AND_MIRROR = ("noise", "blur", "brightness", "contrast", "low_resolution", "inverted_gamma",
                               "gamma", "mirror")


def nnunet_augmentation(crop: int | Sequence[int] = 0) -> tio.Compose:
    """nnU-Net's default augmentation (SPEC.md table), one ``Compose`` that copies the subject once.

    The sampler should crop the patch with ``spatial_margin(patch_size)`` so rotations and zoom-outs read real
    data; the other transforms are pointwise or local (blur radius 3 voxels) and unaffected by the margin.
    """
    return tio.Compose(nnunet_transforms(copy=False, crop=crop))


def build_augmentation(name: str, crop: int | Sequence[int] = 0) -> tio.Transform | None:
    """The patch augmentation called ``name``: 'none' (None), 'basic' or 'nnunet'.

    ``crop`` (voxels per side, e.g. the sampler's margin): the transform itself returns only the central part
    of its input, cut right after the spatial step (or first, where there is none), so that the intensity
    transforms and mirroring work on the patch instead of the enlarged crop, and the rotation resamples only the
    patch's voxels. With ``spatial_margin((128, 128, 96))`` that is 8x fewer voxels. A sampler using this must not
    centre-crop again. Default 0: same shape out as in.
    """
    crop = _crop_margin(crop)
    cut = RotationScaling(crop=crop, copy=False) if any(crop) else None
    if name == "none":
        return None if cut is None else tio.Compose([cut])
    if name == "basic":
        basic = basic_augmentation()
        return basic if cut is None else tio.Compose([cut, *basic.transforms])
    if name == "nnunet":
        return nnunet_augmentation(crop)
    raise ValueError(f"augmentation must be 'none', 'basic' or 'nnunet', got {name!r}")


# --------------------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------------------


def time_transforms(patch_size: Sequence[int], repeats: int = 5, num_threads: int | None = 1,
                    seed: int = 0, crop: int | Sequence[int] = 0) -> dict[str, float]:
    """Seconds per call of each nnU-Net transform, forced to apply, on a random float32 image of ``patch_size``
    (one channel) with a uint8 label; plus ``"nnunet"``: the whole pipeline with its real probabilities (mean
    over ``repeats`` calls, so noisy for few repeats) and ``"nnunet_forced"``: everything applied.

    With ``crop`` the pipeline is ``build_augmentation("nnunet", crop=crop)``: the spatial transform gets
    ``patch_size`` and returns the centre, the other transforms are timed on that smaller size.

    ``num_threads`` (torch and SimpleITK) defaults to 1, like a DataLoader worker; ``None`` keeps the settings.
    One untimed warm-up call precedes the timed ones. Transforms never modify the input tensors in place, so the
    same tensors are wrapped in a fresh subject for each call.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}")
    shape = tuple(int(p) for p in patch_size)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"patch_size must be three positive integers, got {patch_size!r}")
    crop = _crop_margin(crop)
    inner = tuple(n - 2 * c for n, c in zip(shape, crop))
    if min(inner) < 1:
        raise ValueError(f"crop {crop} leaves nothing of patch_size {shape}")
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for size in {shape, inner}:
        tensors[size] = (torch.randn((1, *size), generator=generator),
                         (torch.rand((1, *size), generator=generator) < 0.3).to(torch.uint8))

    def subject(size=shape) -> tio.Subject:
        image, label = tensors[size]
        return tio.Subject(image=tio.ScalarImage(tensor=image), label=tio.LabelMap(tensor=label))

    old_torch, old_sitk = torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    rng_state = torch.random.get_rng_state()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(num_threads)
    try:
        torch.manual_seed(seed)
        candidates = dict(nnunet_transforms(forced=True, copy=False, crop=crop))
        candidates["nnunet_forced"] = tio.Compose(nnunet_transforms(forced=True, copy=False, crop=crop))
        candidates["nnunet"] = nnunet_augmentation(crop)
        timings = {}
        for name, transform in candidates.items():
            size = inner if name in NNUNET_INTENSITY_AND_MIRROR else shape
            transform(subject(size))
            start = time.perf_counter()
            for _ in range(repeats):
                transform(subject(size))
            timings[name] = (time.perf_counter() - start) / repeats
        return timings
    finally:
        torch.set_num_threads(old_torch)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(old_sitk)
        torch.random.set_rng_state(rng_state)
