"""The named batched augmentations (``build_batch_augmentation``) and the split of one between the loader workers
and the GPU (``plan_gpu_augmentation`` -> ``GpuAugmentationPlan``), for the datamodule."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ._checks import _crop, _derive_seed
from .batch_augmentation import BatchAugmentation


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
    from ..augmentation import nnunet_transforms, spatial_margin

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
