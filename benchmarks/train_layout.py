"""One training step of the 4-stage U-Net on the CPU in the contiguous layout (nnU-Net's) and in the channels-last
layout (``lightning_flare.train_layout.ChannelsLastTraining``), same weights and batch, interleaved in one process.

    .venv/bin/python benchmarks/train_layout.py [--repeats 8] [--isa ALL AVX512_CORE_BF16] [--patch 48 48 48] [--batch 2]

Rows: fp32 and bf16 autocast, each with oneDNN free (``ALL``) and capped below AMX (``AVX512_CORE_BF16``: the
kernels of an AVX512_BF16 CPU without AMX), in fresh subprocesses. A step is forward (deep supervision), Dice+CE,
backward and SGD. Times: median and minimum over ``--repeats`` interleaved steps after two warm-up steps; the
first step's loss difference between the layouts is printed. The last column: what ``ChannelsLastTraining("auto")``
would choose from these medians (its own timing, before a fit: the median of five forward + backward passes of
the fit's batch per layout).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table  # noqa: E402
from step_timing import interleaved_times, training_step  # noqa: E402
from lightning_flare.cpu_precision import cpu_model  # noqa: E402
from lightning_flare.network import PlainConvUNet  # noqa: E402
from lightning_flare.train_layout import FULL_PRECISION, MARGIN, set_layout  # noqa: E402


def measure(dtype: str, repeats: int, patch: list[int], batch: int) -> dict:
    torch.manual_seed(0)
    net = PlainConvUNet(deep_supervision=True)
    nets = {"contiguous": net, "channels_last": copy.deepcopy(net)}
    set_layout(nets["channels_last"], channels_last=True)  # as ChannelsLastTraining
    x = torch.randn(batch, 1, *patch)
    inputs = {"contiguous": x, "channels_last": x.contiguous(memory_format=torch.channels_last_3d)}
    labels = (torch.rand(batch, 1, *patch) > 0.8).long()
    run = training_step(nets, inputs, labels, dtype == "bf16")
    first = {k: float(run(k)) for k in nets}  # warm-up 1 (the same weights: the loss must agree up to rounding)
    for k in nets:
        run(k)
    return {"loss_difference": abs(first["contiguous"] - first["channels_last"]),
            **interleaved_times(run, list(nets), repeats)}

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--isa", nargs="+", default=["ALL", "AVX512_CORE_BF16"])
    p.add_argument("--patch", nargs=3, type=int, default=[48, 48, 48], help="z y x of the training patch")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--child", metavar="DTYPE", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.repeats, args.patch, args.batch)))
        return
    print(f"CPU: {cpu_model()}; torch {torch.__version__}; {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.2f}")
    rows = []
    for isa in args.isa:
        for dtype in ("fp32", "bf16"):
            cmd = [sys.executable, __file__, "--child", dtype, "--repeats", str(args.repeats),
                   "--patch", *map(str, args.patch), "--batch", str(args.batch)]
            out = subprocess.run(cmd, env={**os.environ, "ONEDNN_MAX_CPU_ISA": isa}, capture_output=True,
                                 text=True, check=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            ratio = r["channels_last_median"] / r["contiguous_median"]
            auto = ("32-true" if dtype == "fp32" else "bf16-mixed") in FULL_PRECISION and ratio < MARGIN
            rows.append([isa, dtype, r["contiguous_median"], r["channels_last_median"],
                         ratio, r["contiguous_min"],
                         r["channels_last_min"], f"{r['loss_difference']:.1e}",
                         "channels-last" if auto else "contiguous"])
    print(format_table(["oneDNN ISA cap", "precision", "contiguous s (median)", "channels-last s (median)",
                        "channels-last / contiguous", "contiguous s (min)", "channels-last s (min)",
                        "|loss difference|", "auto uses"], rows,
                       title=f"Training step layout, batch {args.batch} x {args.patch}"))
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
