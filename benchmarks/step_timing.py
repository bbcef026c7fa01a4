"""Shared by the CPU step benchmarks (norm_speed.py, train_layout.py): one training step of a U-Net as the module
takes it, and interleaved timing of several variants of one step."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping

import torch
from torch import nn

from lightning_flare.loss import DeepSupervisionLoss, DiceCELoss, deep_supervision_weights, downsample_targets


def training_step(nets: Mapping[str, nn.Module], inputs: Mapping[str, torch.Tensor], labels: torch.Tensor,
                  bf16: bool) -> Callable[[str], torch.Tensor]:
    """``run(key)``: one step of ``nets[key]`` on ``inputs[key]`` (zero grad, forward with deep supervision under
    bf16 autocast or none, Dice+CE on fp32 outputs, backward, SGD with Nesterov momentum); returns the loss."""
    scales = [tuple(s) for s in next(iter(nets.values())).output_scales()]
    loss_fn = DeepSupervisionLoss(DiceCELoss(), deep_supervision_weights(len(scales)))
    targets = downsample_targets(labels, scales)
    optimisers = {k: torch.optim.SGD(v.parameters(), lr=1e-3, momentum=0.99, nesterov=True) for k, v in nets.items()}

    def run(key: str) -> torch.Tensor:
        optimisers[key].zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            outputs = nets[key](inputs[key])
        loss = loss_fn([o.float() for o in outputs], targets)
        loss.backward()
        optimisers[key].step()
        return loss.detach()

    return run


def interleaved_times(run: Callable[[str], object], keys, repeats: int) -> dict[str, float]:
    """``{key}_median`` and ``{key}_min`` seconds of ``run(key)`` over ``repeats`` rounds, the keys in turn in each
    round (other work on the machine slows them alike)."""
    times: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(repeats):
        for k in keys:
            start = time.perf_counter()
            run(k)
            times[k].append(time.perf_counter() - start)
    return {**{f"{k}_median": statistics.median(v) for k, v in times.items()},
            **{f"{k}_min": min(v) for k, v in times.items()}}
