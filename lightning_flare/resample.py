"""Resampling to a target spacing, nnU-Net style, plus a fast torch alternative.

Arrays are (x, y, z) like TorchIO / SimpleITK sizes. Output shapes follow nnU-Net:
``round(shape * spacing / new_spacing)``; both methods map voxel centres with the
"pixel extent" convention (skimage ``resize``, ``align_corners=False``).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .device import to_host


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


CHUNK_VOXELS = 2**24  # above this, cubic 3D resampling runs in slabs (the spline prefilter holds a float64 copy)


def _zoom(array: np.ndarray, new_shape: Sequence[int], order: int, chunk_voxels: int = CHUNK_VOXELS) -> np.ndarray:
    if tuple(array.shape) == tuple(new_shape):
        return array
    factors = [n / o for n, o in zip(new_shape, array.shape)]
    if order <= 1 or array.ndim != 3 or array.size <= chunk_voxels:
        return ndimage.zoom(array, factors, order=order, mode="nearest", grid_mode=True, prefilter=order > 1)
    return _zoom_in_slabs(array, new_shape, order, chunk_voxels)


def _zoom_in_slabs(array: np.ndarray, new_shape: Sequence[int], order: int, chunk_voxels: int, margin: int = 16) -> np.ndarray:
    """``ndimage.zoom`` (grid_mode, 'nearest') computed slab by slab along the last axis with the same
    coordinate mapping; each slab reads ``margin`` extra input planes so the spline prefilter is unaffected
    (its influence decays as 0.27^distance). Peak memory: one slab instead of a float64 copy of the volume."""
    scale = np.asarray(array.shape, float) / np.asarray(new_shape, float)
    out = np.empty(tuple(new_shape), np.float32)
    planes_in = max(1, chunk_voxels // (array.shape[0] * array.shape[1]))
    step = max(1, int(planes_in / scale[2]))
    for o0 in range(0, new_shape[2], step):
        o1 = min(o0 + step, new_shape[2])
        lo = (o0 + 0.5) * scale[2] - 0.5
        hi = (o1 - 0.5) * scale[2] - 0.5
        i0 = max(0, int(np.floor(lo)) - margin)
        i1 = min(array.shape[2], int(np.ceil(hi)) + margin + 1)
        offset = 0.5 * scale - 0.5
        offset[2] = (o0 + 0.5) * scale[2] - 0.5 - i0
        out[:, :, o0:o1] = ndimage.affine_transform(
            array[:, :, i0:i1], scale, offset=offset, output_shape=(new_shape[0], new_shape[1], o1 - o0),
            order=order, mode="nearest", prefilter=True)
    return out


def _zoom_within_range(array: np.ndarray, new_shape: Sequence[int], order: int) -> np.ndarray:
    """``_zoom``, with spline overshoot clipped to the input's value range (skimage ``resize(clip=True)``,
    which nnU-Net calls: a cubic spline rings past saturated air / bone, the clip removes that)."""
    out = _zoom(array, new_shape, order)
    if order > 1 and out is not array and array.size:
        np.clip(out, array.min(), array.max(), out=out)
    return out


def _resample_nnunet(array: np.ndarray, new_shape, axis: int | None, order: int, order_z: int) -> np.ndarray:
    if axis is None:
        return _zoom_within_range(array, new_shape, order)
    # separate axis: 2D resampling slice by slice (bounded memory; each slice clipped to its own range, as
    # nnU-Net resizes slice by slice), then that axis alone
    inplane = [n for i, n in enumerate(new_shape) if i != axis]
    moved = np.moveaxis(array, axis, 0)
    out = np.empty((moved.shape[0], *inplane), np.float32)
    for i, plane in enumerate(moved):
        out[i] = _zoom_within_range(plane, inplane, order)
    out = np.moveaxis(out, 0, axis)
    if out.shape[axis] == new_shape[axis]:
        return out
    if order_z == 0:  # nearest along the axis, same centre mapping as zoom(grid_mode=True)
        return np.take(out, _nearest_indices(out.shape[axis], new_shape[axis]), axis=axis)
    return _zoom(out, new_shape, order_z)


def anti_alias(array: np.ndarray, new_shape: Sequence[int]) -> np.ndarray:
    """Gaussian low-pass along each axis that is downsampled, sigma = (old / new size - 1) / 2 voxels
    (scikit-image's ``resize(anti_aliasing=True)`` rule), so that noise finer than the new grid is averaged
    instead of aliased into it. Axes that keep or gain resolution are untouched."""
    sigma = [max(0.0, (old / new - 1) / 2) for old, new in zip(array.shape, new_shape)]
    if not any(sigma):
        return array
    return ndimage.gaussian_filter(array, sigma, mode="nearest", output=np.float32)


def resample_image(
    array: np.ndarray,
    spacing: Sequence[float],
    new_spacing: Sequence[float],
    method: str = "nnunet",
    anisotropy_threshold: float = 3.0,
    new_shape: Sequence[int] | None = None,
    anti_aliasing: bool = False,
) -> np.ndarray:
    """Third-order spline (nearest along a separate low-resolution axis), or trilinear ('fast');
    ``anti_aliasing``: low-pass first where the grid gets coarser (see ``anti_alias``)."""
    new_shape = tuple(new_shape) if new_shape is not None else new_shape_for_spacing(array.shape, spacing, new_spacing)
    array = np.asarray(array, dtype=np.float32)
    if anti_aliasing:
        array = anti_alias(array, new_shape)
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


def _nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """Source index of each output voxel for nearest-neighbour resampling (voxel centres, pixel-extent mapping).

    Computed in nnU-Net's floating-point order (``scale * (i + 0.5) - 0.5`` rounded as ``map_coordinates``
    order 0 rounds), so that exact ties such as 83.5 * 200 / 167 pick the same plane as nnU-Net."""
    centres = float(size_in) / size_out * (np.arange(size_out) + 0.5) - 0.5
    return np.clip(np.floor(centres + 0.5).astype(int), 0, size_in - 1)


def _linear_weights(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of linear interpolation with ``align_corners=False`` (as F.interpolate)."""
    src = np.maximum((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0)
    i0 = np.minimum(np.floor(src).astype(int), size_in - 1)
    i1 = np.minimum(i0 + 1, size_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def z_weights(size_in: int, size_out: int, nearest: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights along the slab axis: ``out = in[i0] * (1 - w) + in[i1] * w`` (nearest: w = 0)."""
    if nearest:
        i = _nearest_indices(size_in, size_out)
        return i, i, np.zeros(size_out, np.float32)
    return _linear_weights(size_in, size_out)


def probability_axis(spacing: Sequence[float], new_spacing: Sequence[float], method: str = "nnunet",
                     anisotropy_threshold: float = 3.0) -> int | None:
    """Axis that nnU-Net resamples probabilities along with nearest neighbour (its separate z), or None."""
    return _separate_axis(spacing, new_spacing, anisotropy_threshold) if method == "nnunet" else None


def resample_slabs(values: torch.Tensor, new_shape: Sequence[int], reduce: Callable[[torch.Tensor], torch.Tensor],
                   dtype: type, slab: int = 16, nearest_axis: int | None = None) -> np.ndarray:
    """Linear resampling of float (C, x, y, z) ``values`` to ``new_shape`` (nearest neighbour along
    ``nearest_axis``), slab by slab along the last axis (``nearest_axis`` moved there): each slab's
    (slab, C, x, y) planes go through ``reduce`` to (slab, x, y) and into a host array of ``dtype``.
    Peak extra memory: ``C * x * y * slab`` floats."""
    new_shape = tuple(int(s) for s in new_shape)
    if nearest_axis is not None and nearest_axis != 2:  # make the nearest axis the slab axis
        order = [a for a in range(3) if a != nearest_axis] + [nearest_axis]
        moved = resample_slabs(values.permute(0, *(a + 1 for a in order)), [new_shape[a] for a in order], reduce,
                               dtype, slab, nearest_axis=2)
        return np.ascontiguousarray(np.moveaxis(moved, 2, nearest_axis))
    i0, i1, w = z_weights(values.shape[-1], new_shape[2], nearest=nearest_axis == 2)
    out = np.empty(new_shape, dtype)
    for start in range(0, new_shape[2], slab):
        stop = min(start + slab, new_shape[2])
        weight = torch.from_numpy(w[start:stop]).to(values.device)
        z = values[..., i0[start:stop]] * (1 - weight) + values[..., i1[start:stop]] * weight
        planes = F.interpolate(z.permute(3, 0, 1, 2), size=new_shape[:2], mode="bilinear", align_corners=False)
        out[:, :, start:stop] = to_host(reduce(planes).permute(1, 2, 0))
    return out


def resample_to_mask(probabilities: torch.Tensor, new_shape: Sequence[int], slab: int = 16,
                     nearest_axis: int | None = None) -> np.ndarray:
    """argmax of the linear resampling of (C, x, y, z) logits or probabilities to ``new_shape``, in slabs.

    Equal to ``resample_probabilities(...).argmax(0)`` but never holds the full-resolution float
    probabilities: peak extra memory is ``C * x * y * slab`` floats. ``nearest_axis``: that axis is
    resampled with nearest neighbour instead (nnU-Net's order_z 0 for anisotropic spacing, see
    ``probability_axis``). Two classes: the sign of the resampled difference decides (half the work).
    """
    probabilities = probabilities.float()
    if probabilities.shape[0] == 2:  # argmax of two classes = sign of their difference (linear maps commute with it)
        return resample_slabs((probabilities[1] - probabilities[0])[None], new_shape,
                              lambda planes: (planes[:, 0] > 0).to(torch.uint8), np.uint8, slab, nearest_axis)
    return resample_slabs(probabilities, new_shape, lambda planes: planes.argmax(1).to(torch.uint8), np.uint8, slab,
                          nearest_axis)


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
