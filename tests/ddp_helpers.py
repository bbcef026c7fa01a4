"""Callbacks for the 2-process DDP tests (imported by the re-launched rank processes)."""
import json
from pathlib import Path

import lightning as L


class RecordDraws(L.Callback):
    """Writes, per rank and stage, the case ids of the training patches, the validation/test/predict cases, the
    padding items (a rank without a case of its own) and the final callback metrics."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.records: dict = {"train": {}, "val": {}, "test": [], "predict": [], "padding": []}

    def _volume(self, trainer, batch, key):
        if batch.padding:
            self.records["padding"].append(trainer.state.stage.value)
        elif key == "val":
            self.records["val"].setdefault(str(trainer.current_epoch), []).append(batch.case_id)
        else:
            self.records[key].append(batch.case_id)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.records["train"].setdefault(str(trainer.current_epoch), []).extend(batch["case_id"])

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._volume(trainer, batch, "val")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._volume(trainer, batch, "test")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._volume(trainer, batch, "predict")

    def _dump(self, trainer):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        (self.out_dir / f"rank{trainer.global_rank}_{trainer.state.fn.value}.json").write_text(
            json.dumps({**self.records, "metrics": metrics}))

    def on_fit_end(self, trainer, pl_module):
        self._dump(trainer)

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn == "validate":
            self._dump(trainer)

    def on_test_end(self, trainer, pl_module):
        self._dump(trainer)

    def on_predict_end(self, trainer, pl_module):
        self._dump(trainer)
