"""The batched spatial op: rotation / scaling of the samples that drew it, as one ``affine_grid`` + ``grid_sample``
(trilinear image, nearest label, zero padding; the per-patch ``RotationScaling`` convention and matrices), with the
centre crop of every sample."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..augmentation.spatial import rotation_scaling_matrix


def _rotation_scaling_matrices(degrees: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``rotation_scaling_matrix`` of each sample: degrees (K, 3), scale (K,) -> (K, 3, 3) float64."""
    matrices = [rotation_scaling_matrix(d, (s, s, s)) for d, s in zip(degrees.tolist(), scale.tolist())]
    return torch.from_numpy(np.stack(matrices)) if matrices else torch.zeros(0, 3, 3, dtype=torch.float64)


def _rotate_scale_and_crop(image: torch.Tensor, label: torch.Tensor | None, crop: tuple[int, int, int],
                           params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotation / scaling of the samples that drew it (and the centre crop of all: ``crop`` voxels per side cut
    from the input); always new tensors."""
    in_shape = image.shape[2:]
    window = (slice(None), slice(None), *(slice(c, n - c) for c, n in zip(crop, in_shape)))
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
