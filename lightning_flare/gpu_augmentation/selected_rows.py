"""Applying a batched op to the rows (sample, channel) that drew it, with the host-side masks and values: the
other rows are neither read nor written, and an op that no row drew costs nothing."""
from __future__ import annotations

from collections.abc import Callable

import torch

from .intensity import _low_resolution_rows


def _apply_to_rows(rows: torch.Tensor, mask: torch.Tensor, function: Callable | None, values: torch.Tensor) -> None:
    """``rows[i] = function(rows[i], values[i])`` for the rows (sample, channel) selected by ``mask`` (host);
    ``values`` become (K, 1, 1, 1) (or (K, 3) for the blur) float32 on the rows' device. ``function=None``:
    low resolution (a loop with the host-side zooms)."""
    selected = mask.reshape(-1).nonzero().flatten()
    if selected.numel() == 0:
        return
    every = selected.numel() == rows.shape[0]
    index = selected.to(rows.device, non_blocking=True)
    values = values.reshape(mask.numel(), *values.shape[mask.ndim:])[selected]
    data = rows if every else rows.index_select(0, index)
    if function is None:
        out = _low_resolution_rows(data, values.tolist())
    else:
        if values.ndim == 1:
            values = values[:, None, None, None]
        out = function(data, values.to(rows.device, torch.float32, non_blocking=True))
    if every:
        rows.copy_(out)
    else:
        rows.index_copy_(0, index, out)


def _add_noise_to_rows(rows: torch.Tensor, mask: torch.Tensor, std: torch.Tensor,
                       device_generator: Callable[[torch.device], torch.Generator]) -> None:
    """Gaussian noise with the row's ``std`` added, in place, to the rows selected by ``mask`` (host); the noise
    field is drawn on the rows' device from ``device_generator(rows.device)``."""
    selected = mask.reshape(-1).nonzero().flatten()
    if selected.numel() == 0:
        return
    index = selected.to(rows.device, non_blocking=True)
    scale = std.reshape(-1)[selected][:, None, None, None].to(rows.device, torch.float32, non_blocking=True)
    noise = torch.randn((len(selected), *rows.shape[1:]), generator=device_generator(rows.device),
                        device=rows.device, dtype=torch.float32)
    rows.index_copy_(0, index, rows.index_select(0, index) + noise * scale)
