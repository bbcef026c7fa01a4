"""Callbacks for the 2-process DDP test (imported by the re-launched rank processes)."""
import json
from pathlib import Path

import lightning as L


class RecordDraws(L.Callback):
    """Writes, per rank and epoch, the case ids of the training patches and the validation/predict cases."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.records: dict = {"train": {}, "val": {}, "predict": []}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.records["train"].setdefault(str(trainer.current_epoch), []).extend(batch["case_id"])

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.records["val"].setdefault(str(trainer.current_epoch), []).append(batch["case_id"])

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.records["predict"].append(batch["case_id"])

    def _dump(self, trainer):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}_{trainer.state.fn.value}.json").write_text(json.dumps(self.records))

    def on_fit_end(self, trainer, pl_module):
        self._dump(trainer)

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn == "validate":
            self._dump(trainer)

    def on_predict_end(self, trainer, pl_module):
        self._dump(trainer)
