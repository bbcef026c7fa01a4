"""Resampling to a target spacing, nnU-Net style, plus a fast torch alternative.

Arrays are (x, y, z) like TorchIO / SimpleITK sizes. Output shapes follow nnU-Net:
``round(shape * spacing / new_spacing)``; both methods map voxel centres with the
"pixel extent" convention (skimage ``resize``, ``align_corners=False``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


def new_shape_for_spacing(shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]) -> tuple[int, ...]:
    ratio = np.asarray(spacing, float) / np.asarray(new_spacing, float)
    return tuple(int(max(1, round(s))) for s in np.asarray(shape, float) * ratio)


def lowres_axis(spacing: Sequence[float], threshold: float = 3.0) -> int | None:
    """The single axis to resample separately (nnU-Net's 'separate z'), or None."""
    spacing = np.asarray(spacing, float)
    if spacing.max() / spacing.min() <= threshold:
        return None
    axes = np.flatnonzero(spacing == spacing.max())
    return int(axes[0]) if len(axes) == 1 else None


def _separate_axis(spacing, new_spacing, threshold) -> int | None:
    axis = lowres_axis(spacing, threshold)
    return axis if axis is not None else lowres_axis(new_spacing, threshold)


def _zoom(array: np.ndarray, new_shape: Sequence[int], order: int) -> np.ndarray:
    if tuple(array.shape) == tuple(new_shape):
        return array
    factors = [n / o for n, o in zip(new_shape, array.shape)]
    return ndimage.zoom(array, factors, order=order, mode="nearest", grid_mode=True, prefilter=order > 1)


def _resample_nnunet(array: np.ndarray, new_shape, axis: int | None, order: int, order_z: int) -> np.ndarray:
    if axis is None:
        return _zoom(array, new_shape, order)
    inplane = list(new_shape)
    inplane[axis] = array.shape[axis]
    out = _zoom(array, inplane, order)
    return _zoom(out, new_shape, order_z)


def resample_image(
    array: np.ndarray,
    spacing: Sequence[float],
    new_spacing: Sequence[float],
    method: str = "nnunet",
    anisotropy_threshold: float = 3.0,
    new_shape: Sequence[int] | None = None,
) -> np.ndarray:
    """Third-order spline (nearest along a separate low-resolution axis), or trilinear ('fast')."""
    new_shape = tuple(new_shape) if new_shape is not None else new_shape_for_spacing(array.shape, spacing, new_spacing)
    array = np.asarray(array, dtype=np.float32)
    if method == "fast":
        return _interpolate(torch.from_numpy(array)[None], new_shape).numpy()[0]
    axis = _separate_axis(spacing, new_spacing, anisotropy_threshold)
    return _resample_nnunet(array, new_shape, axis, order=3, order_z=0).astype(np.float32, copy=False)


def resample_label(
    label: np.ndarray,
    spacing: Sequence[float],
    new_spacing: Sequence[float],
    num_classes: int,
    method: str = "nnunet",
    anisotropy_threshold: float = 3.0,
    new_shape: Sequence[int] | None = None,
) -> np.ndarray:
    """Linear interpolation of each class's one-hot mask; a voxel takes class c where c reaches 0.5
    (nnU-Net's ``resize_segmentation``: later classes win, so for binary masks ties go to the foreground)."""
    new_shape = tuple(new_shape) if new_shape is not None else new_shape_for_spacing(label.shape, spacing, new_spacing)
    if tuple(label.shape) == new_shape:
        return label.astype(np.uint8)
    axis = _separate_axis(spacing, new_spacing, anisotropy_threshold) if method == "nnunet" else None
    out = np.zeros(new_shape, np.uint8)
    for c in range(1, num_classes):
        onehot = (label == c).astype(np.float32)
        if not onehot.any():
            continue
        if method == "fast":
            prob = _interpolate(torch.from_numpy(onehot)[None], new_shape).numpy()[0]
        else:
            prob = _resample_nnunet(onehot, new_shape, axis, order=1, order_z=0)
        out[prob >= 0.5] = c
    return out


def _interpolate(tensor: torch.Tensor, new_shape: Sequence[int]) -> torch.Tensor:
    """Trilinear resize of a (C, x, y, z) tensor, computed in float32."""
    if tuple(tensor.shape[1:]) == tuple(new_shape):
        return tensor
    out = F.interpolate(tensor[None].float(), size=tuple(int(s) for s in new_shape), mode="trilinear", align_corners=False)
    return out[0]


def resample_probabilities(probabilities: torch.Tensor, new_shape: Sequence[int], chunk_classes: int = 1) -> torch.Tensor:
    """Linear resampling of (C, x, y, z) class probabilities / logits back to the original grid.

    Classes are resampled a few at a time so that the full-resolution float copy of every class
    never exists at once beyond the output itself.
    """
    channels = probabilities.shape[0]
    out = torch.empty((channels, *new_shape), dtype=torch.float32, device=probabilities.device)
    for start in range(0, channels, chunk_classes):
        out[start : start + chunk_classes] = _interpolate(probabilities[start : start + chunk_classes], new_shape)
    return out
