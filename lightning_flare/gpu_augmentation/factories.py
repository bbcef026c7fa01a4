"""The named batched augmentations (``build_batch_augmentation``) and where a named augmentation runs
(``plan_augmentation`` -> ``AugmentationPlan``): per patch in the loader workers, batched on the device, or split
between the two. The datamodule asks ``plan_augmentation`` and needs no branch of its own."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..augmentation import build_augmentation, spatial_margin, spec_transforms
from ..augmentation._checks import _crop_margin
from ..augmentation.spec import RotationScalingSpec, augmentation_spec
from .batch_augmentation import BatchAugmentation, _derive_seed


def build_batch_augmentation(name: str, spatial: bool = True, seed: int | None = None,
                             crop: int | Sequence[int] = 0) -> BatchAugmentation | None:
    """The batched augmentation called ``name``: 'none' (``None``, or a crop-only module when ``crop``), 'basic'
    (mirroring, noise, brightness from U(0.75, 1.25), as the CPU 'basic') or 'nnunet' (the full default; ``spatial``
    adds rotation / scaling). ``crop``: voxels per side cut from the input (see ``BatchAugmentation``)."""
    spec = augmentation_spec(name)
    crop = _crop_margin(crop)
    if not spec and not any(crop):
        return None
    spatial = spatial and any(isinstance(entry, RotationScalingSpec) for entry in spec)
    return BatchAugmentation(spatial=spatial, crop=crop, seed=seed, spec=spec)


@dataclass(frozen=True)
class AugmentationPlan:
    """Where a named augmentation runs: the workers' transform and crop, and the batched augmentation for
    ``on_after_batch_transfer``."""

    worker_transform: Callable | None  # PatchSampler(transform=...): per patch, in the loader workers
    sampler_patch_size: tuple[int, int, int]  # PatchSampler(patch_size=...): what the workers cut and return
    sampler_margin: tuple[int, int, int]  # PatchSampler(margin=...)
    batch_augmentation: BatchAugmentation | None  # on the device, after the transfer ('gpu'); None on 'cpu'
    sampler_context: tuple[int, int, int] = (0, 0, 0)  # PatchSampler(context=...): what batch_augmentation crops


GpuAugmentationPlan = AugmentationPlan  # its name when only the 'gpu' split had one


def plan_augmentation(name: str, patch_size: Sequence[int], device: str = "cpu", gpu_spatial: bool = True,
                      seed: int = 0, rank: int = 0) -> AugmentationPlan:
    """Run augmentation ``name`` per patch in the loader workers (``device='cpu'``) or batched on the training
    device (``'gpu'``, see ``plan_gpu_augmentation``).

    'cpu': a spec with rotation / scaling makes the workers crop ``spatial_margin(patch)`` more per side, and the
    per-patch transform returns only the patch (``build_augmentation(name, crop=margin)``).
    """
    if device == "gpu":
        return plan_gpu_augmentation(name, patch_size, gpu_spatial, seed, rank)
    if device != "cpu":
        raise ValueError(f"augmentation device must be 'cpu' or 'gpu', got {device!r}")
    patch = tuple(int(p) for p in patch_size)
    spatial = any(isinstance(entry, RotationScalingSpec) for entry in augmentation_spec(name))
    margin = tuple(int(m) for m in spatial_margin(patch)) if spatial else (0, 0, 0)
    return AugmentationPlan(build_augmentation(name, crop=margin), patch, margin, None)  # type: ignore[arg-type]


def plan_gpu_augmentation(name: str, patch_size: Sequence[int], gpu_spatial: bool = True, seed: int = 0,
                          rank: int = 0) -> AugmentationPlan:
    """Split augmentation ``name`` between the loader workers and the GPU.

    Without rotation / scaling ('none', 'basic'): the workers cut the patch, the GPU does the rest. With it
    ('nnunet') and ``gpu_spatial``: the workers cut ``patch + 2 * spatial_margin(patch)`` and the GPU rotates /
    scales it and crops the centre (the CPU pipeline's geometry, no padding pulled in); without ``gpu_spatial``:
    the workers cut the enlarged crop and rotate / scale it (the per-patch pipeline's first step,
    ``RandomRotationScaling(crop=margin)``), the GPU does the rest. The seed of the batched draws is derived from
    ``(seed, rank)``.
    """
    spec = augmentation_spec(name)
    patch = tuple(int(p) for p in patch_size)
    batch_seed = _derive_seed(seed, rank, 0x6A)
    zero = (0, 0, 0)
    if not any(isinstance(entry, RotationScalingSpec) for entry in spec):
        return AugmentationPlan(None, patch, zero, build_batch_augmentation(name, False, batch_seed))
    margin = tuple(int(m) for m in spatial_margin(patch))
    if gpu_spatial:
        enlarged = tuple(p + 2 * m for p, m in zip(patch, margin))
        return AugmentationPlan(None, enlarged, zero,  # type: ignore[arg-type]
                                BatchAugmentation(spatial=True, crop=margin, seed=batch_seed, spec=spec), margin)
    worker = spec_transforms(spec[:1], copy=True, crop=margin)["rotation_scaling"]
    return AugmentationPlan(worker, patch, margin,  # type: ignore[arg-type]
                            BatchAugmentation(spatial=False, seed=batch_seed, spec=spec))
