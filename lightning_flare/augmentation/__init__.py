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

Layout: ``intensity`` (deterministic intensity transforms), ``random_intensity`` (their random counterparts),
``spatial`` (rotation / scaling and ``spatial_margin``), ``pipeline`` (the named pipelines), ``timing``
(``time_transforms``); ``_checks`` and ``_draws`` hold the argument checks and the random draws.
"""
from __future__ import annotations

from .intensity import Contrast, GaussianBlur, MultiplyIntensity, RescaledGamma, SimulateLowResolution, gaussian_blur
from .pipeline import (
    NNUNET_INTENSITY_AND_MIRROR,
    basic_augmentation,
    build_augmentation,
    nnunet_augmentation,
    nnunet_transforms,
)
from .random_intensity import (
    RandomBrightness,
    RandomContrast,
    RandomGaussianBlur,
    RandomLowResolution,
    RandomRescaledGamma,
)
from .spatial import RandomRotationScaling, RotationScaling, rotation_scaling_matrix, spatial_margin
from .timing import time_transforms

__all__ = [
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
    "basic_augmentation",
    "build_augmentation",
    "gaussian_blur",
    "nnunet_augmentation",
    "nnunet_transforms",
    "rotation_scaling_matrix",
    "spatial_margin",
    "time_transforms",
]
