"""Whole-volume datasets for validation (cached cases), test (raw cases with labels) and prediction; their item,
``VolumeItem``, is the batch the module's validation / test / predict steps get."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from torch.utils.data import Dataset, Sampler

from .io import Geometry, ImageReadError, read_image, to_array
from .plan import Plan
from .preprocessing import CachedCase, preprocess_image
from .raw_dataset import IMAGE_SUFFIXES, Case


@dataclass
class VolumeItem:
    """One whole case, passed through the loader unchanged (``first_item``). Lightning moves its tensors to the
    device and keeps the other fields (``move_data_to_device`` rebuilds the dataclass field by field, so it is
    not frozen); the data module's transfer hooks set ``started`` and the "transfer" timing.

    Kinds: a cached case (validation: ``image`` and ``label`` on the plan's grid, ``spacing`` set); a raw case
    (test / predict: ``geometry``, ``source`` and ``timings`` set, ``label`` on the original grid for test), its
    ``image`` preprocessed in the loader or, with ``preprocessed`` False, the raw HU volume on the original grid
    that the predictor preprocesses on the device; an unreadable raw case (``error``); a padding item
    (``padding``: a rank without a case of its own, see ``ShardSampler``; the steps score, predict and write
    nothing for it)."""

    index: int  # position in the dataset (-1: padding)
    case_id: str
    image: torch.Tensor | None = None  # (1, x, y, z)
    preprocessed: bool = True  # image on the plan's grid, normalised; False: raw HU on the original grid
    label: torch.Tensor | None = None  # (x, y, z) uint8, on the grid the case is scored on
    spacing: tuple[float, float, float] | None = None  # a cached case's voxel spacing (the plan's)
    geometry: Geometry | None = None  # a raw case's original grid
    source: str = ""  # a raw case's input file or folder
    timings: dict[str, float] | None = None  # a raw case's stage seconds (read, preprocess, transfer, ...)
    started: float | None = None  # perf_counter() before the copy to the device (set by the data module)
    error: str | None = None  # why a raw case could not be read: test raises it, predict reports it
    padding: bool = False
    partial: bool = False  # a cached validation case whose label marks only some lesions (dataset.json "partially_labelled")


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``world`` takes items r, r + world, ...: every case on exactly one rank, none repeated
    (DistributedSampler pads with repeats, which would predict and write some cases twice). A rank left without
    a case (more ranks than cases) takes one padding item instead, index ``length`` (``Padded``): Lightning needs
    a batch on every rank, and the steps skip it."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = list(range(rank, length, world_size)) or [length]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def padding_item() -> VolumeItem:
    """The item of a rank without a case: no volume; the steps score, predict and write nothing for it."""
    return VolumeItem(index=-1, case_id="", padding=True)


class Padded(Dataset):
    """``dataset`` with one more index, ``len(dataset)``, that gives ``padding_item()`` (see ``ShardSampler``)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> VolumeItem:
        return padding_item() if index == len(self.dataset) else self.dataset[index]

    @property
    def case_ids(self) -> list[str] | None:
        return getattr(self.dataset, "case_ids", None)


def first_item(batch: list[VolumeItem]) -> VolumeItem:
    """Collate for volume loaders: one case per batch, passed through unchanged."""
    return batch[0]


class CachedVolumes(Dataset):
    """Preprocessed cases from the cache (validation during fit: scored on the resampled grid)."""

    def __init__(self, entries: Sequence[CachedCase], spacing: Sequence[float], partial_ids: Iterable[str] = ()):
        self.entries = list(entries)
        self.spacing = tuple(spacing)
        self.partial_ids = frozenset(partial_ids)  # partially labelled cases (their items carry ``partial``)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def case_ids(self) -> list[str]:
        """The case of each index (names the per-case validation rows)."""
        return [e.case_id for e in self.entries]

    def __getitem__(self, index: int) -> VolumeItem:
        e = self.entries[index]
        return VolumeItem(index, e.case_id, image=torch.from_numpy(np.load(e.image))[None],
                          label=torch.from_numpy(np.load(e.label)), spacing=self.spacing,
                          partial=e.case_id in self.partial_ids)


COMPACT_DTYPES = (np.int8, np.uint8, np.int16, np.float32)  # handed over as stored: converted on the device


def raw_voxels(image: sitk.Image) -> torch.Tensor:
    """(1, x, y, z) tensor of the stored voxels for preprocessing on the device: an (x, y, z) view of SimpleITK's
    (z, y, x) array, so the host neither transposes nor converts (the device does both, in its own memory), and
    int16 CT crosses to the device at half float32's size. Other dtypes (float64, int32, uint16) become float32."""
    array = sitk.GetArrayFromImage(image)  # a copy of the voxel buffer, in memory order
    if array.dtype.type not in COMPACT_DTYPES:
        array = array.astype(np.float32)
    return torch.from_numpy(array).permute(2, 1, 0)[None]


class RawVolumes(Dataset):
    """Raw cases preprocessed on the fly (in loader workers); labels and geometry stay on the original grid."""

    def __init__(self, cases: Sequence[Case], plan: Plan, with_labels: bool = True, on_device: bool = False):
        self.cases = list(cases)
        self.plan = plan
        self.with_labels = with_labels
        self.on_device = on_device  # hand over the raw HU array (preprocessed False): preprocessed on the device

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> VolumeItem:
        case = self.cases[index]
        item = VolumeItem(index, case.case_id, source=str(case.image))
        try:
            start = time.perf_counter()
            image = read_image(case.image)
            item.geometry = Geometry.of(image)
            read = time.perf_counter()
            if self.on_device:
                item.image, item.preprocessed = raw_voxels(image), False
            else:
                item.image = torch.from_numpy(preprocess_image(image, self.plan))[None]
            item.timings = {"read": read - start, "preprocess": time.perf_counter() - read}
            if self.with_labels and case.label is not None:
                label = read_image(case.label)
                if label.GetSize() != image.GetSize():
                    raise ImageReadError(f"{case.label}: label size {label.GetSize()} differs from image size {image.GetSize()}")
                item.label = torch.from_numpy(to_array(label, np.uint8))
        except (ImageReadError, ValueError) as err:
            # ImageReadError names its file; a preprocessing error (e.g. a grid too large) gets the image's name
            item.error = str(err) if isinstance(err, ImageReadError) else f"{case.image}: {err}"
        return item


def list_images(folder: str | Path) -> list[Case]:
    """Image files (NIfTI, NRRD, MHA) and DICOM series sub-folders of ``folder``; ``CASE_0000.ext`` -> ``CASE``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: prediction input folder does not exist")
    cases = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        suffix = next((s for s in IMAGE_SUFFIXES if path.name.endswith(s)), None)
        if suffix is not None:
            stem = path.name[: -len(suffix)]
            cases.append(Case(stem[:-5] if stem.endswith("_0000") else stem, path))
        elif path.is_dir():
            cases.append(Case(path.name, path))
    if not cases:
        raise FileNotFoundError(f"{folder}: no images found (expected {', '.join(IMAGE_SUFFIXES)} files or DICOM folders)")
    ids = [c.case_id for c in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"{folder}: several inputs map to the same case id(s) {duplicates}")
    return cases
