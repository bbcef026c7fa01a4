"""Timing of nnU-Net's augmentation, transform by transform."""
from __future__ import annotations

import time
from collections.abc import Sequence

import SimpleITK as sitk
import torch
import torchio as tio

from ._checks import _crop_margin
from .pipeline import NNUNET_INTENSITY_AND_MIRROR, nnunet_augmentation, nnunet_transforms


def time_transforms(patch_size: Sequence[int], repeats: int = 5, num_threads: int | None = 1,
                    seed: int = 0, crop: int | Sequence[int] = 0) -> dict[str, float]:
    """Seconds per call of each nnU-Net transform, forced to apply, on a random float32 image of ``patch_size``
    (one channel) with a uint8 label; plus ``"nnunet"``: the whole pipeline with its real probabilities (mean
    over ``repeats`` calls, so noisy for few repeats) and ``"nnunet_forced"``: everything applied.

    With ``crop`` the pipeline is ``build_augmentation("nnunet", crop=crop)``: the spatial transform gets
    ``patch_size`` and returns the centre, the other transforms are timed on that smaller size.

    ``num_threads`` (torch and SimpleITK) defaults to 1, like a DataLoader worker; ``None`` keeps the settings.
    One untimed warm-up call precedes the timed ones. Transforms never modify the input tensors in place, so the
    same tensors are wrapped in a fresh subject for each call.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}")
    shape = tuple(int(p) for p in patch_size)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"patch_size must be three positive integers, got {patch_size!r}")
    crop = _crop_margin(crop)
    inner = tuple(n - 2 * c for n, c in zip(shape, crop))
    if min(inner) < 1:
        raise ValueError(f"crop {crop} leaves nothing of patch_size {shape}")
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for size in {shape, inner}:
        tensors[size] = (torch.randn((1, *size), generator=generator),
                         (torch.rand((1, *size), generator=generator) < 0.3).to(torch.uint8))

    def subject(size=shape) -> tio.Subject:
        image, label = tensors[size]
        return tio.Subject(image=tio.ScalarImage(tensor=image), label=tio.LabelMap(tensor=label))

    old_torch, old_sitk = torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    rng_state = torch.random.get_rng_state()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(num_threads)
    try:
        torch.manual_seed(seed)
        candidates = dict(nnunet_transforms(forced=True, copy=False, crop=crop))
        candidates["nnunet_forced"] = tio.Compose(nnunet_transforms(forced=True, copy=False, crop=crop))
        candidates["nnunet"] = nnunet_augmentation(crop)
        timings = {}
        for name, transform in candidates.items():
            size = inner if name in NNUNET_INTENSITY_AND_MIRROR else shape
            transform(subject(size))
            start = time.perf_counter()
            for _ in range(repeats):
                transform(subject(size))
            timings[name] = (time.perf_counter() - start) / repeats
        return timings
    finally:
        torch.set_num_threads(old_torch)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(old_sitk)
        torch.random.set_rng_state(rng_state)
