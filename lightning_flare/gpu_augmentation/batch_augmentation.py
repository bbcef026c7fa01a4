"""``BatchAugmentation``: the batched executor, a named augmentation's spec (``lightning_flare.augmentation.spec``)
applied to a batch on its device (see the package docstring). The module holds the spec and the seeded
generators and walks the spec in order; the draws and the batched ops live in the sibling files."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..augmentation._checks import _crop_margin
from ..augmentation.intensity import blur_radius, contrast_rows, gamma_rows
from ..augmentation.spec import (
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
    check_spec,
)
from .intensity import _blur_rows
from .mirroring import _mirror
from .parameter_draws import DISABLED, _draw_parameters
from .selected_rows import _add_noise_to_rows, _apply_to_rows
from .spatial import _rotate_scale_and_crop

# keyword arguments of BatchAugmentation -> (the spec entries they change, the field)
KEYWORDS: dict[str, tuple[tuple[str, ...], str]] = {
    "p_rotation": (("rotation_scaling",), "p_rotation"),
    "degrees": (("rotation_scaling",), "degrees"),
    "p_scaling": (("rotation_scaling",), "p_scaling"),
    "scaling": (("rotation_scaling",), "scaling"),
    "p_noise": (("noise",), "p"),
    "noise_std": (("noise",), "std"),
    "p_blur": (("blur",), "p"),
    "p_blur_per_channel": (("blur",), "p_per_channel"),
    "blur_sigma": (("blur",), "sigma"),
    "p_brightness": (("brightness",), "p"),
    "brightness": (("brightness",), "multiplier"),
    "brightness_split_at_one": (("brightness",), "split_at_one"),
    "p_contrast": (("contrast",), "p"),
    "contrast": (("contrast",), "factor"),
    "p_low_resolution": (("low_resolution",), "p"),
    "p_low_resolution_per_channel": (("low_resolution",), "p_per_channel"),
    "zoom": (("low_resolution",), "zoom"),
    "p_inverted_gamma": (("inverted_gamma",), "p"),
    "p_gamma": (("gamma",), "p"),
    "gamma": (("inverted_gamma", "gamma"), "gamma"),
    "p_mirror": (("mirror",), "p_per_axis"),
    "mirror_axes": (("mirror",), "axes"),
}


def _with_keywords(spec: tuple[TransformSpec, ...], keywords: dict) -> tuple[TransformSpec, ...]:
    """``spec`` with the fields named by ``keywords`` (``KEYWORDS``) replaced."""
    changes: dict[str, dict] = {}
    for keyword, value in keywords.items():
        if keyword not in KEYWORDS:
            raise TypeError(f"BatchAugmentation() got an unexpected keyword argument {keyword!r}")
        names, field = KEYWORDS[keyword]
        present = [name for name in names if name in {entry.name for entry in spec}]
        if not present:
            raise ValueError(f"{keyword}: the augmentation has no {' or '.join(names)} transform")
        for name in present:
            changes.setdefault(name, {})[field] = value
    return tuple(dataclasses.replace(e, **changes[e.name]) if e.name in changes else e for e in spec)


def _derive_seed(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0] >> 1)


def _blur_step(entry, x, y, rows, params, device_generator):
    def blur(values, sigma):  # the common kernel radius per axis, from the host-side sigmas of the rows that drew it
        drawn = params["blur_sigma"][params["blur"]]
        return _blur_rows(values, sigma, [blur_radius(float(drawn[:, a].max())) for a in range(3)])
    _apply_to_rows(rows, params["blur"], blur, params["blur_sigma"])


def _gamma_step(entry, x, y, rows, params, device_generator):
    _apply_to_rows(rows, params[entry.name], lambda v, g: gamma_rows(v, g, entry.invert), params[f"{entry.name}_value"])


# spec entry -> its batched step on x (B, C, ...), y and rows = x viewed as (B * C, ...), in place
_BATCHED: dict[type, Callable[..., None]] = {
    NoiseSpec: lambda e, x, y, rows, params, generator: _add_noise_to_rows(
        rows, params["noise"][:, None].expand(x.shape[:2]), params["noise_std"][:, None].expand(x.shape[:2]),
        generator),
    BlurSpec: _blur_step,
    BrightnessSpec: lambda e, x, y, rows, params, generator: _apply_to_rows(
        rows, params["brightness"], lambda v, f: v * f, params["brightness_factor"]),
    ContrastSpec: lambda e, x, y, rows, params, generator: _apply_to_rows(
        rows, params["contrast"], contrast_rows, params["contrast_factor"]),
    LowResolutionSpec: lambda e, x, y, rows, params, generator: _apply_to_rows(
        rows, params["low_resolution"], None, params["zoom"]),
    GammaSpec: _gamma_step,
    MirrorSpec: lambda e, x, y, rows, params, generator: _mirror(x, y, params["mirror"]),
}


class BatchAugmentation(nn.Module):
    """A named augmentation for a batch on its device; see the package docstring.

    ``forward(image, label) -> (image, label)``: image (B, C, x, y, z) floating, label (B, 1, x, y, z) (any dtype;
    or ``None``). Output spatial shape: input minus ``2 * crop``. ``spec``: the transforms, in order (default
    nnU-Net's, ``spec.NNUNET``); keyword arguments (``KEYWORDS``: ``p_noise``, ``noise_std``, ``p_blur_per_channel``,
    ``brightness_split_at_one``, ``mirror_axes``, ...) change single fields of it. ``spatial=False`` leaves out
    rotation / scaling (the CPU workers did it); ``crop`` still applies. ``seed=None`` draws the seed from torch's
    global generator (so ``seed_everything`` fixes it).
    """

    def __init__(self, spatial: bool = True, crop: int | Sequence[int] = 0, seed: int | None = None, *,
                 spec: Sequence[TransformSpec] = NNUNET, **keywords):
        super().__init__()
        self.spec = check_spec(_with_keywords(check_spec(spec), keywords))
        unsupported = [entry.name for entry in self.spec if type(entry) not in _BATCHED
                       and not isinstance(entry, RotationScalingSpec)]
        if unsupported:
            raise ValueError(f"no batched form of {unsupported}")
        self.spatial = bool(spatial)
        self.crop = _crop_margin(crop)
        self._kinds = {**DISABLED, **{entry.name: entry for entry in self.spec}}
        self.seed = int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,)))
        self.epoch: int | None = None
        self.last_params: dict[str, torch.Tensor] = {}
        self._reseed(0)

    @property
    def p(self) -> dict[str, float]:
        """The probabilities, by draw (0 for a transform the spec lacks)."""
        kinds = self._kinds
        return {
            "rotation": kinds["rotation_scaling"].p_rotation, "scaling": kinds["rotation_scaling"].p_scaling,
            "noise": kinds["noise"].p, "blur": kinds["blur"].p, "blur_per_channel": kinds["blur"].p_per_channel,
            "brightness": kinds["brightness"].p, "contrast": kinds["contrast"].p,
            "low_resolution": kinds["low_resolution"].p,
            "low_resolution_per_channel": kinds["low_resolution"].p_per_channel,
            "inverted_gamma": kinds["inverted_gamma"].p, "gamma": kinds["gamma"].p, "mirror": kinds["mirror"].p_per_axis,
        }

    @property
    def brightness_split_at_one(self) -> bool:
        """Brightness factors drawn as ``BGContrast`` ('nnunet') or from U(range) ('basic')."""
        return self._kinds["brightness"].split_at_one

    # ------------------------------------------------------------------ seeding
    def _reseed(self, epoch: int) -> None:
        self._generator = torch.Generator().manual_seed(_derive_seed(self.seed, epoch, 0))
        self._device_seed = _derive_seed(self.seed, epoch, 1)
        self._device_generators: dict[str, torch.Generator] = {}

    def set_epoch(self, epoch: int) -> None:
        """Reseed from ``(seed, epoch)`` when the epoch changes (a no-op otherwise)."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self._reseed(self.epoch)

    def _device_generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._device_generators:
            self._device_generators[key] = torch.Generator(device=device).manual_seed(self._device_seed)
        return self._device_generators[key]

    # ------------------------------------------------------------------ draws (host)
    def draw(self, batch: int, channels: int) -> dict[str, torch.Tensor]:
        """Every random parameter of one batch, on the host (always the same number of draws)."""
        return _draw_parameters(self._kinds, self.spatial, self._generator, batch, channels)

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward(self, image: torch.Tensor, label: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if image.ndim != 5 or not image.is_floating_point():
            raise ValueError(f"image must be a floating (B, C, x, y, z) tensor, got {image.dtype} {tuple(image.shape)}")
        if label is not None and (label.ndim != 5 or label.shape[0] != image.shape[0]
                                  or label.shape[2:] != image.shape[2:]):
            raise ValueError(f"label must be (B, 1, x, y, z) like the image {tuple(image.shape)}, "
                             f"got {tuple(label.shape)}")
        out_shape = tuple(n - 2 * c for n, c in zip(image.shape[2:], self.crop))
        if min(out_shape) < 1:
            raise ValueError(f"crop {self.crop} leaves nothing of a patch of shape {tuple(image.shape[2:])}")
        b, c = image.shape[:2]
        params = self.draw(b, c)
        self.last_params = params
        with torch.autocast(device_type=image.device.type, enabled=False):
            x, y = self._spatial(image, label, params)  # fresh contiguous float32 copies
            rows = x.view(b * c, *x.shape[2:])
            for entry in self.spec:
                if not isinstance(entry, RotationScalingSpec):  # done by _spatial, first
                    _BATCHED[type(entry)](entry, x, y, rows, params, self._device_generator)
        return x.to(image.dtype), y

    def _spatial(self, image: torch.Tensor, label: torch.Tensor | None,
                 params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rotation / scaling of the samples that drew it (and the centre crop of all); always new tensors."""
        return _rotate_scale_and_crop(image, label, self.crop, params)

    # ------------------------------------------------------------------ batches
    def augment_batch(self, batch: dict) -> dict:
        """``batch["image"]`` and ``batch["label"]`` augmented; with ``crop``, ``batch["location"]`` (start, stop
        per sample) is narrowed to the returned centre. Other keys are untouched; a new dict is returned."""
        out = dict(batch)
        out["image"], out["label"] = self(batch["image"], batch.get("label"))
        location = batch.get("location")
        if any(self.crop) and isinstance(location, torch.Tensor) and location.shape[-1] == 6:
            crop = torch.tensor(self.crop, dtype=location.dtype, device=location.device)
            out["location"] = torch.cat([location[..., :3] + crop, location[..., 3:] - crop], -1)
        return out

    def extra_repr(self) -> str:
        active = {k: v for k, v in self.p.items() if v > 0 and (self.spatial or k not in ("rotation", "scaling"))}
        return f"spatial={self.spatial}, crop={self.crop}, seed={self.seed}, p={active}"
