"""Batched patch augmentation on the training device (``augmentation_device: gpu``), for machines where the CPU
loader workers cannot keep up with the GPU.

``BatchAugmentation`` is the batched executor of the named augmentations' spec (``lightning_flare.augmentation.spec``,
the same one ``build_augmentation`` builds per patch: same transforms, same order, same probabilities and ranges),
applied to a whole batch ``image (B, C, x, y, z)`` float / ``label (B, 1, x, y, z)`` uint8 on its device with torch
ops only. Every sample (and, where nnU-Net draws per channel, every channel) gets its own parameters.
``build_batch_augmentation(name)``: 'nnunet' (``spec.NNUNET``), 'basic' (``spec.BASIC``) or 'none'.

How it works
------------
* All per-sample parameters (which samples / channels get a transform, and their factors) are drawn up front on
  the host from one seedable CPU ``torch.Generator``, always the same number of draws per batch. So the decisions
  cost no GPU synchronisation, transforms that no sample drew are skipped entirely, and a transform only reads
  and writes the rows (sample, channel) that drew it. Only the noise field is drawn on the batch's device (from a
  second generator on that device, seeded from the same seed).
* Pointwise transforms (noise, brightness, contrast, gamma) are vectorised over the selected rows with the
  parameters as ``(K, 1, 1, 1)`` tensors; the blur is one grouped separable ``conv3d`` per axis with one kernel per
  row (the per-patch kernel and reflected borders, from ``augmentation.intensity``); contrast, gamma and
  low resolution are the per-patch executor's row functions (low resolution loops over the selected rows, each has
  its own down-sampled shape); mirroring flips, per axis, the samples that drew that axis. The steps run in the
  spec's order, rotation / scaling (and the crop) first.
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

Wiring (``plan_augmentation`` does the datamodule side, for 'cpu' and 'gpu')
--------------------------------------------------------------------------
The datamodule gets ``augmentation_device: "cpu" | "gpu"`` (and ``gpu_spatial: bool = True``) and asks
``plan_augmentation`` for the workers' transform and crop and the batched augmentation (``AugmentationPlan``).
With "cpu" the workers run ``build_augmentation(name, crop=margin)`` on a crop enlarged by
``spatial_margin(patch)`` when the spec rotates / scales ('nnunet'), and there is no batched part. With "gpu" the
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

Layout: ``batch_augmentation`` (the ``BatchAugmentation`` module: the spec walked into batched steps, the seeds),
``parameter_draws`` (the per-sample parameters, drawn on the host), ``intensity`` (the batched blur, and the shared
row functions under their batched names), ``selected_rows`` (applying them to the rows that drew them, and the
noise), ``spatial`` (the batched rotation / scaling with its centre crop), ``mirroring``, ``factories``
(``build_batch_augmentation``, ``plan_augmentation`` / ``plan_gpu_augmentation`` and ``AugmentationPlan``).
"""
from __future__ import annotations

from .batch_augmentation import BatchAugmentation
from .factories import (
    AugmentationPlan,
    GpuAugmentationPlan,
    build_batch_augmentation,
    plan_augmentation,
    plan_gpu_augmentation,
)
from .intensity import _blur_rows, _contrast_rows, _gamma_rows, _low_resolution_rows  # noqa: F401 (tests use them)

__all__ = [
    "AugmentationPlan",
    "BatchAugmentation",
    "GpuAugmentationPlan",
    "build_batch_augmentation",
    "plan_augmentation",
    "plan_gpu_augmentation",
]
