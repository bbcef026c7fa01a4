"""Patch augmentation: the named augmentations' specification (``spec``) and the per-patch executor, TorchIO
random transforms that sample parameters and delegate to deterministic ones.

``spec`` is the one description of nnU-Net's default training augmentation (SPEC.md, "Augmentation") and of the
'basic' set: transforms, order, probabilities and ranges. ``build_augmentation(name)`` builds it here, applied to
one patch at a time in the loader workers; ``lightning_flare.gpu_augmentation`` builds the same spec as a batched
module on the device. The table of 'nnunet' (nnU-Net's order, each transform with its own probability) is in
``spec``'s docstring, beside ``spec.NNUNET``.

Every random number of the per-patch executor comes from torch's global generator, so ``torch.manual_seed`` makes
a run reproducible.

Rotations and zoom-outs need context around the patch: crop ``spatial_margin(patch_size)`` more voxels per side
(nnU-Net also samples a larger patch first). Either centre-crop the result back to the patch, or pass the margin
as ``build_augmentation(name, crop=margin)``: then the spatial step itself returns only the patch and the later
transforms work on the patch instead of the enlarged crop (about 8x fewer voxels for a 128 x 128 x 96 patch).

Every deterministic transform here is an ``IntensityTransform`` (labels are never touched) except
``RotationScaling`` (a ``SpatialTransform``: image and label are resampled with the same grid, the label with
nearest neighbour so its values and dtype are kept).

Layout: ``spec`` (the named augmentations as data, read by both executors), ``intensity`` (deterministic intensity
transforms and their arithmetic on rows, shared with the batched executor), ``random_intensity`` (their random
counterparts), ``spatial`` (rotation / scaling, its matrix and ``spatial_margin``), ``pipeline`` (the spec walked
into TorchIO transforms: ``spec_transforms``, ``build_augmentation``), ``timing`` (``time_transforms``);
``_checks`` (argument checks, shared) and ``_draws`` (the per-patch random draws).
"""
from __future__ import annotations

from .intensity import Contrast, GaussianBlur, MultiplyIntensity, RescaledGamma, SimulateLowResolution, gaussian_blur
from .pipeline import (
    NNUNET_INTENSITY_AND_MIRROR,
    basic_augmentation,
    build_augmentation,
    nnunet_augmentation,
    nnunet_transforms,
    spec_transforms,
)
from .random_intensity import (
    RandomBrightness,
    RandomContrast,
    RandomGaussianBlur,
    RandomLowResolution,
    RandomRescaledGamma,
)
from .spatial import RandomRotationScaling, RotationScaling, rotation_scaling_matrix, spatial_margin
from .spec import AUGMENTATIONS, BASIC, NNUNET, TransformSpec, augmentation_spec
from .timing import time_transforms

__all__ = [
    "AUGMENTATIONS",
    "BASIC",
    "NNUNET",
    "NNUNET_INTENSITY_AND_MIRROR",
    "Contrast",
    "GaussianBlur",
    "MultiplyIntensity",
    "RandomBrightness",
    "RandomContrast",
    "RandomGaussianBlur",
    "RandomLowResolution",
    "RandomRescaledGamma",
    "RandomRotationScaling",
    "RescaledGamma",
    "RotationScaling",
    "SimulateLowResolution",
    "TransformSpec",
    "augmentation_spec",
    "basic_augmentation",
    "build_augmentation",
    "gaussian_blur",
    "nnunet_augmentation",
    "nnunet_transforms",
    "spec_transforms",
    "rotation_scaling_matrix",
    "spatial_margin",
    "time_transforms",
]
