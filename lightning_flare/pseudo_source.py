"""The source dataset of a pseudo-labelling round: labelled training cases, which of them are partially labelled,
the unlabelled scans (``imagesUnlabelled/CASE_0000<file_ending>``) and the ignore label.

Those three facts belong to ``raw_dataset.RawDataset`` (``unlabelled_cases()``, ``partially_labelled``,
``ignore_label``; issue 16 item 1). Where the installed ``RawDataset`` does not have them yet, the private
``_fallback_*`` functions below read the same files the same agreed way; remove them once ``RawDataset`` has them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .raw_dataset import Case, DatasetError, RawDataset, load_raw_dataset, parse_labels

UNLABELLED_DIR = "imagesUnlabelled"


@dataclass(frozen=True)
class Source:
    """What a round needs to know about its source dataset."""

    root: Path
    meta: dict  # dataset.json as written
    dataset: RawDataset
    labelled: list[Case]  # imagesTr with their labelsTr file
    unlabelled: list[Case]  # imagesUnlabelled, label None
    partially_labelled: frozenset[str]
    ignore_label: int | None
    tumour: int  # the one foreground value

    @property
    def file_ending(self) -> str:
        return self.dataset.file_ending

    @property
    def meta_path(self) -> Path:
        return self.root / "dataset.json"


def read_source(root: str | Path) -> Source:
    """The source dataset at ``root``; a ``DatasetError`` naming the file for anything a round cannot use."""
    root = Path(root)
    meta_path = root / "dataset.json"
    dataset, meta = _load(root)
    labels = {k: v for k, v in (meta.get("labels") or {}).items() if k != "ignore"}
    real = parse_labels(labels, source=meta_path)
    foreground = sorted(v for v in real.values() if v != 0)
    if len(foreground) != 1:
        raise DatasetError(f"{meta_path}: pseudo-labelling needs exactly one tumour class besides the background, "
                           f"got the labels {real}")
    ignore = _attribute(dataset, "ignore_label", _fallback_ignore_label)
    labelled = dataset.cases("Tr")
    ids = {c.case_id for c in labelled}
    partial = frozenset(_attribute(dataset, "partially_labelled", _fallback_partially_labelled))
    unknown = sorted(partial - ids)
    if unknown:
        raise DatasetError(f"{meta_path}: partially_labelled names cases without an image and label in imagesTr / "
                           f"labelsTr: {unknown[:5]}")
    unlabelled = dataset.unlabelled_cases() if hasattr(dataset, "unlabelled_cases") else _fallback_unlabelled_cases(dataset)
    clash = sorted(ids & {c.case_id for c in unlabelled})
    if clash:
        raise DatasetError(f"{root / UNLABELLED_DIR}: case ids also in imagesTr: {clash[:5]}")
    return Source(root, meta, dataset, labelled, list(unlabelled), partial, ignore, foreground[0])


def _load(root: Path) -> tuple[RawDataset, dict]:
    """``load_raw_dataset``, and dataset.json as written. Fallback: a ``parse_labels`` without ignore support
    rejects the "ignore" label, so the dataset is then opened with the labels minus "ignore"."""
    meta_path = root / "dataset.json"
    try:
        dataset = load_raw_dataset(root)
    except DatasetError as err:
        if hasattr(RawDataset, "ignore_label") or "'ignore'" not in str(err):
            raise
        dataset = None
    meta = json.loads(meta_path.read_text())
    if dataset is None:  # fallback, see above
        dataset = RawDataset(root, {**meta, "labels": {k: v for k, v in meta["labels"].items() if k != "ignore"}})
    return dataset, meta


def _attribute(dataset: RawDataset, name: str, fallback):
    return getattr(dataset, name) if hasattr(type(dataset), name) else fallback(dataset, _meta_of(dataset))


def _meta_of(dataset: RawDataset) -> dict:
    return json.loads((dataset.root / "dataset.json").read_text())


def _fallback_ignore_label(dataset: RawDataset, meta: dict) -> int | None:
    """dataset.json ``labels["ignore"]``: highest real class + 1 (nnU-Net's convention), or None."""
    labels = meta.get("labels") or {}
    if "ignore" not in labels:
        return None
    value = labels["ignore"]
    value = value[0] if isinstance(value, list) and len(value) == 1 else value
    real = [v for k, v in dataset.labels.items() if k != "ignore"]
    try:
        value = int(value) if not isinstance(value, bool) and float(value) == int(float(value)) else None
    except (TypeError, ValueError):
        value = None
    if value != max(real) + 1:
        raise DatasetError(f"{dataset.root / 'dataset.json'}: the ignore label must be the highest class + 1 "
                           f"({max(real) + 1}), got {labels['ignore']!r}")
    return value


def _fallback_partially_labelled(dataset: RawDataset, meta: dict) -> frozenset[str]:
    """dataset.json ``"partially_labelled": [ids]`` (absent: none)."""
    ids = meta.get("partially_labelled", [])
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise DatasetError(f"{dataset.root / 'dataset.json'}: partially_labelled must be a list of case ids, got {ids!r}")
    return frozenset(ids)


def _fallback_unlabelled_cases(dataset: RawDataset) -> list[Case]:
    """``imagesUnlabelled/CASE_0000<file_ending>`` (other channels skipped), sorted; none without the folder."""
    folder, ending = dataset.root / UNLABELLED_DIR, dataset.file_ending
    if not folder.is_dir():
        return []
    cases = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.name.endswith(ending):
            continue
        stem = path.name[: -len(ending)]
        if not stem.endswith("_0000"):
            if stem[-5:-4] == "_" and stem[-4:].isdigit():
                continue
            raise DatasetError(f"{path}: image name must end with the channel suffix _0000{ending}")
        cases.append(Case(stem[:-5], path))
    return cases
