"""Training patches for ``tio.Queue``: nnU-Net's foreground oversampling, read from memory-mapped cache files.

Each patch is a pure function of (seed, epoch, draw number): its case, whether it is foreground-centred,
its centre and its augmentation draw. Patches are cut and augmented inside the queue's loader workers,
so the work is spread over processes and the cost of a patch does not depend on the size of the scan.

One patch type all the way: ``PatchSampler`` makes a ``Patch``, ``PatchDataset`` hands it to the queue, the
queue holds it as it is (``WholePatchSampler``) and ``collate_patches`` stacks a batch of them into the training
batch ``{"image", "label", "location", "foreground_forced", "case_id", "partial"}`` that ``training_step`` reads
(``partial``: the patch's case is listed in dataset.json's "partially_labelled").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torchio as tio
from torch.utils.data import Dataset, Sampler

from .preprocessing import CachedCase


def crop_with_padding(array: np.ndarray, start: Sequence[int], size: Sequence[int], pad_value: float = 0) -> np.ndarray:
    """``array[start:start+size]`` where parts outside the array are ``pad_value``; reads only that region."""
    start = np.asarray(start, int)
    stop = start + np.asarray(size, int)
    lo = np.maximum(start, 0)
    hi = np.minimum(stop, array.shape)
    out = np.full(tuple(int(s) for s in size), pad_value, dtype=array.dtype)
    if np.all(hi > lo):
        dst = tuple(slice(int(a - s), int(b - s)) for a, b, s in zip(lo, hi, start))
        src = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        out[dst] = array[src]
    return out


def random_start(shape: Sequence[int], patch_size: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """First voxel of a uniform random patch, nnU-Net's ``get_bbox`` for the patch the network gets: per axis
    uniform in ``[0, shape - patch]``, so the patch stays inside the image and covers its borders; along an axis
    shorter than the patch, the patch is centred (``-ceil(d / 2)`` or ``-floor(d / 2)``, d = patch - shape) and
    padded on both sides. (Uniform centres over all voxels would leave ~40 % of a 64 x 64 x 32 patch of a
    90 x 88 x 63 image outside it, zero-filled: the normalised CT's foreground mean, labelled background.)"""
    start = []
    for s, p in zip(shape, patch_size):
        need = max(int(p) - int(s), 0)
        low, high = -((need + 1) // 2), int(s) - int(p) + (need + 1) // 2
        start.append(rng.integers(low, high + 1))
    return np.asarray(start, int)


@dataclass
class Patch:
    """One training patch, on the cached (plan's) grid."""

    image: torch.Tensor  # (1, x, y, z) float32, augmented
    label: torch.Tensor  # (1, x, y, z) uint8
    location: torch.Tensor  # (6,) int64: first voxel and stop (exclusive) of the patch in the cached case
    foreground_forced: bool  # centred on a foreground voxel by the oversampling rule
    case_id: str
    partial: bool = False  # its case's label marks only some lesions (RawDataset.partially_labelled)


class PatchSampler:
    """nnU-Net's rule: in each batch of ``batch_size`` the last ``round(batch_size * oversample)`` patches are
    centred on a random foreground voxel (the outside is padded with 0), the others are uniform random crops
    (``random_start``: inside the image, which they reach to its borders, as nnU-Net's ``get_bbox`` places
    the final patch). Cases without foreground fall back to uniform.

    ``transform`` augments each patch; it gets a crop enlarged by ``margin`` voxels per side, which is
    centre-cropped back to ``patch_size`` afterwards (so rotations do not pull in padding). ``context``: voxels per
    side of the returned patch that a later step crops away (the batched augmentation's crop): the uniform crops
    place the rest, the network's patch, inside the image.
    """

    def __init__(self, patch_size: Sequence[int], batch_size: int, oversample_foreground: float = 0.33,
                 transform: Callable[[tio.Subject], tio.Subject] | None = None, margin: Sequence[int] | int = 0,
                 context: Sequence[int] | int = 0):
        self.patch_size = np.asarray([int(p) for p in patch_size])
        if len(self.patch_size) != 3 or self.patch_size.min() < 1:
            raise ValueError(f"patch_size must be 3 positive integers, got {patch_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= oversample_foreground <= 1:
            raise ValueError(f"oversample_foreground must be in [0, 1], got {oversample_foreground}")
        self.batch_size = batch_size
        self.num_forced = int(round(batch_size * oversample_foreground))
        self.transform = transform
        self.margin = np.broadcast_to(np.asarray(margin, int), (3,)).copy()
        self.context = np.broadcast_to(np.asarray(context, int), (3,)).copy()
        if np.any(self.context < 0) or np.any(self.patch_size - 2 * self.context < 1):
            raise ValueError(f"context must leave a patch inside patch_size {patch_size}, got {context}")

    def is_forced(self, draw: int) -> bool:
        """Whether the patch at position ``draw`` of the (per-rank) stream is foreground-centred."""
        return draw % self.batch_size >= self.batch_size - self.num_forced

    def __call__(self, entry: CachedCase, draw: int, rng: np.random.Generator, spacing: Sequence[float]) -> Patch:
        image = np.load(entry.image, mmap_mode="r")
        label = np.load(entry.label, mmap_mode="r")
        foreground = np.load(entry.foreground, mmap_mode="r")
        forced = self.is_forced(draw) and len(foreground) > 0
        if forced:
            centre = np.asarray(foreground[rng.integers(len(foreground))], int)
        else:
            inner = self.patch_size - 2 * self.context
            centre = random_start(image.shape, inner, rng) - self.context + self.patch_size // 2
        size = self.patch_size + 2 * self.margin
        start = centre - size // 2
        affine = np.diag([*spacing, 1.0])
        crop = tio.Subject(  # the transform's input: TorchIO transforms read the spacing from the affine
            image=tio.ScalarImage(tensor=torch.from_numpy(crop_with_padding(image, start, size, 0.0))[None], affine=affine),
            label=tio.LabelMap(tensor=torch.from_numpy(crop_with_padding(label, start, size, 0))[None], affine=affine),
        )
        if self.transform is not None:
            crop = self.transform(crop)
        # centre crop back to the patch (a transform may already have cut it, e.g. rotating only the patch voxels)
        p = self.patch_size
        m = (np.asarray(crop["image"].shape[1:]) - p) // 2
        window = (slice(None), *(slice(int(a), int(a + b)) for a, b in zip(m, p)))
        return Patch(
            image=crop["image"].data[window].float().contiguous(),
            label=crop["label"].data[window].to(torch.uint8).contiguous(),
            location=torch.as_tensor(np.concatenate([start + self.margin, start + self.margin + p])),
            foreground_forced=bool(forced),
            case_id=entry.case_id,
        )


class PatchDataset(Dataset):
    """The queue's subjects: item ``draw * num_cases + case`` (see EpochSubjectSampler) is that draw's ``Patch``."""

    def __init__(self, entries: Sequence[CachedCase], sampler: PatchSampler, spacing: Sequence[float], seed: int = 0,
                 partial_ids: frozenset[str] = frozenset()):
        self.entries = list(entries)
        self.sampler = sampler
        self.spacing = tuple(spacing)
        self.seed = seed
        self.partial_ids = frozenset(partial_ids)
        self.epoch = 0
        self.rank = 0

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, code: int) -> Patch:
        draw, case = divmod(int(code), len(self.entries))
        key = [self.seed, self.rank, self.epoch, draw]
        torch.manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))  # TorchIO transforms use torch's RNG
        patch = self.sampler(self.entries[case], draw, np.random.default_rng(key), self.spacing)
        patch.partial = patch.case_id in self.partial_ids
        return patch


class WholePatchSampler(tio.data.PatchSampler):
    """The queue's sampler when its items already are patches: yields the ``Patch`` itself."""

    def __init__(self, patch_size: Sequence[int]):
        super().__init__(tuple(int(p) for p in patch_size))

    def __call__(self, patch: Patch, num_patches: int | None = None) -> Iterator[Patch]:
        yield patch


class PatchQueue(tio.Queue):
    """``tio.Queue`` whose length comes from the subject sampler alone (no pass over the subjects)."""

    @property
    def iterations_per_epoch(self) -> int:
        return len(self.subject_sampler) * self.samples_per_volume


def collate_patches(patches: list[Patch]) -> dict:
    """The training batch: image (B, 1, x, y, z) float, label (B, 1, x, y, z) uint8, location (B, 6),
    foreground_forced (B,) bool, case_id (list of B), partial (B,) bool."""
    return {
        "image": torch.stack([p.image for p in patches]).float(),
        "label": torch.stack([p.label for p in patches]).to(torch.uint8),
        "location": torch.stack([torch.as_tensor(p.location) for p in patches]),
        "foreground_forced": torch.tensor([bool(p.foreground_forced) for p in patches]),
        "case_id": [p.case_id for p in patches],
        "partial": torch.tensor([bool(p.partial) for p in patches]),
    }


class EpochSubjectSampler(Sampler[int]):
    """Draws of one epoch as codes ``draw * num_subjects + subject``; ``samples_per_epoch`` per rank.

    Subjects come from concatenated random permutations, so every subject is drawn about equally often;
    with several ranks, rank ``r`` takes every ``world_size``-th draw, so each draw is used by one rank.
    ``set_epoch`` reshuffles (Lightning calls it through ``QueueSampler``).
    """

    def __init__(self, num_subjects: int, samples_per_epoch: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 dataset: PatchDataset | None = None):
        if num_subjects < 1:
            raise ValueError("no training subjects")
        self.num_subjects = num_subjects
        self.samples_per_epoch = samples_per_epoch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.dataset = dataset
        self.epoch = 0
        if dataset is not None:
            dataset.rank = rank

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.dataset is not None:
            self.dataset.epoch = epoch

    def subjects(self) -> list[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        total = self.samples_per_epoch * self.world_size
        rounds = -(-total // self.num_subjects)
        order = np.concatenate([rng.permutation(self.num_subjects) for _ in range(rounds)])[:total]
        return order[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(draw * self.num_subjects + s for draw, s in enumerate(self.subjects()))

    def __len__(self) -> int:
        return self.samples_per_epoch


class QueueSampler(Sampler[int]):
    """Sequential indices over a ``tio.Queue``; forwards ``set_epoch`` (called by Lightning) to the subject sampler."""

    def __init__(self, queue: tio.Queue):
        self.queue = queue

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.queue.subject_sampler, "set_epoch"):
            self.queue.subject_sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self)))

    def __len__(self) -> int:
        return len(self.queue)


def build_patch_loader(entries: Sequence[CachedCase], sampler: PatchSampler, spacing: Sequence[float],
                       iterations_per_epoch: int, num_workers: int = 0, seed: int = 0, rank: int = 0,
                       world_size: int = 1, queue_length: int = 8,
                       partial_ids: frozenset[str] = frozenset()) -> torch.utils.data.DataLoader:
    """The training loader: PatchDataset -> PatchQueue (workers cut and augment) -> batches of ``sampler.batch_size``;
    patches of the cases in ``partial_ids`` carry ``partial`` True."""
    dataset = PatchDataset(entries, sampler, spacing, seed, partial_ids)
    subject_sampler = EpochSubjectSampler(len(entries), iterations_per_epoch * sampler.batch_size, seed, rank, world_size, dataset)
    queue = PatchQueue(
        dataset,
        max_length=max(queue_length, sampler.batch_size),
        samples_per_volume=1,
        sampler=WholePatchSampler(sampler.patch_size),
        subject_sampler=subject_sampler,
        shuffle_subjects=False,
        shuffle_patches=False,  # keeps the batch positions of the foreground rule
        num_workers=num_workers,
        start_background=False,
    )
    return torch.utils.data.DataLoader(queue, batch_size=sampler.batch_size, sampler=QueueSampler(queue),
                                       num_workers=0, collate_fn=collate_patches)
