"""The per-sample parameters of one batch, drawn on the host from the augmentation's CPU generator: which samples
(and channels) get each transform, and its factors. Always the same draws per batch, whatever the spec holds (a
transform it lacks is drawn with probability 0), so the stream does not depend on what was drawn or configured."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..augmentation.spec import NNUNET, TransformSpec, split_at_one_ranges

# one slot per transform in every batch's draws, in this order
KINDS = tuple(entry.name for entry in NNUNET)
DISABLED = {entry.name: entry.with_probability(0.0) for entry in NNUNET}


def _draw_parameters(kinds: Mapping[str, TransformSpec], spatial: bool, generator: torch.Generator, batch: int,
                     channels: int) -> dict[str, torch.Tensor]:
    """Every random parameter of one batch for the entries ``kinds`` (a spec entry for each name in ``KINDS``),
    from ``generator``: masks (B,) / (B, C) / (B, 3) bool and values float64 (``BatchAugmentation.last_params``).
    ``spatial=False``: rotation and scaling are drawn, then switched off."""
    rotation_scaling, noise, blur, brightness, contrast, low_resolution, inverted_gamma, gamma, mirror = (
        kinds[name] for name in KINDS)

    def rand(*shape):
        return torch.rand(shape, generator=generator, dtype=torch.float64)

    def coin(p, *shape):
        return rand(*shape) < p

    def uniform(low, high, *shape):
        return low + (high - low) * rand(*shape)

    def split_at_one(low, high, *shape):  # nnU-Net's BGContrast: three draws, whatever is picked
        allowed, below, above = split_at_one_ranges(low, high)
        picked = coin(0.5, *shape) & allowed
        lower = uniform(*below, *shape)
        return torch.where(picked, lower, uniform(*above, *shape))

    b, c = batch, channels
    brightness_draw = split_at_one if brightness.split_at_one else uniform
    params = {
        "rotation": coin(rotation_scaling.p_rotation, b),
        "degrees": uniform(-rotation_scaling.degrees, rotation_scaling.degrees, b, 3),
        "scaling": coin(rotation_scaling.p_scaling, b),
        "scale": uniform(*rotation_scaling.scaling, b),
        "noise": coin(noise.p, b),
        "noise_std": uniform(*noise.std, b),
        "blur": coin(blur.p, b, 1) & coin(blur.p_per_channel, b, c),
        "blur_sigma": uniform(*blur.sigma, b, c, 3),
        "brightness": coin(brightness.p, b, 1).expand(b, c),
        "brightness_factor": brightness_draw(*brightness.multiplier, b, c),
        "contrast": coin(contrast.p, b, 1).expand(b, c),
        "contrast_factor": split_at_one(*contrast.factor, b, c),
        "low_resolution": coin(low_resolution.p, b, 1) & coin(low_resolution.p_per_channel, b, c),
        "zoom": uniform(*low_resolution.zoom, b, c),
        "inverted_gamma": coin(inverted_gamma.p, b, 1).expand(b, c),
        "inverted_gamma_value": split_at_one(*inverted_gamma.gamma, b, c),
        "gamma": coin(gamma.p, b, 1).expand(b, c),
        "gamma_value": split_at_one(*gamma.gamma, b, c),
        "mirror": coin(mirror.p_per_axis, b, 3) & torch.tensor([a in mirror.axes for a in range(3)]),
    }
    params["degrees"] = params["degrees"] * params["rotation"][:, None]
    params["scale"] = torch.where(params["scaling"], params["scale"], torch.ones(()))
    if not spatial:
        params["rotation"] = params["rotation"] & False
        params["scaling"] = params["scaling"] & False
    return {k: v.contiguous() for k, v in params.items()}
