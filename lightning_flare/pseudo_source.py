"""The source dataset of a pseudo-labelling round: labelled training cases, which of them are partially labelled,
the unlabelled scans (``imagesUnlabelled/CASE_0000<file_ending>``) and the ignore label, all as
``raw_dataset.RawDataset`` reads them (``cases("Tr")``, ``partially_labelled``, ``unlabelled_cases()``,
``ignore_label``)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io import Geometry, read_image, to_array
from .raw_dataset import Case, DatasetError, RawDataset, load_raw_dataset

UNLABELLED_DIR = "imagesUnlabelled"


class PseudoLabelError(ValueError):
    """A round that cannot run; the message names the file or setting and the problem."""


@dataclass(frozen=True)
class Source:
    """What a round needs to know about its source dataset."""

    root: Path
    meta: dict  # dataset.json as written
    dataset: RawDataset
    labelled: list[Case]  # imagesTr with their labelsTr file
    unlabelled: list[Case]  # imagesUnlabelled, label None
    partially_labelled: frozenset[str]
    ignore_label: int | None  # the dataset's: the number of classes (nnU-Net's convention), or None
    tumour: int  # the one foreground value

    @property
    def file_ending(self) -> str:
        return self.dataset.file_ending

    @property
    def meta_path(self) -> Path:
        return self.root / "dataset.json"

    @property
    def num_classes(self) -> int:
        """Classes besides the ignore label (background and tumour): the value an ignore label must have."""
        return len(self.dataset.labels)


def read_source(root: str | Path) -> Source:
    """The source dataset at ``root``; a ``DatasetError`` naming the file for anything a round cannot use."""
    dataset = load_raw_dataset(root)
    meta_path = dataset.root / "dataset.json"
    real = dataset.labels  # without "ignore"
    foreground = sorted(v for v in real.values() if v != 0)
    if len(foreground) != 1:
        raise DatasetError(f"{meta_path}: pseudo-labelling needs exactly one tumour class besides the background, "
                           f"got the labels {real}")
    labelled = dataset.cases("Tr")
    partial = dataset.partially_labelled  # each an imagesTr case with a labelsTr label, else a DatasetError
    unlabelled = dataset.unlabelled_cases()
    clash = sorted({c.case_id for c in labelled} & {c.case_id for c in unlabelled})
    if clash:
        raise DatasetError(f"{dataset.root / UNLABELLED_DIR}: case ids also in imagesTr: {clash[:5]}")
    return Source(dataset.root, dataset.meta, dataset, labelled, unlabelled, partial, dataset.ignore_label,
                  foreground[0])


def read_mask(path: Path, geometry: Geometry, allowed: set[int], what: str) -> np.ndarray:
    """A mask on ``geometry``'s grid with values in ``allowed``; a ``PseudoLabelError`` naming the file otherwise."""
    if not path.is_file():
        raise PseudoLabelError(f"{path}: {what} missing")
    image = read_image(path)
    if tuple(image.GetSize()) != tuple(geometry.size):
        raise PseudoLabelError(f"{path}: {what} size {image.GetSize()} differs from the image size {geometry.size}")
    array = to_array(image, np.uint8)
    unknown = sorted(set(np.unique(array).tolist()) - allowed)
    if unknown:
        raise PseudoLabelError(f"{path}: {what} values {unknown} are not in {sorted(allowed)}")
    return array
