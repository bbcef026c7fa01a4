"""Mirroring of a batch: each sample flipped along the axes it drew, image and label together."""
from __future__ import annotations

import torch


def _mirror(x: torch.Tensor, y: torch.Tensor | None, mirror: torch.Tensor) -> None:
    """Flip, in place, each sample along the axes it drew: one ``flip`` per pattern of axes (at most 7)."""
    code = mirror.long() @ torch.tensor([1, 2, 4])
    for pattern in code.unique().tolist():
        if pattern == 0:
            continue
        dims = [2 + axis for axis in range(3) if pattern >> axis & 1]
        index = (code == pattern).nonzero().flatten().to(x.device, non_blocking=True)
        for data in (x, y):
            if data is not None:
                data.index_copy_(0, index, data.index_select(0, index).flip(dims))
