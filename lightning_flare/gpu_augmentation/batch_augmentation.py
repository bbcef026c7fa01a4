"""``BatchAugmentation``: nnU-Net's default augmentation for a batch on its device (see the package docstring).
The module holds the settings and the seeded generators; the draws and the batched ops live in the sibling files."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ._checks import _crop, _derive_seed, _pair, _probability
from .intensity import _blur_rows, _contrast_rows, _gamma_rows
from .mirroring import _mirror
from .parameter_draws import _draw_parameters
from .selected_rows import _add_noise_to_rows, _apply_to_rows
from .spatial import _rotate_scale_and_crop


class BatchAugmentation(nn.Module):
    """nnU-Net's default augmentation for a batch on its device; see the package docstring.

    ``forward(image, label) -> (image, label)``: image (B, C, x, y, z) floating, label (B, 1, x, y, z) (any dtype;
    or ``None``). Output spatial shape: input minus ``2 * crop``. Probabilities (``p_*``) and ranges default to the
    CPU 'nnunet' pipeline; ``p_blur_per_channel`` / ``p_low_resolution_per_channel`` are the second, per-channel
    coins. ``brightness_split_at_one``: draw brightness factors as ``BGContrast`` (the 'nnunet' pipeline) or from U(range)
    (the 'basic' one). ``spatial=False`` leaves out rotation / scaling (the CPU workers did it); ``crop`` still
    applies. ``seed=None`` draws the seed from torch's global generator (so ``seed_everything`` fixes it).
    """

    def __init__(
        self,
        spatial: bool = True,
        crop: int | Sequence[int] = 0,
        seed: int | None = None,
        *,
        p_rotation: float = 0.2,
        degrees: float = 30.0,
        p_scaling: float = 0.2,
        scaling: tuple[float, float] = (0.7, 1.4),
        p_noise: float = 0.1,
        noise_std: tuple[float, float] = (0.0, 0.1),
        p_blur: float = 0.2,
        p_blur_per_channel: float = 0.5,
        blur_sigma: tuple[float, float] = (0.5, 1.0),
        p_brightness: float = 0.15,
        brightness: tuple[float, float] = (0.75, 1.25),
        brightness_split_at_one: bool = True,
        p_contrast: float = 0.15,
        contrast: tuple[float, float] = (0.75, 1.25),
        p_low_resolution: float = 0.25,
        p_low_resolution_per_channel: float = 0.5,
        zoom: tuple[float, float] = (0.5, 1.0),
        p_inverted_gamma: float = 0.1,
        p_gamma: float = 0.3,
        gamma: tuple[float, float] = (0.7, 1.5),
        p_mirror: float = 0.5,
        mirror_axes: Sequence[int] = (0, 1, 2),
    ):
        super().__init__()
        self.spatial = bool(spatial)
        self.crop = _crop(crop)
        self.p = {
            "rotation": _probability(p_rotation, "p_rotation"),
            "scaling": _probability(p_scaling, "p_scaling"),
            "noise": _probability(p_noise, "p_noise"),
            "blur": _probability(p_blur, "p_blur"),
            "blur_per_channel": _probability(p_blur_per_channel, "p_blur_per_channel"),
            "brightness": _probability(p_brightness, "p_brightness"),
            "contrast": _probability(p_contrast, "p_contrast"),
            "low_resolution": _probability(p_low_resolution, "p_low_resolution"),
            "low_resolution_per_channel": _probability(p_low_resolution_per_channel, "p_low_resolution_per_channel"),
            "inverted_gamma": _probability(p_inverted_gamma, "p_inverted_gamma"),
            "gamma": _probability(p_gamma, "p_gamma"),
            "mirror": _probability(p_mirror, "p_mirror"),
        }
        degrees = float(degrees)
        if not 0 <= degrees <= 180:
            raise ValueError(f"degrees must be in [0, 180], got {degrees!r}")
        self.degrees = degrees
        self.scaling = _pair(scaling, "scaling", positive=True)
        self.noise_std = _pair(noise_std, "noise_std")
        self.blur_sigma = _pair(blur_sigma, "blur_sigma", positive=True)
        self.brightness = _pair(brightness, "brightness", positive=True)
        self.brightness_split_at_one = bool(brightness_split_at_one)
        self.contrast = _pair(contrast, "contrast")
        self.zoom = _pair(zoom, "zoom", positive=True, max_value=1.0)
        self.gamma = _pair(gamma, "gamma", positive=True)
        self.mirror_axes = tuple(sorted({int(a) for a in mirror_axes}))
        if any(a not in (0, 1, 2) for a in self.mirror_axes):
            raise ValueError(f"mirror_axes must be among (0, 1, 2), got {mirror_axes!r}")
        self.seed = int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,)))
        self.epoch: int | None = None
        self.last_params: dict[str, torch.Tensor] = {}
        self._reseed(0)

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
        return _draw_parameters(self, self._generator, batch, channels)

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
            _add_noise_to_rows(rows, params["noise"][:, None].expand(b, c), params["noise_std"][:, None].expand(b, c),
                               self._device_generator)
            _apply_to_rows(rows, params["blur"], lambda v, s: _blur_rows(v, s, self._blur_radius(params)),
                           params["blur_sigma"])
            _apply_to_rows(rows, params["brightness"], lambda v, f: v * f, params["brightness_factor"])
            _apply_to_rows(rows, params["contrast"], _contrast_rows, params["contrast_factor"])
            _apply_to_rows(rows, params["low_resolution"], None, params["zoom"])
            _apply_to_rows(rows, params["inverted_gamma"], lambda v, g: _gamma_rows(v, g, True),
                           params["inverted_gamma_value"])
            _apply_to_rows(rows, params["gamma"], lambda v, g: _gamma_rows(v, g, False), params["gamma_value"])
            _mirror(x, y, params["mirror"])
        return x.to(image.dtype), y

    def _blur_radius(self, params) -> list[int]:
        sigma = params["blur_sigma"][params["blur"]]
        return [max(1, math.ceil(3 * float(sigma[:, a].max()))) for a in range(3)]

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
