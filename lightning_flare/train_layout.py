"""Channels-last training on the CPU: the network's weights and each batch in the channels-last layout during fit.

Measured on an Intel Xeon with AMX, one training step of the 4-stage U-Net (batch 2 x 48^3), interleaved in one
process (``benchmarks/train_layout.py``): in fp32, channels-last takes 0.83-0.93x the time of the contiguous
layout (oneDNN free / capped below AMX); in bf16 with AMX it takes ~1.6x. So "auto" turns it on for fp32 training on
the CPU only (``MeasuredCpuPrecision`` picks fp32 on CPUs without fast bf16), and leaves GPUs as they are."""
from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

FP32 = ("32-true", "32", "64-true", "64")


def use_channels_last_training(setting: bool | str, device: torch.device | str, precision: str) -> bool:
    """``setting`` true / false, or "auto": the CPU in full precision (``precision``: the trainer's)."""
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise ValueError(f"ChannelsLastTraining enabled must be true, false or 'auto', got {setting!r}")
    return torch.device(device).type == "cpu" and str(precision) in FP32


class ChannelsLastTraining(Callback):
    """Puts ``pl_module.net`` in ``torch.channels_last_3d`` for the fit (before the optimizer and any DDP wrapper
    see the parameters; the same Parameter objects, so nothing else changes) and each training batch's image with
    it; back to the contiguous layout when the fit ends, so checkpoints, tests and exports afterwards see the usual
    layout. Numerically the same function (kernels differ in rounding only)."""

    def __init__(self, enabled: bool | str = "auto") -> None:
        use_channels_last_training(enabled, "cpu", "32-true")  # validates the setting now, not at fit time
        self.enabled = enabled
        self.active = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.active = use_channels_last_training(self.enabled, trainer.strategy.root_device, trainer.precision)
        if self.active:
            pl_module.net.to(memory_format=torch.channels_last_3d)
            rank_zero_info(f"ChannelsLastTraining: channels-last layout for {trainer.precision} training on the CPU")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self.active and isinstance(batch, dict) and isinstance(batch.get("image"), torch.Tensor) \
                and batch["image"].ndim == 5:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last_3d)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.active:
            pl_module.net.to(memory_format=torch.contiguous_format)
            self.active = False
