"""The per-sample parameters of one batch, drawn on the host from the augmentation's CPU generator: which samples
(and channels) get each transform, and its factors. Always the same number of draws per batch, so the stream
does not depend on what was drawn."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .batch_augmentation import BatchAugmentation


def _draw_parameters(augmentation: BatchAugmentation, generator: torch.Generator, batch: int,
                     channels: int) -> dict[str, torch.Tensor]:
    """Every random parameter of one batch for ``augmentation``'s probabilities and ranges, from ``generator``: masks
    (B,) / (B, C) / (B, 3) bool and values float64 (see ``BatchAugmentation.last_params``)."""

    def rand(*shape):
        return torch.rand(shape, generator=generator, dtype=torch.float64)

    def coin(p, *shape):
        return rand(*shape) < p

    def uniform(low, high, *shape):
        return low + (high - low) * rand(*shape)

    def split_at_one(low, high, *shape):  # nnU-Net's BGContrast, as _uniform_split_at_one
        below = coin(0.5, *shape) & (low < 1)
        lower = uniform(low, min(1.0, high), *shape)
        upper = uniform(max(low, 1.0), high, *shape) if high >= 1 else uniform(low, high, *shape)
        return torch.where(below, lower, upper)

    b, c, p = batch, channels, augmentation.p
    brightness_draw = split_at_one if augmentation.brightness_split_at_one else uniform
    params = {
        "rotation": coin(p["rotation"], b),
        "degrees": uniform(-augmentation.degrees, augmentation.degrees, b, 3),
        "scaling": coin(p["scaling"], b),
        "scale": uniform(*augmentation.scaling, b),
        "noise": coin(p["noise"], b),
        "noise_std": uniform(*augmentation.noise_std, b),
        "blur": coin(p["blur"], b, 1) & coin(p["blur_per_channel"], b, c),
        "blur_sigma": uniform(*augmentation.blur_sigma, b, c, 3),
        "brightness": coin(p["brightness"], b, 1).expand(b, c),
        "brightness_factor": brightness_draw(*augmentation.brightness, b, c),
        "contrast": coin(p["contrast"], b, 1).expand(b, c),
        "contrast_factor": split_at_one(*augmentation.contrast, b, c),
        "low_resolution": coin(p["low_resolution"], b, 1) & coin(p["low_resolution_per_channel"], b, c),
        "zoom": uniform(*augmentation.zoom, b, c),
        "inverted_gamma": coin(p["inverted_gamma"], b, 1).expand(b, c),
        "inverted_gamma_value": split_at_one(*augmentation.gamma, b, c),
        "gamma": coin(p["gamma"], b, 1).expand(b, c),
        "gamma_value": split_at_one(*augmentation.gamma, b, c),
        "mirror": coin(p["mirror"], b, 3) & torch.tensor([a in augmentation.mirror_axes for a in range(3)]),
    }
    params["degrees"] = params["degrees"] * params["rotation"][:, None]
    params["scale"] = torch.where(params["scaling"], params["scale"], torch.ones(()))
    if not augmentation.spatial:
        params["rotation"] = params["rotation"] & False
        params["scaling"] = params["scaling"] & False
    return {k: v.contiguous() for k, v in params.items()}
