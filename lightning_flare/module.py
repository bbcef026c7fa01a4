"""LightningModule: the injected U-Net, Dice+CE deep supervision, SGD + poly LR, sliding-window evaluation."""
from __future__ import annotations

import os
import time
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from .device import to_host
from .efficiency import peak_gpu_mb, reset_peak_gpu
from .inference import autocast_context
from .loss import DeepSupervisionLoss, DiceCELoss, deep_supervision_weights, downsample_targets
from .metrics import FlareMetrics
from .partial_labels import PartialLabelSettings, left_out_of_scores, training_target, without_ignored
from .plan import Plan
from .metrics.postprocessing_scores import ComponentThresholdScores, LargestComponentScores
from .metrics.healthy_decision_scores import HealthyDecisionScores
from .healthy_decision import case_report_fields, decision_report, tumour_probability
from .postprocessing import keep_largest_component, remove_small_components
from .predictor import (InferenceSettings, Prediction, Predictor, chosen_min_component_ml, postprocessing_logs,
                        postprocessing_summary, scored_ml, validation_choice)
from .report import build_summary, headline_metrics, log_case_volumes
from .volumes import VolumeItem


def poly_lr_factor(epoch: int, max_epochs: int, exponent: float = 0.9) -> float:
    """nnU-Net's poly decay: lr = lr0 * (1 - epoch / max_epochs) ** exponent."""
    return max(0.0, 1 - epoch / max(max_epochs, 1)) ** exponent


class FlareSegmentationModule(L.LightningModule):
    """Training (Dice + CE with deep supervision, SGD + poly LR) and the Lightning hooks around the injected
    ``net`` and the whole-volume ``Predictor`` (its ``inference`` settings: sliding window, mirroring, precision,
    postprocessing). ``val_tta``: mirroring in validation (None: as ``inference.tta``). ``partial_labels``: training on
    partially labelled cases (``partial_labels.PartialLabelSettings``; the dataset's ignore label is always honoured)."""

    def __init__(
        self,
        net: nn.Module,
        inference: InferenceSettings = InferenceSettings(),
        lr: float = 1e-3,
        momentum: float = 0.99,
        weight_decay: float = 3e-5,
        nesterov: bool = True,
        poly_exponent: float = 0.9,
        val_tta: bool | None = None,
        nsd_tolerance_mm: float = 2.0,
        report_dir: str | None = None,
        full_val_every_n_epochs: int = 1,
        pseudo_val_patches: int = 4,
        partial_labels: PartialLabelSettings = PartialLabelSettings(),
    ):
        super().__init__()
        self.inference = inference if isinstance(inference, InferenceSettings) else InferenceSettings.from_dict(inference)
        self.partial_labels = PartialLabelSettings.from_any(partial_labels)
        self.save_hyperparameters(ignore=["net", "inference", "partial_labels"])
        self.hparams["inference"] = self.inference.to_dict()  # plain values: checkpoints stay loadable without pickle
        self.hparams["partial_labels"] = self.partial_labels.to_dict()
        self.net = net
        scales = net.output_scales() if getattr(net, "deep_supervision", False) else [(1.0, 1.0, 1.0)]
        self.output_scales = [tuple(s) for s in scales]
        self.loss = DeepSupervisionLoss(DiceCELoss(), deep_supervision_weights(len(self.output_scales)))
        # NSD surfel search: on the module's GPU for validation (resampled grid); on the CPU (k-d tree) for test, whose
        # original grid has many more surfels (a brute-force search grows with their square, a k-d tree does not)
        self.val_metrics = FlareMetrics(nsd_tolerance_mm)
        self.test_metrics = FlareMetrics(nsd_tolerance_mm, device_search=False)
        self.plan: Plan | None = None
        self.fingerprint: dict | None = None
        self.test_rows: list[dict] = []
        # TP, FP, FN voxels of the patch-level pseudo Dice: a buffer, so it sits on the module's device (all_gather
        # over NCCL needs that); integers, so that 16-bit module conversions leave it exact; not in checkpoints
        self.register_buffer("_pseudo_counts", torch.zeros(3, dtype=torch.int64), persistent=False)
        self._last_full = {"val/dsc": 0.0, "val/nsd": 0.0}
        if val_tta is not None and not isinstance(val_tta, bool):
            raise ValueError(f"val_tta must be true, false or null (= tta), got {val_tta!r}")
        self.postprocessing_scores = ComponentThresholdScores(also_ml=scored_ml(self.inference))  # on every full validation
        self.largest_component_scores = LargestComponentScores(also_ml=scored_ml(self.inference))  # largest component only
        self.postprocessing: dict | None = None  # the latest validation choice, kept in the checkpoint
        self.healthy_scores = HealthyDecisionScores(also_ml=self.inference.min_component_ml)  # healthy-scan decision

    # ----------------------------------------------------------------- set-up; the plan (handed over by the data module) in the checkpoint
    def setup(self, stage: str) -> None:
        if self._trainer is not None and self.trainer.world_size > 1 and len(self.output_scales) > 1:
            # as nnU-Net: a tiny weight on the lowest head, or DDP finds parameters without gradient
            self.loss = DeepSupervisionLoss(DiceCELoss(), deep_supervision_weights(len(self.output_scales), lowest=1e-6))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.plan is not None:
            checkpoint["plan"] = self.plan.to_dict()
        if self.fingerprint is not None:
            checkpoint["fingerprint"] = self.fingerprint
        if hasattr(self.net, "init_args"):  # lets export / other tools rebuild the network without the YAML
            checkpoint["net_init_args"] = dict(self.net.init_args)
        if self.postprocessing is not None:
            checkpoint["postprocessing"] = self.postprocessing

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "plan" in checkpoint:
            self.plan = Plan.from_dict(checkpoint["plan"])
        self.fingerprint = checkpoint.get("fingerprint", self.fingerprint)
        self.postprocessing = checkpoint.get("postprocessing", self.postprocessing)

    # ----------------------------------------------------------------- training
    def forward(self, x: torch.Tensor):
        return self.net(x)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        image, target = batch["image"], batch["label"].long()
        outputs = self.net(image)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        ignore = self.partial_labels.ignore_value(self.plan)  # the dataset's ignore label, or the partial mode's
        self.loss = self.loss.with_ignore_label(ignore)
        target = training_target(self.partial_labels, target, outputs[0], batch.get("partial"), ignore, self.current_epoch)
        loss = self.loss(outputs, downsample_targets(target, self.output_scales))
        if self.partial_labels.active:
            self.log("train/ignored_fraction", (target == ignore).float().mean(), on_step=False, on_epoch=True, batch_size=image.shape[0])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=image.shape[0])
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=hp.nesterov)
        epochs = lambda: self.trainer.max_epochs if self._trainer is not None and self.trainer.max_epochs else 1000  # noqa: E731  (read every epoch: a TimeBudget may plan fewer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: poly_lr_factor(epoch, epochs(), hp.poly_exponent))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def on_train_epoch_start(self) -> None:
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=False, on_epoch=True)

    # ----------------------------------------------------------------- inference (the Predictor)
    def predictor(self) -> Predictor:
        """The whole-volume predictor of this module's network, plan, settings and validation choice."""
        return Predictor(self.net, self.plan, self.inference, self.postprocessing, self.device, self.trainer_precision())

    def trainer_precision(self) -> str | None:
        """The attached trainer's precision ("bf16-mixed", "16-mixed", "32-true", ...): inference autocasts to its
        16-bit dtype (``inference.autocast_dtype``); None without a trainer."""
        return str(self.trainer.precision) if self._trainer is not None else None

    def predict_logits(self, image: torch.Tensor, tta: bool | None = None) -> torch.Tensor:
        return self.predictor().logits(image, tta)

    def predict_probabilities(self, image: torch.Tensor) -> torch.Tensor:
        return self.predictor().probabilities(image)

    def predict_original_grid(self, item: VolumeItem, decision: dict | None = None) -> np.ndarray:
        """uint8 mask (host) on the original grid for an item of ``RawVolumes`` (adds its stage timings; ``decision``)."""
        if item.timings is None:
            item.timings = {}
        geometry = item.geometry
        return self.predictor().mask(item.image, geometry.spacing, geometry.size, preprocessed=item.preprocessed,
                                     timings=item.timings, decision=decision)

    def min_component_ml(self) -> float:
        """Components below this volume are removed (``inference.min_component_ml``; "auto": the validation choice)."""
        return chosen_min_component_ml(self.inference, self.postprocessing)

    def _full_validation_epoch(self) -> bool:
        n = max(1, int(self.hparams.full_val_every_n_epochs))
        return self._trainer is None or self.trainer.sanity_checking or self.trainer.state.fn == "validate" or \
            (self.current_epoch + 1) % n == 0 or self.current_epoch + 1 == self.trainer.max_epochs

    def validation_step(self, batch: VolumeItem, batch_idx: int) -> dict | None:
        """Whole volumes (DSC/NSD) every ``full_val_every_n_epochs`` and in ``validate``; patch pseudo-Dice otherwise."""
        if batch.padding:  # this rank has no case of its own (more ranks than cases)
            if self._full_validation_epoch():
                self.val_metrics.add_placeholder()
            return None
        if self._full_validation_epoch():
            logits = self.predict_logits(batch.image, tta=self.hparams.get("val_tta"))
            # prediction and label on the host once (NumPy / SciPy); an ignore region (and a partial case's unmarked
            # components): postprocessed whole (as Predictor.mask), left out of the scores
            prediction, raw = to_host(logits.argmax(0).to(torch.uint8)), to_host(batch.label)
            label, ignored = left_out_of_scores(prediction, raw, self.plan.ignore_label, batch.partial)
            self.postprocessing_scores.update(prediction, label, batch.spacing, ignored)
            self.healthy_scores.update(prediction, to_host(tumour_probability(logits)), label, batch.spacing, ignored)
            self.largest_component_scores.update(prediction, label, batch.spacing, ignored)
            if self.inference.min_component_ml not in (0, 0.0, "auto"):
                prediction = remove_small_components(prediction, batch.spacing, self.min_component_ml())
            if self.inference.largest_component is True:
                prediction = keep_largest_component(prediction)
            if ignored is not None:
                prediction = np.where(ignored, 0, prediction).astype(prediction.dtype)
            self.val_metrics.update(prediction, label, batch.spacing, batch.index)
            return {"prediction": torch.from_numpy(prediction)}  # for ValidationImageLogger, CasePanelLogger
        self._pseudo_dice_update(batch)
        return None

    def _pseudo_dice_update(self, batch: VolumeItem) -> None:
        """nnU-Net-style pseudo Dice: patch-size windows (centred on tumour voxels, not ignored ones, when there are
        some) counted on the batch's device, a declared ignore region left out; only the window centres reach the host."""
        image, label, ignore = batch.image, batch.label, self.plan.ignore_label
        patch = np.asarray(self.plan.patch_size)
        rng = np.random.default_rng([self.current_epoch, int(batch.index)])
        foreground = torch.nonzero(without_ignored(label, label, ignore)[1] > 0)
        shape = np.asarray(label.shape)
        with self.predictor().full_resolution_net() as net:
            for _ in range(int(self.hparams.pseudo_val_patches)):
                if len(foreground):
                    centre = to_host(foreground[int(rng.integers(len(foreground)))])
                else:
                    centre = rng.integers(0, shape)
                start = np.clip(centre - patch // 2, 0, np.maximum(shape - patch, 0))
                window = tuple(slice(int(a), int(a + p)) for a, p in zip(start, patch))
                x = image[(slice(None), *window)]
                pad = [int(p - s) for p, s in zip(patch, x.shape[1:])]
                x = torch.nn.functional.pad(x, [v for d in reversed(pad) for v in (0, d)])
                with autocast_context(self.device, self.inference.autocast, self.trainer_precision()):
                    logits = net(x[None].to(self.device))
                pred = logits[0].argmax(0)[tuple(slice(0, s) for s in label[window].shape)]
                pred, ref = (mask > 0 for mask in without_ignored(pred, label[window], ignore))
                counts = torch.stack([(pred & ref).sum(), (pred & ~ref).sum(), (~pred & ref).sum()])
                self._pseudo_counts += counts.to(self._pseudo_counts.device)

    def on_validation_epoch_end(self) -> None:
        if self._full_validation_epoch():
            result = self.val_metrics.compute()
            self._last_full = {"val/dsc": float(result["dsc"]), "val/nsd": float(result["nsd"])}
            self.log("val/volume_ratio_median", float(result["volume_ratio_median"]))  # lesion cases, predicted / reference
            log_case_volumes(self.trainer, "val/volumes", self.val_metrics)  # W&B table: volumes per case
            self.val_metrics.reset()
            self.postprocessing = validation_choice(self.inference, self.postprocessing_scores.compute(),
                                                    self.largest_component_scores.compute(), self.healthy_scores.choose,
                                                    self.current_epoch)
            self.postprocessing_scores.reset()
            self.largest_component_scores.reset()
            for key, value in postprocessing_logs(self.postprocessing).items():
                self.log(key, value)
        else:
            counts = self._pseudo_counts
            if self.trainer.world_size > 1:
                counts = self.all_gather(counts).reshape(-1, 3).sum(0)
            tp, fp, fn = counts.tolist()
            self.log("val/pseudo_dsc", 2 * tp / max(2 * tp + fp + fn, 1e-8), prog_bar=True)
            self._pseudo_counts.zero_()
        # val/dsc and val/nsd always hold the latest full-volume scores, so ModelCheckpoint can monitor them
        self.log("val/dsc", self._last_full["val/dsc"], prog_bar=True)
        self.log("val/nsd", self._last_full["val/nsd"], prog_bar=True)

    def test_step(self, batch: VolumeItem, batch_idx: int) -> dict | None:
        if batch.padding:  # this rank has no case of its own (more ranks than cases)
            self.test_metrics.add_placeholder()
            return
        if batch.error is not None:
            raise ValueError(batch.error)
        decision: dict = {}
        prediction = self.predict_original_grid(batch, decision)  # on the host
        raw = to_host(batch.label)
        mask, label = without_ignored(prediction, raw, self.plan.ignore_label)  # scored as validation
        if decision.get("components_only_mask") is not None:  # the mask before the decision: the same region out
            decision["components_only_mask"] = without_ignored(decision["components_only_mask"], raw, self.plan.ignore_label)[0]
        spacing = batch.geometry.spacing
        self.test_metrics.update(mask, label, spacing, batch.index)
        voxel_ml = float(np.prod(spacing)) / 1000.0
        self.test_rows.append({"case": batch.case_id, "index": batch.index,
                               "reference_ml": float((label > 0).sum()) * voxel_ml,
                               "predicted_ml": float((mask > 0).sum()) * voxel_ml,
                               **case_report_fields(mask, label, spacing, decision)})
        return {"prediction": prediction}  # for CasePanelLogger (as predicted, the ignore region too)

    def on_test_epoch_start(self) -> None:
        self.test_rows = []

    def on_test_epoch_end(self) -> None:
        result = self.test_metrics.compute()
        self.log("test/dsc", result["dsc"])
        self.log("test/nsd", result["nsd"])
        rows = self._per_case_rows()
        for key, value in headline_metrics(build_summary(rows)).items():  # healthy FP rates, lesion recall/precision
            self.log(f"test/{key}", value)
        self.test_results = {"summary": {k: float(v) for k, v in result.items()}, "cases": rows}
        self.test_metrics.reset()
        if self.trainer.is_global_zero:
            from .report import WANDB_COLUMNS, print_test_table, wandb_rows, write_reports
            out_dir = self.hparams.report_dir or os.path.join(self.trainer.default_root_dir, "test")
            rule = decision_report(self.inference.healthy_decision, self.postprocessing)  # the healthy-scan decision
            self.test_results["report"] = write_reports(rows, out_dir, tolerance_mm=self.hparams.nsd_tolerance_mm, healthy_decision=rule)
            self.test_results["report_dir"] = out_dir
            print_test_table(self.test_results)
            print(postprocessing_summary(self.inference, self.postprocessing))
            for logger in self.loggers:
                if hasattr(logger, "log_table"):  # W&B
                    logger.log_table(key="test/per_case", columns=WANDB_COLUMNS, data=wandb_rows(rows))

    def _gathered_test_rows(self) -> list[dict]:
        """Every rank's per-case rows (DDP shards the test cases)."""
        rows = self.test_rows
        if self.trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(parts, rows)
            rows = [r for part in parts for r in part]
        return sorted({r["index"]: r for r in rows}.values(), key=lambda r: r["index"])

    def _per_case_rows(self) -> list[dict]:
        indices, dsc, nsd = self.test_metrics.per_case()
        scores = {int(i): (float(d), float(n)) for i, d, n in zip(indices, dsc, nsd)}
        rows = []
        for row in self._gathered_test_rows():
            d, n = scores.get(row["index"], (float("nan"), float("nan")))
            healthy_fp = row["reference_ml"] == 0 and row["predicted_ml"] > 0
            extras = {k: v for k, v in row.items() if k not in ("case", "index", "reference_ml", "predicted_ml")}
            rows.append({"case": row["case"], "dsc": d, "nsd": n, "reference_ml": row["reference_ml"],
                         "predicted_ml": row["predicted_ml"], "healthy_false_positive": healthy_fp,
                         **extras, "dsc_components_only": extras.get("dsc_components_only", d)})
        return rows

    def predict_step(self, batch: VolumeItem, batch_idx: int, dataloader_idx: int = 0) -> Prediction:
        if batch.padding:  # this rank has no case of its own (more ranks than cases): the writer skips it
            return Prediction(batch.case_id, padding=True)
        if batch.error is not None:
            return Prediction(batch.case_id, batch.source, error=batch.error)
        started = batch.started if batch.started is not None else time.perf_counter()  # set before the transfer
        reset_peak_gpu(self.device)
        mask = self.predict_original_grid(batch)
        return Prediction(batch.case_id, batch.source, mask=mask, geometry=batch.geometry, timings=batch.timings,
                          started=started, peak_gpu_mb=peak_gpu_mb(self.device))
