"""Reading an nnU-Net raw dataset folder (dataset.json, imagesTr/, labelsTr/, imagesTs/, labelsTs/)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

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


_EXAMPLE = '(e.g. {"background": 0, "tumor": 1})'


def _label_value(name: str, value: Any, source: str | Path) -> int:
    """One label's value as an int: 1, 1.0, "1" or [1] (a one-value list is no region in nnU-Net)."""
    if isinstance(value, (list, tuple)) and len(value) > 1:
        raise DatasetError(f"{source}: label {name!r} has the value {value!r}, a region (several label values); "
                           "region-based training is not supported: give each label one integer")
    original, value = value, (value[0] if isinstance(value, (list, tuple)) and len(value) == 1 else value)
    if isinstance(value, int) and not isinstance(value, bool):  # JSON true is no label value
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)  # nnU-Net int()s values; 1.5 is rejected here rather than silently read as 1
    if isinstance(value, str) and re.fullmatch(r"[0-9]+", value):
        return int(value)  # FLARE24 writes {"background": "0", "tumor": "1"}
    raise DatasetError(f"{source}: label {name!r} has the value {original!r}; a label value must be a "
                       'non-negative integer, written 1 or "1"')


def parse_labels(labels: Any, source: str | Path) -> dict[str, int]:
    """dataset.json's ``labels`` as {name: int}, in the forms nnU-Net v2 accepts for a non-region dataset.

    Values may be ints, integral floats (1.0), integer strings ("1", as FLARE24's own dataset.json) or one-value
    lists. nnU-Net's ``"ignore"`` entry is not a class and is left out (``parse_ignore_label`` reads it). Errors
    (DatasetError naming ``source`` and the value): regions (lists of several values), bools, other strings or
    floats, a background that is missing or not 0, values that are not 0, 1, ..., n-1, a bad ignore label.
    """
    if not isinstance(labels, dict) or not labels:
        raise DatasetError(f"{source}: needs a 'labels' mapping {_EXAMPLE}, got {labels!r}")
    parsed = {str(name): _label_value(str(name), value, source) for name, value in labels.items() if name != "ignore"}
    if "background" not in parsed:
        raise DatasetError(f"{source}: label 'background' is missing; it must be 0 {_EXAMPLE}, got {labels}")
    if parsed["background"] != 0:
        raise DatasetError(f"{source}: label 'background' is {labels['background']!r}; it must be 0 {_EXAMPLE}")
    if (values := sorted(parsed.values())) != list(range(len(values))):
        raise DatasetError(f"{source}: label values must be consecutive integers from 0, each used once "
                           f"(0, 1, ..., {len(values) - 1}), got {values} in {labels}")
    if "ignore" in labels:
        _check_ignore(labels, len(parsed), source)
    return parsed


def _check_ignore(labels: dict, num_classes: int, source: str | Path) -> int:
    value = _label_value("ignore", labels["ignore"], source)
    if value != num_classes:
        raise DatasetError(f"{source}: label 'ignore' is {labels['ignore']!r}; nnU-Net's ignore label must be the "
                           f"highest value, one more than the highest class: {num_classes} for the classes "
                           f"{ {k: v for k, v in labels.items() if k != 'ignore'} }")
    return value


def parse_ignore_label(labels: Any, source: str | Path) -> int | None:
    """The value of dataset.json's ``"ignore"`` label (nnU-Net's sparse-annotation convention: voxels of this value
    are unknown and take part in no loss term), or None. It must be the number of classes (the highest class + 1);
    errors as ``parse_labels``."""
    classes = parse_labels(labels, source)
    return _check_ignore(labels, len(classes), source) if "ignore" in labels else None


@dataclass
class RawDataset:
    root: Path
    meta: dict

    @property
    def labels(self) -> dict[str, int]:
        return parse_labels(self.meta.get("labels"), source=self.root / "dataset.json")

    @property
    def ignore_label(self) -> int | None:
        """dataset.json's ``"ignore"`` label value (voxels of ``labelsTr`` left out of the loss), or None."""
        return parse_ignore_label(self.meta.get("labels"), source=self.root / "dataset.json")

    @property
    def partially_labelled(self) -> frozenset[str]:
        """Training cases whose label marks only some lesions (dataset.json ``"partially_labelled"``: case ids).
        Each must be an ``imagesTr`` case with a ``labelsTr`` label, else a DatasetError naming the id."""
        source, listed = self.root / "dataset.json", self.meta.get("partially_labelled", [])
        if not isinstance(listed, list) or not all(isinstance(c, str) for c in listed):
            raise DatasetError(f"{source}: 'partially_labelled' must be a list of training case ids, got {listed!r}")
        labelled = {c.case_id for c in self.cases("Tr", require_labels=False) if c.label is not None}
        for case_id in listed:
            if case_id not in labelled:
                raise DatasetError(f"{source}: 'partially_labelled' lists {case_id!r}, which is no training case "
                                   f"with a label (no {case_id}_0000{self.file_ending} in imagesTr with "
                                   f"{case_id}{self.file_ending} in labelsTr)")
        return frozenset(listed)

    def unlabelled_cases(self) -> list[Case]:
        """Scans without any label, in ``imagesUnlabelled/`` (``CASE_0000<file_ending>``); none without the folder."""
        return self.cases("Unlabelled", require_labels=False)

    @property
    def file_ending(self) -> str:
        return self.meta.get("file_ending", ".nii.gz")

    @property
    def name(self) -> str:
        return self.root.name

    def cases(self, split: str = "Tr", require_labels: bool = True) -> list[Case]:
        """Cases of ``imagesTr`` / ``imagesTs`` (/ ``imagesUnlabelled``) with their labels (``labelsTr`` / ``labelsTs``)."""
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
    if not isinstance(meta, dict):
        raise DatasetError(f"{meta_path}: must hold a JSON object, got {type(meta).__name__}")
    parse_labels(meta.get("labels"), source=meta_path)  # also checks an "ignore" label
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
