"""W&B panels of real cases: for up to ``num_cases`` cases, an axial slice through the reference tumour's centre of
mass as three side-by-side pictures (CT | reference | prediction against the reference), so that over- and
under-segmentation show without opening a file. RGB composites made with NumPy, logged through the trainer's
loggers that can log images (W&B). A plan's ignore label (nnU-Net's unknown region) is drawn grey, not as tumour,
and left out of the slice choice and the volumes, as the scores leave it out. The panels of one log call are padded
(black, bottom and right) to one size: W&B warns about images of differing sizes in one call."""
from __future__ import annotations

from typing import Any, Sequence

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from .device import to_host
from .partial_labels import without_ignored

GREEN, RED, YELLOW, GREY = (0, 200, 0), (230, 0, 0), (255, 210, 0), (128, 128, 160)
GAP = 4  # black columns between the three pictures


def centre_slice(reference: np.ndarray, prediction: np.ndarray) -> int:
    """Axial (z) index of the reference tumour's centre of mass; of the predicted one when the reference is empty;
    the middle slice when both are."""
    for mask in (reference, prediction):
        per_slice = np.count_nonzero(np.asarray(mask) > 0, axis=(0, 1))
        if per_slice.any():
            return int(round(float(np.dot(np.arange(per_slice.size), per_slice) / per_slice.sum())))
    return int(reference.shape[2] // 2)


def ct_window(slice_hu: np.ndarray, level: float = 40.0, width: float = 400.0) -> np.ndarray:
    """uint8 grey values of a CT slice in the window ``level`` +/- ``width`` / 2 (HU)."""
    low = level - width / 2
    return (np.clip((slice_hu - low) / width, 0, 1) * 255).astype(np.uint8)


def tint(grey: np.ndarray, colours: Sequence[tuple[np.ndarray, tuple[int, int, int]]], alpha: float = 0.5) -> np.ndarray:
    """RGB (uint8) of a grey picture with each ``(mask, colour)`` blended in at ``alpha``."""
    rgb = np.repeat(grey[..., None].astype(np.float32), 3, axis=-1)
    for mask, colour in colours:
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * np.asarray(colour, np.float32)
    return np.round(rgb).astype(np.uint8)


def composite(slice_hu: np.ndarray, reference: np.ndarray, prediction: np.ndarray, level: float = 40.0,
              width: float = 400.0, ignored: np.ndarray | None = None) -> np.ndarray:
    """(y, 3 x + 2 GAP, 3) uint8: the CT slice, the reference in green, and the prediction against the reference
    (yellow: both, red: predicted only = over-segmentation, green: reference only = missed). Inputs are (x, y);
    ``ignored`` (bool): the ignore region, grey in the reference and prediction pictures and tumour in neither."""
    grey = ct_window(slice_hu, level, width).T  # image rows = y, columns = x
    unknown = np.zeros(grey.shape, bool) if ignored is None else np.asarray(ignored, bool).T
    ref, pred = ((np.asarray(m).T > 0) & ~unknown for m in (reference, prediction))
    pictures = [tint(grey, []), tint(grey, [(ref, GREEN), (unknown, GREY)]),
                tint(grey, [(ref & pred, YELLOW), (pred & ~ref, RED), (ref & ~pred, GREEN), (unknown, GREY)])]
    gap = np.zeros((grey.shape[0], GAP, 3), np.uint8)
    return np.concatenate([pictures[0], gap, pictures[1], gap, pictures[2]], axis=1)


def same_size(pictures: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The (rows, columns, 3) pictures padded with black at the bottom and right to the largest rows and columns."""
    rows, columns = max(p.shape[0] for p in pictures), max(p.shape[1] for p in pictures)
    return [np.pad(p, ((0, rows - p.shape[0]), (0, columns - p.shape[1]), (0, 0))) for p in pictures]


def caption(case_id: str, z: int, reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float]) -> str:
    """Case, slice and the whole case's reference / predicted volume (ml) and their ratio."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    ref_ml, pred_ml = (float(np.count_nonzero(m > 0)) * voxel_ml for m in (reference, prediction))
    ratio = f" (x{pred_ml / ref_ml:.2f})" if ref_ml > 0 else ""
    return f"{case_id} z={z}: reference {ref_ml:.1f} ml, predicted {pred_ml:.1f} ml{ratio} | CT | reference | prediction"


class CasePanelLogger(Callback):
    """At every ``every_n_validations``-th whole-volume validation (and at the last epoch of a fit, and at every
    ``validate``), and at ``test`` when ``on_test``, log ``num_cases`` panels (``composite``) as ``val/panels`` /
    ``test/panels``. Validation shows the plan's grid; test the original grid (the image re-read from its file
    when the loader preprocessed it). Only global rank 0 logs, its own cases."""

    def __init__(self, num_cases: int = 4, every_n_validations: int = 1, on_test: bool = True, level: float = 40.0,
                 width: float = 400.0) -> None:
        if isinstance(num_cases, bool) or not isinstance(num_cases, int) or num_cases < 0:
            raise ValueError(f"num_cases must be an integer >= 0, got {num_cases!r}")
        if isinstance(every_n_validations, bool) or not isinstance(every_n_validations, int) or every_n_validations < 1:
            raise ValueError(f"every_n_validations must be an integer >= 1, got {every_n_validations!r}")
        self.num_cases, self.every_n_validations, self.on_test = num_cases, every_n_validations, on_test
        self.level, self.width = level, width
        self.validations = 0  # whole-volume validations seen (a patch-only validation does not count)
        self._panels: list[tuple[np.ndarray, str]] = []
        self._whole = False

    # ------------------------------------------------------------------------------------------------ validation
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._panels, self._whole = [], False

    def _due(self, trainer: L.Trainer) -> bool:
        if trainer.state.fn != TrainerFn.FITTING:
            return True
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and trainer.current_epoch + 1 >= trainer.max_epochs
        return last or (self.validations + 1) % self.every_n_validations == 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking or not isinstance(outputs, dict) or "prediction" not in outputs:
            return
        self._whole = True
        if len(self._panels) >= self.num_cases or not trainer.is_global_zero or not self._due(trainer):
            return
        stats = pl_module.plan.intensity  # batch: a cached case on the plan's grid (volumes.VolumeItem)
        hu = to_host(batch.image[0].float()) * stats.std + stats.mean
        self._add(hu, to_host(batch.label), to_host(outputs["prediction"]), batch.case_id, batch.spacing,
                  pl_module.plan.ignore_label)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._whole:
            self.validations += 1
        self._log(trainer, "val/panels")

    # ------------------------------------------------------------------------------------------------ test
    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._panels = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not self.on_test or not isinstance(outputs, dict) or "prediction" not in outputs:
            return
        if len(self._panels) >= self.num_cases or not trainer.is_global_zero:
            return
        if batch.preprocessed:  # the loader preprocessed the image onto the plan's grid: read the original
            from .io import read_image, to_array

            hu = to_array(read_image(batch.source))
        else:
            hu = to_host(batch.image[0].float())
        self._add(hu, to_host(batch.label), to_host(outputs["prediction"]), batch.case_id, batch.geometry.spacing,
                  pl_module.plan.ignore_label)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, "test/panels")

    # ------------------------------------------------------------------------------------------------ common
    def _add(self, hu: np.ndarray, reference: np.ndarray, prediction: np.ndarray, case_id: str, spacing: Any,
             ignore_label: int | None = None) -> None:
        ignored = None if ignore_label is None else reference == ignore_label
        prediction, reference = without_ignored(prediction, reference, ignore_label)
        z = centre_slice(reference, prediction)
        picture = composite(hu[:, :, z], reference[:, :, z], prediction[:, :, z], self.level, self.width,
                            None if ignored is None else ignored[:, :, z])
        self._panels.append((picture, caption(case_id, z, reference, prediction, spacing)))

    def _log(self, trainer: L.Trainer, key: str) -> None:
        panels, self._panels = self._panels, []
        if not panels or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key=key, images=same_size([p for p, _ in panels]), caption=[c for _, c in panels],
                                 step=trainer.global_step)
