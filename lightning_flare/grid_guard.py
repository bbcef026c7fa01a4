"""Refuse a resampling whose target grid cannot fit in memory, before anything of that size is allocated.

A header with a wrong spacing (centimetres written as millimetres, a corrupt pixdim: 50 mm voxels) makes the
plan's grid thousands of voxels a side: the resampling then fills all memory and swaps or is killed, with no word
of which file did it. ``check_target_grid`` compares the working arrays on the target grid (``BYTES_PER_VOXEL``)
with the memory available to this process (Linux: ``MemAvailable``, and the cgroup's limit when it is lower) and
raises a ``ValueError`` that gives the spacing and the grid; the callers add the file.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from .resample import new_shape_for_spacing

# on the plan's grid while a case is predicted: the float32 image, two float32 class logits and the window-weight sum
BYTES_PER_VOXEL = 16


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def available_memory() -> int | None:
    """Bytes this process can still allocate (Linux), or None where that is not known."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    fields = {line.split(":")[0]: line.split()[1] for line in lines if ":" in line and len(line.split()) > 1}
    if "MemAvailable" not in fields:
        return None
    available = int(fields["MemAvailable"]) * 1024
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        available = min(available, max(limit - used, 0))
    return available


def check_target_grid(shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float],
                      available: int | None = None) -> tuple[int, ...]:
    """The shape of ``shape`` voxels at ``spacing`` resampled to ``target_spacing``; a ValueError when its working
    arrays would not fit in ``available`` bytes (default: ``available_memory()``; None: not checked)."""
    new_shape = new_shape_for_spacing(shape, spacing, target_spacing)
    available = available_memory() if available is None else available
    need = math.prod(new_shape) * BYTES_PER_VOXEL
    if available is not None and need > available:
        spacing_mm = ", ".join(f"{float(s):g}" for s in spacing)
        target_mm = ", ".join(f"{float(s):g}" for s in target_spacing)
        raise ValueError(f"{tuple(int(s) for s in shape)} voxels at ({spacing_mm}) mm resample to {new_shape} at the "
                         f"plan's ({target_mm}) mm: {math.prod(new_shape) / 1e6:.0f} M voxels, about "
                         f"{need / 2**30:.1f} GiB of working arrays, more than the {available / 2**30:.1f} GiB of memory "
                         f"available; check the spacing in the image header")
    return new_shape
