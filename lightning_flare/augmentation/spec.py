"""The named augmentations as data: which transforms, in which order, with which probabilities and ranges.

This is the one place where nnU-Net's default augmentation (SPEC.md "Augmentation") and the 'basic' set are
written down. Both executors build their pipelines by walking these tuples in order: the per-patch TorchIO
pipeline of the loader workers (``augmentation.build_augmentation``) and the batched module on the device
(``gpu_augmentation.BatchAugmentation``). ``NNUNET``, in nnU-Net's order:

==================================  ===========================  ==========================================
transform                           probability                  parameters
==================================  ===========================  ==========================================
rotation (3 axes) / scaling         0.2 / 0.2, independent       angles U(-30, 30) deg; factor U(0.7, 1.4)
Gaussian noise                      0.1                          std U(0, 0.1)
Gaussian blur                       0.2, then 0.5 per channel    sigma U(0.5, 1.0) voxels, per axis
multiplicative brightness           0.15                         factor 0.75 - 1.25 (split at one)
contrast                            0.15                         factor 0.75 - 1.25 (split at one), clipped
low-resolution simulation           0.25, then 0.5 per channel   zoom U(0.5, 1.0), nearest down, trilinear up
gamma of the inverted image         0.1                          gamma 0.7 - 1.5 (split at one), mean/std kept
gamma                               0.3                          gamma 0.7 - 1.5 (split at one), mean/std kept
mirroring                           0.5 per axis                 axes 0, 1, 2 (image and label together)
==================================  ===========================  ==========================================

``BASIC``: mirroring (0.5 per axis), noise (0.1, std U(0, 0.1)), brightness (0.15, factor U(0.75, 1.25)).

Each entry is a frozen dataclass whose values are checked when it is made; ``p*`` fields are probabilities
(``p``: the transform's own coin; ``p_per_channel``: a second coin per channel; rotation and scaling have a coin
each; mirroring one per axis), the other fields are the ranges of the random parameters. "Split at one" is
nnU-Net's ``BGContrast`` draw (``split_at_one_ranges``): with probability 0.5 from ``U(low, 1)``, otherwise from
``U(1, high)``, so half the draws darken / flatten.
"""
from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from ._checks import _number, _probability, _range


@dataclass(frozen=True)
class TransformSpec:
    """Base of the entries; ``name`` identifies the transform in a pipeline (unique within one)."""

    name: ClassVar[str]

    def probabilities(self) -> tuple[str, ...]:
        """The names of the probability fields."""
        return tuple(f.name for f in dataclasses.fields(self) if f.name == "p" or f.name.startswith("p_"))

    def with_probability(self, value: float) -> TransformSpec:
        """This entry with every probability set to ``value`` (1: always applied; 0: never)."""
        return dataclasses.replace(self, **dict.fromkeys(self.probabilities(), value))

    def _check_probabilities(self) -> None:
        for field in self.probabilities():
            self._set(field, _probability(getattr(self, field), f"{self.name}.{field}"))

    def _set(self, field: str, value) -> None:
        """Store the checked (normalised) value of a field of this frozen instance."""
        object.__setattr__(self, field, value)


@dataclass(frozen=True)
class RotationScalingSpec(TransformSpec):
    """Rotation about the three axes (angles U(-degrees, degrees)) and, independently, one scaling factor for all
    axes from U(scaling) (> 1 zooms out); image linear, label nearest neighbour, padding 0. Comes first."""

    p_rotation: float
    degrees: float
    p_scaling: float
    scaling: tuple[float, float]

    name: ClassVar[str] = "rotation_scaling"

    def __post_init__(self):
        self._check_probabilities()
        degrees = _number(self.degrees, "rotation_scaling.degrees")
        if not 0 <= degrees <= 180:
            raise ValueError(f"rotation_scaling.degrees must be in [0, 180], got {self.degrees!r}")
        self._set("degrees", degrees)
        self._set("scaling", _range(self.scaling, "rotation_scaling.scaling", positive=True))


@dataclass(frozen=True)
class NoiseSpec(TransformSpec):
    """Additive Gaussian noise, its std from U(std)."""

    p: float
    std: tuple[float, float]

    name: ClassVar[str] = "noise"

    def __post_init__(self):
        self._check_probabilities()
        self._set("std", _range(self.std, "noise.std", min_value=0))


@dataclass(frozen=True)
class BlurSpec(TransformSpec):
    """Gaussian blur, sigma (voxels) from U(sigma) per axis; radius ceil(3 sigma), reflected borders."""

    p: float
    p_per_channel: float
    sigma: tuple[float, float]

    name: ClassVar[str] = "blur"

    def __post_init__(self):
        self._check_probabilities()
        self._set("sigma", _range(self.sigma, "blur.sigma", positive=True))


@dataclass(frozen=True)
class BrightnessSpec(TransformSpec):
    """Multiplicative brightness, one factor per channel from ``multiplier`` (``BGContrast`` if split_at_one,
    else uniform)."""

    p: float
    multiplier: tuple[float, float]
    split_at_one: bool

    name: ClassVar[str] = "brightness"

    def __post_init__(self):
        self._check_probabilities()
        self._set("multiplier", _range(self.multiplier, "brightness.multiplier", positive=True))
        self._set("split_at_one", bool(self.split_at_one))


@dataclass(frozen=True)
class ContrastSpec(TransformSpec):
    """``(x - mean) * factor + mean`` per channel, factor from ``factor`` (``BGContrast``), clipped to the
    channel's original range."""

    p: float
    factor: tuple[float, float]

    name: ClassVar[str] = "contrast"

    def __post_init__(self):
        self._check_probabilities()
        self._set("factor", _range(self.factor, "contrast.factor", min_value=0))


@dataclass(frozen=True)
class LowResolutionSpec(TransformSpec):
    """Nearest-neighbour downsampling by one zoom from U(zoom) for all axes, trilinear back."""

    p: float
    p_per_channel: float
    zoom: tuple[float, float]

    name: ClassVar[str] = "low_resolution"

    def __post_init__(self):
        self._check_probabilities()
        self._set("zoom", _range(self.zoom, "low_resolution.zoom", positive=True, max_value=1))


@dataclass(frozen=True)
class GammaSpec(TransformSpec):
    """nnU-Net's gamma (``BGContrast`` draw from ``gamma``) with mean and std retained; ``invert``: of the
    inverted image (named 'inverted_gamma')."""

    p: float
    gamma: tuple[float, float]
    invert: bool

    @property
    def name(self) -> str:  # type: ignore[override]
        return "inverted_gamma" if self.invert else "gamma"

    def __post_init__(self):
        self._check_probabilities()
        self._set("gamma", _range(self.gamma, f"{self.name}.gamma", positive=True))
        self._set("invert", bool(self.invert))


@dataclass(frozen=True)
class MirrorSpec(TransformSpec):
    """Flip image and label together along each of ``axes`` with probability ``p_per_axis``."""

    p_per_axis: float
    axes: tuple[int, ...]

    name: ClassVar[str] = "mirror"

    def __post_init__(self):
        self._check_probabilities()
        axes = tuple(self.axes) if isinstance(self.axes, Sequence) and not isinstance(self.axes, str) else (self.axes,)
        if not all(isinstance(a, numbers.Integral) and not isinstance(a, bool) and a in (0, 1, 2) for a in axes):
            raise ValueError(f"mirror.axes must be among (0, 1, 2), got {self.axes!r}")
        self._set("axes", tuple(sorted({int(a) for a in axes})))


# nnU-Net's default training augmentation, in nnU-Net's order (SPEC.md's table)
NNUNET: tuple[TransformSpec, ...] = (
    RotationScalingSpec(p_rotation=0.2, degrees=30.0, p_scaling=0.2, scaling=(0.7, 1.4)),
    NoiseSpec(p=0.1, std=(0.0, 0.1)),
    BlurSpec(p=0.2, p_per_channel=0.5, sigma=(0.5, 1.0)),
    BrightnessSpec(p=0.15, multiplier=(0.75, 1.25), split_at_one=True),
    ContrastSpec(p=0.15, factor=(0.75, 1.25)),
    LowResolutionSpec(p=0.25, p_per_channel=0.5, zoom=(0.5, 1.0)),
    GammaSpec(p=0.1, gamma=(0.7, 1.5), invert=True),
    GammaSpec(p=0.3, gamma=(0.7, 1.5), invert=False),
    MirrorSpec(p_per_axis=0.5, axes=(0, 1, 2)),
)

# mirroring plus nnU-Net's noise and brightness (the brightness factor drawn uniformly)
BASIC: tuple[TransformSpec, ...] = (
    MirrorSpec(p_per_axis=0.5, axes=(0, 1, 2)),
    NoiseSpec(p=0.1, std=(0.0, 0.1)),
    BrightnessSpec(p=0.15, multiplier=(0.75, 1.25), split_at_one=False),
)

AUGMENTATIONS: dict[str, tuple[TransformSpec, ...]] = {"none": (), "basic": BASIC, "nnunet": NNUNET}


def check_spec(spec: Sequence[TransformSpec]) -> tuple[TransformSpec, ...]:
    """``spec`` as a tuple, checked: entries are ``TransformSpec``, names are unique, rotation / scaling (which
    carries the crop of an enlarged patch) can only come first."""
    spec = tuple(spec)
    names = [entry.name for entry in spec if isinstance(entry, TransformSpec)]
    if len(names) != len(spec):
        raise ValueError(f"an augmentation spec holds TransformSpec entries, got {spec!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"an augmentation spec names each transform once, got {names}")
    if "rotation_scaling" in names[1:]:
        raise ValueError(f"rotation_scaling must come first in an augmentation spec, got {names}")
    return spec


def augmentation_spec(name: str) -> tuple[TransformSpec, ...]:
    """The augmentation called ``name``: 'none', 'basic' or 'nnunet'."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be 'none', 'basic' or 'nnunet', got {name!r}")
    return AUGMENTATIONS[name]


def forced(spec: Sequence[TransformSpec]) -> tuple[TransformSpec, ...]:
    """``spec`` with every probability 1 (every transform, channel and axis always augmented): for timing."""
    return tuple(entry.with_probability(1.0) for entry in spec)


def split_at_one_ranges(low: float, high: float) -> tuple[bool, tuple[float, float], tuple[float, float]]:
    """nnU-Net's ``BGContrast`` draw from ``(low, high)``: with probability 0.5, if allowed (``low < 1``), from the
    first range ``(low, min(1, high))``, otherwise from the second ``(max(low, 1), high)`` (``(low, high)`` when
    ``high < 1``). Returns ``(allowed, first, second)``; each executor draws its coin and values from these."""
    below = (low, min(1.0, high))
    above = (max(low, 1.0), high) if high >= 1 else (low, high)
    return low < 1, below, above


for _spec in AUGMENTATIONS.values():
    check_spec(_spec)
