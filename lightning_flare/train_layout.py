"""Channels-last training on the CPU: the network's weights in the channels-last layout during fit, where a timed
training step of the network says it is faster on this CPU.

Measured on an Intel Xeon with AMX, one training step of the 4-stage U-Net (batch 2 x 48^3), interleaved in one
process (``benchmarks/train_layout.py``): in fp32, channels-last takes 0.93x the time of the contiguous layout with
oneDNN free and 0.87x capped below AMX (the kernels of an AVX512_BF16 CPU without AMX); in bf16 it takes 1.3-1.7x.
Other CPUs were not measured, so "auto" times both layouts on the fit's own network and batch shape before
training (12 forward + backward passes, the median of 5 per layout; the median of 3 passes of one sample gave
0.72x and 1.00x in two fits on the CPU above) and only for fp32 training on the CPU; bf16, 16-bit and GPUs keep the
contiguous layout."""
from __future__ import annotations

import statistics
import time
from copy import deepcopy
from typing import Callable, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

FULL_PRECISION = ("32-true", "32")
MARGIN = 0.95  # channels-last must take under 95 % of the contiguous layout's time


def use_channels_last_training(setting: bool | str, device: torch.device | str, precision: str,
                               measure: Callable[[], bool]) -> bool:
    """``setting`` true / false, or "auto": ``measure()`` for fp32 training on the CPU (``precision``: the trainer's),
    otherwise false."""
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise ValueError(f"ChannelsLastTraining enabled must be true, false or 'auto', got {setting!r}")
    return torch.device(device).type == "cpu" and str(precision) in FULL_PRECISION and measure()


def time_training_layouts(net: nn.Module, shape: Sequence[int], repeats: int = 5) -> dict[str, float]:
    """Median seconds of one forward + backward of copies of ``net`` on a random batch of ``shape`` in each layout
    (``contiguous``, ``channels_last``), alternating after one warm-up each, so that other work slows both alike
    (the median, not the best: on the CPU measured, the gain is fewer slow steps more than a faster best step)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=generator)
    layouts = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last_3d}
    copies = {k: deepcopy(net).train().to(memory_format=f) for k, f in layouts.items()}

    def step(key: str) -> float:
        start = time.perf_counter()
        outputs = copies[key](x.contiguous(memory_format=layouts[key]))
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        sum(o.float().square().mean() for o in outputs).backward()
        return time.perf_counter() - start

    for key in copies:
        step(key)
    times: dict[str, list[float]] = {key: [] for key in copies}
    for _ in range(repeats):
        for key in copies:
            times[key].append(step(key))
    return {key: statistics.median(values) for key, values in times.items()}


def _probe_shape(trainer: L.Trainer, net: nn.Module) -> tuple[int, ...]:
    """The fit's batch (the data module's ``batch_size`` x ``patch_size``; 2 x 48^3 without them), the net's
    input channels."""
    conv = next((m for m in net.modules() if isinstance(m, nn.Conv3d)), None)
    data = getattr(trainer, "datamodule", None)
    patch = getattr(data, "patch_size", None) or (48, 48, 48)
    return (int(getattr(data, "batch_size", None) or 2), conv.in_channels if conv is not None else 1, *map(int, patch))


def set_layout(net: nn.Module, channels_last: bool) -> None:
    """5-D parameters in place (the same Parameter objects) channels-last or contiguous. A weight that already is
    both (one input channel, a 1x1x1 kernel) keeps its strides: autograd gives its gradient those, and DDP's
    reducer compares every stride ("Grad strides do not match bucket view strides")."""
    for param in net.parameters():
        if param.dim() != 5:
            continue
        if channels_last and not param.is_contiguous(memory_format=torch.channels_last_3d):
            param.data = param.data.contiguous(memory_format=torch.channels_last_3d)
        elif not channels_last and not param.is_contiguous():
            param.data = param.data.contiguous()


class ChannelsLastTraining(Callback):
    """Puts ``pl_module.net`` in ``torch.channels_last_3d`` for the fit, before the optimizer and any DDP wrapper
    see the parameters (the same Parameter objects; the DDP ranks follow rank 0's choice), and the optimizer state
    in its parameters' layout at train start (a resumed checkpoint's momentum); back to the contiguous layout when
    the fit ends or fails, so that whatever uses the module afterwards sees the usual layout. Numerically the same
    function (the kernels differ in rounding only). Checkpoints written during the fit hold channels-last tensors,
    which load into either layout."""

    def __init__(self, enabled: bool | str = "auto") -> None:
        use_channels_last_training(enabled, "cpu", "bf16-mixed", lambda: False)  # refuses a bad setting now
        self.enabled = enabled
        self.active = False
        self.timings: dict[str, float] = {}

    def _measure(self, trainer: L.Trainer, net: nn.Module) -> bool:
        self.timings = time_training_layouts(net, _probe_shape(trainer, net))
        return self.timings["channels_last"] < MARGIN * self.timings["contiguous"]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.active = use_channels_last_training(self.enabled, trainer.strategy.root_device, trainer.precision,
                                                 lambda: self._measure(trainer, pl_module.net))
        self.active = bool(trainer.strategy.broadcast(self.active, src=0))
        timed = ", ".join(f"{k} {v:.3f} s" for k, v in self.timings.items())
        rank_zero_info(f"ChannelsLastTraining: {'channels-last' if self.active else 'contiguous'} layout for "
                       f"{trainer.precision} training" + (f" (one step timed: {timed})" if timed else ""))
        if self.active:
            set_layout(pl_module.net, channels_last=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for optimizer in trainer.optimizers:  # restored momentum keeps the layout it was saved in
            for param, state in optimizer.state.items():
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                        state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.active:
            set_layout(pl_module.net, channels_last=False)
            self.active = False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")
