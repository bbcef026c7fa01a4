"""Inference time, in one run with the same random FLARE24 weights: ours end to end (``cli.py predict``), nnU-Net v2's
``nnUNetPredictor`` end to end, the three sliding-window implementations (ours, nnU-Net's, MONAI's
``sliding_window_inference``) on the same preprocessed array, and the lower bound (number of windows x one
window's forward time, fp32 and bf16, in our channels-last layout and in the contiguous one).

Cases: (a) a synthetic 512 x 512 x 200 CT-like scan at 0.8 x 0.8 x 2.5 mm, (b) the real chest CT
``../shared/data/Dataset002_LungCT/imagesTs/LUNG1_0000.nii.gz`` (BSD-3-Clause, see its LICENSE.md).

Weights: ``lightning_flare.network.PlainConvUNet()`` (the FLARE24 network, random He init, seeded) written as an
nnU-Net v2 results folder (plans.json with a 3d_fullres configuration: spacing [3, 2, 2], patch [96, 128, 128],
CTNormalization with the FLARE24 statistics; dataset.json; fold_all/checkpoint_final.pth with the kernels permuted
from our (x, y, z) to nnU-Net's (z, y, x)); our checkpoint is made from that folder by
``python -m lightning_flare.convert_nnunet``, so both sides load the same weights.

Settings: window 128 x 128 x 96 (x, y, z), step 0.5, no test-time mirroring, 2 torch threads everywhere.
Ours: bf16 autocast, Hann weighting; nnU-Net: Gaussian weighting, fp32 (nnU-Net never autocasts on the CPU);
MONAI: Gaussian weighting, sw_batch_size 2, bf16 autocast. End-to-end runs are subprocesses (start-up, reading,
preprocessing, inference, resampling back, writing) with their wall time and peak resident memory. Ours and
every in-process measurement run with THP_MEM_ALLOC_ENABLE=1 (cli.py's setting); nnU-Net's end-to-end process
without it.

Run with the benchmark environment:  .venv-bench/bin/python benchmarks/predict.py  (see benchmarks/README.md)
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

# Our processes ask torch's CPU allocator for transparent huge pages (cli.py sets this before importing torch);
# the in-process measurements (sliding windows, lower bounds) run under the same allocator setting, and
# nnU-Net's end-to-end process runs as its users run it, without (child_env).
os.environ["THP_MEM_ALLOC_ENABLE"] = "1"

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    REPO, SHARED_DATA, convert_and_compare, format_table, nnunet_dataset_json, nnunet_environment, nnunet_plans, require_nnunet,
    run_measured, synthetic_ct, write_nifti, write_nnunet_model,
)

THREADS = 2
PATCH = (128, 128, 96)  # x, y, z
SPACING = (2.0, 2.0, 3.0)
MODEL_DATASET = "Dataset903_BenchFLARE24"
TRAINER_FOLDER = "nnUNetTrainer__nnUNetPlans__3d_fullres"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=["synthetic", "lung"], default=None,
                   help="default: synthetic and lung (--quick: synthetic only)")
    p.add_argument("--quick", action="store_true", help="smoke run: a 128 x 128 x 40 synthetic scan, 1 timing repeat")
    p.add_argument("--repeats", type=int, default=3, help="timed single-window forward passes (median)")
    p.add_argument("--nnunet-processes", type=int, default=2,
                   help="nnUNetPredictor num_processes_preprocessing / _segmentation_export (default 2)")
    p.add_argument("--seed", type=int, default=0, help="weights and synthetic scan")
    p.add_argument("--work-dir", default=str(REPO / "cache" / "benchmarks" / "predict"))
    p.add_argument("--data-root", default=str(SHARED_DATA))
    p.add_argument("--skip", nargs="*", default=[], choices=["ours", "nnunet", "sliding", "monai", "bound"],
                   help="parts to leave out")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-args", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cases is None:
        args.cases = ["synthetic"] if args.quick else ["synthetic", "lung"]
    if args.quick:
        args.repeats = 1
    return args


def child_env() -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS), "nnUNet_def_n_proc": str(THREADS),
                "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1", "nnUNet_compile": "false"})
    return env


# --------------------------------------------------------------------------------------------- model folders
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
                               ["--config", str(REPO / "configs" / "flare24.yaml")])
    return model_dir, ckpt, ours_state


# --------------------------------------------------------------------------------------------- inputs
def prepare_case(name: str, args, work: Path) -> tuple[str, Path, Path] | None:
    """(case id, input folder holding CASE_0000.nii.gz, that file)."""
    if name == "synthetic":
        shape, spacing = ((128, 128, 40) if args.quick else (512, 512, 200)), (0.8, 0.8, 2.5)
        folder = work / "inputs" / f"synthetic_{shape[0]}x{shape[1]}x{shape[2]}_seed{args.seed}"
        path = folder / "SYNTH_0000.nii.gz"
        if not path.is_file():
            start = time.perf_counter()
            hu, _ = synthetic_ct(shape, spacing, seed=args.seed, num_lesions=2)
            write_nifti(hu, spacing, path, origin=(-204.8, -204.8, -250.0))
            print(f"synthetic scan {shape} at {spacing} mm written in {time.perf_counter() - start:.1f} s")
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
def run_ours(case_id: str, in_dir: Path, ckpt: Path, out_dir: Path, log: Path) -> dict:
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [sys.executable, str(REPO / "cli.py"), "predict", "--config", str(REPO / "configs" / "flare24.yaml"),
           "--ckpt_path", str(ckpt), "--data.predict_dir", str(in_dir), "--writer.output_dir", str(out_dir),
           "--writer.overwrite", "true", "--trainer.accelerator", "cpu", "--trainer.precision", "bf16-mixed",
           "--trainer.logger", "false", "--trainer.default_root_dir", str(out_dir.parent / "lightning_root")]
    result = run_measured(cmd, env=child_env(), cwd=REPO, log=log)
    if result["returncode"] != 0:
        raise SystemExit(f"ours (cli.py predict) failed, see {log}:\n{result['output'][-3000:]}")
    result["mask"] = out_dir / f"{case_id}.nii.gz"
    stages = out_dir / "efficiency.csv"
    if stages.is_file():
        with open(stages) as f:
            rows = [r for r in csv.DictReader(f) if r.get("case") == case_id]
        result["stages"] = rows[0] if rows else None
    return result


def run_nnunet(case_id: str, image: Path, model_dir: Path, out_dir: Path, processes: int, log: Path) -> dict:
    shutil.rmtree(out_dir, ignore_errors=True)
    payload = json.dumps({"image": str(image), "model_dir": str(model_dir), "output": str(out_dir / case_id),
                          "processes": processes})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "nnunet", "--child-args", payload]
    env = child_env()
    env.pop("THP_MEM_ALLOC_ENABLE")  # as nnU-Net runs for its users
    result = run_measured(cmd, env=env, cwd=REPO, log=log)
    if result["returncode"] != 0:
        raise SystemExit(f"nnU-Net (nnUNetPredictor) failed, see {log}:\n{result['output'][-3000:]}")
    for line in result["output"].splitlines():
        if line.startswith("RESULT "):
            result.update(json.loads(line[len("RESULT "):]))
    result["mask"] = out_dir / f"{case_id}.nii.gz"
    return result


def child_nnunet(spec: dict) -> None:
    """Runs in a subprocess: nnU-Net's documented Python API for predicting from files."""
    import torch

    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(spec["model_dir"], use_folds=("all",),
                                                   checkpoint_name="checkpoint_final.pth")
    ready = time.perf_counter()
    predictor.predict_from_files([[spec["image"]]], [spec["output"]], save_probabilities=False, overwrite=True,
                                 num_processes_preprocessing=spec["processes"],
                                 num_processes_segmentation_export=spec["processes"])
    done = time.perf_counter()
    print("RESULT " + json.dumps({"import_and_init_s": ready - start, "predict_from_files_s": done - ready}), flush=True)


# --------------------------------------------------------------------------------------------- in-process parts
class CountingNet:
    """Wraps a network: counts windows (batch items) and returns the full-resolution logits only."""

    def __init__(self, net):
        self.net, self.windows = net, 0

    def __call__(self, x):
        self.windows += x.shape[0]
        out = self.net(x)
        return out[0] if isinstance(out, (list, tuple)) else out


def time_it(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    total = int(a.sum()) + int(b.sum())
    return float("nan") if total == 0 else 2.0 * int((a & b).sum()) / total


def in_process(image_path: Path, model_dir: Path, ours_state: dict, args) -> tuple[list, dict]:
    """Ours / nnU-Net / MONAI sliding windows on our preprocessed array, and the lower bound."""
    import torch
    from torch import nn
    from lightning_flare.inference import grid_overlap, sliding_window_logits, window_batch_size
    from lightning_flare.io import read_image
    from lightning_flare.network import PlainConvUNet
    from lightning_flare.plan import Plan
    from lightning_flare.preprocessing import preprocess_image

    torch.set_num_threads(THREADS)
    ckpt_plan = json.loads((model_dir / "plans.json").read_text())
    stats = ckpt_plan["foreground_intensity_properties_per_channel"]["0"]
    plan = Plan(SPACING, PATCH, (stats["percentile_00_5"], stats["percentile_99_5"], stats["mean"], stats["std"]))
    seconds, array = time_it(lambda: preprocess_image(read_image(image_path), plan))
    image = torch.from_numpy(array)[None]  # (1, x, y, z)
    info = {"preprocessed_shape": tuple(array.shape), "preprocess_s": seconds}

    net = PlainConvUNet(deep_supervision=False)
    net.load_state_dict(ours_state)
    net.eval()

    class Wrapped(nn.Module):  # sliding_window_logits needs an nn.Module (device from its parameters)
        windows = 0  # on the class: sliding_window_logits runs a (channels-last) copy of the module

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            type(self).windows += x.shape[0]
            return self.inner(x)

    rows, masks = [], {}
    if "sliding" not in args.skip:
        wrapped = Wrapped(net)
        batch = window_batch_size("auto", "cpu")  # what cli.py predict uses with configs/flare24.yaml
        seconds, logits = time_it(lambda: sliding_window_logits(wrapped, image, PATCH, 0.5, batch, autocast=True))
        masks["ours"] = logits.argmax(0).numpy()
        rows.append((f"ours sliding window (bf16, Hann, batch {batch})", seconds, wrapped.windows, None, ""))

        # nnU-Net's sliding window on the same array, (1, z, y, x), as nnUNetPredictor runs it on the CPU (fp32)
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        with contextlib.redirect_stdout(io.StringIO()):  # it prints a note about perform_everything_on_device
            predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                        perform_everything_on_device=False, device=torch.device("cpu"),
                                        verbose=False, allow_tqdm=False)
            predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=("all",))
        zyx = image.permute(0, 3, 2, 1).contiguous()
        slicers = predictor._internal_get_sliding_window_slicers(
            tuple(max(s, p) for s, p in zip(zyx.shape[1:], predictor.configuration_manager.patch_size)))
        torch.set_num_threads(THREADS)
        seconds, logits = time_it(lambda: predictor.predict_logits_from_preprocessed_data(zyx))
        masks["nnunet"] = logits.argmax(0).permute(2, 1, 0).numpy()
        rows.append(("nnU-Net sliding window (fp32, Gaussian, batch 1)", seconds, len(slicers), None,
                     f"Dice vs ours {dice(masks['ours'], masks['nnunet']):.3f}"))
        info["nnunet_windows"] = len(slicers)
    if "monai" not in args.skip:
        from monai.inferers import sliding_window_inference

        counting = CountingNet(net)

        def monai_run():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                return sliding_window_inference(image[None], roi_size=PATCH, sw_batch_size=2, predictor=counting,
                                                overlap=0.5, mode="gaussian")

        torch.set_num_threads(THREADS)
        seconds, logits = time_it(monai_run)
        masks["monai"] = logits[0].float().argmax(0).numpy()
        note = f"Dice vs ours {dice(masks['ours'], masks['monai']):.3f}" if "ours" in masks else ""
        rows.append(("MONAI sliding_window_inference (bf16, Gaussian, batch 2)", seconds, counting.windows, None, note))
    if "bound" not in args.skip:
        from lightning_flare.inference import channels_last_forward

        windows = info.get("nnunet_windows") or _nnunet_window_count(tuple(reversed(array.shape)))
        x = torch.randn(1, 1, *PATCH)
        layouts = (("channels-last", channels_last_forward(net), "ours' layout on the CPU"),
                   ("contiguous", net, "nnU-Net's and MONAI's layout"))
        for label, autocast in (("fp32", False), ("bf16", True)):
            for layout, fn, note in layouts:
                def forward():
                    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                        fn(x)

                forward()  # warm-up
                torch.set_num_threads(THREADS)
                one = statistics.median(time_it(forward)[0] for _ in range(args.repeats))
                rows.append((f"lower bound {label} {layout} ({windows} windows x {one:.2f} s)", windows * one, windows,
                             None, f"one window, batch 1, {note}"))
    import torchio as tio

    padded = torch.zeros(1, *(max(s, p) for s, p in zip(array.shape, PATCH)), dtype=torch.uint8)
    info["ours_grid_windows"] = len(tio.GridSampler(tio.Subject(image=tio.LabelMap(tensor=padded)), PATCH,
                                                    grid_overlap(PATCH, 0.5)))
    return rows, info


def _nnunet_window_count(shape_zyx) -> int:
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    patch = tuple(reversed(PATCH))
    steps = compute_steps_for_sliding_window(tuple(max(s, p) for s, p in zip(shape_zyx, patch)), patch, 0.5)
    return math.prod(len(s) for s in steps)


# --------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child == "nnunet":
        child_nnunet(json.loads(args.child_args))
        return 0
    require_nnunet()
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    nnunet_environment(work / "nnunet")  # nnU-Net warns without them; nothing is written there
    import torch
    import SimpleITK as sitk
    from importlib.metadata import version

    torch.set_num_threads(THREADS)
    print(f"predict benchmark: torch {torch.__version__}, nnunetv2 {version('nnunetv2')}, monai {version('monai')}, "
          f"python {platform.python_version()}, {os.cpu_count()} CPUs, {THREADS} torch threads, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    model_dir, ckpt, ours_state = write_models(work, args.seed)
    print(f"random FLARE24 weights (seed {args.seed}): nnU-Net folder {model_dir}, our checkpoint {ckpt} "
          "(converted, identical tensors)")

    for name in args.cases:
        prepared = prepare_case(name, args, work)
        if prepared is None:
            continue
        case_id, in_dir, image = prepared
        size = sitk.ReadImage(str(image)).GetSize()
        spacing = sitk.ReadImage(str(image)).GetSpacing()
        rows, e2e = [], {}
        if "ours" not in args.skip:
            e2e["ours"] = run_ours(case_id, in_dir, ckpt, work / "out" / name / "ours", work / "out" / f"{name}_ours.log")
            rows.append(("ours end to end (cli.py predict, bf16)", e2e["ours"]["seconds"], None,
                         _memory(e2e["ours"]), _stages_note(e2e["ours"].get("stages"))))
        if "nnunet" not in args.skip:
            e2e["nnunet"] = run_nnunet(case_id, image, model_dir, work / "out" / name / "nnunet", args.nnunet_processes,
                                       work / "out" / f"{name}_nnunet.log")
            r = e2e["nnunet"]
            rows.append(("nnU-Net end to end (nnUNetPredictor, fp32)", r["seconds"], None, _memory(r),
                         f"init {r.get('import_and_init_s', float('nan')):.1f} s, predict_from_files "
                         f"{r.get('predict_from_files_s', float('nan')):.1f} s"))
        agreement = ""
        if "ours" in e2e and "nnunet" in e2e:
            a = sitk.GetArrayFromImage(sitk.ReadImage(str(e2e["ours"]["mask"])))
            b = sitk.GetArrayFromImage(sitk.ReadImage(str(e2e["nnunet"]["mask"])))
            agreement = (f"masks on the original grid: ours {100 * (a > 0).mean():.2f} % foreground, nnU-Net "
                         f"{100 * (b > 0).mean():.2f} %, Dice {dice(a, b):.3f}, voxel agreement "
                         f"{100 * (a == b).mean():.2f} %" if a.shape == b.shape else
                         f"mask shapes differ: ours {a.shape}, nnU-Net {b.shape}")
        inner, info = in_process(image, model_dir, ours_state, args) if {"sliding", "monai", "bound"} - set(args.skip) \
            else ([], {})
        reference = e2e.get("nnunet", {}).get("seconds")
        bound = next((r[1] for r in inner if r[0].startswith("lower bound bf16 channels-last")), None)
        network = (e2e.get("ours", {}).get("stages") or {}).get("network")
        if network not in (None, ""):
            rows.append(("ours network stage inside cli.py predict", float(network), None, "", "efficiency.csv"))
        table = []
        for label, seconds, windows, rss, note in rows + [(r[0], r[1], r[2], r[3], r[4]) for r in inner]:
            table.append([label, seconds, windows if windows is not None else "", rss or "",
                          reference / seconds if reference else float("nan"),
                          seconds / bound if bound else float("nan"), note])
        print(format_table(
            ["method", "seconds", "windows", "peak RSS / PSS MB", "nnU-Net e2e / this", "this / bound bf16 ours' layout", "notes"], table,
            f"{name}: {image.name} {size} voxels at {tuple(round(s, 3) for s in spacing)} mm -> "
            f"{info.get('preprocessed_shape', '?')} (x, y, z) at {SPACING} mm; ours' grid "
            f"{info.get('ours_grid_windows', '?')} windows, nnU-Net's {info.get('nnunet_windows', '?')}"))
        if agreement:
            print(agreement)
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    return 0


def _memory(result: dict) -> str:
    """Peak summed RSS / PSS of the process tree (PSS counts pages shared by forked workers once)."""
    return f"{result['peak_tree_mb']:.0f} / {result['peak_tree_pss_mb']:.0f}"


def _stages_note(stages: dict | None) -> str:
    if not stages:
        return ""
    keys = [k for k in ("read", "preprocess", "network", "postprocess", "write") if stages.get(k) not in (None, "")]
    return ", ".join(f"{k} {float(stages[k]):.1f}" for k in keys) + " s (efficiency.csv)"


if __name__ == "__main__":
    sys.exit(main())
