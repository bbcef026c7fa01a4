"""The per-patch executor: the named augmentations ('none', 'basic', 'nnunet'; their specs in ``spec``) as TorchIO
transforms, built by walking the spec in order."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torchio as tio

from ._checks import _crop_margin
from .random_intensity import (
    RandomBrightness,
    RandomContrast,
    RandomGaussianBlur,
    RandomLowResolution,
    RandomRescaledGamma,
)
from .spatial import RandomRotationScaling, RotationScaling
from .spec import (
    BASIC,
    NNUNET,
    BlurSpec,
    BrightnessSpec,
    ContrastSpec,
    GammaSpec,
    LowResolutionSpec,
    MirrorSpec,
    NoiseSpec,
    RotationScalingSpec,
    TransformSpec,
    augmentation_spec,
    check_spec,
    forced as forced_spec,
)

# spec entry -> its TorchIO transform; ``kw`` holds TorchIO's ``copy`` flag, ``crop`` is the spatial step's
_PER_PATCH: dict[type, Callable[..., tio.Transform]] = {
    RotationScalingSpec: lambda s, kw, crop: RandomRotationScaling(
        degrees=s.degrees, scaling=s.scaling, p_rotation=s.p_rotation, p_scaling=s.p_scaling, default_pad_value=0.0,
        crop=crop, **kw),
    NoiseSpec: lambda s, kw, crop: tio.RandomNoise(mean=0, std=s.std, p=s.p, **kw),
    BlurSpec: lambda s, kw, crop: RandomGaussianBlur(sigma=s.sigma, p_per_channel=s.p_per_channel, p=s.p, **kw),
    BrightnessSpec: lambda s, kw, crop: RandomBrightness(s.multiplier, split_at_one=s.split_at_one, p=s.p, **kw),
    ContrastSpec: lambda s, kw, crop: RandomContrast(s.factor, preserve_range=True, p=s.p, **kw),
    LowResolutionSpec: lambda s, kw, crop: RandomLowResolution(zoom=s.zoom, p_per_channel=s.p_per_channel, p=s.p,
                                                               **kw),
    GammaSpec: lambda s, kw, crop: RandomRescaledGamma(s.gamma, invert=s.invert, retain_stats=True, p=s.p, **kw),
    MirrorSpec: lambda s, kw, crop: tio.RandomFlip(axes=s.axes, flip_probability=s.p_per_axis, **kw),
}


def spec_transforms(spec: Sequence[TransformSpec], copy: bool = True,
                    crop: int | Sequence[int] = 0) -> dict[str, tio.Transform]:
    """The TorchIO transforms of ``spec``, by name, in its order.

    ``crop`` (voxels per side): the first step returns only the centre of its input: rotation / scaling when the
    spec starts with it, else an added plain crop named 'crop' (see ``build_augmentation``).
    ``copy``: TorchIO's flag; with ``False`` a transform writes its results into the subject it is given (for use
    inside a ``Compose`` that copies the subject once: a deep copy of a 166 x 166 x 125 patch costs about as much as
    the whole intensity augmentation).
    """
    spec = check_spec(spec)
    crop = _crop_margin(crop)
    transforms: dict[str, tio.Transform] = {}
    if any(crop) and not (spec and isinstance(spec[0], RotationScalingSpec)):
        transforms["crop"] = RotationScaling(crop=crop, copy=copy)
    for entry in spec:
        transforms[entry.name] = _PER_PATCH[type(entry)](entry, {"copy": copy}, crop)
    return transforms


def basic_augmentation() -> tio.Compose:
    """Mirroring on each axis (p 0.5 per axis) plus nnU-Net's noise and brightness (``spec.BASIC``)."""
    return tio.Compose(spec_transforms(BASIC, copy=False))


def nnunet_transforms(
    forced: bool = False, copy: bool = True, crop: int | Sequence[int] = 0
) -> dict[str, tio.Transform]:
    """The transforms of nnU-Net's default augmentation (``spec.NNUNET``), by name, in nnU-Net's order.

    ``forced``: every transform always applies (probabilities 1, also per channel / per axis): for timing.
    ``crop``: the spatial transform returns only the centre (``crop`` voxels fewer per side), see
    ``build_augmentation``. ``copy``: see ``spec_transforms`` (``nnunet_augmentation`` uses ``False``).
    """
    return spec_transforms(forced_spec(NNUNET) if forced else NNUNET, copy=copy, crop=crop)


NNUNET_INTENSITY_AND_MIRROR = tuple(entry.name for entry in NNUNET if not isinstance(entry, RotationScalingSpec))


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
    transforms = spec_transforms(augmentation_spec(name), copy=False, crop=crop)
    return tio.Compose(transforms) if transforms else None
