"""One prepared device check: CUDA + AMP training steps, then the predictor's seconds per case and GPU memory.

For a session that is lent a GPU machine (see the README of this folder). In one command it
  1. prints the device, torch and CUDA versions;
  2. trains a few steps of the 4-stage U-Net on a small synthetic dataset with fp16 AMP on the GPU, once with
     CPU augmentation in the loader and once with the batch augmentation on the GPU, and checks that every
     logged loss is finite;
  3. predicts a synthetic 512 x 512 x 300 scan (0.8 x 0.8 x 2.5 mm) with the FLARE24 configuration and random
     (seeded) weights, three copies so that the later cases show the steady state, with preprocessing in the
     loader (nnU-Net resampling) and on the device (``--data.preprocess_on device --data.resampling fast``),
     the latter also with the channels-last window layout (``--model.sw_channels_last true``);
  4. prints one table (seconds per case, network seconds, peak GPU memory, GPU memory-time area, peak RSS)
     against the issue's goal (<= 2 s and <= 2 GB per 512 x 512 x 300 case on an H100) and writes it, with the
     efficiency.csv files, under ``--out``.
It exits 1 if a check fails. ``--allow-cpu --quick`` runs the same steps on the CPU with a small scan (a dry run
of the script itself; the figures then mean nothing for the goal).

Run with the project environment:  python benchmarks/gpu_check.py --out $OUT
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # cli.py
from common import REPO, format_table, run_measured, synthetic_ct, write_nifti  # noqa: E402

GOAL_SECONDS, GOAL_GPU_MB = 2.0, 2048.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "cache" / "benchmarks" / "gpu_check" / "out"),
                   help="where the table and the efficiency.csv files go (e.g. $OUT on the device machine)")
    p.add_argument("--work-dir", default=str(REPO / "cache" / "benchmarks" / "gpu_check"))
    p.add_argument("--allow-cpu", action="store_true", help="run on the CPU when CUDA is absent (dry run)")
    p.add_argument("--quick", action="store_true", help="a 128 x 128 x 40 scan and fewer training steps")
    p.add_argument("--copies", type=int, default=3, help="copies of the scan to predict (seconds per case)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def train_check(work: Path, accelerator: str, precision: str, augmentation_device: str, steps: int) -> dict:
    """A few fit steps on a small synthetic dataset; every logged training loss must be finite."""
    import cli
    from lightning_flare.synthetic import write_dataset

    data = work / "Dataset905_GpuCheck"
    if not (data / "dataset.json").is_file():
        write_dataset(data, num_train=6, num_test=1, seed=5)
    out = work / f"fit_{augmentation_device}"
    shutil.rmtree(out, ignore_errors=True)
    args = ["fit", "--config", str(REPO / "configs" / "demo.yaml"), "--data.data_dir", str(data),
            "--data.cache_dir", str(work / "cache"), "--data.iterations_per_epoch", str(steps),
            "--data.augmentation_device", augmentation_device, "--data.num_workers", "2",
            "--trainer.accelerator", accelerator, "--trainer.precision", precision, "--trainer.max_epochs", "1",
            "--trainer.limit_val_batches", "0", "--trainer.logger", "false", "--trainer.callbacks", "[]",
            "--trainer.log_every_n_steps", "1", "--trainer.enable_checkpointing", "false",
            "--trainer.default_root_dir", str(out), "--trainer.enable_progress_bar", "false"]
    start = time.perf_counter()
    result = cli.main(args)
    seconds = time.perf_counter() - start
    metrics = {k: float(v) for k, v in result.trainer.callback_metrics.items() if k.startswith("train/loss")}
    finite = bool(metrics) and all(math.isfinite(v) for v in metrics.values())
    return {"check": f"fit {steps} steps, {precision}, augmentation on {augmentation_device}",
            "ok": finite and result.trainer.global_step == steps, "seconds": seconds,
            "detail": f"global_step {result.trainer.global_step}, " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())}


def predict_run(work: Path, out_root: Path, ckpt: Path, in_dir: Path, accelerator: str, precision: str,
                label: str, extra: list[str]) -> list[dict]:
    out = out_root / f"predict_{label}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(REPO / "cli.py"), "predict", "--config", str(REPO / "configs" / "flare24.yaml"),
           "--ckpt_path", str(ckpt), "--data.predict_dir", str(in_dir), "--writer.output_dir", str(out),
           "--writer.overwrite", "true", "--trainer.accelerator", accelerator, "--trainer.precision", precision,
           "--trainer.logger", "false", "--trainer.default_root_dir", str(work / "lightning_root"), *extra]
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    result = run_measured(cmd, env=env, cwd=REPO, log=out_root / f"predict_{label}.log")
    if result["returncode"] != 0:
        raise SystemExit(f"cli.py predict ({label}) failed, see {out_root / f'predict_{label}.log'}:\n"
                         f"{result['output'][-3000:]}")
    with open(out / "efficiency.csv") as f:
        rows = list(csv.DictReader(f))
    return [dict(row, run=label, process_s=result["seconds"]) for row in rows]


def fast_resampling_copy(ckpt: Path) -> Path:
    """The same weights with the plan's resampling set to 'fast' (trilinear, torch), which preprocessing on the
    device needs; a model trained that way would carry it itself."""
    import torch

    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    checkpoint["plan"] = dict(checkpoint["plan"], resampling="fast")
    path = ckpt.with_name(ckpt.stem + "_fast_resampling.ckpt")
    torch.save(checkpoint, path)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("no CUDA device: this check is for a GPU machine (--allow-cpu for a dry run on the CPU)")
        return 2
    accelerator, precision = ("gpu", "16-mixed") if cuda else ("cpu", "bf16-mixed")
    device = torch.cuda.get_device_name(0) if cuda else "CPU (dry run)"
    print(f"gpu check: {device}, torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
          f"{torch.backends.cudnn.version() if cuda else '-'}, {os.cpu_count()} CPUs")
    work, out_root = Path(args.work_dir).resolve(), Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out_root.mkdir(parents=True, exist_ok=True)

    steps = 4 if args.quick else 20
    checks = [train_check(work, accelerator, precision, "cpu", steps)]
    if cuda:
        checks.append(train_check(work, accelerator, precision, "gpu", steps))
    print(format_table(["check", "ok", "seconds", "detail"],
                       [[c["check"], "yes" if c["ok"] else "NO", c["seconds"], c["detail"]] for c in checks],
                       "training steps"))

    from predict import write_models  # random FLARE24 weights through the nnU-Net import

    _, ckpt, _ = write_models(work, args.seed)
    shape, spacing = ((128, 128, 40) if args.quick else (512, 512, 300)), (0.8, 0.8, 2.5)
    in_dir = work / f"inputs_{shape[0]}x{shape[1]}x{shape[2]}"
    if len(list(in_dir.glob("*.nii.gz"))) != args.copies:
        shutil.rmtree(in_dir, ignore_errors=True)
        hu, _ = synthetic_ct(shape, spacing, seed=args.seed)
        for k in range(args.copies):
            write_nifti(hu, spacing, in_dir / f"SCAN{k}_0000.nii.gz")
        del hu
    rows = predict_run(work, out_root, ckpt, in_dir, accelerator, precision, "loader", [])
    rows += predict_run(work, out_root, fast_resampling_copy(ckpt), in_dir, accelerator, precision, "device",
                        ["--data.preprocess_on", "device", "--data.resampling", "fast"])
    if cuda:  # the channels-last layout is the CPU default; whether it runs and pays on a GPU is measured here
        try:
            rows += predict_run(work, out_root, fast_resampling_copy(ckpt), in_dir, accelerator, precision,
                                "device_channels_last", ["--data.preprocess_on", "device", "--data.resampling",
                                                         "fast", "--model.sw_channels_last", "true"])
        except SystemExit as err:  # keep the other runs' table
            print(err)
            checks.append({"check": "predict with --model.sw_channels_last true", "ok": False, "seconds": float("nan"),
                           "detail": str(err)[:300]})
    table = []
    for r in rows:
        seconds, gpu_mb = float(r["total_s"]), float(r["peak_gpu_mb"])
        meets = "yes" if cuda and seconds <= GOAL_SECONDS and gpu_mb <= GOAL_GPU_MB else "no"
        table.append([r["run"], r["case"], seconds, float(r["network"]), gpu_mb, float(r["gpu_memory_area_mb_s"]),
                      float(r["peak_rss_mb"]), meets])
    text = format_table(["run", "case", "total s", "network s", "peak GPU MB", "GPU MB*s", "peak RSS MB",
                         f"<= {GOAL_SECONDS:.0f} s and <= {GOAL_GPU_MB / 1024:.0f} GB"], table,
                        f"predict, {shape[0]}x{shape[1]}x{shape[2]} at {spacing} mm, FLARE24 config, random weights, "
                        f"{precision}, {device}")
    print(text)
    (out_root / "gpu_check.md").write_text(text + "\n")
    (out_root / "gpu_check.json").write_text(json.dumps({"device": device, "checks": checks, "predict": rows}, indent=1))
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
