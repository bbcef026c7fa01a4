"""Random intensity transforms: sample parameters per channel, delegate to the deterministic ones in
``intensity``."""
from __future__ import annotations

import torchio as tio
from torchio.transforms.augmentation import RandomTransform
from torchio.transforms.intensity_transform import IntensityTransform

from ._checks import _probability, _range
from ._draws import _coin, _uniform, _uniform_split_at_one
from .intensity import Contrast, GaussianBlur, MultiplyIntensity, RescaledGamma, SimulateLowResolution


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
