"""Patch sampling for ``tio.Queue``: nnU-Net's foreground oversampling, read from memory-mapped cache files."""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torchio as tio
from torch.utils.data import Sampler

from .preprocessing import CachedCase


def make_subject(entry: CachedCase, spacing: Sequence[float]) -> tio.Subject:
    """A lightweight subject: images stay on disk; the sampler reads only the crops it needs."""
    affine = np.diag([*spacing, 1.0])
    return tio.Subject(
        image=tio.ScalarImage(entry.image, affine=affine, reader=_npy_reader),
        label=tio.LabelMap(entry.label, affine=affine, reader=_npy_reader),
        case_id=entry.case_id,
        foreground_path=str(entry.foreground),
    )


def _npy_reader(path) -> tuple[torch.Tensor, np.ndarray]:
    array = np.load(path)
    return torch.from_numpy(array.astype(np.float32))[None], np.eye(4)


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


class ForegroundOversamplingSampler(tio.data.PatchSampler):
    """nnU-Net's rule: in each batch of ``batch_size`` the last ``round(batch_size * oversample)`` patches are
    centred on a random foreground voxel, the others on a uniformly random voxel (so border voxels can be
    centres; the outside is padded). Cases without foreground fall back to uniform.

    The batch position comes from a running patch counter, so the queue must yield patches in the order
    they were sampled (``shuffle_patches=False``) with one patch per subject draw (``samples_per_volume=1``).

    ``transform`` augments each patch; spatial transforms get a crop enlarged by ``margin`` voxels per side,
    which is centre-cropped back to the patch size afterwards (so rotations do not pull in padding and the
    cost does not depend on the size of the scan).
    """

    def __init__(
        self,
        patch_size: Sequence[int],
        batch_size: int,
        oversample_foreground: float = 0.33,
        transform: Callable[[tio.Subject], tio.Subject] | None = None,
        margin: Sequence[int] | int = 0,
        seed: int | None = None,
    ):
        super().__init__(tuple(int(p) for p in patch_size))
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= oversample_foreground <= 1:
            raise ValueError(f"oversample_foreground must be in [0, 1], got {oversample_foreground}")
        self.batch_size = batch_size
        self.num_forced = int(round(batch_size * oversample_foreground))
        self.transform = transform
        self.margin = np.broadcast_to(np.asarray(margin, int), (3,)).copy()
        self.rng = np.random.default_rng(seed)
        self.counter = 0

    def force_foreground_now(self) -> bool:
        position = self.counter % self.batch_size
        self.counter += 1
        return position >= self.batch_size - self.num_forced

    def __call__(self, subject: tio.Subject, num_patches: int | None = None) -> Iterator[tio.Subject]:
        return self._generate_patches(subject, num_patches)

    def _generate_patches(self, subject: tio.Subject, num_patches: int | None = None) -> Iterator[tio.Subject]:
        image = np.load(subject["image"].path, mmap_mode="r")
        label = np.load(subject["label"].path, mmap_mode="r")
        foreground = np.load(subject["foreground_path"])
        count = 0
        while num_patches is None or count < num_patches:
            forced = self.force_foreground_now()
            yield self.sample(subject, image, label, foreground, forced)
            count += 1

    def sample(self, subject, image: np.ndarray, label: np.ndarray, foreground: np.ndarray, forced: bool) -> tio.Subject:
        if forced and len(foreground):
            centre = foreground[self.rng.integers(len(foreground))]
        else:
            centre = np.array([self.rng.integers(s) for s in image.shape])
        size = self.patch_size.astype(int) + 2 * self.margin
        start = centre - size // 2
        patch = tio.Subject(
            image=tio.ScalarImage(tensor=torch.from_numpy(crop_with_padding(image, start, size, 0.0))[None], affine=subject["image"].affine),
            label=tio.LabelMap(tensor=torch.from_numpy(crop_with_padding(label, start, size, 0))[None], affine=subject["label"].affine),
            case_id=subject["case_id"],
            foreground_forced=bool(forced and len(foreground)),
        )
        if self.transform is not None:
            patch = self.transform(patch)
        if np.any(self.margin):
            m = self.margin
            p = self.patch_size.astype(int)
            for key in ("image", "label"):
                data = patch[key].data[:, m[0] : m[0] + p[0], m[1] : m[1] + p[1], m[2] : m[2] + p[2]]
                patch[key].set_data(data.contiguous())
        location = np.concatenate([start + self.margin, start + self.margin + self.patch_size.astype(int)])
        patch[tio.LOCATION] = torch.as_tensor(location)
        return patch


def collate_patches(patches: list[tio.Subject]) -> dict:
    """Batch of patches as plain tensors: image (B, 1, x, y, z) float, label (B, 1, x, y, z) uint8."""
    return {
        "image": torch.stack([p["image"].data for p in patches]).float(),
        "label": torch.stack([p["label"].data for p in patches]).to(torch.uint8),
        "location": torch.stack([torch.as_tensor(p[tio.LOCATION]) for p in patches]),
        "foreground_forced": torch.tensor([bool(p["foreground_forced"]) for p in patches]),
        "case_id": [p["case_id"] for p in patches],
    }


class EpochSubjectSampler(Sampler[int]):
    """Subject indices for one epoch: concatenated random permutations, ``samples_per_epoch`` per rank.

    Every subject is drawn about equally often; with several ranks, rank ``r`` takes every
    ``world_size``-th draw, so a subject is used by one rank per draw. ``set_epoch`` reshuffles.
    """

    def __init__(self, num_subjects: int, samples_per_epoch: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if num_subjects < 1:
            raise ValueError("no training subjects")
        self.num_subjects = num_subjects
        self.samples_per_epoch = samples_per_epoch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> list[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        total = self.samples_per_epoch * self.world_size
        rounds = -(-total // self.num_subjects)
        order = np.concatenate([rng.permutation(self.num_subjects) for _ in range(rounds)])[:total]
        return order[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

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
        return len(self.queue.subject_sampler) * self.queue.samples_per_volume
