"""LightningDataModule: nnU-Net raw dataset -> fingerprint + plan -> cached preprocessing -> tio.Queue."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from .gpu_augmentation import plan_augmentation
from .fingerprint import load_or_compute_fingerprint
from .plan import IntensityStats, Plan, reconcile_plan
from .preprocessing import PreprocessedCache
from .raw_dataset import Case, RawDataset, load_raw_dataset, select_fold
from .sampling import PatchSampler, build_patch_loader
from .device import synchronize
from .volumes import CachedVolumes, Padded, RawVolumes, ShardSampler, VolumeItem, first_item, list_images

log = logging.getLogger(__name__)


class FlareDataModule(L.LightningDataModule):
    """Spacing and patch sizes are (x, y, z). ``intensity_stats`` (clip_low, clip_high, mean, std) overrides
    the fingerprint's. ``synthetic`` (keyword arguments of ``lightning_flare.synthetic.write_dataset``) makes
    ``prepare_data`` generate the embedded demo dataset into ``data_dir`` when it is absent. ``test_split``: the
    cases ``test`` scores: "auto" (imagesTs/labelsTs, else the fold's validation cases), "test" or "val" (the
    fold's validation cases, e.g. for cross-validation)."""

    def __init__(
        self,
        data_dir: str | None = None,
        cache_dir: str = "cache",
        fold: int | str = 0,
        num_folds: int = 5,
        split_seed: int = 12345,
        target_spacing: Sequence[float] = (2.0, 2.0, 3.0),
        patch_size: Sequence[int] = (128, 128, 96),
        batch_size: int = 2,
        iterations_per_epoch: int = 250,
        oversample_foreground: float = 0.33,
        intensity_stats: dict[str, float] | None = None,
        resampling: str = "nnunet",
        anti_aliasing: bool = False,
        augmentation: str = "basic",
        augmentation_device: str = "cpu",
        gpu_spatial: bool = True,
        queue_length: int = 8,
        num_workers: int = 2,
        preprocess_on: str = "loader",
        predict_dir: str | None = None,
        test_split: str = "auto",
        synthetic: dict[str, Any] | None = None,
        seed: int = 0,
        verify: bool = True,
    ):
        super().__init__()
        self.data_dir = Path(data_dir) if data_dir else None
        self.cache_dir = Path(cache_dir)
        self.fold, self.num_folds, self.split_seed = fold, num_folds, split_seed
        self.target_spacing = tuple(float(s) for s in target_spacing)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.batch_size, self.iterations_per_epoch = batch_size, iterations_per_epoch
        self.oversample_foreground = oversample_foreground
        self.intensity_stats = IntensityStats.from_any(intensity_stats) if intensity_stats else None
        self.resampling, self.augmentation = resampling, augmentation
        self.anti_aliasing = bool(anti_aliasing)  # low-pass the image before downsampling it (not nnU-Net's default)
        if augmentation_device not in ("cpu", "gpu"):
            raise ValueError(f"augmentation_device must be 'cpu' or 'gpu', got {augmentation_device!r}")
        self.augmentation_device, self.gpu_spatial = augmentation_device, gpu_spatial
        self.batch_augmentation = None  # "gpu" mode: batched transforms after the batch reaches the device
        self.queue_length, self.num_workers = queue_length, num_workers
        if preprocess_on not in ("loader", "device"):
            raise ValueError(f"preprocess_on must be 'loader' or 'device', got {preprocess_on!r}")
        if preprocess_on == "device" and resampling != "fast":
            raise ValueError(f"preprocess_on: device needs resampling: fast (torch), got resampling {resampling!r}")
        self.preprocess_on = preprocess_on  # test/predict: resample + normalise in loader workers or on the device
        self.predict_dir = predict_dir
        if test_split not in ("auto", "test", "val"):
            raise ValueError(f"test_split must be 'auto', 'test' or 'val', got {test_split!r}")
        if test_split == "val" and str(fold) == "all":
            raise ValueError("test_split 'val' with fold 'all': the validation cases of fold 'all' are its training cases")
        self.test_split = test_split
        self.synthetic, self.seed, self.verify = synthetic, seed, verify
        self.plan: Plan | None = None
        self.skip_existing_in: str | None = None  # set by the CLI from the prediction writer
        self.fingerprint: dict | None = None  # dataset fingerprint (when the statistics come from the data)
        self._dataset: RawDataset | None = None

    # ----------------------------------------------------------------- dataset and plan
    @property
    def dataset(self) -> RawDataset:
        if self._dataset is None:
            if self.data_dir is None:
                raise ValueError("data.data_dir is not set (an nnU-Net raw dataset folder is needed for this stage)")
            self._dataset = load_raw_dataset(self.data_dir)
        return self._dataset

    def prepare_data(self) -> None:
        """Generate the synthetic dataset into data_dir when it is absent; an existing folder is never rewritten
        (a synthetic one made with other settings gets a warning: delete it to regenerate)."""
        if self.synthetic is None or self.data_dir is None:
            return
        meta = self.data_dir / "dataset.json"
        if not meta.is_file():
            from .synthetic import write_dataset

            write_dataset(self.data_dir, **self.synthetic)
            return
        try:
            stored = json.loads(meta.read_text()).get("synthetic_params")
        except ValueError:
            return  # loading the dataset reports the broken file
        if stored is not None:
            from .synthetic import synthetic_params

            wanted = synthetic_params(**self.synthetic)
            if stored != wanted:
                log.warning(f"{self.data_dir} holds a synthetic dataset made with {stored}, not the configured "
                            f"{wanted}; using it as it is (delete the folder to regenerate it)")

    def plan_from_data(self) -> Plan:
        """Plan from the configuration; intensity statistics from the config or the training fingerprint."""
        stats = self.intensity_stats
        if stats is None:
            cases = self.dataset.cases("Tr")
            path = self.cache_dir / f"{self.dataset.name}_fingerprint.json"
            self.fingerprint = load_or_compute_fingerprint(path, cases, self.num_workers, self.dataset.ignore_label)
            inten = self.fingerprint["intensity"]
            stats = IntensityStats(inten["percentile_00_5"], inten["percentile_99_5"], inten["mean"], inten["std"])
        labels = self.dataset.labels if self.data_dir is not None else {"background": 0, "tumor": 1}
        ignore = self.dataset.ignore_label if self.data_dir is not None else None
        return Plan(self.target_spacing, self.patch_size, stats, labels, self.resampling,
                    anti_aliasing=self.anti_aliasing, ignore_label=ignore)

    def resolve_plan(self) -> Plan:
        """The run's one plan, made once per stage and handed to the model (which keeps it in checkpoints): the
        model's own (restored from a checkpoint) checked against this configuration, else one made from the data."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        restored = getattr(model, "plan", None)
        if restored is not None and restored == self.plan:
            return self.plan  # already reconciled
        net = getattr(model, "net", None)
        self.plan = reconcile_plan(restored, self.configured_plan(), lambda: self.plan or self.plan_from_data(),
                                   num_classes=getattr(net, "num_classes", None))
        if model is not None:
            model.plan = self.plan
            if self.fingerprint is not None:
                model.fingerprint = self.fingerprint
        return self.plan

    def configured_plan(self) -> dict[str, Any]:
        """The plan's fields this configuration fixes (the intensity statistics only when given; the labels only
        with a dataset)."""
        configured: dict[str, Any] = {"target_spacing": self.target_spacing, "patch_size": self.patch_size,
                                      "resampling": self.resampling, "anti_aliasing": self.anti_aliasing}
        if self.intensity_stats is not None:
            configured["intensity"] = self.intensity_stats
        if self.data_dir is not None and (self.data_dir / "dataset.json").is_file():
            configured["labels"] = self.dataset.labels
            configured["ignore_label"] = self.dataset.ignore_label
        return configured

    def setup(self, stage: str) -> None:
        if stage == "fit":
            if self.verify:
                self.verify_dataset()
            self.plan = self.plan_from_data()

    def verify_dataset(self) -> None:
        """Check every training file before any work (all problems listed at once); remembered per file state."""
        from .verify import verify_dataset

        files = sorted(p for d in ("imagesTr", "labelsTr") for p in (self.dataset.root / d).glob("*") if p.is_file())
        state = json.dumps([[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
                           + [(self.dataset.root / "dataset.json").read_text()])
        marker = self.cache_dir / f"{self.dataset.name}_verified_{hashlib.sha1(state.encode()).hexdigest()[:12]}"
        if marker.exists():
            return
        report = verify_dataset(self.dataset.root, splits=("Tr",), num_workers=self.num_workers)
        for warning in report.warnings:
            log.warning(warning)
        report.raise_if_errors()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        marker.touch()

    def _fold_cases(self) -> tuple[list[Case], list[Case]]:
        return select_fold(self.dataset, self.dataset.cases("Tr"), self.fold, self.num_folds, self.split_seed)

    def _cache(self, plan: Plan, cases: Sequence[Case]):
        cache = PreprocessedCache(self.cache_dir, plan, self.dataset.name)
        return cache.build(cases, self.num_workers, progress=self._is_global_zero())

    # ----------------------------------------------------------------- loaders
    def train_dataloader(self) -> DataLoader:
        plan = self.resolve_plan()
        train_cases, _ = self._fold_cases()
        entries = self._cache(plan, train_cases)
        rank, world = _rank_and_world()
        # per-patch transform in the loader workers (with the crop it needs), batched one after the transfer ('gpu')
        split = plan_augmentation(self.augmentation, plan.patch_size, self.augmentation_device, self.gpu_spatial,
                                  self.seed, rank)
        self.batch_augmentation = split.batch_augmentation
        sampler = PatchSampler(split.sampler_patch_size, self.batch_size, self.oversample_foreground,
                               split.worker_transform, margin=split.sampler_margin, context=split.sampler_context)
        return build_patch_loader(entries, sampler, plan.target_spacing, self.iterations_per_epoch, self.num_workers,
                                  self.seed, rank, world, self.queue_length,
                                  partial_ids=self.dataset.partially_labelled)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Whole volumes (test / predict): the clock of the case starts before its copy to the device."""
        if isinstance(batch, VolumeItem) and batch.timings is not None:
            batch.started = time.perf_counter()
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Whole volumes: the copy to the device is the case's "transfer" stage. GPU augmentation mode: batched
        transforms on the device, training batches only."""
        if isinstance(batch, VolumeItem) and batch.timings is not None and batch.started is not None:
            synchronize(batch.image.device if batch.image is not None else None)  # Lightning copies non-blocking
            batch.timings["transfer"] = time.perf_counter() - batch.started
        if self.batch_augmentation is not None and self.trainer is not None and self.trainer.training:
            self.batch_augmentation.set_epoch(self.trainer.current_epoch)
            batch = self.batch_augmentation.augment_batch(batch)
        return batch

    def val_dataloader(self) -> DataLoader:
        plan = self.resolve_plan()
        if str(self.fold) == "all" and self._is_global_zero():
            log.warning("fold 'all': the validation cases are the training cases, so val/dsc measures the fit, not "
                        "generalisation, and an 'auto' postprocessing would be chosen on training cases; train the "
                        "final model with --trainer.limit_val_batches 0 and the postprocessing cross-validation chose")
        _, val_cases = self._fold_cases()
        return self._volume_loader(CachedVolumes(self._cache(plan, val_cases), plan.target_spacing,
                                                 self.dataset.partially_labelled))

    def test_dataloader(self) -> DataLoader:
        plan = self.resolve_plan()
        cases = self.dataset.cases("Ts") if self.test_split != "val" else []
        if not cases and self.test_split == "test":
            raise ValueError(f"{self.data_dir}: test_split 'test' but imagesTs/ holds no case")
        if not cases:
            cases = self._fold_cases()[1]
        if not cases:
            raise ValueError(f"{self.data_dir}: no test cases (imagesTs/ is empty and there is no validation fold)")
        missing = [c.case_id for c in cases if c.label is None]
        if missing:
            raise ValueError(f"{self.data_dir}: test cases without labels: {missing}")
        return self._volume_loader(RawVolumes(cases, plan, with_labels=True, on_device=self.preprocess_on == "device"))

    def predict_dataloader(self) -> DataLoader:
        plan = self.resolve_plan()
        if self.predict_dir is None:
            raise ValueError("data.predict_dir is not set: give the folder of images to segment (--data.predict_dir DIR)")
        cases = list_images(self.predict_dir)
        if self.skip_existing_in is not None:
            done = [c for c in cases if (Path(self.skip_existing_in) / f"{c.case_id}.nii.gz").exists()]
            if done:
                log.warning(f"skipping {len(done)} case(s) already predicted in {self.skip_existing_in} (--writer.overwrite true to redo)")
            cases = [c for c in cases if c not in done]
        return self._volume_loader(RawVolumes(cases, plan, with_labels=False, on_device=self.preprocess_on == "device"))

    def _volume_loader(self, dataset: Dataset) -> DataLoader:
        rank, world = _rank_and_world()
        sampler = ShardSampler(len(dataset), rank, world) if world > 1 else None
        dataset = Padded(dataset) if world > 1 else dataset  # a rank without a case gets a padding item
        # workers read and preprocess the *next* volumes while this process computes; with a single volume there
        # is nothing to overlap, and a worker would only add its own memory
        count = len(sampler) if sampler is not None else len(dataset)
        workers = max(0, min(self.num_workers, count - 1))
        return DataLoader(dataset, batch_size=1, sampler=sampler, collate_fn=first_item, num_workers=workers,
                          persistent_workers=False, multiprocessing_context="fork" if workers and os.name == "posix" else None)

    def _is_global_zero(self) -> bool:
        return self.trainer is None or self.trainer.is_global_zero


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
