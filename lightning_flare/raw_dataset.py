"""Reading an nnU-Net raw dataset folder (dataset.json, imagesTr/, labelsTr/, imagesTs/, labelsTs/)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


@dataclass(frozen=True)
class Case:
    case_id: str
    image: Path
    label: Path | None = None


def source_signature(case: Case) -> dict[str, list[int]]:
    """Size and modification time of a case's files: an entry made from other file contents is stale."""
    stats = {kind: path.stat() for kind, path in (("image", case.image), ("label", case.label)) if path is not None}
    return {kind: [st.st_size, st.st_mtime_ns] for kind, st in stats.items()}


class DatasetError(ValueError):
    """A dataset folder or file that cannot be used; the message names the file and the problem."""


@dataclass
class RawDataset:
    root: Path
    meta: dict

    @property
    def labels(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.meta["labels"].items()}

    @property
    def file_ending(self) -> str:
        return self.meta.get("file_ending", ".nii.gz")

    @property
    def name(self) -> str:
        return self.root.name

    def cases(self, split: str = "Tr", require_labels: bool = True) -> list[Case]:
        """Cases of ``imagesTr`` / ``imagesTs`` with their labels (``labelsTr`` / ``labelsTs``)."""
        images_dir, labels_dir = self.root / f"images{split}", self.root / f"labels{split}"
        if not images_dir.is_dir():
            return []
        cases = []
        for path in sorted(images_dir.iterdir()):
            if not path.name.endswith(self.file_ending) or path.name.startswith("."):
                continue
            stem = path.name[: -len(self.file_ending)]
            if not stem.endswith("_0000"):
                if stem[-5:-4] == "_" and stem[-4:].isdigit():
                    continue  # another channel of a multi-channel case; only CT (_0000) is used
                raise DatasetError(f"{path}: image name must end with the channel suffix _0000{self.file_ending}")
            case_id = stem[:-5]
            label = labels_dir / f"{case_id}{self.file_ending}"
            if not label.exists():
                if require_labels and labels_dir.is_dir():
                    raise DatasetError(f"{path}: no label {label.name} in {labels_dir}")
                label = None
            cases.append(Case(case_id, path, label))
        if require_labels and labels_dir.is_dir():
            image_ids = {c.case_id for c in cases}
            for label in sorted(labels_dir.iterdir()):
                if label.name.endswith(self.file_ending) and label.name[: -len(self.file_ending)] not in image_ids:
                    raise DatasetError(f"{label}: label without image {label.name[: -len(self.file_ending)]}_0000{self.file_ending} in {images_dir}")
        return cases


def load_raw_dataset(root: str | Path) -> RawDataset:
    root = Path(root)
    meta_path = root / "dataset.json"
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder does not exist")
    if not meta_path.is_file():
        raise DatasetError(f"{meta_path}: missing (an nnU-Net raw dataset needs dataset.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetError(f"{meta_path}: cannot be parsed as JSON ({err})") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("labels"), dict) or "background" not in meta["labels"]:
        raise DatasetError(f"{meta_path}: needs a 'labels' mapping with 'background' (e.g. {{\"background\": 0, \"tumor\": 1}})")
    try:
        values = sorted(int(v) for v in meta["labels"].values())
    except (TypeError, ValueError) as err:
        raise DatasetError(f"{meta_path}: label values must be integers, got {meta['labels']}") from err
    if values != list(range(len(values))):
        raise DatasetError(f"{meta_path}: label values must be consecutive from 0, got {values}")
    return RawDataset(root, meta)


def kfold_splits(case_ids: Sequence[str], num_folds: int = 5, seed: int = 12345) -> list[dict[str, list[str]]]:
    """nnU-Net's splits: KFold(shuffle=True, random_state=seed) over the sorted case ids."""
    keys = sorted(case_ids)
    if len(keys) < num_folds:
        raise DatasetError(f"{num_folds}-fold split needs at least {num_folds} training cases, found {len(keys)}")
    order = np.arange(len(keys))
    np.random.RandomState(seed).shuffle(order)
    sizes = np.full(num_folds, len(keys) // num_folds)
    sizes[: len(keys) % num_folds] += 1
    splits, start = [], 0
    for size in sizes:
        val = set(order[start : start + size].tolist())
        start += size
        splits.append({
            "train": [k for i, k in enumerate(keys) if i not in val],
            "val": [k for i, k in enumerate(keys) if i in val],
        })
    return splits


def select_fold(dataset: RawDataset, cases: list[Case], fold: int | str, num_folds: int = 5, seed: int = 12345) -> tuple[list[Case], list[Case]]:
    """Train and validation cases of ``fold``; ``"all"`` trains on everything (validation = all too)."""
    if str(fold) == "all":
        return cases, cases
    fold = int(fold)
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold must be 'all' or in [0, {num_folds - 1}], got {fold}")
    splits_file = dataset.root / "splits_final.json"
    if splits_file.is_file():
        splits = json.loads(splits_file.read_text())
        if fold >= len(splits):
            raise DatasetError(f"{splits_file}: has {len(splits)} folds, fold {fold} requested")
    else:
        splits = kfold_splits([c.case_id for c in cases], num_folds, seed)
    by_id = {c.case_id: c for c in cases}
    missing = [k for k in splits[fold]["train"] + splits[fold]["val"] if k not in by_id]
    if missing:
        raise DatasetError(f"{splits_file}: cases not in the dataset: {missing[:5]}")
    return [by_id[k] for k in splits[fold]["train"]], [by_id[k] for k in splits[fold]["val"]]
