"""Writing predicted masks: ``CASE.nii.gz`` (uint8, 0/1) on the input's exact grid, atomically, in a background
thread (writing case k overlaps computing case k + 1), with the efficiency report. No Lightning here."""
from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .efficiency import EfficiencyReport, GpuMemorySampler, process_uptime
from .io import from_array, remove_stale_temporaries, write_image
from .predictor import Prediction



class CasesFailed(RuntimeError):
    """Some inputs could not be predicted (each named, with its problem); the other masks are written."""

class MaskWriter:
    """Masks of ``Prediction``s into ``output_dir``; ``finish`` writes ``efficiency.csv`` with a first row for the
    start-up (process start to this writer, i.e. to the first case)."""

    def __init__(self, output_dir: str | Path, device: torch.device | str | None = None):
        self.output_dir = Path(output_dir)
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(f"{self.output_dir}: output folder cannot be created ({err.strerror})") from err
        if not os.access(self.output_dir, os.W_OK):
            raise PermissionError(f"{self.output_dir}: output folder is not writable")
        remove_stale_temporaries(self.output_dir)  # left by a run killed mid-write
        self.failures: list[str] = []
        self.written: list[Path] = []
        self.efficiency = EfficiencyReport()
        self.efficiency.add_startup(process_uptime())
        self.gpu = GpuMemorySampler(device=device).start()
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: list[Future] = []

    def submit(self, prediction: Prediction) -> None:
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

    def finish(self, report_name: str = "efficiency.csv", raise_failures: bool = True) -> EfficiencyReport:
        """Wait for the pending writes, write and print the efficiency report (when a case was written)."""
        for job in self._pending:
            try:
                job.result()
            except Exception as err:  # noqa: BLE001 - reported with the other failed cases
                self.failures.append(f"writing a mask into {self.output_dir} failed: {err}")
        self._pool.shutdown()
        self.gpu.stop()
        if self.efficiency.cases:
            self.efficiency.write(self.output_dir / report_name)
            print("\n" + self.efficiency.format(), flush=True)
        if raise_failures:
            self.raise_failures()
        return self.efficiency

    def raise_failures(self) -> None:
        if self.failures:
            raise CasesFailed(f"{len(self.failures)} case(s) could not be predicted:\n  " + "\n  ".join(self.failures))
