"""Callbacks: validation image panels for W&B."""
from __future__ import annotations

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from .device import to_host


def lesion_slice(label: np.ndarray) -> int:
    """Axial (z) index through the largest lesion: the slice with the most voxels of the largest component."""
    from scipy import ndimage

    if not label.any():
        return label.shape[2] // 2
    components, count = ndimage.label(label > 0)
    sizes = np.bincount(components.ravel())[1:]
    largest = components == (int(np.argmax(sizes)) + 1)
    return int(np.argmax(largest.sum(axis=(0, 1))))


def ct_window(slice_hu: np.ndarray, level: float = 40.0, width: float = 400.0) -> np.ndarray:
    low = level - width / 2
    return (np.clip((slice_hu - low) / width, 0, 1) * 255).astype(np.uint8)


class ValidationImageLogger(Callback):
    """Every ``every_n_epochs`` full validation, log an axial slice per case (up to ``max_cases``) through the
    largest lesion: CT window image with ground truth and prediction as W&B masks."""

    def __init__(self, every_n_epochs: int = 1, max_cases: int = 4, level: float = 40.0, width: float = 400.0):
        self.every_n_epochs, self.max_cases = every_n_epochs, max_cases
        self.level, self.width = level, width
        self._panels: list[dict] = []

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._panels = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not outputs or "prediction" not in outputs or len(self._panels) >= self.max_cases:
            return
        if trainer.sanity_checking or (trainer.current_epoch + 1) % max(1, self.every_n_epochs):
            return
        label = to_host(batch.label)  # batch: a cached case (volumes.VolumeItem)
        z = lesion_slice(label)
        stats = pl_module.plan.intensity
        hu = to_host(batch.image[0, :, :, z].float()) * stats.std + stats.mean
        # (x, y) -> image rows = y, columns = x
        self._panels.append({
            "case_id": batch.case_id, "z": z,
            "image": ct_window(hu, self.level, self.width).T,
            "ground_truth": label[:, :, z].T.astype(np.uint8),
            "prediction": to_host(outputs["prediction"][:, :, z]).T.astype(np.uint8),
        })

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._panels or not trainer.is_global_zero:
            return
        names = {v: k for k, v in (pl_module.plan.labels if pl_module.plan else {"background": 0, "tumor": 1}).items()}
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(
                    key="val/slices",
                    images=[p["image"] for p in self._panels],
                    caption=[f"{p['case_id']} z={p['z']}" for p in self._panels],
                    masks=[{"ground_truth": {"mask_data": p["ground_truth"], "class_labels": names},
                            "prediction": {"mask_data": p["prediction"], "class_labels": names}} for p in self._panels],
                    step=trainer.global_step,
                )
        self._panels = []
