"""Training precision on the CPU by measurement: bf16 autocast where it beats fp32 on this processor, else fp32."""
from __future__ import annotations

import contextlib

import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from .cpu_precision import cpu_bf16_is_faster


class MeasuredCpuPrecision(MixedPrecision):
    """A precision plugin for CPU training (``trainer.plugins``; leave ``trainer.precision`` unset): "bf16-mixed"
    where ``cpu_precision.cpu_bf16_is_faster()`` (AMX, Zen 4/5, ...), else full "32-true" (no autocast). On a
    GPU it autocasts nothing: use ``trainer.precision`` there."""

    def __init__(self) -> None:
        super().__init__("bf16-mixed", "cpu")
        if not cpu_bf16_is_faster():
            self.precision = "32-true"  # what trainer.precision then reports (and inference follows)

    def autocast_context_manager(self):
        if self.precision == "bf16-mixed":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()
