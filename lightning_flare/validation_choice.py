"""Choosing a trained model's postprocessing again on its validation cases, as nnU-Net's
``nnUNetv2_determine_postprocessing`` does after training: ``flare validate --ckpt_path OLD.ckpt`` with this
callback writes a copy of ``OLD.ckpt`` whose postprocessing (``min_component_ml``, the largest component, the
healthy-scan decision; ``predictor.validation_choice``) is the one this validation chose.

Why: a checkpoint keeps the choice made at its last full validation. A model trained before a rule existed (the
component rule of the healthy-scan decision, say), or to be judged on other validation cases, gets the new choice
without being trained again. Everything else of ``OLD.ckpt`` is copied as it is: weights, plan, fingerprint, the
training's hyper-parameters (not this command's overrides), epoch, optimizer state; the choice's ``epoch`` is the
checkpoint's. The copy is written under a temporary name, fsync'ed and renamed (``AtomicCheckpointIO``) by the
global-zero rank; ``path`` must not be ``OLD.ckpt``, and a validation that made no new choice (no batch ran) is an
error, not a silent copy.
"""
from __future__ import annotations

import os
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from .checkpoint import load_checkpoint
from .checkpoint_io import AtomicCheckpointIO


class ValidationChoiceCheckpoint(L.Callback):
    """After ``validate --ckpt_path OLD`` (not during ``fit``), writes ``OLD`` with this validation's
    postprocessing choice to ``path``."""

    def __init__(self, path: str) -> None:
        if not path:
            raise ValueError("ValidationChoiceCheckpoint needs a path for the checkpoint it writes")
        self.path = path
        self._before: Any = None  # the module's choice when validation starts (the checkpoint's) and when it ends
        self._after: Any = None

    def _source(self, trainer: L.Trainer) -> str:
        source = trainer.ckpt_path
        if not source:
            raise ValueError(f"{self.path}: ValidationChoiceCheckpoint needs 'validate --ckpt_path CHECKPOINT' (the "
                             "model whose postprocessing is chosen again)")
        if os.path.realpath(source) == os.path.realpath(self.path):
            raise ValueError(f"{self.path}: is the checkpoint being validated; give another path")
        return source

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._source(trainer)  # fail before validating, not after
            self._before, self._after = getattr(pl_module, "postprocessing", None), None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._after = getattr(pl_module, "postprocessing", None)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "validate":
            return
        source = self._source(trainer)
        choice = self._after
        if choice is None or choice is self._before:  # validation_choice makes a new dict at every full validation
            raise RuntimeError(f"{self.path}: not written: this validation made no postprocessing choice (did any "
                               "validation batch run? limit_val_batches / fast_dev_run)")
        if not trainer.is_global_zero:
            return
        checkpoint = load_checkpoint(source)
        checkpoint["postprocessing"] = {**choice, "epoch": int(checkpoint.get("epoch", choice.get("epoch", 0)))}
        AtomicCheckpointIO().save_checkpoint(checkpoint, self.path)
        decision = choice["healthy_decision"]
        rank_zero_info(f"{self.path}: {source} with the postprocessing chosen on this validation: min_component_ml "
                       f"{choice['min_component_ml']:g}, largest component {choice['largest_component_only']}; "
                       f"{decision.get('status', '')}")
