"""Batched patch augmentation on the training device (``augmentation_device: gpu``), for machines where the CPU
loader workers cannot keep up with the GPU.

``BatchAugmentation`` is the batched counterpart of ``build_augmentation("nnunet")`` (``lightning_flare.augmentation``,
SPEC.md "Augmentation"): same transforms, same order, same probabilities and ranges, but applied to a whole batch
``image (B, C, x, y, z)`` float / ``label (B, 1, x, y, z)`` uint8 on its device with torch ops only. Every sample
(and, where nnU-Net draws per channel, every channel) gets its own parameters:

==================================  ===========================  ===============================================
transform                           probability                  parameters
==================================  ===========================  ===============================================
rotation (3 axes) / scaling         0.2 / 0.2, independent       angles U(-30, 30) deg; factor U(0.7, 1.4)
Gaussian noise                      0.1                          std U(0, 0.1)
Gaussian blur                       0.2, then 0.5 per channel    sigma U(0.5, 1.0) voxels, per axis
multiplicative brightness           0.15                         factor 0.75 - 1.25 (split at one)
contrast                            0.15                         factor 0.75 - 1.25 (split at one), clipped
low-resolution simulation           0.25, then 0.5 per channel   zoom U(0.5, 1.0), nearest down, trilinear up
gamma of the inverted image         0.1                          gamma 0.7 - 1.5 (split at one), mean/std kept
gamma                               0.3                          gamma 0.7 - 1.5 (split at one), mean/std kept
mirroring                           0.5 per axis                 axes 0, 1, 2 (image and label together)
==================================  ===========================  ===============================================

"Split at one" is nnU-Net's ``BGContrast`` draw (as the CPU pipeline): with probability 0.5 from ``U(low, 1)``,
otherwise from ``U(1, high)``. ``build_batch_augmentation("basic")`` mirrors the CPU 'basic' set (mirroring,
noise, brightness drawn from ``U(0.75, 1.25)``).

How it works
------------
* All per-sample parameters (which samples / channels get a transform, and their factors) are drawn up front on
  the host from one seedable CPU ``torch.Generator``, always the same number of draws per batch. So the decisions
  cost no GPU synchronisation, transforms that no sample drew are skipped entirely, and a transform only reads
  and writes the rows (sample, channel) that drew it. Only the noise field is drawn on the batch's device (from a
  second generator on that device, seeded from the same seed).
* Pointwise transforms (noise, brightness, contrast, gamma) are vectorised over the selected rows with the
  parameters as ``(K, 1, 1, 1)`` tensors; the blur is one grouped separable ``conv3d`` per axis with one kernel per
  row (radius ``ceil(3 sigma)``, reflected borders, as the CPU ``gaussian_blur``); low-resolution loops over the
  selected rows (each has its own down-sampled shape); mirroring flips, per axis, the samples that drew that axis.
* Rotation / scaling (``spatial=True``): one ``affine_grid`` + ``grid_sample`` for the samples that drew either,
  trilinear for the image, nearest for the label, zero padding, same convention as the CPU ``RotationScaling``
  (nnU-Net's ``Rz Ry Rx diag(s)`` about the patch centre; a factor > 1 zooms out). With ``crop`` (voxels per
  side) the input is the enlarged crop and only its centre is returned (the other samples are plain-cropped), so
  rotations and zoom-outs read real data instead of padding (``spatial_margin(patch_size)``).
* Computation is float32 with autocast disabled (safe inside ``torch.autocast``); the image comes back in its
  input dtype, the label in its dtype; the inputs are never modified in place. No gradients.
* ``set_epoch(epoch)`` reseeds both generators from ``(seed, epoch)``: a run resumed at an epoch boundary sees the
  same draws as an uninterrupted one (per device kind: CPU and CUDA noise streams differ).
* ``last_params`` holds the host-side draws of the last call (masks and values), for tests and logging.

Wiring (``plan_gpu_augmentation`` does the datamodule side)
-----------------------------------------------------------
The datamodule gets ``augmentation_device: "cpu" | "gpu"`` (and ``gpu_spatial: bool = True``). With "gpu" the
loader workers only crop the patch (no TorchIO transform), or, with ``gpu_spatial=False`` and 'nnunet', crop
the enlarged patch and rotate / scale it on the CPU (``RandomRotationScaling(crop=margin)``, the CPU pipeline's
first step), and the datamodule keeps ``self.batch_augmentation`` (a ``BatchAugmentation`` or ``None``). With
``gpu_spatial=True`` and 'nnunet' the workers cut ``patch + 2 * spatial_margin(patch)`` (about 8x the voxels of
the patch: larger host-to-device copies, but no CPU resampling) and the GPU rotates / scales and crops to the
patch. ``LightningModule.on_after_batch_transfer(batch, dataloader_idx)`` applies it to training batches only
(``self.training``; the validation / test / predict items are whole volumes and are left alone)::

    def on_after_batch_transfer(self, batch, dataloader_idx):
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        augment = getattr(datamodule, "batch_augmentation", None)
        if augment is not None and self.training:
            augment.set_epoch(self.current_epoch)   # no-op within an epoch
            batch = augment.augment_batch(batch)    # image, label (and location when cropping)
        return batch

(Lightning warns once that the module's hook is used although a datamodule is passed; the same hook on the
datamodule itself, testing ``self.trainer.training`` instead of ``self.training``, works too and does not warn.)
Seeds: give each DDP rank its own (``plan_gpu_augmentation(..., seed=..., rank=...)`` derives one from both).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BatchAugmentation",
    "GpuAugmentationPlan",
    "build_batch_augmentation",
    "plan_gpu_augmentation",
]

# ----------------------------------------------------------------------------------------------- argument checks
def _probability(value, name: str) -> float:
    value = float(value)
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return value


def _pair(value, name: str, positive: bool = False, max_value: float | None = None) -> tuple[float, float]:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}")
    low, high = float(value[0]), float(value[1])
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ValueError(f"{name} must be finite with low <= high, got {value!r}")
    if positive and low <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    if low < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    if max_value is not None and high > max_value:
        raise ValueError(f"{name} must be <= {max_value}, got {value!r}")
    return low, high


def _crop(value) -> tuple[int, int, int]:
    values = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else (value,) * 3
    if len(values) != 3 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0
                                   for v in values):
        raise ValueError(f"crop must be a non-negative integer or three of them, got {value!r}")
    return tuple(int(v) for v in values)  # type: ignore[return-value]


def _derive_seed(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0] >> 1)


# ----------------------------------------------------------------------------------------------- helpers
def _rotation_scaling_matrices(degrees: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Batched ``rotation_scaling_matrix``: ``Rz @ Ry @ Rx @ diag(scale)``; degrees (K, 3), scale (K,) -> (K, 3, 3)."""
    ax, ay, az = torch.deg2rad(degrees.to(torch.float64)).unbind(1)
    one, zero = torch.ones_like(ax), torch.zeros_like(ax)

    def matrix(*rows):
        return torch.stack([torch.stack(r, -1) for r in rows], -2)

    rx = matrix((one, zero, zero), (zero, ax.cos(), -ax.sin()), (zero, ax.sin(), ax.cos()))
    ry = matrix((ay.cos(), zero, ay.sin()), (zero, one, zero), (-ay.sin(), zero, ay.cos()))
    rz = matrix((az.cos(), -az.sin(), zero), (az.sin(), az.cos(), zero), (zero, zero, one))
    return rz @ ry @ rx @ torch.diag_embed(scale.to(torch.float64)[:, None].expand(-1, 3))


def _reflect_index(size: int, radius: int, device) -> torch.Tensor:
    """Indices ``-radius .. size - 1 + radius`` reflected into ``[0, size)`` (torch 'reflect': d c b | a b c d)."""
    index = torch.arange(-radius, size + radius, device=device).abs()
    index = torch.where(index > size - 1, 2 * (size - 1) - index, index)
    return index.clamp(0, size - 1)


def _blur_rows(x: torch.Tensor, sigma: torch.Tensor, radius: Sequence[int]) -> torch.Tensor:
    """Separable Gaussian blur of each row of ``x`` (K, X, Y, Z) with its own ``sigma`` (K, 3) (voxels), as one
    grouped ``conv3d`` per axis. ``radius[a]``: the largest ``ceil(3 sigma)`` on axis a (known on the host); rows
    with a smaller sigma get zero weights beyond their own radius, so each row matches the CPU kernel."""
    k = x.shape[0]
    out = x[None]  # (1, K, X, Y, Z): one group per row
    for axis in range(3):
        r = int(radius[axis])
        taps = torch.arange(-r, r + 1, device=x.device, dtype=torch.float32)
        s = sigma[:, axis:axis + 1]
        weights = torch.exp(-0.5 * (taps / s) ** 2) * (taps.abs() <= torch.ceil(3 * s))
        weights = weights / weights.sum(1, keepdim=True)
        shape = [k, 1, 1, 1, 1]
        shape[2 + axis] = 2 * r + 1
        dim = 2 + axis
        padded = out.index_select(dim, _reflect_index(out.shape[dim], r, x.device))
        out = F.conv3d(padded, weights.reshape(shape), groups=k)
    return out[0]


def _contrast_rows(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``(x - mean) * factor + mean`` per row, clipped to the row's original ``[min, max]``."""
    dims = (1, 2, 3)
    mean = x.mean(dims, keepdim=True)
    low, high = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
    out = x * factor + mean * (1 - factor)
    return torch.minimum(torch.maximum(out, low), high)


def _gamma_rows(x: torch.Tensor, gamma: torch.Tensor, invert: bool) -> torch.Tensor:
    """nnU-Net's ``augment_gamma`` with retained statistics, per row (see ``RescaledGamma``)."""
    dims = (1, 2, 3)
    if invert:
        x = -x
    mean, std = x.mean(dims, keepdim=True), x.std(dims, keepdim=True)
    low = x.amin(dims, keepdim=True)
    scale = (x.amax(dims, keepdim=True) - low).clamp(min=1e-7)
    out = ((x - low) / scale).pow(gamma) * scale + low
    out = (out - out.mean(dims, keepdim=True)) * (std / out.std(dims, keepdim=True).clamp(min=1e-7)) + mean
    return -out if invert else out


def _low_resolution_rows(x: torch.Tensor, zoom: Sequence[float]) -> torch.Tensor:
    """Nearest-neighbour down to ``round(shape * zoom)``, trilinear back (per row: the small shapes differ)."""
    shape = tuple(x.shape[1:])
    out = x.clone()
    for row, z in enumerate(zoom):
        small = tuple(max(1, round(n * z)) for n in shape)
        if small == shape:
            continue
        down = F.interpolate(x[row][None, None], size=small, mode="nearest-exact")
        out[row] = F.interpolate(down, size=shape, mode="trilinear")[0, 0]
    return out


# ----------------------------------------------------------------------------------------------- the module
class BatchAugmentation(nn.Module):
    """nnU-Net's default augmentation for a batch on its device; see the module docstring.

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
        g = self._generator

        def rand(*shape):
            return torch.rand(shape, generator=g, dtype=torch.float64)

        def coin(p, *shape):
            return rand(*shape) < p

        def uniform(low, high, *shape):
            return low + (high - low) * rand(*shape)

        def split_at_one(low, high, *shape):  # nnU-Net's BGContrast, as _uniform_split_at_one
            below = coin(0.5, *shape) & (low < 1)
            lower = uniform(low, min(1.0, high), *shape)
            upper = uniform(max(low, 1.0), high, *shape) if high >= 1 else uniform(low, high, *shape)
            return torch.where(below, lower, upper)

        b, c, p = batch, channels, self.p
        brightness_draw = split_at_one if self.brightness_split_at_one else uniform
        params = {
            "rotation": coin(p["rotation"], b),
            "degrees": uniform(-self.degrees, self.degrees, b, 3),
            "scaling": coin(p["scaling"], b),
            "scale": uniform(*self.scaling, b),
            "noise": coin(p["noise"], b),
            "noise_std": uniform(*self.noise_std, b),
            "blur": coin(p["blur"], b, 1) & coin(p["blur_per_channel"], b, c),
            "blur_sigma": uniform(*self.blur_sigma, b, c, 3),
            "brightness": coin(p["brightness"], b, 1).expand(b, c),
            "brightness_factor": brightness_draw(*self.brightness, b, c),
            "contrast": coin(p["contrast"], b, 1).expand(b, c),
            "contrast_factor": split_at_one(*self.contrast, b, c),
            "low_resolution": coin(p["low_resolution"], b, 1) & coin(p["low_resolution_per_channel"], b, c),
            "zoom": uniform(*self.zoom, b, c),
            "inverted_gamma": coin(p["inverted_gamma"], b, 1).expand(b, c),
            "inverted_gamma_value": split_at_one(*self.gamma, b, c),
            "gamma": coin(p["gamma"], b, 1).expand(b, c),
            "gamma_value": split_at_one(*self.gamma, b, c),
            "mirror": coin(p["mirror"], b, 3) & torch.tensor([a in self.mirror_axes for a in range(3)]),
        }
        params["degrees"] = params["degrees"] * params["rotation"][:, None]
        params["scale"] = torch.where(params["scaling"], params["scale"], torch.ones(()))
        if not self.spatial:
            params["rotation"] = params["rotation"] & False
            params["scaling"] = params["scaling"] & False
        return {k: v.contiguous() for k, v in params.items()}

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
            self._noise(rows, params["noise"][:, None].expand(b, c), params["noise_std"][:, None].expand(b, c))
            self._rows(rows, params["blur"], lambda v, s: _blur_rows(v, s, self._blur_radius(params)),
                       params["blur_sigma"])
            self._rows(rows, params["brightness"], lambda v, f: v * f, params["brightness_factor"])
            self._rows(rows, params["contrast"], _contrast_rows, params["contrast_factor"])
            self._rows(rows, params["low_resolution"], None, params["zoom"])
            self._rows(rows, params["inverted_gamma"], lambda v, g: _gamma_rows(v, g, True),
                       params["inverted_gamma_value"])
            self._rows(rows, params["gamma"], lambda v, g: _gamma_rows(v, g, False), params["gamma_value"])
            self._mirror(x, y, params["mirror"])
        return x.to(image.dtype), y

    @staticmethod
    def _mirror(x: torch.Tensor, y: torch.Tensor | None, mirror: torch.Tensor) -> None:
        """Flip, in place, each sample along the axes it drew: one ``flip`` per pattern of axes (at most 7)."""
        code = mirror.long() @ torch.tensor([1, 2, 4])
        for pattern in code.unique().tolist():
            if pattern == 0:
                continue
            dims = [2 + axis for axis in range(3) if pattern >> axis & 1]
            index = (code == pattern).nonzero().flatten().to(x.device, non_blocking=True)
            for data in (x, y):
                if data is not None:
                    data.index_copy_(0, index, data.index_select(0, index).flip(dims))

    def _blur_radius(self, params) -> list[int]:
        sigma = params["blur_sigma"][params["blur"]]
        return [max(1, math.ceil(3 * float(sigma[:, a].max()))) for a in range(3)]

    def _rows(self, rows: torch.Tensor, mask: torch.Tensor, function: Callable | None, values: torch.Tensor) -> None:
        """``rows[i] = function(rows[i], values[i])`` for the rows (sample, channel) selected by ``mask`` (host);
        ``values`` become (K, 1, 1, 1) (or (K, 3) for the blur) float32 on the rows' device. ``function=None``:
        low resolution (a loop with the host-side zooms)."""
        selected = mask.reshape(-1).nonzero().flatten()
        if selected.numel() == 0:
            return
        every = selected.numel() == rows.shape[0]
        index = selected.to(rows.device, non_blocking=True)
        values = values.reshape(mask.numel(), *values.shape[mask.ndim:])[selected]
        data = rows if every else rows.index_select(0, index)
        if function is None:
            out = _low_resolution_rows(data, values.tolist())
        else:
            if values.ndim == 1:
                values = values[:, None, None, None]
            out = function(data, values.to(rows.device, torch.float32, non_blocking=True))
        if every:
            rows.copy_(out)
        else:
            rows.index_copy_(0, index, out)

    def _noise(self, rows: torch.Tensor, mask: torch.Tensor, std: torch.Tensor) -> None:
        selected = mask.reshape(-1).nonzero().flatten()
        if selected.numel() == 0:
            return
        index = selected.to(rows.device, non_blocking=True)
        scale = std.reshape(-1)[selected][:, None, None, None].to(rows.device, torch.float32, non_blocking=True)
        noise = torch.randn((len(selected), *rows.shape[1:]), generator=self._device_generator(rows.device),
                            device=rows.device, dtype=torch.float32)
        rows.index_copy_(0, index, rows.index_select(0, index) + noise * scale)

    def _spatial(self, image: torch.Tensor, label: torch.Tensor | None,
                 params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rotation / scaling of the samples that drew it (and the centre crop of all); always new tensors."""
        in_shape = image.shape[2:]
        window = (slice(None), slice(None), *(slice(c, n - c) for c, n in zip(self.crop, in_shape)))
        x = image[window].to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        y = None if label is None else label[window].clone(memory_format=torch.contiguous_format)
        selected = (params["rotation"] | params["scaling"]).nonzero().flatten()
        if selected.numel() == 0:
            return x, y
        out_shape = x.shape[2:]
        # voxel offset v from the output centre reads the input at its centre + M v; in grid_sample's normalised
        # coordinates (align_corners=True: -1 / 1 are the first / last voxel centres) that is
        # diag(1 / c_in) M diag(c_out), with the axes reversed (grid order is z, y, x)
        c_in = torch.tensor([max((n - 1) / 2, 1e-6) for n in in_shape], dtype=torch.float64)
        c_out = torch.tensor([(n - 1) / 2 for n in out_shape], dtype=torch.float64)
        matrix = _rotation_scaling_matrices(params["degrees"][selected], params["scale"][selected])
        normalised = matrix * c_out[None, None, :] / c_in[None, :, None]
        theta = torch.zeros(len(selected), 3, 4, dtype=torch.float32)
        theta[:, :, :3] = normalised.flip(1, 2)
        index = selected.to(image.device, non_blocking=True)
        grid = F.affine_grid(theta.to(image.device, non_blocking=True), [len(selected), 1, *out_shape],
                             align_corners=True)
        source = image.index_select(0, index).float()
        x.index_copy_(0, index, F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=True))
        if y is not None:
            warped = F.grid_sample(label.index_select(0, index).float(), grid, mode="nearest", padding_mode="zeros",
                                   align_corners=True)
            y.index_copy_(0, index, warped.round().to(label.dtype))
        return x, y

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


# ----------------------------------------------------------------------------------------------- factories
def build_batch_augmentation(name: str, spatial: bool = True, seed: int | None = None,
                             crop: int | Sequence[int] = 0) -> BatchAugmentation | None:
    """The batched augmentation called ``name``: 'none' (``None``, or a crop-only module when ``crop``), 'basic'
    (mirroring, noise, brightness from U(0.75, 1.25), as the CPU 'basic') or 'nnunet' (the full default; ``spatial``
    adds rotation / scaling). ``crop``: voxels per side cut from the input (see ``BatchAugmentation``)."""
    crop = _crop(crop)
    off = dict(p_rotation=0.0, p_scaling=0.0, p_noise=0.0, p_blur=0.0, p_brightness=0.0, p_contrast=0.0,
               p_low_resolution=0.0, p_inverted_gamma=0.0, p_gamma=0.0, p_mirror=0.0)
    if name == "none":
        return BatchAugmentation(spatial=False, crop=crop, seed=seed, **off) if any(crop) else None
    if name == "basic":
        return BatchAugmentation(spatial=False, crop=crop, seed=seed, **{**off, "p_noise": 0.1, "p_brightness": 0.15,
                                                                         "p_mirror": 0.5},
                                 brightness_split_at_one=False)
    if name == "nnunet":
        return BatchAugmentation(spatial=spatial, crop=crop, seed=seed)
    raise ValueError(f"augmentation must be 'none', 'basic' or 'nnunet', got {name!r}")


@dataclass
class GpuAugmentationPlan:
    """What the datamodule needs for ``augmentation_device: gpu``: the workers' transform and crop, and the
    batched augmentation for ``on_after_batch_transfer``."""

    worker_transform: Callable | None  # PatchSampler(transform=...)
    sampler_patch_size: tuple[int, int, int]  # PatchSampler(patch_size=...): what the workers cut and return
    sampler_margin: tuple[int, int, int]  # PatchSampler(margin=...)
    batch_augmentation: BatchAugmentation | None


def plan_gpu_augmentation(name: str, patch_size: Sequence[int], gpu_spatial: bool = True, seed: int = 0,
                          rank: int = 0) -> GpuAugmentationPlan:
    """Split augmentation ``name`` between the loader workers and the GPU.

    'none' / 'basic': the workers cut the patch, the GPU does the rest. 'nnunet' with ``gpu_spatial``: the workers
    cut ``patch + 2 * spatial_margin(patch)`` and the GPU rotates / scales it and crops the centre (the CPU pipeline's
    geometry, no padding pulled in); without: the workers cut the enlarged crop and rotate / scale it
    (``RandomRotationScaling(crop=margin)``, as the CPU pipeline's first step), the GPU does the rest. The seed of
    the batched draws is derived from ``(seed, rank)``.
    """
    from .augmentation import nnunet_transforms, spatial_margin

    patch = tuple(int(p) for p in patch_size)
    batch_seed = _derive_seed(seed, rank, 0x6A)
    zero = (0, 0, 0)
    if name != "nnunet":
        return GpuAugmentationPlan(None, patch, zero, build_batch_augmentation(name, False, batch_seed))
    margin = tuple(int(m) for m in spatial_margin(patch))
    if gpu_spatial:
        enlarged = tuple(p + 2 * m for p, m in zip(patch, margin))
        return GpuAugmentationPlan(None, enlarged, zero, BatchAugmentation(spatial=True, crop=margin, seed=batch_seed))
    worker = nnunet_transforms(copy=True, crop=margin)["rotation_scaling"]
    return GpuAugmentationPlan(worker, patch, margin,  # type: ignore[arg-type]
                               BatchAugmentation(spatial=False, seed=batch_seed))
