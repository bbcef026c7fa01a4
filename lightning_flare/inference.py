"""Sliding-window inference with TorchIO's GridSampler and a GridAggregator that stays on the device (Hann or Gaussian)."""
from __future__ import annotations

import logging
from copy import deepcopy
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchio as tio
from torch import nn

from .body_box import windows_touching

log = logging.getLogger(__name__)


def grid_overlap(patch_size: Sequence[int], overlap: float) -> tuple[int, int, int]:
    """Overlap in voxels for a fractional ``overlap`` (0.5 = nnU-Net's step 0.5); TorchIO needs even numbers."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    return tuple(int(2 * int(round(p * overlap / 2))) for p in patch_size)


AUTOCAST_SETTINGS = (True, False, "auto", "bf16", "fp16")


def check_autocast_setting(setting) -> None:
    if not isinstance(setting, (bool, str)) or setting not in AUTOCAST_SETTINGS:
        raise ValueError(f"autocast must be true, false, 'auto', 'bf16' or 'fp16', got {setting!r}")


def autocast_dtype(device_type: str, setting: bool | str = True, precision: str | None = None) -> torch.dtype | None:
    """The dtype inference autocasts to on ``device_type``, or None (full precision): decided here only.

    ``setting`` is the module's ``autocast``: false: none; "bf16" / "fp16": that dtype; true: autocast in the
    trainer's 16-bit dtype when its ``precision`` names one ("bf16-mixed", "bf16-true" -> bfloat16; "16-mixed",
    "16-true" -> float16), else the device's (CUDA float16, others bfloat16); "auto": as true, except that on
    CUDA a trainer in full precision ("32-true", "64-true") means none. On the CPU true is bfloat16 and "auto" is
    bfloat16 only where it is faster than float32 on this processor (``cpu_precision``), else none, whatever the
    trainer says (Lightning turns 16-mixed into bf16-mixed there anyway)."""
    check_autocast_setting(setting)
    if setting is False:
        return None
    if setting in ("bf16", "fp16"):
        return torch.bfloat16 if setting == "bf16" else torch.float16
    if device_type == "cpu" and setting == "auto":
        from .cpu_precision import cpu_bf16_is_faster  # measured once per CPU model

        return torch.bfloat16 if cpu_bf16_is_faster() else None
    if device_type != "cuda":
        return torch.bfloat16
    precision = str(precision) if precision is not None else ""
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    full = precision.startswith(("32", "64"))
    return None if setting == "auto" and full else torch.float16


def autocast_context(device: torch.device | str, setting: bool | str = True, precision: str | None = None):
    """``torch.autocast`` in ``autocast_dtype``'s dtype; full precision turns off an enclosing autocast (Lightning
    runs every step inside its precision plugin's)."""
    device_type = torch.device(device).type
    dtype = autocast_dtype(device_type, setting, precision)
    if dtype is None:
        return torch.autocast(device_type=device_type, enabled=False)
    return torch.autocast(device_type=device_type, dtype=dtype)


def window_batch_size(value: int | str, device: torch.device | str) -> int:
    """Windows per forward pass; ``"auto"``: 1 on the CPU (a batch of 2 128x128x96 windows took ~20% longer
    per window than one at a time on 2 cores: cache misses, no parallelism gained), 2 on accelerators."""
    if value == "auto":
        return 1 if torch.device(device).type == "cpu" else 2
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"sw_batch_size must be a positive integer or 'auto', got {value!r}")
    return value


def use_channels_last(value: bool | str, device: torch.device | str) -> bool:
    """Whether windows run in the channels-last 3D layout; ``"auto"``: on the CPU, where oneDNN then runs the
    3D convolutions without reordering every input and output (benchmarks/window_forward.py), and on CUDA, where
    it ran the FLARE24 network in 0.63x the time and 0.78x the peak memory under fp16 (H200,
    benchmarks/gpu_check.py); other devices keep the contiguous layout."""
    if value == "auto":
        return torch.device(device).type in ("cpu", "cuda")
    if not isinstance(value, bool):
        raise ValueError(f"channels_last must be true, false or 'auto', got {value!r}")
    return value


def contiguous_forward(net: nn.Module) -> nn.Module:
    """``net``, or a contiguous copy of it where its weights are channels-last (a fit under
    ``train_layout.ChannelsLastTraining``): ``channels_last: false`` then still runs the contiguous layout."""
    if any(p.dim() == 5 and not p.is_contiguous() for p in net.parameters()):
        return deepcopy(net).to(memory_format=torch.contiguous_format)
    return net


def channels_last_forward(net: nn.Module):
    """A forward function running a channels-last copy of ``net`` (``net`` itself is left untouched): a
    convolution keeps the channels-last layout only when its weight has it too."""
    copy = deepcopy(net).to(memory_format=torch.channels_last_3d)

    def forward(x: torch.Tensor):
        return copy(x.contiguous(memory_format=torch.channels_last_3d))

    return forward


def nnunet_steps(size: int, patch: int, step: float) -> list[int]:
    """nnU-Net's window starts along one axis: ceil((size - patch) / (step * patch)) + 1 evenly spaced starts."""
    if size <= patch:
        return [0]
    count = int(np.ceil((size - patch) / (patch * step))) + 1
    return [int(np.round((size - patch) / (count - 1) * i)) for i in range(count)]


def gaussian_window(patch_size: Sequence[int], sigma_scale: float = 1 / 8) -> torch.Tensor:
    """nnU-Net's importance map: a Gaussian (sigma = patch / 8) peaking at the window centre; no zeros."""
    grids = torch.meshgrid(*[torch.arange(p, dtype=torch.float64) - (p // 2) for p in patch_size], indexing="ij")
    window = torch.exp(-sum(g ** 2 / (2 * (p * sigma_scale) ** 2) for g, p in zip(grids, patch_size)))
    window = window / window.max()
    return torch.clamp(window, min=float(window[window > 0].min())).float()


def window_locations(shape: Sequence[int], patch_size: Sequence[int], overlap: float = 0.5,
                     steps: str = "torchio") -> np.ndarray:
    """Corners (i0, j0, k0, i1, j1, k1) of the window grid over a volume of ``shape`` (an axis shorter than the
    window counts as the window: ``sliding_window_logits`` pads it): TorchIO's grid or nnU-Net's ('nnunet')."""
    patch = [int(p) for p in patch_size]
    shape = [max(int(s), p) for s, p in zip(shape, patch)]
    if steps == "nnunet":
        starts = [nnunet_steps(s, p, 1 - overlap) for s, p in zip(shape, patch)]
        return np.array([(i, j, k, i + patch[0], j + patch[1], k + patch[2])
                         for i in starts[0] for j in starts[1] for k in starts[2]], dtype=np.int64)
    if steps != "torchio":
        raise ValueError(f"sw_steps must be 'torchio' or 'nnunet', got {steps!r}")
    return np.asarray(tio.GridSampler._get_patches_locations(tuple(shape), tuple(patch), grid_overlap(patch, overlap)),
                      dtype=np.int64)


class _SlicingGridSampler(tio.GridSampler):
    """GridSampler whose windows are plain tensor slices (TorchIO's crop deep-copies the whole subject), on the
    grid of ``window_locations`` (``steps='nnunet'``: nnU-Net's)."""

    def __init__(self, subject, patch_size, overlap: float = 0.5, steps: str = "torchio"):
        super().__init__(subject, patch_size, grid_overlap(patch_size, overlap))
        self.locations = window_locations(subject.spatial_shape, patch_size, overlap, steps)

    def __len__(self) -> int:
        return len(self.locations)

    def __getitem__(self, index):
        i, j, k, *_ = (int(v) for v in self.locations[index])
        p = self.patch_size.astype(int)
        data = self.subject["image"].data[:, i : i + p[0], j : j + p[1], k : k + p[2]]
        return data, torch.as_tensor(self.locations[index])


AIR_LOGIT = 20.0  # background's lead where no window ran (softmax: tumour probability ~2e-9)


def air_logits(num_classes: int, shape: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Logits (C, x, y, z) of voxels no window covers: background (class 0) by ``AIR_LOGIT``."""
    output = torch.full((num_classes, *shape), -AIR_LOGIT, dtype=torch.float32, device=device)
    output[0] = 0.0
    return output


def fill_skipped(output: torch.Tensor, skipped: np.ndarray, margin: float = AIR_LOGIT) -> None:
    """Background (class 0 by ``margin`` logits) in every voxel of ``output`` (C, x, y, z) that a ``skipped`` window
    (rows i0, j0, k0, i1, j1, k1) covers: a voxel either kept all of the whole grid's windows or is background."""
    if len(skipped) == 0:
        return
    incomplete = torch.zeros(output.shape[1:], dtype=torch.bool, device=output.device)
    for i, j, k, i1, j1, k1 in np.asarray(skipped).tolist():
        incomplete[i:i1, j:j1, k:k1] = True
    if bool(incomplete.any()):
        output[0][incomplete] = 0.0
        output[1:, incomplete] = -margin


class DeviceGridAggregator(tio.inference.GridAggregator):
    """TorchIO's weighted ('hann' overlap mode) GridAggregator, accumulated on the windows' own device.

    TorchIO's ``add_batch`` copies every batch to the CPU and keeps a weight map per class; this one sums
    ``window * output`` and ``window`` where the batch is (the GPU when predicting there) with one weight map
    for all classes, and divides in place. ``weighting``: TorchIO's Hann window or nnU-Net's Gaussian."""

    def __init__(self, sampler: tio.GridSampler, weighting: str = "hann"):
        super().__init__(sampler, overlap_mode="hann")
        if self.volume_padded:
            raise ValueError("DeviceGridAggregator needs a sampler without padding_mode")
        if weighting not in ("hann", "gaussian"):
            raise ValueError(f"sw_weighting must be 'hann' or 'gaussian', got {weighting!r}")
        self.weighting = weighting

    def _initialize_hann_window(self) -> None:
        if self._hann_window is None:
            size = [int(p) for p in self.patch_size]
            self._hann_window = gaussian_window(size) if self.weighting == "gaussian" else self._get_hann_window(size)

    def add_batch(self, batch_tensor: torch.Tensor, locations: torch.Tensor) -> None:
        self._initialize_hann_window()
        if self._output_tensor is None:
            device = batch_tensor.device
            self._hann_window = self._hann_window.to(device, torch.float32)
            self._output_tensor = torch.zeros((batch_tensor.shape[1], *self.spatial_shape), dtype=torch.float32, device=device)
            self._avgmask_tensor = torch.zeros((1, *self.spatial_shape), dtype=torch.float32, device=device)
        for window, (i, j, k, i1, j1, k1) in zip(batch_tensor, locations.tolist()):
            if tuple(window.shape[1:]) != (i1 - i, j1 - j, k1 - k):
                raise RuntimeError(f"window of shape {tuple(window.shape[1:])} does not fit location {(i, j, k, i1, j1, k1)}")
            self._output_tensor[:, i:i1, j:j1, k:k1].addcmul_(window.float(), self._hann_window)
            self._avgmask_tensor[:, i:i1, j:j1, k:k1].add_(self._hann_window)

    def get_output_tensor(self) -> torch.Tensor:
        """The weighted average, (C, x, y, z) float32 on the windows' device (computed in place: call once)."""
        if self._output_tensor is None:
            raise RuntimeError("no window was added")
        return self._output_tensor.div_(self._avgmask_tensor)


@torch.no_grad()
def sliding_window_logits(
    net: nn.Module,
    image: torch.Tensor,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    batch_size: int = 2,
    autocast: bool | str = True,
    mirror_axes: Sequence[int] = (),
    device: torch.device | str | None = None,
    weighting: str = "hann",
    steps: str = "torchio",
    channels_last: bool | str = "auto",
    precision: str | None = None,
    body: tuple[slice, slice, slice] | None = None,
    counts: dict[str, int] | None = None,
) -> torch.Tensor:
    """Class logits (C, x, y, z), float32 on the network's device, for a normalised (1, x, y, z) image.

    Volumes smaller than the window are padded (and cropped back). ``mirror_axes`` enables nnU-Net's
    test-time mirroring over the given spatial axes (all 2^n flips averaged). ``weighting``: 'hann' (TorchIO)
    or 'gaussian' (nnU-Net); ``steps``: TorchIO's window grid or nnU-Net's ('nnunet', as ``nnUNetPredictor``);
    ``channels_last``: see ``use_channels_last``; ``autocast`` and the trainer's ``precision``: see ``autocast_dtype``.
    ``body`` (x, y, z slices of ``image``, ``body_box``): only the whole grid's windows that touch it run (the
    same windows at the same places); a voxel all of whose windows ran has the whole grid's logits bit for bit (so
    every voxel inside ``body``), any other is background (``fill_skipped``). A ``body`` that touches no window
    runs the whole grid. ``counts`` receives the windows run and those of the whole grid.
    """
    device = torch.device(device) if device is not None else next(net.parameters()).device
    patch_size = tuple(int(p) for p in patch_size)
    shape = tuple(image.shape[1:])
    pad = [max(p - s, 0) for p, s in zip(patch_size, shape)]
    if any(pad):
        padding = []
        for extra in reversed(pad):
            padding += [extra // 2, extra - extra // 2]
        image = F.pad(image, padding)
    subject = tio.Subject(image=tio.ScalarImage(tensor=image.float()))
    sampler = _SlicingGridSampler(subject, patch_size, overlap, steps)
    total = len(sampler.locations)
    skipped = sampler.locations[:0]
    if body is not None:  # only windows that touch the body: inside it every voxel keeps all its windows
        shifted = tuple(slice(b.start + p // 2, b.stop + p // 2) for b, p in zip(body, pad))
        keep = windows_touching(sampler.locations, shifted)
        if keep.any():
            skipped, sampler.locations = sampler.locations[~keep], sampler.locations[keep]
        else:
            log.warning("skip_air: the body box %s touches none of the %d windows; running them all", body, total)
    if counts is not None:
        counts.update(windows=len(sampler.locations), windows_total=total)
    aggregator = DeviceGridAggregator(sampler, weighting)
    flips = _flip_sets(mirror_axes)
    forward = channels_last_forward(net) if use_channels_last(channels_last, device) else contiguous_forward(net)
    for start in range(0, len(sampler), batch_size):
        items = [sampler[i] for i in range(start, min(start + batch_size, len(sampler)))]
        windows = torch.stack([w for w, _ in items]).to(device)
        locations = torch.stack([loc for _, loc in items])
        logits = None
        with autocast_context(device, autocast, precision):
            for dims in flips:
                x = torch.flip(windows, dims) if dims else windows
                out = forward(x)
                out = out[0] if isinstance(out, (list, tuple)) else out
                out = (torch.flip(out, dims) if dims else out).float()
                logits = out if logits is None else logits + out
        aggregator.add_batch(logits / len(flips), locations)
    output = aggregator.get_output_tensor()
    fill_skipped(output, skipped)
    if any(pad):
        output = output[:, pad[0] // 2 : pad[0] // 2 + shape[0], pad[1] // 2 : pad[1] // 2 + shape[1], pad[2] // 2 : pad[2] // 2 + shape[2]]
    return output.contiguous()


def _flip_sets(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """All subsets of the spatial axes, as tensor dims of a (B, C, x, y, z) batch."""
    axes = [int(a) + 2 for a in mirror_axes]
    sets: list[tuple[int, ...]] = [()]
    for axis in axes:
        sets += [s + (axis,) for s in sets]
    return sets

