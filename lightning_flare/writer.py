"""Prediction writer: ``CASE.nii.gz`` masks (uint8, 0/1) on the input's exact grid, written atomically."""
from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter

from .efficiency import COLUMNS, EfficiencyReport, GpuMemorySampler
from .io import from_array, remove_stale_temporaries, write_image
from .predictor import Prediction


class NiftiPredictionWriter(BasePredictionWriter):
    """Existing masks are kept unless ``overwrite`` (the data module then skips those cases before any work).
    Also writes ``efficiency.csv`` (per-case stage times, peak RSS, GPU memory) and prints its summary."""

    def __init__(self, output_dir: str = "predictions", overwrite: bool = False):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.overwrite = overwrite
        self.failures: list[str] = []
        self.written: list[Path] = []

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.failures, self.written = [], []
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(f"{self.output_dir}: output folder cannot be created ({err.strerror})") from err
        if not os.access(self.output_dir, os.W_OK):
            raise PermissionError(f"{self.output_dir}: output folder is not writable")
        remove_stale_temporaries(self.output_dir)  # left by a run killed mid-write
        self.efficiency = EfficiencyReport()
        self.gpu = GpuMemorySampler(device=pl_module.device).start()
        self._pool = ThreadPoolExecutor(max_workers=1)  # writing case k overlaps computing case k + 1
        self._pending: list[Future] = []

    def write_on_batch_end(self, trainer, pl_module, prediction: Prediction, batch_indices: Sequence[int] | None,
                           batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        if prediction.padding:  # a rank without a case of its own
            return
        if prediction.error is not None:
            self.failures.append(prediction.error)
            return
        self._pending.append(self._pool.submit(self._write, prediction))

    def _write(self, prediction: Prediction) -> None:
        path = self.output_dir / f"{prediction.case_id}.nii.gz"
        start = time.perf_counter()
        mask = np.asarray(prediction.mask, np.uint8)
        write_image(from_array(mask, prediction.geometry), path)
        now = time.perf_counter()
        self.written.append(path)
        timings = {**(prediction.timings or {}), "write": now - start}
        peak, area = self.gpu.window(prediction.started if prediction.started is not None else start, now)
        peak = max(peak, float(prediction.peak_gpu_mb))  # the allocator's own peak sees between samples
        self.efficiency.add(prediction.case_id, timings, (peak, area))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for job in self._pending:
            try:
                job.result()
            except Exception as err:  # noqa: BLE001 - reported with the other failed cases
                self.failures.append(f"writing a mask into {self.output_dir} failed: {err}")
        self._pool.shutdown()
        self.gpu.stop()
        if self.efficiency.rows:
            name = "efficiency.csv" if trainer.world_size == 1 else f"efficiency_rank{trainer.global_rank}.csv"
            self.efficiency.write(self.output_dir / name)
            print("\n" + self.efficiency.format(), flush=True)
            for logger in trainer.loggers:
                if hasattr(logger, "log_table"):  # W&B
                    logger.log_table(key="predict/efficiency", columns=COLUMNS,
                                     data=[[row[c] for c in COLUMNS] for row in self.efficiency.rows])
        if self.failures:
            raise RuntimeError(f"{len(self.failures)} case(s) could not be predicted:\n  " + "\n  ".join(self.failures))
