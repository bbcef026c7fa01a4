"""The network's instance norm on the CPU: torch's ``nn.InstanceNorm3d`` (nnU-Net's: a view of a reshaped batch
norm, channels-last input copied to contiguous), ours before 2026-11-30 (torch's for contiguous input, batch norm
per channels-last sample) and ours (``lightning_flare.network.InstanceNorm3d``: group norm with one group per
channel), in the same 4-stage U-Net with the same weights, interleaved in one process.

    .venv/bin/python benchmarks/norm_speed.py [--repeats 8] [--isa ALL AVX512_CORE_BF16]
        [--train-patch 48 48 48] [--window 96 128 128]  (z y x)

Rows: one training step (batch 2, deep supervision, Dice+CE, SGD; fp32 and bf16 autocast) and one inference window
(batch 1, channels-last, fp32 and bf16), each with oneDNN free (``ALL``) and capped below AMX
(``AVX512_CORE_BF16``: an AVX512_BF16 CPU without AMX) in fresh subprocesses. Times are the median and the minimum
over ``--repeats`` interleaved runs after two warm-up runs; the largest difference of the outputs is printed.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table  # noqa: E402
from step_timing import interleaved_times, training_step  # noqa: E402
from lightning_flare.cpu_precision import cpu_model  # noqa: E402
from lightning_flare.network import InstanceNorm3d, PlainConvUNet  # noqa: E402


class PreviousInstanceNorm3d(nn.InstanceNorm3d):
    """Ours before group norm: torch's for contiguous input; batch norm with batch statistics per channels-last
    sample (the reference this benchmark compares against)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last_3d):
            return super().forward(x)
        out = torch.empty_like(x)
        for i in range(x.shape[0]):
            out[i : i + 1] = torch.batch_norm(x[i : i + 1], self.weight, self.bias, None, None, True, 0.0, self.eps,
                                              False)
        return out


def norm_copy(net: nn.Module, norm_class: type) -> nn.Module:
    """A copy of ``net`` whose norms are ``norm_class`` (same weights)."""
    other = copy.deepcopy(net)
    for m in other.modules():
        if isinstance(m, InstanceNorm3d):
            m.__class__ = norm_class
    return other


def measure(task: str, dtype: str, repeats: int, train_patch: list[int], window: list[int]) -> dict:
    torch.manual_seed(0)
    ours = PlainConvUNet(deep_supervision=task == "train")
    nets = {"torch": norm_copy(ours, nn.InstanceNorm3d), "previous": norm_copy(ours, PreviousInstanceNorm3d),
            "ours": ours}
    autocast = dict(device_type="cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    if task == "train":
        x = torch.randn(2, 1, *train_patch)
        labels = (torch.rand(2, 1, *train_patch) > 0.8).long()
        run = training_step(nets, {k: x for k in nets}, labels, dtype == "bf16")
    else:
        x = torch.randn(1, 1, *window).contiguous(memory_format=torch.channels_last_3d)
        for net in nets.values():
            net.to(memory_format=torch.channels_last_3d).eval()

        def run(key):
            with torch.no_grad(), torch.autocast(**autocast):
                return nets[key](x).float()
    first = {k: run(k) for k in nets}  # warm-up 1 (the training step also updates the weights)
    difference = float((first["torch"] - first["ours"]).abs().max())
    for k in nets:
        run(k)
    return {"difference": difference, **interleaved_times(run, list(nets), repeats)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--isa", nargs="+", default=["ALL", "AVX512_CORE_BF16"])
    p.add_argument("--train-patch", nargs=3, type=int, default=[48, 48, 48], help="z y x of the training patch")
    p.add_argument("--window", nargs=3, type=int, default=[96, 128, 128], help="z y x of the inference window")
    p.add_argument("--child", nargs=2, metavar=("TASK", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.repeats, args.train_patch, args.window)))
        return
    print(f"CPU: {cpu_model()}; torch {torch.__version__}; {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.2f}")
    rows = []
    for isa in args.isa:
        for task in ("train", "infer"):
            for dtype in ("fp32", "bf16"):
                cmd = [sys.executable, __file__, "--child", task, dtype, "--repeats", str(args.repeats),
                       "--train-patch", *map(str, args.train_patch), "--window", *map(str, args.window)]
                out = subprocess.run(cmd, env={**os.environ, "ONEDNN_MAX_CPU_ISA": isa}, capture_output=True,
                                     text=True, check=True).stdout.strip().splitlines()[-1]
                r = json.loads(out)
                rows.append([isa, task, dtype, r["torch_median"], r["previous_median"], r["ours_median"],
                             r["ours_median"] / r["torch_median"], r["ours_median"] / r["previous_median"],
                             r["torch_min"], r["previous_min"], r["ours_min"], f"{r['difference']:.2e}"])
    print(format_table(["oneDNN ISA cap", "task", "precision", "torch s (median)", "previous s (median)",
                        "ours s (median)", "ours / torch", "ours / previous", "torch s (min)", "previous s (min)",
                        "ours s (min)", "max |output difference|"], rows,
                       title=f"Instance norm: torch's vs ours (group norm), training step batch 2 x {args.train_patch}, "
                             f"inference window 1 x {args.window}"))
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
