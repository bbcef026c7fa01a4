"""Rotation and scaling in voxel space (deterministic and random) and the margin they need around a patch."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torchio as tio
from torchio.transforms.augmentation import RandomTransform
from torchio.transforms.spatial_transform import SpatialTransform

from ._checks import _crop_margin, _number, _probability, _range, _triplet
from ._draws import _coin, _uniform

_SITK_INTERPOLATORS = {
    "nearest": sitk.sitkNearestNeighbor,
    "linear": sitk.sitkLinear,
    "bspline": sitk.sitkBSpline,
}


def rotation_scaling_matrix(degrees: Sequence[float], scale: Sequence[float]) -> np.ndarray:
    """nnU-Net's ``create_affine_matrix_3d``: ``Rz @ Ry @ Rx @ diag(scale)`` (angle i rotates about axis i)."""
    ax, ay, az = np.radians(np.asarray(degrees, float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx @ np.diag(np.asarray(scale, float))


class RotationScaling(SpatialTransform):
    """Deterministic: rotate and scale about the patch centre, in voxel coordinates (as nnU-Net; the spacing is
    ignored), keeping the shape, or, with ``crop``, returning only the central part (``crop`` voxels fewer per
    side; resampled directly into that smaller grid, which is cheaper; with no rotation or scaling it is a plain
    crop).

    The output voxel at offset ``v`` from the centre ``(n - 1) / 2`` is read from the input at
    ``rotation_scaling_matrix(degrees, scale) @ v``: nnU-Net's convention, a scale > 1 shows more context (objects
    look smaller), the opposite of ``tio.Affine``'s ``scales``. Points outside the input get ``default_pad_value``
    (image) or ``default_pad_label`` (label maps).

    Resampling uses SimpleITK in the voxel grid (about twice as fast on CPU as ``torch.grid_sample``). The image is
    interpolated linearly by default: nnU-Net v1 used cubic splines (order 3) for the data, v2 uses trilinear
    ``grid_sample``; linear is the accepted trade-off ('bspline' is available but ~10x slower). Label maps use
    nearest neighbour (nnU-Net v2 interpolates one-hot masks linearly; nearest keeps values exact and is cheaper)
    and keep their dtype.
    """

    def __init__(
        self,
        degrees: float | Sequence[float] = 0.0,
        scale: float | Sequence[float] = 1.0,
        image_interpolation: str = "linear",
        label_interpolation: str = "nearest",
        default_pad_value: float = 0.0,
        default_pad_label: float = 0,
        crop: int | Sequence[int] = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.degrees = _triplet(degrees, "degrees")
        self.scale = _triplet(scale, "scale", positive=True)
        for name, value in (("image_interpolation", image_interpolation), ("label_interpolation", label_interpolation)):
            if value not in _SITK_INTERPOLATORS:
                raise ValueError(f"{name} must be one of {sorted(_SITK_INTERPOLATORS)}, got {value!r}")
        self.image_interpolation = image_interpolation
        self.label_interpolation = label_interpolation
        self.default_pad_value = _number(default_pad_value, "default_pad_value")
        self.default_pad_label = _number(default_pad_label, "default_pad_label")
        self.crop = _crop_margin(crop)
        self.args_names = ["degrees", "scale", "image_interpolation", "label_interpolation",
                           "default_pad_value", "default_pad_label", "crop"]

    def is_identity(self) -> bool:
        return all(d == 0 for d in self.degrees) and all(s == 1 for s in self.scale)

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        if self.is_identity() and not any(self.crop):
            return subject
        subject.check_consistent_spatial_shape()
        shape = subject.spatial_shape
        out_shape = tuple(n - 2 * c for n, c in zip(shape, self.crop))
        if min(out_shape) < 1:
            raise ValueError(f"crop {self.crop} leaves nothing of an image of shape {shape}")
        if self.is_identity():
            region = tuple(slice(c, c + n) for c, n in zip(self.crop, out_shape))
            for image in self.get_images(subject):
                image.set_data(image.data[(slice(None), *region)].contiguous())
                self._shift_origin(image)
            return subject
        # numpy arrays (x, y, z) are read by SimpleITK as images of size (z, y, x): reverse the axes of the matrix.
        # The input grid has origin 0 and spacing 1 (physical point = voxel index); the output grid starts at
        # ``crop``, so it is the central part of the rotated input.
        matrix = rotation_scaling_matrix(self.degrees, self.scale)[::-1, ::-1]
        transform = sitk.AffineTransform(3)
        transform.SetMatrix(matrix.ravel().tolist())
        transform.SetCenter([(n - 1) / 2 for n in reversed(shape)])
        out_size = [int(n) for n in reversed(out_shape)]
        out_origin = [float(c) for c in reversed(self.crop)]
        for image in self.get_images(subject):
            is_label = isinstance(image, tio.LabelMap)
            interpolator = _SITK_INTERPOLATORS[self.label_interpolation if is_label else self.image_interpolation]
            pad = self.default_pad_label if is_label else self.default_pad_value
            data = image.data
            channels = []
            for channel in data:
                array = channel.numpy()
                if array.dtype == np.bool_:
                    array = array.astype(np.uint8)
                sitk_image = sitk.GetImageFromArray(array)
                resampled = sitk.Resample(sitk_image, out_size, transform, interpolator, out_origin,
                                          (1.0, 1.0, 1.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), pad,
                                          sitk_image.GetPixelID())
                channels.append(torch.from_numpy(sitk.GetArrayFromImage(resampled)))
            out = channels[0][None] if len(channels) == 1 else torch.stack(channels)
            image.set_data(out.to(data.dtype))
            self._shift_origin(image)
        return subject

    def _shift_origin(self, image: tio.Image) -> None:
        """After cropping, the first voxel is ``crop`` voxels further in (as ``tio.Crop`` does)."""
        if any(self.crop):
            affine = image.affine.copy()
            affine[:3, 3] = affine[:3, :3] @ np.asarray(self.crop, float) + affine[:3, 3]
            image.affine = affine


class RandomRotationScaling(RandomTransform, SpatialTransform):
    """nnU-Net's spatial augmentation without elastic deformation: with probability ``p_rotation`` the three angles
    are drawn from U(``degrees``) (a number d means (-d, d)), independently with probability ``p_scaling`` one
    factor for all axes from U(``scaling``) (nnU-Net convention: > 1 zooms out). If either happens, one
    ``RotationScaling`` resamples image and label once; otherwise the subject is returned untouched.

    ``crop`` (voxels per side): return only the central part, always (see ``RotationScaling``); used by
    ``build_augmentation(..., crop=margin)`` so that the later transforms work on the patch, not the enlarged crop.
    """

    def __init__(
        self,
        degrees: float | tuple[float, float] = 30.0,
        scaling: tuple[float, float] = (0.7, 1.4),
        p_rotation: float = 0.2,
        p_scaling: float = 0.2,
        image_interpolation: str = "linear",
        label_interpolation: str = "nearest",
        default_pad_value: float = 0.0,
        default_pad_label: float = 0,
        crop: int | Sequence[int] = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(degrees, Sequence) and not isinstance(degrees, str):
            self.degrees = _range(degrees, "degrees")
        else:
            d = _number(degrees, "degrees")
            if d < 0:
                raise ValueError(f"degrees must be >= 0 when given as one number, got {degrees!r}")
            self.degrees = (-d, d)
        self.scaling = _range(scaling, "scaling", positive=True)
        self.p_rotation = _probability(p_rotation, "p_rotation")
        self.p_scaling = _probability(p_scaling, "p_scaling")
        # checked here so that a bad value fails at construction, not at the first rotated patch
        self._deterministic_args = dict(
            image_interpolation=image_interpolation, label_interpolation=label_interpolation,
            default_pad_value=default_pad_value, default_pad_label=default_pad_label, crop=_crop_margin(crop),
        )
        RotationScaling(**self._deterministic_args)
        if any(self._deterministic_args["crop"]) and self.probability < 1:
            raise ValueError(f"p must be 1 when crop is used (the crop must always happen), got {self.probability}")

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        rotate = _coin(self.p_rotation)
        scale = _coin(self.p_scaling)
        if not (rotate or scale or any(self._deterministic_args["crop"])):
            return subject
        degrees = tuple(_uniform(*self.degrees) for _ in range(3)) if rotate else (0.0, 0.0, 0.0)
        factor = _uniform(*self.scaling) if scale else 1.0
        transform = RotationScaling(degrees, factor, **self._deterministic_args,
                                    **{**self._get_base_args(), "copy": False, "keep": None})
        return transform(subject)


def spatial_margin(
    patch_size: Sequence[int],
    max_degrees: float = 30.0,
    max_scale: float = 1.4,
    all_axes_at_once: bool = False,
) -> tuple[int, int, int]:
    """Per-side margin (voxels) to crop around a patch so that ``RandomRotationScaling`` reads no padding for
    the central ``patch_size`` region.

    For a rotation matrix ``R`` and a scale ``s`` the central box with half-sizes ``h = (patch - 1) / 2`` reads
    the input up to ``s * sum_j |R_ij| h_j`` from the centre along axis i; the margin is that minus ``h_i``,
    rounded up, at the largest zoom-out ``max_scale`` (1.4: nnU-Net's upper scaling factor in its convention,
    where > 1 zooms out; for "objects scaled down to 0.7" in TorchIO's sense pass ``max_scale=1 / 0.7``).

    By default the bound covers a rotation by up to ``max_degrees`` about any *one* axis combined with the
    largest zoom-out (exact, closed form): the same notion as nnU-Net's ``get_patch_size``, which rotates per
    axis and divides by the smallest scale. The three angles are drawn together, and when all are near 30 deg
    and the scale near 1.4 a corner may still read some padding (value 0, as nnU-Net pads). With
    ``all_axes_at_once`` the bound covers every combination of three angles in ``[-max_degrees, max_degrees]``
    (evaluated on a 2.5 deg grid, plus one voxel of slack) at the price of a much larger crop.

    For (128, 128, 96): (58, 58, 55) -> crop (244, 244, 206); all_axes_at_once: (78, 79, 87) -> (284, 286, 270);
    scaling alone would need (26, 26, 19).
    """
    size = np.asarray([int(p) for p in patch_size], float)
    if size.shape != (3,) or np.any(size < 1):
        raise ValueError(f"patch_size must be three positive integers, got {patch_size!r}")
    max_degrees = _number(max_degrees, "max_degrees")
    if not 0 <= max_degrees <= 90:
        raise ValueError(f"max_degrees must be in [0, 90], got {max_degrees!r}")
    max_scale = _number(max_scale, "max_scale")
    if max_scale <= 0:
        raise ValueError(f"max_scale must be positive, got {max_scale!r}")
    half = (size - 1) / 2
    limit = math.radians(max_degrees)
    if all_axes_at_once:
        steps = max(2, int(math.ceil(max_degrees / 2.5)) * 2 + 1)
        angles = np.linspace(-max_degrees, max_degrees, steps)
        ax, ay, az = np.radians(np.meshgrid(angles, angles, angles, indexing="ij"))
        zero, one = np.zeros_like(ax), np.ones_like(ax)
        rx = np.stack([one, zero, zero, zero, np.cos(ax), -np.sin(ax), zero, np.sin(ax), np.cos(ax)], -1)
        ry = np.stack([np.cos(ay), zero, np.sin(ay), zero, one, zero, -np.sin(ay), zero, np.cos(ay)], -1)
        rz = np.stack([np.cos(az), -np.sin(az), zero, np.sin(az), np.cos(az), zero, zero, zero, one], -1)
        rotations = (rz.reshape(-1, 3, 3) @ ry.reshape(-1, 3, 3) @ rx.reshape(-1, 3, 3))  # as rotation_scaling_matrix
        extent = (np.abs(rotations) @ half).max(axis=0) + 1
    else:
        extent = half.copy()
        for i in range(3):
            for j in range(3):
                if i == j:
                    continue
                # rotation about the third axis mixes i and j: h_i |cos t| + h_j |sin t|, t in [0, limit]
                t = min(limit, math.atan2(half[j], half[i])) if half[i] > 0 else limit
                extent[i] = max(extent[i], half[i] * math.cos(t) + half[j] * math.sin(t))
    margin = np.ceil(np.maximum(extent * max(max_scale, 1.0) - half, 0) - 1e-9)
    return tuple(int(m) for m in margin)  # type: ignore[return-value]
