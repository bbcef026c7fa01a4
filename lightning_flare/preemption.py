"""Save a resumable checkpoint when the job is told to stop (SIGTERM, e.g. a SLURM preemption or timeout)."""
from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from .io import atomic_write


class PreemptionCheckpoint(Callback):
    """On SIGTERM (Lightning turns it into an exception in the loop), write ``last.ckpt`` atomically in the
    ModelCheckpoint folder, so ``fit --ckpt_path last`` resumes. Under SLURM with requeue, Lightning's own
    SIGUSR1 handler (auto-requeue) also saves and requeues; this covers plain SIGTERM."""

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not (getattr(trainer, "received_sigterm", False) or type(exception).__name__ == "SIGTERMException"):
            return
        directory = self.dirpath
        if directory is None:
            callbacks = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
            directory = callbacks[0].dirpath if callbacks and callbacks[0].dirpath else os.path.join(trainer.default_root_dir, "checkpoints")
        path = Path(directory) / "last.ckpt"
        atomic_write(path, lambda tmp: trainer.save_checkpoint(tmp), suffix=".ckpt")
