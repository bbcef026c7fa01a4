"""Choosing a trained model's postprocessing again on its validation cases, as nnU-Net's
``nnUNetv2_determine_postprocessing`` does after training: ``flare validate --ckpt_path OLD.ckpt`` with this
callback writes the checkpoint again, with the choice of that validation (``min_component_ml``, the largest
component, the healthy-scan decision; ``predictor.validation_choice``) in place of the one it was trained with.

Why: a checkpoint keeps the choice made at its last full validation. A model trained before a rule existed (the
component rule of the healthy-scan decision, say), or validated on other cases, gets the new choice without being
trained again. The network's weights, plan, fingerprint and hyper-parameters are written unchanged (no optimizer
state: the result is for testing and prediction, not for resuming a fit); the file is written under a temporary
name and renamed (``checkpoint_io.AtomicCheckpointIO``), and the input checkpoint is never overwritten by accident:
``path`` must differ from it.
"""
from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class ValidationChoiceCheckpoint(L.Callback):
    """After ``validate`` (not during ``fit``), saves the model with this validation's postprocessing choice to
    ``path`` (weights only)."""

    def __init__(self, path: str) -> None:
        if not path:
            raise ValueError("ValidationChoiceCheckpoint needs a path for the checkpoint it writes")
        self.path = path

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != "validate" or trainer.sanity_checking:
            return
        choice = getattr(pl_module, "postprocessing", None)
        if choice is None or "healthy_decision" not in choice:
            raise RuntimeError(f"{self.path}: not written: this validation made no postprocessing choice (no full "
                               "validation ran; is limit_val_batches or fast_dev_run set?)")
        source = trainer.ckpt_path
        if source is not None and os.path.realpath(source) == os.path.realpath(self.path):
            raise ValueError(f"{self.path}: is the checkpoint being validated; give another path")
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(self.path, weights_only=True)
        decision = choice["healthy_decision"]
        rank_zero_info(f"{self.path}: written with the postprocessing chosen on this validation: min_component_ml "
                       f"{choice['min_component_ml']:g}, largest component {choice['largest_component_only']}; "
                       f"{decision.get('status', '')}")
