"""Prediction writer: ``CASE.nii.gz`` masks (uint8, 0/1) on the input's exact grid, written atomically."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from .efficiency import COLUMNS
from .mask_writer import MaskWriter
from .predictor import Prediction


class NiftiPredictionWriter(BasePredictionWriter):
    """Existing masks are kept unless ``overwrite`` (the data module then skips those cases before any work).
    Also writes ``efficiency.csv`` (start-up, per-case stage times, peak RSS, GPU memory) and prints its summary.
    The writing itself is ``MaskWriter``'s (shared with ``python -m lightning_flare.predict``)."""

    def __init__(self, output_dir: str = "predictions", overwrite: bool = False):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.overwrite = overwrite
        self.masks: MaskWriter | None = None

    @property
    def written(self) -> list[Path]:
        return self.masks.written if self.masks is not None else []

    @property
    def failures(self) -> list[str]:
        return self.masks.failures if self.masks is not None else []

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.masks = MaskWriter(self.output_dir, pl_module.device)

    def write_on_batch_end(self, trainer, pl_module, prediction: Prediction, batch_indices: Sequence[int] | None,
                           batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        self.masks.submit(prediction)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        name = "efficiency.csv" if trainer.world_size == 1 else f"efficiency_rank{trainer.global_rank}.csv"
        report = self.masks.finish(name, raise_failures=False)
        if report.rows:
            for logger in trainer.loggers:
                if hasattr(logger, "log_table"):  # W&B
                    logger.log_table(key="predict/efficiency", columns=COLUMNS,
                                     data=[[row[c] for c in COLUMNS] for row in report.rows])
        self.masks.raise_failures()
