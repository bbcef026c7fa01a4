"""Patch augmentation: random transforms sample parameters and delegate to deterministic ones (TorchIO style)."""
from __future__ import annotations

import torch
import torchio as tio
from torchio.transforms.augmentation import RandomTransform
from torchio.transforms.intensity_transform import IntensityTransform


class MultiplyIntensity(IntensityTransform):
    """Deterministic: multiply every intensity image by ``factor``."""

    def __init__(self, factor: float, **kwargs):
        super().__init__(**kwargs)
        self.factor = float(factor)
        self.args_names = ["factor"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        for image in self.get_images(subject):
            image.set_data(image.data * self.factor)
        return subject


class RandomBrightness(RandomTransform, IntensityTransform):
    """Multiplicative brightness with a factor drawn from U(low, high) (nnU-Net: 0.75-1.25, p 0.15)."""

    def __init__(self, multiplier: tuple[float, float] = (0.75, 1.25), **kwargs):
        super().__init__(**kwargs)
        low, high = (float(v) for v in multiplier)
        if not 0 < low <= high:
            raise ValueError(f"multiplier must be (low, high) with 0 < low <= high, got {multiplier}")
        self.multiplier = (low, high)

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        factor = float(torch.empty(1).uniform_(*self.multiplier))
        return MultiplyIntensity(factor, **self._get_base_args())(subject)


def basic_augmentation() -> tio.Compose:
    """Mirroring on each axis (p 0.5 per axis) plus nnU-Net's noise and brightness (issue 2's basic set)."""
    return tio.Compose([
        tio.RandomFlip(axes=(0, 1, 2), flip_probability=0.5),
        tio.RandomNoise(mean=0, std=(0, 0.1), p=0.1),
        RandomBrightness((0.75, 1.25), p=0.15),
    ])


def build_augmentation(name: str) -> tio.Transform | None:
    if name == "none":
        return None
    if name == "basic":
        return basic_augmentation()
    raise ValueError(f"augmentation must be 'none' or 'basic', got {name!r}")
