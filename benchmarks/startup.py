"""Start-up of the two predict commands, side by side in one run: ``cli.py predict`` (LightningCLI) and
``python -m lightning_flare.predict`` (no Lightning), same checkpoint, same settings, same one scan. Prints the
``(start-up)`` row of each ``efficiency.csv`` (process start to the first case), the case's seconds and the
whole command's wall time, each the median of ``--repeats`` fresh processes.

    .venv/bin/python benchmarks/startup.py [--ckpt runs/demo/checkpoints/last.ckpt] [--config configs/demo.yaml]
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, format_table  # noqa: E402
from lightning_flare.cpu_precision import cpu_model  # noqa: E402  (lscpu's Model name)


def measure(cmd: list[str], out: Path) -> tuple[float, float, float]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    rows = list(csv.DictReader(open(out / "efficiency.csv")))
    return float(rows[0]["total_s"]), float(rows[1]["total_s"]), wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(REPO / "runs" / "demo" / "checkpoints" / "last.ckpt"))
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    p.add_argument("--image", default=None, help="one scan (default: the demo's first test case)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work-dir", default=str(REPO / "cache" / "benchmarks" / "startup"))
    args = p.parse_args()
    work = Path(args.work_dir)
    inputs = work / "inputs"
    shutil.rmtree(inputs, ignore_errors=True)
    inputs.mkdir(parents=True)
    image = Path(args.image) if args.image else sorted((REPO / "data" / "Dataset900_Synthetic" / "imagesTs").glob("*.nii.gz"))[0]
    shutil.copy(image, inputs / image.name)
    print(f"CPU: {cpu_model()}; load average {os.getloadavg()[0]:.2f}; scan {image.name}; checkpoint {args.ckpt}")
    commands = {
        "cli.py predict (Lightning)": [sys.executable, str(REPO / "cli.py"), "predict", "--config", args.config,
                                       "--ckpt_path", args.ckpt, "--data.predict_dir", str(inputs),
                                       "--writer.output_dir", str(work / "lightning"), "--trainer.logger", "false",
                                       "--data.num_workers", "0", "--trainer.enable_progress_bar", "false"],
        "python -m lightning_flare.predict": [sys.executable, "-m", "lightning_flare.predict", "--ckpt", args.ckpt,
                                              "-i", str(inputs), "-o", str(work / "lean"), "--config", args.config],
    }
    outs = {"cli.py predict (Lightning)": work / "lightning", "python -m lightning_flare.predict": work / "lean"}
    results = {name: [] for name in commands}
    for _ in range(args.repeats):  # interleaved, so that both see the same background load
        for name, cmd in commands.items():
            results[name].append(measure(cmd, outs[name]))
    rows = [[name, *(statistics.median(r[i] for r in runs) for i in range(3))] for name, runs in results.items()]
    print(format_table(["command", "start-up s", "case s", "wall s"], rows,
                       title=f"Start-up (process start to the first case), median of {args.repeats}"))


if __name__ == "__main__":
    main()
