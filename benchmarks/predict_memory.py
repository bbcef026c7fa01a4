"""Peak memory of ``cli.py predict`` on one large scan (default 512 x 512 x 1000 at 0.8 x 0.8 x 1 mm), FLARE24 config.

Goal (issue "Fast, memory-bounded predictor"): within 6 GB RSS on the CPU. The table compares the measured
peaks with that goal and with the arrays a predictor that keeps everything would hold at once: the input
as float32, and the class probabilities on the original grid as float32 (2 classes).

Weights: the FLARE24 network with random (seeded) weights, or ``--ckpt`` (a checkpoint of this project).
Memory is sampled every 0.1 s over the whole process tree (summed RSS, and summed PSS, which counts pages
that forked loader workers share with the main process once), plus the largest single process (``wait4``).

Run with the project environment:  .venv/bin/python benchmarks/predict_memory.py   (about 4-6 minutes on 2 cores)
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, format_table, run_measured, synthetic_ct, write_nifti  # noqa: E402

GOAL_MB = 6 * 1024
THREADS = 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=(512, 512, 1000), metavar=("X", "Y", "Z"))
    p.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 1.0), metavar=("SX", "SY", "SZ"))
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1],
                   help="--data.num_workers values to measure (0: everything in the main process)")
    p.add_argument("--ckpt", default=None, help="checkpoint to use (default: random FLARE24 weights)")
    p.add_argument("--config", default=str(REPO / "configs" / "flare24.yaml"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=str(REPO / "cache" / "benchmarks" / "predict_memory"))
    return p.parse_args(argv)


def random_checkpoint(work: Path, seed: int) -> Path:
    """FLARE24 network with random weights, written through the nnU-Net import (as benchmarks/predict.py)."""
    from predict import write_models

    _, ckpt, _ = write_models(work, seed)
    return ckpt


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work_dir).resolve()
    shape, spacing = tuple(args.shape), tuple(args.spacing)
    in_dir = work / "in"
    name = f"SCAN{shape[0]}x{shape[1]}x{shape[2]}"
    image = in_dir / f"{name}_0000.nii.gz"
    from lightning_flare.cpu_precision import cpu_model

    print(f"predict memory benchmark: CPU {cpu_model()}; python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    if not image.is_file():
        for stale in in_dir.glob("*.nii.gz"):
            stale.unlink()
        hu, _ = synthetic_ct(shape, spacing, seed=args.seed)
        write_nifti(hu, spacing, image)
        del hu
    ckpt = Path(args.ckpt) if args.ckpt else random_checkpoint(work, args.seed)
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), WANDB_MODE="offline", WANDB_SILENT="true")
    voxels = int(np.prod(shape))
    rows = []
    for workers in args.workers:
        out = work / f"out_workers{workers}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, str(REPO / "cli.py"), "predict", "--config", args.config, "--ckpt_path", str(ckpt),
               "--data.predict_dir", str(in_dir), "--writer.output_dir", str(out), "--writer.overwrite", "true",
               "--data.num_workers", str(workers), "--trainer.accelerator", "cpu", "--trainer.logger", "false",
               "--trainer.default_root_dir", str(work / "lightning_root")]
        result = run_measured(cmd, env=env, cwd=REPO, log=work / f"workers{workers}.log")
        if result["returncode"] != 0:
            raise SystemExit(f"cli.py predict failed, see {work / f'workers{workers}.log'}:\n{result['output'][-3000:]}")
        stages = ""
        with open(out / "efficiency.csv") as f:
            row = next(r for r in csv.DictReader(f) if r.get("case") == name)
        stages = ", ".join(f"{k} {float(row[k]):.0f}" for k in ("read", "preprocess", "network", "postprocess", "write")
                           if row.get(k) not in (None, "")) + " s"
        worst = max(result["peak_tree_mb"], result["peak_tree_pss_mb"])
        rows.append([f"cli.py predict, {workers} loader worker(s)", result["seconds"], f"{result['peak_tree_mb']:.0f}",
                     f"{result['peak_tree_pss_mb']:.0f}", f"{result['peak_process_mb']:.0f}",
                     f"{worst / GOAL_MB:.2f}", stages])
    rows.append(["reference: the input as float32", "", f"{voxels * 4 / 2**20:.0f}", "", "", "", "one array"])
    rows.append(["reference: 2-class float32 probabilities at input size", "", f"{voxels * 8 / 2**20:.0f}", "", "", "",
                 "what slab-wise resampling avoids"])
    rows.append(["goal", "", f"{GOAL_MB}", f"{GOAL_MB}", "", "1.00", "issue: <= 6 GB RSS on the CPU"])
    print(format_table(["run", "seconds", "peak tree RSS MB", "peak tree PSS MB", "largest process MB",
                        "peak / goal", "stages (efficiency.csv)"], rows,
                       f"{name} at {spacing} mm, {voxels / 1e6:.0f} M voxels, config {Path(args.config).name}"))
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
