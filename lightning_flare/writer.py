"""Prediction writer: ``CASE.nii.gz`` masks (uint8, 0/1) on the input's exact grid, written atomically."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter

from .io import from_array, write_image


class NiftiPredictionWriter(BasePredictionWriter):
    def __init__(self, output_dir: str = "predictions", overwrite: bool = False):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.overwrite = overwrite
        self.failures: list[str] = []
        self.written: list[Path] = []

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.failures, self.written = [], []
        self.output_dir.mkdir(parents=True, exist_ok=True)

    def write_on_batch_end(self, trainer, pl_module, prediction: dict, batch_indices: Sequence[int] | None,
                           batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        if prediction.get("skipped"):
            return
        if "error" in prediction:
            self.failures.append(prediction["error"])
            return
        path = self.output_dir / f"{prediction['case_id']}.nii.gz"
        if path.exists() and not self.overwrite:
            return
        mask = np.asarray(prediction["mask"], np.uint8)
        write_image(from_array(mask, prediction["geometry"]), path)
        self.written.append(path)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.failures:
            raise RuntimeError(f"{len(self.failures)} case(s) could not be predicted:\n  " + "\n  ".join(self.failures))
