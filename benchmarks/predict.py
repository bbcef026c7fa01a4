"""Inference time against issue 14's goals, in one run with the same imported FLARE24 weights: our two predict
commands and nnU-Net v2's ``nnUNetPredictor``, end to end, side by side (interleaved, median of ``--repeats``):

- ``python -m lightning_flare.predict`` (the FLARE submission path: FLARE times a case from container start, so
  the end-to-end goal applies to this command) and ``cli.py predict`` (Lightning), both with the FLARE24 config,
  ``autocast: auto`` (bf16 on the CPU only where it is measured to be faster, ``lightning_flare.cpu_precision``),
  no mirroring, each ``--skip-air`` variant;
- ``nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False)`` on the CPU (fp32, as always).

Per case and command: wall time of the process, start-up (process start to the first case: our efficiency.csv's
``(start-up)`` row; nnU-Net: until its predictor is initialised), the case's and the network stage's seconds,
windows run / of the full grid, the bound (windows run x one 128 x 128 x 96 window's forward pass in the fastest
precision and layout measured in this run: fp32 and bf16, channels-last), peak memory of the process tree
(summed RSS and PSS), and the ratios to nnU-Net. Then the goal lines: end to end <= 0.35x nnU-Net on a CPU
without fast bf16, <= 0.25x with it (which one: what ``auto`` chose here); peak memory <= 0.6x; network stage
<= 1.1x the bound; start-up < 3 s.

Cases: (a) a synthetic whole-body CT (512 x 512 x 200 at 0.8 x 0.8 x 2.5 mm, arms down, patient table), (b) the
real chest CT ``../shared/data/Dataset002_LungCT/imagesTs/LUNG1_0000.nii.gz`` (BSD-3-Clause, see its
LICENSE.md). Weights: ``lightning_flare.network.PlainConvUNet()`` (random He init, seeded) written as an nnU-Net
v2 results folder (3d_fullres: spacing [3, 2, 2], patch [96, 128, 128], the FLARE24 CT normalisation); our
checkpoint is made from it by ``python -m lightning_flare.convert_nnunet`` (tensors checked identical).

    .venv-bench/bin/python benchmarks/predict.py [--repeats 3] [--skip-air false box_grid]   (see benchmarks/README.md)
    .venv-bench/bin/python benchmarks/predict.py --quick     # smoke run: a small whole-body scan, one window
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

# Our processes ask torch's CPU allocator for transparent huge pages (cli.py and the package set this before
# torch loads); so do the in-process window timings. nnU-Net's process runs as its users run it, without.
if "--child" not in sys.argv:
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    REPO, SHARED_DATA, convert_and_compare, format_table, nnunet_dataset_json, nnunet_environment, nnunet_plans,
    require_nnunet, run_measured, synthetic_ct, write_nifti, write_nnunet_model,
)
from predict_parts import extra_table, one_window_seconds, windows_per_variant  # noqa: E402

THREADS = 2
PATCH = (128, 128, 96)  # x, y, z
SPACING = (2.0, 2.0, 3.0)
MODEL_DATASET = "Dataset903_BenchFLARE24"
TRAINER_FOLDER = "nnUNetTrainer__nnUNetPlans__3d_fullres"
CONFIG = REPO / "configs" / "flare24.yaml"
LEAN, CLI, NNUNET = "python -m lightning_flare.predict", "cli.py predict", "nnUNetPredictor"
GOAL_E2E = {True: 0.25, False: 0.35}  # keyed by: did autocast auto choose bf16 on this CPU
GOAL_MEMORY, GOAL_BOUND, GOAL_STARTUP = 0.6, 1.1, 3.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=["synthetic", "lung"], default=None,
                   help="default: synthetic and lung (--quick: synthetic only)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: a 160 x 160 x 48 whole-body scan (one window), one repeat, one timed window")
    p.add_argument("--repeats", type=int, default=1, help="end-to-end runs of every command, interleaved (median)")
    p.add_argument("--window-repeats", type=int, default=3, help="timed forward passes of one window per precision")
    p.add_argument("--commands", nargs="+", choices=["lean", "cli", "nnunet"], default=["lean", "cli", "nnunet"])
    p.add_argument("--skip-air", nargs="+", choices=["false", "true", "box_grid"], default=["false"],
                   help="model.inference.skip_air variants of our commands (default: false, the configs' value)")
    p.add_argument("--extra", nargs="*", default=[], choices=["sliding", "monai", "contiguous"],
                   help="also: the three sliding windows on one preprocessed array (sliding, monai); one window in "
                        "the contiguous layout (contiguous)")
    p.add_argument("--synthetic-shape", type=int, nargs=3, default=(512, 512, 200), metavar=("X", "Y", "Z"))
    p.add_argument("--cli-workers", type=int, default=None, help="cli.py's --data.num_workers (default: the config's)")
    p.add_argument("--nnunet-processes", type=int, default=2,
                   help="nnUNetPredictor num_processes_preprocessing / _segmentation_export (default 2)")
    p.add_argument("--probe-cache", choices=["fresh", "user"], default="fresh",
                   help="fresh (default): the CPU precision probe runs at this run's start (LIGHTNING_FLARE_CACHE in "
                        "the work dir, for every command of the run); user: the answer in ~/.cache/lightning_flare")
    p.add_argument("--seed", type=int, default=0, help="weights and synthetic scan")
    p.add_argument("--work-dir", default=str(REPO / "cache" / "benchmarks" / "predict"))
    p.add_argument("--data-root", default=str(SHARED_DATA))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-args", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cases is None:
        args.cases = ["synthetic"] if args.quick else ["synthetic", "lung"]
    if args.quick:
        args.repeats, args.window_repeats, args.synthetic_shape = 1, 1, (160, 160, 48)
    return args


def child_env() -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS), "nnUNet_def_n_proc": str(THREADS),
                "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1", "nnUNet_compile": "false"})
    return env


def write_models(work: Path, seed: int) -> tuple[Path, Path, dict]:
    """nnU-Net results folder with random FLARE24 weights, and our checkpoint converted from it."""
    import torch
    from lightning_flare.network import PlainConvUNet

    torch.manual_seed(seed)
    net = PlainConvUNet()  # FLARE24 defaults: 4 stages (32, 64, 128, 256), 5,602,950 parameters
    ours_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    model_dir = write_nnunet_model(work / "model" / MODEL_DATASET / TRAINER_FOLDER, ours_state,
                                   nnunet_plans(MODEL_DATASET, PATCH, SPACING, 2, (205, 205, 167)), nnunet_dataset_json(1))
    ckpt = convert_and_compare(model_dir, work / "model" / "ours_from_nnunet.ckpt", ours_state, child_env(),
                               ["--config", str(CONFIG)])
    return model_dir, ckpt, ours_state


def prepare_case(name: str, args, work: Path) -> tuple[str, Path, Path] | None:
    """(case id, input folder holding CASE_0000.nii.gz, that file)."""
    if name == "synthetic":
        shape, spacing = tuple(args.synthetic_shape), (0.8, 0.8, 2.5)
        folder = work / "inputs" / f"wholebody_{shape[0]}x{shape[1]}x{shape[2]}_seed{args.seed}"
        path = folder / "SYNTH_0000.nii.gz"
        if not path.is_file():
            start = time.perf_counter()
            hu, _ = synthetic_ct(shape, spacing, seed=args.seed, num_lesions=2, arms=True, table=True)
            write_nifti(hu, spacing, path, origin=(-0.4 * shape[0], -0.4 * shape[1], -1.25 * shape[2]))
            print(f"synthetic whole-body scan {shape} at {spacing} mm written in {time.perf_counter() - start:.1f} s")
        return "SYNTH", folder, path
    source = Path(args.data_root) / "Dataset002_LungCT" / "imagesTs" / "LUNG1_0000.nii.gz"
    if not source.is_file():
        print(f"skipping the lung CT: {source} not found")
        return None
    folder = work / "inputs" / "lung"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / source.name
    if not path.exists():
        path.symlink_to(source.resolve())
    return "LUNG1", folder, path


# --------------------------------------------------------------------------------------------- end to end
def our_command(kind: str, variant: str, in_dir: Path, ckpt: Path, out_dir: Path, workers: int | None) -> list[str]:
    if kind == "lean":
        return [sys.executable, "-m", "lightning_flare.predict", "--ckpt", str(ckpt), "-i", str(in_dir), "-o",
                str(out_dir), "--config", str(CONFIG), "--device", "cpu", "--overwrite", "--set", "tta=false",
                "--set", f"skip_air={variant}"]
    return [sys.executable, str(REPO / "cli.py"), "predict", "--config", str(CONFIG), "--ckpt_path", str(ckpt),
            "--data.predict_dir", str(in_dir), "--writer.output_dir", str(out_dir), "--writer.overwrite", "true",
            "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(out_dir.parent / "lightning_root"), "--model.inference.tta", "false",
            "--model.inference.skip_air", variant, *(["--data.num_workers", str(workers)] if workers is not None else [])]


def run_ours(kind: str, variant: str, case_id: str, in_dir: Path, ckpt: Path, out_dir: Path, log: Path,
             workers: int | None) -> dict:
    shutil.rmtree(out_dir, ignore_errors=True)
    result = run_measured(our_command(kind, variant, in_dir, ckpt, out_dir, workers), env=child_env(), cwd=REPO, log=log)
    if result["returncode"] != 0:
        raise SystemExit(f"ours ({kind}) failed, see {log}:\n{result['output'][-3000:]}")
    result["mask"] = out_dir / f"{case_id}.nii.gz"
    with open(out_dir / "efficiency.csv") as f:
        rows = list(csv.DictReader(f))
    startup = next(r for r in rows if r["case"] == "(start-up)")
    case = next(r for r in rows if r["case"] == case_id)
    result.update(startup=float(startup["total_s"]), case=float(case["total_s"]), network=float(case["network"]),
                  stages={k: float(case[k]) for k in ("read", "preprocess", "transfer", "network", "postprocess", "write")})
    return result


def run_nnunet(case_id: str, image: Path, model_dir: Path, out_dir: Path, processes: int, log: Path) -> dict:
    shutil.rmtree(out_dir, ignore_errors=True)
    payload = json.dumps({"image": str(image), "model_dir": str(model_dir), "output": str(out_dir / case_id),
                          "processes": processes})
    env = child_env()
    env.pop("THP_MEM_ALLOC_ENABLE", None)  # as nnU-Net runs for its users
    result = run_measured([sys.executable, str(Path(__file__).resolve()), "--child", "nnunet", "--child-args", payload],
                          env=env, cwd=REPO, log=log)
    if result["returncode"] != 0:
        raise SystemExit(f"nnU-Net (nnUNetPredictor) failed, see {log}:\n{result['output'][-3000:]}")
    for line in result["output"].splitlines():
        if line.startswith("RESULT "):
            result.update(json.loads(line[len("RESULT "):]))
    result["mask"] = out_dir / f"{case_id}.nii.gz"
    return result


def process_age() -> float:
    """Seconds since this process started (Linux /proc), without importing the package (it sets THP)."""
    ticks = os.sysconf("SC_CLK_TCK")
    started = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
    boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
    return time.time() - boot - started


def child_nnunet(spec: dict) -> None:
    """Runs in a subprocess: nnU-Net's documented Python API for predicting from files."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    torch.set_num_threads(THREADS)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(spec["model_dir"], use_folds=("all",),
                                                   checkpoint_name="checkpoint_final.pth")
    startup, network = process_age(), []
    sliding = predictor.predict_sliding_window_return_logits

    def timed(data):  # the network stage: nnU-Net's sliding window (windows, Gaussian weighting, aggregation)
        start = time.perf_counter()
        logits = sliding(data)
        network.append(time.perf_counter() - start)
        return logits

    predictor.predict_sliding_window_return_logits = timed
    start = time.perf_counter()
    predictor.predict_from_files([[spec["image"]]], [spec["output"]], save_probabilities=False, overwrite=True,
                                 num_processes_preprocessing=spec["processes"],
                                 num_processes_segmentation_export=spec["processes"])
    print("RESULT " + json.dumps({"startup": startup, "case": time.perf_counter() - start,
                                  "network": sum(network)}), flush=True)


def nnunet_window_count(preprocessed_shape_xyz) -> int:
    import math
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    patch = tuple(reversed(PATCH))
    shape = tuple(max(s, p) for s, p in zip(reversed(preprocessed_shape_xyz), patch))
    return math.prod(len(s) for s in compute_steps_for_sliding_window(shape, patch, 0.5))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    total = int(a.sum()) + int(b.sum())
    return float("nan") if total == 0 else 2.0 * int((a & b).sum()) / total


# --------------------------------------------------------------------------------------------- one case
def run_case(name: str, args, work: Path, model_dir: Path, ckpt: Path, window: float, bf16: bool) -> None:
    import SimpleITK as sitk

    prepared = prepare_case(name, args, work)
    if prepared is None:
        return
    case_id, in_dir, image = prepared
    header = sitk.ReadImage(str(image))
    windows, shape = windows_per_variant(ckpt, image, case_id, args.skip_air)
    grid_nnunet = nnunet_window_count(shape)
    runs = [(kind, variant) for kind in ("lean", "cli") if kind in args.commands for variant in args.skip_air]
    runs += [("nnunet", "")] if "nnunet" in args.commands else []
    results: dict[tuple[str, str], list[dict]] = {run: [] for run in runs}
    for repeat in range(args.repeats):  # interleaved, the order rotating, so that all see the same background load
        for kind, variant in runs[repeat % len(runs):] + runs[:repeat % len(runs)]:
            out = work / "out" / name / f"{kind}_{variant or 'nnunet'}"
            log = work / "out" / f"{name}_{kind}_{variant or 'nnunet'}.log"
            results[(kind, variant)].append(
                run_nnunet(case_id, image, model_dir, out, args.nnunet_processes, log) if kind == "nnunet" else
                run_ours(kind, variant, case_id, in_dir, ckpt, out, log, args.cli_workers))
    med = {run: {k: statistics.median(r[k] for r in rs) for k in
                 ("seconds", "startup", "case", "network", "peak_tree_mb", "peak_tree_pss_mb")}
           for run, rs in results.items()}
    reference = med.get(("nnunet", ""))
    labels = {"lean": LEAN + " (submission)", "cli": CLI + " (Lightning)", "nnunet": NNUNET + " (fp32)"}
    table, goal_rows = [], []
    for (kind, variant), m in med.items():
        run, grid = (windows[variant] if kind != "nnunet" else (grid_nnunet, grid_nnunet))
        bound = run * window
        ratio = (lambda key: m[key] / reference[key] if reference else float("nan"))
        stages = results[(kind, variant)][-1].get("stages")
        label = labels[kind] + (f" [skip_air {variant}]" if kind != "nnunet" and len(args.skip_air) > 1 else "")
        table.append([label, m["seconds"], m["startup"], m["case"], m["network"], f"{run}/{grid}", bound,
                      m["network"] / bound, m["peak_tree_mb"], m["peak_tree_pss_mb"], ratio("seconds"),
                      ratio("peak_tree_pss_mb"), ratio("peak_tree_mb"),
                      ", ".join(f"{k} {v:.1f}" for k, v in stages.items() if v) if stages else ""])
        if kind != "nnunet":
            goal_rows.append((kind, label, m, ratio("seconds"), ratio("peak_tree_pss_mb"), ratio("peak_tree_mb"),
                              m["network"] / bound))
    print(format_table(
        ["command", "wall s", "start-up s", "case s", "network s", "windows run/grid", "bound s", "network / bound",
         "peak RSS MB", "peak PSS MB", "wall / nnU-Net", "PSS / nnU-Net", "RSS / nnU-Net", "stages s (efficiency.csv)"],
        table, f"{name}: {image.name} {header.GetSize()} voxels at {tuple(round(s, 3) for s in header.GetSpacing())} mm"
               f" -> {shape} (x, y, z) at {SPACING} mm; full grid: ours {windows['false'][1]} windows, nnU-Net's "
               f"{grid_nnunet}; median of {args.repeats} run(s) each"))
    print_goals(case_id, goal_rows, bf16, reference is not None)
    lean = results.get(("lean", args.skip_air[0])) or results.get(("cli", args.skip_air[0]))
    if lean and reference:
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(lean[-1]["mask"])))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(results[("nnunet", "")][-1]["mask"])))
        print(f"masks on the original grid (random weights: a sanity check only): ours {100 * (a > 0).mean():.2f} % "
              f"foreground, nnU-Net {100 * (b > 0).mean():.2f} %, Dice {dice(a, b):.3f}, voxel agreement "
              f"{100 * (a == b).mean():.2f} %" if a.shape == b.shape else f"mask shapes differ: {a.shape}, {b.shape}")
    if set(args.extra) & {"sliding", "monai"}:
        print(extra_table(image, model_dir, ckpt, args.extra, THREADS))


def verdict(value: float, goal: float) -> str:
    return "n/a" if value != value else ("met" if value <= goal else "MISSED")


def print_goals(case_id: str, rows, bf16: bool, with_nnunet: bool) -> None:
    e2e = GOAL_E2E[bf16]
    print(f"goals, {case_id} (autocast auto chose {'bf16' if bf16 else 'fp32'}: a CPU "
          f"{'with' if bf16 else 'without'} fast bf16, so end to end <= {e2e}x; the goal applies to {LEAN}, the "
          f"submission path FLARE times from container start; {CLI} for comparison):")
    for kind, label, m, wall, pss, rss, bound in rows:
        parts = []
        if with_nnunet:
            parts.append(f"end to end {wall:.2f}x nnU-Net {verdict(wall, e2e)} (<= {e2e}x)"
                         + ("" if kind == "lean" else " [goal not for this command]"))
            parts.append(f"peak memory {pss:.2f}x PSS / {rss:.2f}x RSS {verdict(pss, GOAL_MEMORY)} (<= {GOAL_MEMORY}x, PSS)")
        parts.append(f"network stage {bound:.2f}x bound {verdict(bound, GOAL_BOUND)} (<= {GOAL_BOUND}x)")
        parts.append(f"start-up {m['startup']:.2f} s {verdict(m['startup'], GOAL_STARTUP)} (< {GOAL_STARTUP:g} s)")
        print(f"  {label}: " + "; ".join(parts))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child == "nnunet":
        child_nnunet(json.loads(args.child_args))
        return 0
    require_nnunet()
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    nnunet_environment(work / "nnunet")  # nnU-Net warns without them; nothing is written there
    if args.probe_cache == "fresh":  # inherited by every command of this run (child_env copies os.environ)
        shutil.rmtree(work / "probe_cache", ignore_errors=True)
        os.environ["LIGHTNING_FLARE_CACHE"] = str(work / "probe_cache")
    import torch
    from importlib.metadata import version
    from lightning_flare.cpu_precision import cache_file, cpu_bf16_is_faster, cpu_model, decision_key

    torch.set_num_threads(THREADS)
    bf16 = cpu_bf16_is_faster()  # decided (or read) here, so that every command of this run finds the same answer
    probe = json.loads(cache_file().read_text()).get(decision_key(), {}) if cache_file().is_file() else {}
    print(f"predict benchmark: CPU {cpu_model()}; torch {torch.__version__}, nnunetv2 {version('nnunetv2')}, python "
          f"{platform.python_version()}, {os.cpu_count()} CPUs, {THREADS} torch threads, load average "
          f"{os.getloadavg()[0]:.2f} at start")
    print(f"autocast auto on this CPU: {'bf16' if bf16 else 'fp32'} (cpu_precision probe, {args.probe_cache}: "
          f"{', '.join(f'{k} {v}' for k, v in probe.items() if k != 'bf16_faster') or 'no timing'}; {cache_file()})")
    model_dir, ckpt, ours_state = write_models(work, args.seed)
    print(f"random FLARE24 weights (seed {args.seed}): nnU-Net folder {model_dir}, our checkpoint {ckpt} "
          "(converted, identical tensors)")
    layouts = ("channels-last", "contiguous") if "contiguous" in args.extra else ("channels-last",)
    windows = one_window_seconds(ours_state, PATCH, args.window_repeats, layouts, THREADS)
    fastest = min(windows, key=windows.get)
    print(f"one {PATCH[0]} x {PATCH[1]} x {PATCH[2]} window (batch 1, median of {args.window_repeats} after a "
          f"warm-up): " + ", ".join(f"{k} {v:.2f} s" for k, v in windows.items()) + f"; the bound uses the fastest, "
          f"{fastest}")
    chosen = min((v for k, v in windows.items() if k.startswith("bf16" if bf16 else "fp32")), default=float("nan"))
    if chosen > windows[fastest] / 0.9:
        print(f"NOTE: autocast auto chose {'bf16' if bf16 else 'fp32'}, but one window in {fastest} took "
              f"{windows[fastest] / chosen:.2f}x its time here: the probe ({cache_file()}) disagrees with the "
              "network's windows (probed under load?). Which end-to-end goal applies follows auto's choice; the bound "
              "uses the fastest window")
    for name in args.cases:
        run_case(name, args, work, model_dir, ckpt, windows[fastest], bf16)
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
