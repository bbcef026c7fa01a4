"""Training time of a fit, written to a JSON file (benchmarks/cross_validate.py reads it)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

from .cpu_precision import cpu_model
from .io import write_text


class FitTimer(Callback):
    """Writes ``path`` (relative: under ``trainer.default_root_dir``) at the end of ``fit``: the trainer's
    precision, the CPU model, the fit's wall seconds (set-up, preprocessing and validation included), the number
    of training iterations and their seconds (each from its batch start to its batch end; ``seconds_per_iteration``:
    the mean without the first ``warmup`` iterations, oneDNN's primitive creation; ``epoch_seconds_per_iteration``:
    each epoch's mean, which shows a machine that slows down during the fit)."""

    def __init__(self, path: str = "fit_time.json", warmup: int = 2) -> None:
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
        self.path, self.warmup = path, warmup
        self.times: list[float] = []
        self.epochs: list[int] = []
        self._fit_start = self._batch_start = 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start, self.times, self.epochs = time.perf_counter(), [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._batch_start)
        self.epochs.append(trainer.current_epoch)

    def record(self, trainer: L.Trainer) -> dict:
        timed = self.times[self.warmup:] or self.times
        assert len(self.epochs) == len(self.times), "one epoch index per timed iteration"
        per_epoch: dict[int, list[float]] = {}
        for epoch, seconds in zip(self.epochs, self.times):
            per_epoch.setdefault(epoch, []).append(seconds)
        return {"precision": str(trainer.precision), "cpu": cpu_model(), "fit_s": time.perf_counter() - self._fit_start,
                "iterations": len(self.times), "iteration_s": sum(self.times),
                "seconds_per_iteration": sum(timed) / len(timed) if timed else float("nan"),
                "epoch_seconds_per_iteration": {str(e): round(sum(v) / len(v), 4) for e, v in per_epoch.items()}}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            path = Path(self.path)
            path = path if path.is_absolute() else Path(trainer.default_root_dir) / path
            write_text(path, json.dumps(self.record(trainer), indent=1) + "\n")
