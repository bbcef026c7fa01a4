"""One prepared device check: every CUDA path of the framework once, then the predictor's seconds per case and GPU
memory.

For a session that is lent a GPU machine (see the README of this folder). In one command it
  1. prints the device, torch and CUDA versions;
  2. runs the CUDA-parametrised tests (``pytest -m 'not slow' -k cuda``: the GPU augmentation, the CLI stages on
     the GPU, the autocast rule);
  3. runs ``cli.py`` on a tiny synthetic dataset on the GPU, each stage a subprocess: ``fit`` (bf16-mixed; a
     pseudo-Dice epoch, then full-volume validation with component postprocessing), ``validate``, ``test`` with
     preprocessing on the device, ``predict`` with preprocessing in the loader;
  4. trains a few steps of the 4-stage U-Net with fp16 AMP, augmentation on the CPU (in the loader) and on the
     GPU (``--data.augmentation_device gpu``), and checks that every logged loss is finite;
  5. predicts a synthetic 512 x 512 x 300 scan (0.8 x 0.8 x 2.5 mm) with the FLARE24 configuration and random
     (seeded) weights, three copies so that the later cases show the steady state, with preprocessing in the
     loader (nnU-Net resampling) and on the device (``--data.preprocess_on device --data.resampling fast``),
     the latter also with the contiguous window layout (``--model.inference.sw_channels_last false``; ``auto`` is channels-last), and prints one
     table (seconds per case, transfer and network seconds, peak GPU memory of the process, GPU memory-time
     area, peak RSS) against the issue's goal (<= 2 s and <= 2 GB per 512 x 512 x 300 case on an H100).
Every check is a row of one table (ok / FAILED and the error line); the tables, ``gpu_check.json`` and every
subprocess's log go under ``--out`` (logs in ``--out/logs``). Exit status 1 if any check failed.
``--only-predict`` runs step 5 alone; ``--predict-set KEY=VALUE`` adds a LightningCLI override to its predict runs
(e.g. ``model.inference.largest_component=true``; with random weights that does not make the mask compact: the
speckle is one large component).
``--dry-run`` (= ``--allow-cpu --quick``) runs the same steps on the CPU with a small scan: it proves that the
script itself runs (the CUDA tests are then skipped and the figures mean nothing for the goal).

Run with the project environment:  python benchmarks/gpu_check.py --out $OUT
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # cli.py
from common import REPO, cli_overrides, format_table, run_measured, synthetic_ct, write_nifti  # noqa: E402

GOAL_SECONDS, GOAL_GPU_MB = 2.0, 2048.0


class CheckFailed(Exception):
    """A check's failure, with the line that says why."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "cache" / "benchmarks" / "gpu_check" / "out"),
                   help="where the tables, gpu_check.json and logs/ go (e.g. $OUT on the device machine)")
    p.add_argument("--work-dir", default=str(REPO / "cache" / "benchmarks" / "gpu_check"))
    p.add_argument("--allow-cpu", action="store_true", help="run on the CPU when CUDA is absent (dry run)")
    p.add_argument("--quick", action="store_true", help="a 128 x 128 x 40 scan and fewer training steps")
    p.add_argument("--dry-run", action="store_true", help="--allow-cpu --quick: check the script itself on the CPU")
    p.add_argument("--copies", type=int, default=3, help="copies of the scan to predict (seconds per case)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only-predict", action="store_true", help="only step 5, the predict benchmark")
    p.add_argument("--predict-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a LightningCLI override of every predict run (e.g. model.inference.largest_component=true)")
    args = p.parse_args(argv)
    try:
        args.predict_overrides = cli_overrides(args.predict_set, "--predict-set")
    except ValueError as err:
        p.error(str(err))
    if args.dry_run:
        args.allow_cpu = args.quick = True
    return args


# ----------------------------------------------------------------------------------------------- running checks
def error_line(output: str) -> str:
    """The line of a log that says what went wrong (the last error / FAILED line, else the last line)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.search(r"\b\w*(Error|Exception)\b|^FAILED|^E  |Traceback|error:", line):
            return line[:300]
    return lines[-1][:300] if lines else "(no output)"


def run_check(checks: list[dict], name: str, function) -> object:
    """Runs ``function`` (returns a detail string, or (detail, value)); records ok / FAILED and the error line."""
    start = time.perf_counter()
    value = None
    try:
        result = function()
        detail, value = result if isinstance(result, tuple) else (result, None)
        ok = True
    except CheckFailed as err:
        ok, detail = False, str(err)
    except Exception as err:  # noqa: BLE001 - any failure is a row of the table
        traceback.print_exc()
        ok, detail = False, f"{type(err).__name__}: {err}".splitlines()[0][:300]
    seconds = time.perf_counter() - start
    checks.append({"check": name, "ok": ok, "seconds": seconds, "detail": detail})
    print(f"[{'ok' if ok else 'FAILED'}] {name} ({seconds:.1f} s): {detail}", flush=True)
    return value


def run_logged(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """A subprocess with its output in ``log``; CheckFailed with the error line unless it exits 0."""
    env = dict(os.environ if env is None else env, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    result = run_measured(cmd, env=env, cwd=REPO, log=log)
    if result["returncode"] != 0:
        raise CheckFailed(f"exit {result['returncode']}: {error_line(result['output'])} (log: {log})")
    return result


# ----------------------------------------------------------------------------------------------- the checks
def cuda_tests(out_root: Path) -> str:
    """The CUDA-parametrised tests (skipped, not failed, without CUDA)."""
    log = out_root / "logs" / "pytest_cuda.log"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", "-k", "cuda", "tests"]
    result = run_measured(cmd, env=dict(os.environ, WANDB_MODE="offline"), cwd=REPO, log=log)
    output = result["output"]
    summary = next((line.strip("= ") for line in reversed(output.splitlines())
                    if re.search(r"\d+ (passed|failed|skipped|error)", line)), "no summary")
    if result["returncode"] != 0:
        failed = [line[len("FAILED "):].split(" - ")[0] for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))]
        raise CheckFailed(f"{summary}; {', '.join(failed[:4]) or error_line(output)} (log: {log})")
    return summary


def tiny_dataset(work: Path) -> Path:
    from lightning_flare.synthetic import write_dataset

    data = work / "Dataset906_GpuCheckTiny"
    if not (data / "dataset.json").is_file():
        write_dataset(data, num_train=6, num_test=2, seed=3, in_plane_size=64)
    return data


def tiny_args(data: Path, work: Path, out: Path, accelerator: str) -> list[str]:
    """configs/demo.yaml scaled down as the tests' tiny runs, on ``accelerator``; trilinear resampling so that test
    can preprocess on the device."""
    precision = "bf16-mixed"  # bf16 training: inference must follow it (not fp16)
    return ["--config", str(REPO / "configs" / "demo.yaml"), "--model.net.features_per_stage", "[4, 8, 16, 32]",
            "--data.data_dir", str(data), "--data.cache_dir", str(work / "cache_tiny"),
            "--data.patch_size", "[16, 16, 16]", "--data.target_spacing", "[4.0, 4.0, 5.0]",
            "--data.iterations_per_epoch", "4", "--data.num_workers", "2", "--data.resampling", "fast",
            "--data.anti_aliasing", "false", "--trainer.accelerator", accelerator, "--trainer.devices", "1",
            "--trainer.precision", precision, "--trainer.logger", "false", "--trainer.default_root_dir", str(out),
            "--trainer.enable_progress_bar", "false", "--trainer.callbacks", json.dumps([
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(out / "ckpt"), "filename": "last", "save_top_k": 1,
                               "every_n_epochs": 1, "save_on_train_epoch_end": True}}])]


def cli_stage(stage: str, args: list[str], out_root: Path) -> dict:
    return run_logged([sys.executable, str(REPO / "cli.py"), stage, *args], out_root / "logs" / f"cli_{stage}.log")


def stage_checks(checks: list[dict], work: Path, out_root: Path, accelerator: str) -> None:
    """fit (pseudo-Dice epoch, then full-volume validation), validate, test, predict of the tiny dataset."""
    import torch

    data = tiny_dataset(work)
    out = work / "tiny_run"
    shutil.rmtree(out, ignore_errors=True)
    args = tiny_args(data, work, out, accelerator)
    ckpt = out / "ckpt" / "last.ckpt"

    def fit() -> str:
        cli_stage("fit", [*args, "--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "1",
                          "--model.full_val_every_n_epochs", "2", "--model.inference.min_component_ml", "0.05"], out_root)
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
        chosen = checkpoint.get("postprocessing")  # written by a full-volume validation
        if chosen is None:
            raise CheckFailed("the checkpoint holds no postprocessing choice: no full-volume validation ran")
        return f"epoch {checkpoint['epoch']}, validation DSC by threshold {chosen['val_dsc_by_min_component_ml']}"

    def validate() -> str:
        result = cli_stage("validate", [*args, "--ckpt_path", str(ckpt)], out_root)
        return error_line(result["output"]) if "val/dsc" not in result["output"] else "val/dsc logged"

    def test() -> str:
        report = out / "test_report"
        cli_stage("test", [*args, "--ckpt_path", str(ckpt), "--data.preprocess_on", "device",
                           "--model.report_dir", str(report)], out_root)
        rows = list(csv.DictReader(open(report / "metrics_per_case.csv")))
        if len(rows) != 2:
            raise CheckFailed(f"{len(rows)} test cases scored, expected 2")
        return "preprocessing on the device; " + ", ".join(f"{r['case']} DSC {float(r['dsc']):.3f}" for r in rows)

    def predict() -> str:
        masks = out / "masks"
        cli_stage("predict", [*args, "--ckpt_path", str(ckpt), "--data.predict_dir", str(data / "imagesTs"),
                              "--writer.output_dir", str(masks)], out_root)
        rows = [r for r in csv.DictReader(open(masks / "efficiency.csv")) if r["case"] != "(start-up)"]
        if len(list(masks.glob("*.nii.gz"))) != 2 or len(rows) != 2:
            raise CheckFailed(f"{len(list(masks.glob('*.nii.gz')))} masks and {len(rows)} efficiency rows, expected 2")
        if accelerator == "gpu" and not all(float(r["peak_gpu_mb"]) > 0 for r in rows):
            raise CheckFailed("efficiency.csv: no GPU memory measured")
        return "; ".join(f"{r['case']}: transfer {float(r['transfer']):.3f} s, network {float(r['network']):.3f} s, "
                         f"peak GPU {float(r['peak_gpu_mb']):.0f} MB" for r in rows)

    run_check(checks, "cli fit (pseudo-Dice epoch, full-volume validation, postprocessing)", fit)
    for name, function in (("cli validate", validate), ("cli test (preprocessing on the device)", test),
                           ("cli predict (preprocessing in the loader)", predict)):
        if ckpt.is_file():
            run_check(checks, name, function)
        else:
            checks.append({"check": name, "ok": False, "seconds": 0.0, "detail": "not run: fit left no checkpoint"})


def train_check(work: Path, accelerator: str, precision: str, augmentation_device: str, steps: int) -> str:
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
    result = cli.main(args)
    metrics = {k: float(v) for k, v in result.trainer.callback_metrics.items() if k.startswith("train/loss")}
    detail = f"global_step {result.trainer.global_step}, " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    if not metrics or not all(math.isfinite(v) for v in metrics.values()) or result.trainer.global_step != steps:
        raise CheckFailed(f"not {steps} steps with finite losses: {detail}")
    return detail


def predict_run(work: Path, out_root: Path, ckpt: Path, in_dir: Path, accelerator: str, precision: str,
                label: str, extra: list[str]) -> tuple[str, list[dict]]:
    out = out_root / f"predict_{label}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(REPO / "cli.py"), "predict", "--config", str(REPO / "configs" / "flare24.yaml"),
           "--ckpt_path", str(ckpt), "--data.predict_dir", str(in_dir), "--writer.output_dir", str(out),
           "--writer.overwrite", "true", "--trainer.accelerator", accelerator, "--trainer.precision", precision,
           "--trainer.logger", "false", "--trainer.default_root_dir", str(work / "lightning_root"), *extra]
    result = run_logged(cmd, out_root / "logs" / f"predict_{label}.log")
    with open(out / "efficiency.csv") as f:
        rows = [dict(row, run=label, process_s=result["seconds"]) for row in csv.DictReader(f)]
    cases = sum(row["case"] != "(start-up)" for row in rows)
    return f"{cases} cases in {result['seconds']:.1f} s (process)", rows


def fast_resampling_copy(ckpt: Path) -> Path:
    """The same weights with the plan's resampling set to 'fast' (trilinear, torch), which preprocessing on the
    device needs; a model trained that way would carry it itself."""
    import torch

    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    checkpoint["plan"] = dict(checkpoint["plan"], resampling="fast")
    path = ckpt.with_name(ckpt.stem + "_fast_resampling.ckpt")
    torch.save(checkpoint, path)
    return path


def predict_benchmark(checks: list[dict], args, work: Path, out_root: Path, accelerator: str, precision: str,
                      cuda: bool, device: str) -> str:
    from predict import write_models  # random FLARE24 weights through the nnU-Net import

    ckpt = run_check(checks, "FLARE24 checkpoint (random weights, nnU-Net import)",
                     lambda: ("written", write_models(work, args.seed)[1]))
    if ckpt is None:
        return ""
    shape, spacing = ((128, 128, 40) if args.quick else (512, 512, 300)), (0.8, 0.8, 2.5)
    in_dir = work / f"inputs_{shape[0]}x{shape[1]}x{shape[2]}"
    if len(list(in_dir.glob("*.nii.gz"))) != args.copies:
        shutil.rmtree(in_dir, ignore_errors=True)
        hu, _ = synthetic_ct(shape, spacing, seed=args.seed)
        for k in range(args.copies):
            write_nifti(hu, spacing, in_dir / f"SCAN{k}_0000.nii.gz")
        del hu
    device_args = ["--data.preprocess_on", "device", "--data.resampling", "fast"]
    overrides = args.predict_overrides
    device_args += overrides
    runs = [("loader", ckpt, overrides), ("device", fast_resampling_copy(ckpt), device_args)]
    if cuda:  # 'auto' is channels-last on CUDA too (H200: 0.63x network time, 0.78x GPU memory); checked again here
        runs.append(("device_contiguous", fast_resampling_copy(ckpt), [*device_args, "--model.inference.sw_channels_last", "false"]))
    rows: list[dict] = []
    for label, path, extra in runs:
        rows += run_check(checks, f"predict benchmark: {label}",
                          lambda: predict_run(work, out_root, path, in_dir, accelerator, precision, label, extra)) or []
    table = []
    for r in rows:
        seconds, gpu_mb = float(r["total_s"]), float(r["peak_gpu_mb"])
        meets = "yes" if cuda and seconds <= GOAL_SECONDS and gpu_mb <= GOAL_GPU_MB else "no"
        table.append([r["run"], r["case"], seconds, float(r["transfer"]), float(r["network"]), gpu_mb,
                      float(r["gpu_memory_area_mb_s"]), float(r["peak_rss_mb"]), meets])
    (out_root / "predict_rows.json").write_text(json.dumps(rows, indent=1))
    return format_table(["run", "case", "total s", "transfer s", "network s", "peak GPU MB (process)", "GPU MB*s",
                         "peak RSS MB", f"<= {GOAL_SECONDS:.0f} s and <= {GOAL_GPU_MB / 1024:.0f} GB"], table,
                        f"predict, {shape[0]}x{shape[1]}x{shape[2]} at {spacing} mm, FLARE24 config, random weights, "
                        f"{precision}, {device}" + (f", {' '.join(overrides)}" if overrides else ""))


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("no CUDA device: this check is for a GPU machine (--dry-run for a dry run on the CPU)")
        return 2
    accelerator, precision = ("gpu", "16-mixed") if cuda else ("cpu", "bf16-mixed")
    device = torch.cuda.get_device_name(0) if cuda else "CPU (dry run)"
    print(f"gpu check: {device}, torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
          f"{torch.backends.cudnn.version() if cuda else '-'}, {os.cpu_count()} CPUs", flush=True)
    work, out_root = Path(args.work_dir).resolve(), Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    (out_root / "logs").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    checks: list[dict] = []
    if not args.only_predict:
        run_check(checks, "pytest -m 'not slow' -k cuda", lambda: cuda_tests(out_root))
        stage_checks(checks, work, out_root, accelerator)
        steps = 4 if args.quick else 20
        for augmentation_device in ("cpu", "gpu") if cuda else ("cpu",):
            run_check(checks, f"fit {steps} steps, {precision}, augmentation on {augmentation_device}",
                      lambda: train_check(work, accelerator, precision, augmentation_device, steps))
    predict_table = predict_benchmark(checks, args, work, out_root, accelerator, precision, cuda, device)

    failed = [c for c in checks if not c["ok"]]
    table = format_table(["check", "result", "seconds", "detail / error"],
                         [[c["check"], "ok" if c["ok"] else "FAILED", c["seconds"], c["detail"]] for c in checks],
                         f"gpu check on {device}: {len(checks) - len(failed)} of {len(checks)} ok, "
                         f"{time.perf_counter() - started:.0f} s")
    text = "\n".join(part for part in (predict_table, table) if part)
    print(text)
    if failed:
        print("FAILED: " + "; ".join(f"{c['check']}: {c['detail']}" for c in failed))
    (out_root / "gpu_check.md").write_text(text + "\n")
    (out_root / "gpu_check.json").write_text(json.dumps({"device": device, "checks": checks}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
