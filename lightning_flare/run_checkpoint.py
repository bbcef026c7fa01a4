"""``ModelCheckpoint`` whose folder belongs to the run: a relative ``dirpath`` lies under ``default_root_dir``."""
from __future__ import annotations

import os

from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """As ``ModelCheckpoint``, but ``dirpath`` (default ``checkpoints``) is taken relative to the trainer's
    ``default_root_dir`` unless it is absolute (or a URL): two runs with different ``default_root_dir`` never
    share a checkpoint folder, and ``fit --ckpt_path last`` finds the run's own ``last.ckpt``."""

    def __init__(self, dirpath: str | None = None, **kwargs) -> None:
        self.run_dirpath = str(dirpath) if dirpath else "checkpoints"
        absolute = "://" in self.run_dirpath or os.path.isabs(os.path.expanduser(self.run_dirpath))
        super().__init__(dirpath=self.run_dirpath if absolute else None, **kwargs)

    def _resolve(self, trainer) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, self.run_dirpath))

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._resolve(trainer)
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer) -> set[str]:  # fit(ckpt_path="last") asks before setup
        self._resolve(trainer)
        return super()._find_last_checkpoints(trainer)
