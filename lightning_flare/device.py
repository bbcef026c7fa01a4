"""The host/device boundary: how results leave the accelerator, and how device work is timed.

Lightning moves every tensor of a batch to the model's device before a step runs. Inside the steps, tensors stay
where they are; whatever NumPy / SciPy code needs (component labelling, FLARE scores, NIfTI masks) is brought to
the host by ``to_host`` only, never by ``.numpy()`` on a tensor that may live on a GPU."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


def to_host(x: Any) -> np.ndarray:
    """A NumPy copy (or view, for host tensors) of a tensor on any device, or ``np.asarray`` of anything else."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the work queued on a CUDA ``device`` (a timer read after it then includes that work); no-op elsewhere."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
