"""Equal-work anchor (issue 13, item 1): nnU-Net v2's own trainer and ours, trained with the same plan, cases,
fold, counts and seed, then scored alike on the same validation cases.

    .venv-bench/bin/python benchmarks/train_equal.py [--config configs/ibsi_cpu.yaml] [--folds 0 1] [--seeds 0 1]
        [--iterations N [--iterations-per-epoch M]] [--augmentation nnunet|basic|none] [--mirror]
        [--override=--data.patch_size=[32,32,16]] [--workdir DIR] [--keep] [--json FILE] [--no-measured]

Both sides get everything the configuration fixes:
- the plan: our fingerprint and plan (target spacing, patch, CT normalisation statistics) are computed once by our
  code (in our venv) and written as nnU-Net's ``nnUNetPlans.json`` (``nnunet_compat.plans_from_plan``: the 4-stage
  PlainConvUNet with our features / kernels / strides, CTNormalization with our statistics, nnU-Net's resampling),
  then nnU-Net preprocesses the raw cases itself (``preprocess_dataset``); the script compares its arrays with our
  cache. Batch size in the plans; ``splits_final.json`` = our folds (checked against nnU-Net's own split);
- the counts: a small ``nnUNetTrainer`` subclass sets num_epochs / num_iterations_per_epoch (the config's
  max_epochs / iterations_per_epoch, or ``--iterations``), initial_lr, weight_decay, oversample_foreground_percent,
  num_val_iterations_per_epoch = 1 (nnU-Net cannot skip its per-epoch pseudo validation; ours runs none);
  ours runs without the config's ``TimeBudget`` callback (it would end a slow fit early), its other callbacks kept;
- augmentation (``--augmentation``): nnunet (default) = nnU-Net's stock pipeline on its side, ``augmentation:
  nnunet`` on ours. The IBSI config's ``basic`` (mirroring, noise, uniform brightness) has no stock nnU-Net
  trainer; ``--augmentation basic`` builds it from nnU-Net's own transform classes; ``none`` = nnUNetTrainerNoDA;
- device cpu, ``--threads`` torch threads (2), ``data.num_workers`` augmentation workers on both sides
  (``nnUNet_n_proc_DA``), fp32 on both (nnU-Net autocasts only on CUDA: ours runs ``--trainer.precision 32-true``),
  the same seed for the weights' initialisation and the main process (nnU-Net's augmentation workers are unseeded).
An extra row trains ours with the config's measured CPU precision (``MeasuredCpuPrecision``, bf16 where it wins),
unless ``--no-measured`` or the measurement picks fp32 anyway.

Scoring: nnU-Net's final checkpoint with ``nnUNetPredictor`` (step 0.5, Gaussian, fp32), ours (last.ckpt) with
``python -m lightning_flare.predict`` set to the same windows (``sw_steps nnunet``, ``sw_weighting gaussian``, overlap
0.5, fp32, no postprocessing); both without mirroring unless ``--mirror``. Both masks are scored by
``lightning_flare.evaluate`` (FLARE DSC / NSD at 2 mm, original grid) against the raw labels.

Timing: training wall = the training process from start to exit (start-up, training, its checkpoints).
s/it = the sum over epochs of (epoch start -> end of its last training iteration) / iterations: on both sides that
covers data waits, forward, backward, clipping and the optimiser step, and excludes validation, checkpointing and
start-up; "s/it after epoch 1" drops the first epoch (oneDNN primitive creation, worker start).

Run with the benchmark environment (nnunetv2); ours trains in the project venv (``--ours-python``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SHARED_DATA, format_table, nnunet_environment, run_measured, write_json  # noqa: E402

CONFIGURATION, PLANS = "3d_fullres", "nnUNetPlans"
TRAINER = "EqualWorkTrainer"
DSC_MARGIN = 0.02
# nnU-Net's values that no trainer attribute sets (nnUNetTrainer.configure_optimizers / train_step / PolyLRScheduler)
NNUNET_FIXED = {"momentum": 0.99, "nesterov": True, "poly_exponent": 0.9, "gradient_clip_val": 12.0,
                "gradient_clip_algorithm": "norm", "deep_supervision": True}


# ============================================================================================== our side's clock
class TrainTimer(L.Callback):
    """Our training clock (``--trainer.callbacks+=train_equal.TrainTimer``): per epoch, seconds from
    on_train_epoch_start to the end of its last training batch, and the batch count; written to $TRAIN_EQUAL_TIMES
    after every epoch (nnU-Net's side is timed the same way by EqualWorkTrainer)."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.record = {"precision": str(trainer.precision), "epoch_seconds": [], "epoch_iterations": []}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start, self._end, self._count = time.perf_counter(), None, 0

    def on_train_batch_end(self, trainer, *args) -> None:
        self._end, self._count = time.perf_counter(), self._count + 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._end is not None:
            self.record["epoch_seconds"].append(self._end - self._start)
            self.record["epoch_iterations"].append(self._count)
        Path(os.environ["TRAIN_EQUAL_TIMES"]).write_text(json.dumps(self.record))


# ============================================================================================== arguments
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "ibsi_cpu.yaml"))
    p.add_argument("--data", default=str(SHARED_DATA / "Dataset001_IBSISTS"), help="nnU-Net raw dataset folder")
    p.add_argument("--folds", nargs="+", type=int, default=[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--iterations", type=int, default=None,
                   help="total training iterations (default: the config's max_epochs x iterations_per_epoch)")
    p.add_argument("--iterations-per-epoch", type=int, default=None,
                   help="default: the config's (capped at --iterations); --iterations must be a multiple of it")
    p.add_argument("--augmentation", choices=["nnunet", "basic", "none"], default="nnunet",
                   help="both sides (default nnunet: nnU-Net's stock pipeline; the config's value is reported)")
    p.add_argument("--mirror", action="store_true", help="score both with mirroring TTA (default: neither)")
    p.add_argument("--override", action="append", default=[],
                   help="an extra cli.py argument for our side that may also shape the plan (repeatable), "
                        "e.g. --override=--data.patch_size=[32,32,16]")
    p.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    p.add_argument("--no-measured", action="store_true", help="skip the extra row of ours in the measured precision")
    p.add_argument("--ours-python", default=None,
                   help="python of the project venv for our side (default: REPO/.venv/bin/python, else this one)")
    p.add_argument("--workdir", default=None,
                   help="nnUNet_raw / _preprocessed / _results, our cache, runs, masks (default: a new temporary "
                        "folder under cache/benchmarks, removed at the end unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--json", default=str(REPO / "cache" / "benchmarks" / "train_equal.json"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-args", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child_env(threads: int, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    path = [str(REPO), str(Path(__file__).resolve().parent)]  # this checkout's package; train_equal.TrainTimer
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "WANDB_MODE": "offline",
                "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1", "nnUNet_compile": "false",
                "PYTHONPATH": os.pathsep.join(path + [p for p in [os.environ.get("PYTHONPATH")] if p])})
    env.update(extra or {})
    return env


def run_child(python: str, name: str, spec: dict, env: dict, log: Path) -> dict:
    """This script in ``--child name`` mode under ``python``; its RESULT line plus wall time."""
    cmd = [python, str(Path(__file__).resolve()), "--child", name, "--child-args", json.dumps(spec)]
    result = run_measured(cmd, env=env, cwd=REPO, log=log)
    if result["returncode"] != 0:
        raise SystemExit(f"{name} failed (exit {result['returncode']}), see {log}:\n{result['output'][-4000:]}")
    lines = [line for line in result["output"].splitlines() if line.startswith("RESULT ")]
    out = json.loads(lines[-1][len("RESULT "):]) if lines else {}
    out["wall_s"] = result["seconds"]
    return out


def emit(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


# ============================================================================================== our plan (our venv)
def child_ours_plan(spec: dict) -> None:
    """Our configuration resolved as cli.py resolves it, the plan (fingerprint of all training cases) and the
    preprocessed cache of every case (timed)."""
    from lightning_flare.cli import main as cli_main
    from lightning_flare.cpu_precision import cpu_bf16_is_faster

    sys.argv = sys.argv[:1]  # LightningCLI warns when it is given args beside a command line
    cli = cli_main(["--config", spec["config"], *spec["overrides"], "--data.data_dir", spec["data"],
                    "--data.cache_dir", spec["cache"], "--trainer.logger", "false", "--trainer.precision", "32-true"],
                   run=False)
    dm, model, trainer = cli.datamodule, cli.model, cli.trainer
    plan = dm.plan_from_data()
    start = time.perf_counter()
    entries = dm._cache(plan, dm.dataset.cases("Tr"))
    seconds = time.perf_counter() - start
    hp = model.hparams
    emit({"plan": plan.to_dict(), "fingerprint": {k: v for k, v in (dm.fingerprint or {}).items() if k != "sources"},
          "net": dict(model.net.init_args),
          "data": {k: getattr(dm, k) for k in ("batch_size", "iterations_per_epoch", "oversample_foreground",
                                               "augmentation", "num_workers", "num_folds", "split_seed")},
          "model": {"lr": hp.lr, "momentum": hp.momentum, "weight_decay": hp.weight_decay, "nesterov": hp.nesterov,
                    "poly_exponent": hp.poly_exponent},
          "trainer": {"max_epochs": trainer.max_epochs, "gradient_clip_val": trainer.gradient_clip_val,
                      "gradient_clip_algorithm": str(trainer.gradient_clip_algorithm.value
                                                     if hasattr(trainer.gradient_clip_algorithm, "value")
                                                     else trainer.gradient_clip_algorithm)},
          "case_ids": [c.case_id for c in dm.dataset.cases("Tr")],
          "cache": {e.case_id: [str(e.image), str(e.label)] for e in entries}, "cache_s": seconds,
          "bf16_faster": bool(cpu_bf16_is_faster()), "torch": __import__("torch").__version__})


# ============================================================================================== nnU-Net set-up
def dataset_name_of(raw: Path) -> tuple[str, int]:
    match = re.fullmatch(r"Dataset(\d{3})_\w+", raw.name)
    return (raw.name, int(match.group(1))) if match else ("Dataset999_EqualWork", 999)


def write_nnunet_tree(raw: Path, info: dict, folders: dict, name: str) -> list[dict]:
    """Raw dataset (links), plans / dataset.json / fingerprint / splits in nnUNet_preprocessed; returns the splits."""
    from lightning_flare.nnunet_compat import plans_from_plan
    from lightning_flare.plan import Plan
    from lightning_flare.raw_dataset import kfold_splits
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    raw_dir = Path(folders["nnUNet_raw"]) / name
    raw_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("imagesTr", "labelsTr"):
        if not (raw_dir / sub).exists():
            (raw_dir / sub).symlink_to((raw / sub).resolve(), target_is_directory=True)
    dataset = json.loads((raw / "dataset.json").read_text())
    write_json(raw_dir / "dataset.json", dataset)

    plan, fp = Plan.from_dict(info["plan"]), info["fingerprint"]
    if fp:  # median shape after resampling (x, y, z): only informative fields of the plans depend on it
        shapes = [[s * sp / t for s, sp, t in zip(shape, spacing, plan.target_spacing)]
                  for shape, spacing in zip(fp["shapes"], fp["spacings"])]
        median = [int(round(v)) for v in np.median(shapes, axis=0)]
        inten = fp["intensity"]
        foreground = {"max": inten["max"], "min": inten["min"], "median": inten["median"]}
    else:
        median, foreground = None, None
    plans = plans_from_plan(plan, info["net"], name, CONFIGURATION, info["data"]["batch_size"], median, foreground)
    pre = Path(folders["nnUNet_preprocessed"]) / name
    write_json(pre / f"{PLANS}.json", plans)
    write_json(pre / "dataset.json", dataset)
    write_json(pre / "dataset_fingerprint.json", {  # nnU-Net only copies it to the results folder
        "foreground_intensity_properties_per_channel": plans["foreground_intensity_properties_per_channel"],
        "spacings": [list(reversed(s)) for s in fp.get("spacings", [])],
        "shapes_after_crop": [list(reversed(s)) for s in fp.get("shapes", [])],
        "median_relative_size_after_cropping": 1.0, "written_by": "benchmarks/train_equal.py (our fingerprint)"})

    ids = sorted(info["case_ids"])
    own = raw / "splits_final.json"
    if own.is_file():  # our select_fold uses it too
        splits = json.loads(own.read_text())
    else:
        splits = kfold_splits(ids, info["data"]["num_folds"], info["data"]["split_seed"])
        theirs = generate_crossval_split(ids, seed=12345, n_splits=5)
        same = [{"train": sorted(a["train"]), "val": sorted(a["val"])} for a in splits] == \
               [{"train": sorted(b["train"]), "val": sorted(b["val"])} for b in theirs]
        if not same:
            raise SystemExit("our folds differ from nnU-Net's generate_crossval_split(seed 12345, 5 folds): "
                             f"ours {splits}, nnU-Net's {theirs}")
        print(f"folds: identical to nnU-Net's own 5-fold split (seed 12345) of {len(ids)} cases")
    write_json(pre / "splits_final.json", splits)
    return splits


def compare_preprocessing(info: dict, pre_dir: Path) -> dict:
    """nnU-Net's preprocessed arrays vs our cache, case by case (nnU-Net's (c, z, y, x) after its nonzero crop)."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = pre_dir / f"{PLANS}_{CONFIGURATION}"
    ds = infer_dataset_class(str(folder))(str(folder))
    same_shape, image_diff, label_diff, outside, cropped = 0, 0.0, 0, 0, []
    for case, (image, label) in sorted(info["cache"].items()):
        data, seg, _, _ = ds.load_case(case)
        ours_img = np.load(image).transpose(2, 1, 0)
        ours_seg = np.load(label).transpose(2, 1, 0)
        if tuple(data.shape[1:]) != ours_img.shape:
            cropped.append(f"{case} {tuple(data.shape[1:])} vs {ours_img.shape}")
            continue
        same_shape += 1
        image_diff = max(image_diff, float(np.abs(np.asarray(data[0]) - ours_img).max()))
        seg = np.asarray(seg[0])
        differ = (seg > 0) != (ours_seg > 0)
        label_diff += int(differ.sum())
        outside += int((differ & (seg < 0)).sum())
    line = (f"nnU-Net's preprocessing vs our cache: {same_shape}/{len(info['cache'])} cases of the same shape, "
            f"max |image difference| {image_diff:.3g}, {label_diff} tumour voxels differ ({outside} of them nnU-Net's "
            "-1, outside its nonzero mask)")
    if cropped:
        line += f"; different shapes (nnU-Net's nonzero crop?): {', '.join(cropped)}"
    print(line)
    return {"same_shape": same_shape, "max_image_abs_diff": image_diff, "label_voxels_differ": label_diff,
            "label_voxels_differ_outside_nonzero": outside, "different_shape": cropped}


# ============================================================================================== nnU-Net (bench venv)
def make_trainer_class(spec: dict):
    """nnUNetTrainer with the configuration's counts and a clock around each epoch's training loop."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoDA import nnUNetTrainerNoDA

    base = nnUNetTrainerNoDA if spec["augmentation"] == "none" else nnUNetTrainer

    class EqualWorkTrainer(base):
        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cpu")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = spec["epochs"]
            self.num_iterations_per_epoch = spec["iterations_per_epoch"]
            self.num_val_iterations_per_epoch = 1  # its pseudo validation cannot be skipped: the least there is
            self.initial_lr = spec["lr"]
            self.weight_decay = spec["weight_decay"]
            self.oversample_foreground_percent = spec["oversample"]
            self.equal_work_times = {"epoch_seconds": [], "epoch_iterations": []}

        def on_train_epoch_start(self):
            super().on_train_epoch_start()
            self._clock = time.perf_counter()

        def on_train_epoch_end(self, train_outputs):
            self.equal_work_times["epoch_seconds"].append(time.perf_counter() - self._clock)
            self.equal_work_times["epoch_iterations"].append(len(train_outputs))
            super().on_train_epoch_end(train_outputs)

        if spec["augmentation"] == "basic":  # our BASIC (augmentation/spec.py) from nnU-Net's own transforms
            @staticmethod
            def get_training_transforms(patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                        do_dummy_2d_data_aug, use_mask_for_norm=None, is_cascaded=False,
                                        foreground_labels=None, regions=None, ignore_label=None):
                from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
                from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
                from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
                from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
                from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
                from batchgeneratorsv2.transforms.utils.random import RandomTransform
                from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform

                transforms = [MirrorTransform(allowed_axes=mirror_axes),
                              RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1,
                                                                     synchronize_channels=True), apply_probability=0.1),
                              RandomTransform(MultiplicativeBrightnessTransform(
                                  multiplier_range=(0.75, 1.25), synchronize_channels=False, p_per_channel=1),
                                  apply_probability=0.15),
                              RemoveLabelTansform(-1, 0)]
                if deep_supervision_scales is not None:
                    transforms.append(DownsampleSegForDSTransform(ds_scales=deep_supervision_scales))
                return ComposeTransforms(transforms)

            def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
                rotation, dummy_2d, _, mirror_axes = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
                return rotation, dummy_2d, self.configuration_manager.patch_size, mirror_axes  # no spatial transform

    EqualWorkTrainer.__name__ = EqualWorkTrainer.__qualname__ = TRAINER
    return EqualWorkTrainer


def child_nnunet_train(spec: dict) -> None:
    import random

    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    torch.set_num_threads(spec["threads"])
    random.seed(spec["seed"])
    np.random.seed(spec["seed"])
    torch.manual_seed(spec["seed"])
    pre = Path(os.environ["nnUNet_preprocessed"]) / spec["dataset"]
    plans = load_json(str(pre / f"{PLANS}.json"))
    plans["continue_training"] = False  # nnU-Net 2.8's trainer pops it (run_training.get_trainer_from_args sets it)
    trainer = make_trainer_class(spec)(plans, CONFIGURATION, spec["fold"], load_json(str(pre / "dataset.json")),
                                       torch.device("cpu"))
    start = time.perf_counter()
    trainer.run_training()
    times = dict(trainer.equal_work_times, run_training_s=time.perf_counter() - start, output=trainer.output_folder,
                 precision="32-true (nnU-Net: no autocast on the CPU)")
    write_json(Path(trainer.output_folder) / "equal_work_times.json", times)
    emit(times)


def child_nnunet_predict(spec: dict) -> None:
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    torch.set_num_threads(spec["threads"])
    fold_dir = Path(spec["fold_dir"])
    plans_manager = PlansManager(load_json(str(fold_dir.parent / "plans.json")))
    dataset_json = load_json(str(fold_dir.parent / "dataset.json"))
    checkpoint = torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    config = plans_manager.get_configuration(checkpoint["init_args"]["configuration"])
    # our trainer subclass only sets counts: nnUNetTrainer builds the same network (the predictor would look the
    # subclass up by name inside the nnunetv2 package)
    network = nnUNetTrainer.build_network_architecture(
        plans_manager, config, determine_num_input_channels(plans_manager, config, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=spec["mirror"],
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, config, [checkpoint["network_weights"]], dataset_json,
                                    checkpoint["trainer_name"], checkpoint["inference_allowed_mirroring_axes"])
    start = time.perf_counter()
    predictor.predict_from_files(spec["input"], spec["output"], save_probabilities=False, overwrite=True,
                                 num_processes_preprocessing=spec["threads"],
                                 num_processes_segmentation_export=spec["threads"])
    emit({"predict_s": time.perf_counter() - start})


# ============================================================================================== runs
def epochs_and_iterations(args, info: dict) -> tuple[int, int]:
    ipe, epochs = int(info["data"]["iterations_per_epoch"]), int(info["trainer"]["max_epochs"])
    if args.iterations_per_epoch:
        ipe = args.iterations_per_epoch
    if args.iterations is None:
        return epochs, ipe
    ipe = min(ipe, args.iterations)
    if args.iterations % ipe:
        raise SystemExit(f"--iterations {args.iterations} is not a multiple of {ipe} iterations per epoch")
    return args.iterations // ipe, ipe


def train_nnunet(args, info, work, folders, name, fold, seed, epochs, ipe) -> dict:
    results = work / "nnunet" / f"results_seed{seed}"
    spec = {"dataset": name, "fold": fold, "seed": seed, "epochs": epochs, "iterations_per_epoch": ipe,
            "lr": info["model"]["lr"], "weight_decay": info["model"]["weight_decay"],
            "oversample": info["data"]["oversample_foreground"], "augmentation": args.augmentation,
            "threads": args.threads}
    env = child_env(args.threads, {**folders, "nnUNet_results": str(results),
                                   "nnUNet_n_proc_DA": str(info["data"]["num_workers"])})
    out = run_child(sys.executable, "nnunet-train", spec, env, work / "logs" / f"nnunet_fold{fold}_seed{seed}.log")
    out["fold_dir"] = out.pop("output")
    out["precision"] = "32-true"
    return out


def without_time_budget(config: Path, work: Path) -> list[str]:
    """``--config`` arguments that drop the config's TimeBudget callback (it would end a slow fit early: equal work
    means the same iterations on both sides), or none when it has no such callback. The rest of its callbacks stay."""
    import yaml

    callbacks = ((yaml.safe_load(config.read_text()) or {}).get("trainer") or {}).get("callbacks")
    if not isinstance(callbacks, list):
        return []
    kept = [c for c in callbacks if not str((c or {}).get("class_path", "")).endswith("TimeBudget")]
    if len(kept) == len(callbacks):
        return []
    layer = work / "ours_no_time_budget.yaml"
    layer.write_text(yaml.safe_dump({"trainer": {"callbacks": kept}}, sort_keys=False))
    return ["--config", str(layer)]


def train_ours(args, info, work, fold, seed, epochs, ipe, measured: bool) -> dict:
    tag = f"fold{fold}_seed{seed}_{'measured' if measured else 'fp32'}"
    run_dir, times = work / "ours" / tag, work / "ours" / f"{tag}_times.json"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = Path(args.config).resolve()
    cmd = [args.ours_python, str(REPO / "cli.py"), "fit", "--config", str(config), *without_time_budget(config, work),
           *args.override,
           "--data.data_dir", str(Path(args.data).resolve()), "--data.cache_dir", str(work / "ours_cache"),
           "--data.fold", str(fold), "--data.augmentation", args.augmentation,
           "--data.iterations_per_epoch", str(ipe), "--trainer.max_epochs", str(epochs),
           "--seed_everything", str(seed), "--data.seed", str(seed),
           "--trainer.limit_val_batches", "0", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
           "--trainer.default_root_dir", str(run_dir), "--trainer.callbacks+=train_equal.TrainTimer"]
    if not measured:
        cmd += ["--trainer.precision", "32-true"]
    env = child_env(args.threads, {"TRAIN_EQUAL_TIMES": str(times)})
    result = run_measured(cmd, env=env, cwd=REPO, log=work / "logs" / f"ours_{tag}.log")
    if result["returncode"] != 0:
        raise SystemExit(f"ours (cli.py fit) failed, see {work / 'logs' / f'ours_{tag}.log'}:\n{result['output'][-4000:]}")
    out = json.loads(times.read_text())
    out.update(wall_s=result["seconds"], ckpt=str(run_dir / "checkpoints" / "last.ckpt"))
    return out


def predict_nnunet(args, work, folders, trained: dict, images: Path, out_dir: Path) -> dict:
    shutil.rmtree(out_dir, ignore_errors=True)
    spec = {"fold_dir": trained["fold_dir"], "input": str(images), "output": str(out_dir), "mirror": args.mirror,
            "threads": args.threads}
    return run_child(sys.executable, "nnunet-predict", spec, child_env(args.threads, folders),
                     work / "logs" / f"predict_{out_dir.name}.log")


def predict_ours(args, work, trained: dict, images: Path, out_dir: Path) -> dict:
    shutil.rmtree(out_dir, ignore_errors=True)
    sets = {"tta": str(args.mirror).lower(), "sw_steps": "nnunet", "sw_weighting": "gaussian", "sw_overlap": "0.5",
            "autocast": "false", "min_component_ml": "0", "skip_air": "false"}
    cmd = [args.ours_python, "-m", "lightning_flare.predict", "--ckpt", trained["ckpt"], "-i", str(images),
           "-o", str(out_dir), "--config", str(Path(args.config).resolve()), "--device", "cpu", "--overwrite"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    log = work / "logs" / f"predict_{out_dir.name}.log"
    result = run_measured(cmd, env=child_env(args.threads), cwd=REPO, log=log)
    if result["returncode"] != 0:
        raise SystemExit(f"ours (lightning_flare.predict) failed, see {log}:\n{result['output'][-4000:]}")
    return {"predict_s": result["seconds"]}


def score(pred_dir: Path, labels: Path) -> dict:
    from lightning_flare.evaluate import evaluate_folders

    rows, _ = evaluate_folders(pred_dir, labels)
    ratios = [r["predicted_ml"] / r["reference_ml"] for r in rows if r["reference_ml"] > 0]
    return {"dsc": statistics.fmean(r["dsc"] for r in rows), "nsd": statistics.fmean(r["nsd"] for r in rows),
            "median_volume_ratio": statistics.median(ratios) if ratios else float("nan"),
            "cases": [{k: r[k] for k in ("case", "dsc", "nsd", "reference_ml", "predicted_ml")} for r in rows]}


def validation_inputs(raw: Path, val_ids: list[str], work: Path, fold: int) -> tuple[Path, Path]:
    images, labels = work / f"val_fold{fold}" / "images", work / f"val_fold{fold}" / "labels"
    for folder in (images, labels):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    for case in val_ids:
        (images / f"{case}_0000.nii.gz").symlink_to((raw / "imagesTr" / f"{case}_0000.nii.gz").resolve())
        (labels / f"{case}.nii.gz").symlink_to((raw / "labelsTr" / f"{case}.nii.gz").resolve())
    return images, labels


def seconds_per_iteration(times: dict) -> tuple[float, float]:
    """(all epochs, epochs after the first) seconds per training iteration."""
    sec, its = times["epoch_seconds"], times["epoch_iterations"]
    total = sum(sec) / max(1, sum(its))
    later = sum(sec[1:]) / sum(its[1:]) if len(its) > 1 and sum(its[1:]) else float("nan")
    return total, later


# ============================================================================================== report
def spread(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    return f"{mean:.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def report(runs: list[dict], args, info: dict) -> dict:
    rows = [[r["side"], f"{r['fold']}/{r['seed']}", r["precision"], r["iterations"], r["train_wall_s"], r["s_per_it"],
             r["s_per_it_after_epoch1"], r["dsc"], r["nsd"], r["median_volume_ratio"], r["predict_s"]] for r in runs]
    print(format_table(["side", "fold/seed", "precision", "iterations", "training wall s", "s/it", "s/it after epoch 1",
                        "mean DSC", "mean NSD", "median vol ratio", "predict s"], rows,
                       f"Equal work: {Path(args.config).name}, augmentation {args.augmentation} on both sides, "
                       f"{'with' if args.mirror else 'without'} mirroring TTA; validation cases of each fold"))
    sides = list(dict.fromkeys(r["side"] for r in runs))
    summary = {}
    for side in sides:
        mine = [r for r in runs if r["side"] == side]
        summary[side] = {key: [r[key] for r in mine] for key in ("dsc", "nsd", "median_volume_ratio", "s_per_it")}
    print(format_table(["side", "runs", "mean DSC", "mean NSD", "median vol ratio", "s/it"],
                       [[s, len(summary[s]["dsc"]), spread(summary[s]["dsc"]), spread(summary[s]["nsd"]),
                         spread(summary[s]["median_volume_ratio"]), spread(summary[s]["s_per_it"])] for s in sides],
                       "Mean over folds / seeds (± standard deviation over runs)"))
    goals = {}
    if "nnU-Net" in summary and "ours" in summary:
        theirs, ours = summary["nnU-Net"], summary["ours"]
        d_t, d_o = statistics.fmean(theirs["dsc"]), statistics.fmean(ours["dsc"])
        s_t, s_o = statistics.fmean(theirs["s_per_it"]), statistics.fmean(ours["s_per_it"])
        goals = {"dsc": {"ours": d_o, "nnunet": d_t, "met": d_o >= d_t - DSC_MARGIN},
                 "s_per_it": {"ours": s_o, "nnunet": s_t, "met": s_o <= s_t}}
        print(f"goal: ours mean DSC {d_o:.3f} >= nnU-Net's {d_t:.3f} - {DSC_MARGIN}: "
              f"{'met' if goals['dsc']['met'] else 'NOT MET'}")
        print(f"goal: ours s/it {s_o:.3f} <= nnU-Net's {s_t:.3f} (both fp32; ratio {s_o / s_t:.2f}): "
              f"{'met' if goals['s_per_it']['met'] else 'NOT MET'}")
        if "ours (measured)" in summary:
            s_m = statistics.fmean(summary["ours (measured)"]["s_per_it"])
            print(f"ours in the measured precision: {s_m:.3f} s/it ({s_m / s_t:.2f} x nnU-Net's fp32)")
    return {"summary": summary, "goals": goals}


def differences(args, info: dict) -> list[str]:
    """What the two sides cannot share, besides the implementations themselves."""
    out = []
    fixed = {**info["model"], **info["trainer"], "deep_supervision": info["net"].get("deep_supervision", True)}
    for key, value in NNUNET_FIXED.items():
        if fixed.get(key) != value and not (isinstance(value, float) and fixed.get(key) == value):
            out.append(f"{key}: ours {fixed.get(key)!r}, nnU-Net fixed at {value!r}")
    if info["data"]["augmentation"] != args.augmentation:
        out.append(f"augmentation: the config says {info['data']['augmentation']!r}, both sides run "
                   f"{args.augmentation!r}" + (" (built from nnU-Net's transform classes, not a stock nnU-Net trainer)"
                                              if args.augmentation == "basic" else ""))
    out.append("validation during training: nnU-Net runs 1 pseudo-validation batch per epoch (cannot be skipped), "
               "ours none (outside the s/it clock on both sides)")
    out.append("checkpoints: nnU-Net writes checkpoint_best on every new best EMA pseudo Dice and a progress plot per "
               "epoch, ours last.ckpt per epoch (both outside the s/it clock, inside the training wall)")
    out.append("data loading: nnU-Net's augmentation workers start before its first epoch and run on across epochs "
               "(up to 6 batches buffered during its end-of-epoch work, outside the clock); ours' queue starts its "
               "worker in each epoch (inside the clock): 'after epoch 1' leaves out the first epoch's start")
    out.append("case sampling: ours draws cases as concatenated random permutations (each case about equally often "
               "per epoch), nnU-Net uniformly with replacement; nnU-Net's augmentation workers are unseeded")
    out.append(f"torch: ours {info['torch']} (--ours-python), nnU-Net {__import__('torch').__version__} (this venv)")
    return out


# ============================================================================================== main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(args.child_args)
        {"ours-plan": child_ours_plan, "nnunet-train": child_nnunet_train,
         "nnunet-predict": child_nnunet_predict}[args.child](spec)
        return 0
    try:
        import nnunetv2  # noqa: F401
    except ImportError as err:
        raise SystemExit(f"nnunetv2 is not importable ({err}): run with .venv-bench/bin/python (make bench-env)")
    from lightning_flare.cpu_precision import cpu_model

    if args.ours_python is None:
        own = REPO / ".venv" / "bin" / "python"
        args.ours_python = str(own) if own.is_file() else sys.executable
    raw = Path(args.data).resolve()
    created = args.workdir is None or not Path(args.workdir).exists()
    if args.workdir is None:
        (REPO / "cache" / "benchmarks").mkdir(parents=True, exist_ok=True)
        args.workdir = tempfile.mkdtemp(prefix="train_equal_", dir=REPO / "cache" / "benchmarks")
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"CPU: {cpu_model()}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} at start")
    print(f"work folder {work}; ours runs with {args.ours_python}")

    # --- our plan, cache; nnU-Net's tree and preprocessing
    info = run_child(args.ours_python, "ours-plan", {"config": str(Path(args.config).resolve()),
                                                    "overrides": args.override, "data": str(raw),
                                                    "cache": str(work / "ours_cache")},
                     child_env(args.threads), work / "logs" / "ours_plan.log")
    plan = info["plan"]
    print(f"plan: spacing {plan['target_spacing']} mm, patch {plan['patch_size']}, CT normalisation {plan['intensity']}, "
          f"batch {info['data']['batch_size']}; network {info['net']['features_per_stage']}; "
          f"our cache built in {info['cache_s']:.1f} s")
    epochs, ipe = epochs_and_iterations(args, info)
    print(f"counts: {epochs} epochs x {ipe} iterations = {epochs * ipe} iterations, lr {info['model']['lr']}, "
          f"oversample {info['data']['oversample_foreground']}, {info['data']['num_workers']} augmentation worker(s), "
          f"{args.threads} torch threads")
    folders = nnunet_environment(work / "nnunet")
    name, dataset_id = dataset_name_of(raw)
    splits = write_nnunet_tree(raw, info, folders, name)
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

    start = time.perf_counter()
    preprocess_dataset(dataset_id, PLANS, (CONFIGURATION,), (args.threads,), verbose=False, show_progress_bar=False)
    nnunet_pre_s = time.perf_counter() - start
    print(f"nnU-Net preprocessing: {nnunet_pre_s:.1f} s ({args.threads} processes)")
    pre_check = compare_preprocessing(info, Path(folders["nnUNet_preprocessed"]) / name)
    measured = not args.no_measured and info["bf16_faster"]
    if not args.no_measured and not measured:
        print("ours in the measured precision: fp32 on this CPU (bf16 is not faster), so no extra row")

    # --- train and score
    runs = []
    for fold in args.folds:
        images, labels = validation_inputs(raw, splits[fold]["val"], work, fold)
        for seed in args.seeds:
            jobs = [("nnU-Net", None), ("ours", False)] + ([("ours (measured)", True)] if measured else [])
            for side, ours_measured in jobs:
                print(f"fold {fold} seed {seed}: training {side} ({epochs * ipe} iterations) ...", flush=True)
                tag = f"{'nnunet' if ours_measured is None else 'ours_measured' if ours_measured else 'ours'}"
                out_dir = work / "predictions" / f"{tag}_fold{fold}_seed{seed}"
                if ours_measured is None:
                    trained = train_nnunet(args, info, work, folders, name, fold, seed, epochs, ipe)
                    predicted = predict_nnunet(args, work, folders, trained, images, out_dir)
                else:
                    trained = train_ours(args, info, work, fold, seed, epochs, ipe, ours_measured)
                    predicted = predict_ours(args, work, trained, images, out_dir)
                s_it, s_it_later = seconds_per_iteration(trained)
                scores = score(out_dir, labels)
                runs.append({"side": side, "fold": fold, "seed": seed, "precision": trained["precision"],
                             "iterations": sum(trained["epoch_iterations"]), "train_wall_s": trained["wall_s"],
                             "s_per_it": s_it, "s_per_it_after_epoch1": s_it_later,
                             "predict_s": predicted.get("predict_s", predicted.get("wall_s")), **scores,
                             "epoch_seconds": trained["epoch_seconds"]})
                print(f"  {side}: {trained['wall_s']:.0f} s wall, {s_it:.3f} s/it, DSC {scores['dsc']:.3f}, "
                      f"NSD {scores['nsd']:.3f}", flush=True)

    # --- report
    result = report(runs, args, info)
    diffs = differences(args, info)
    print("\nWhat differs between the two sides (besides the implementations):")
    for line in diffs:
        print(f"- {line}")
    total = time.perf_counter() - started
    print(f"total wall time {total:.0f} s; load average at end {os.getloadavg()[0]:.2f}")
    write_json(args.json, {"cpu": cpu_model(), "config": str(args.config), "overrides": args.override,
                           "augmentation": args.augmentation, "mirror": args.mirror, "threads": args.threads,
                           "epochs": epochs, "iterations_per_epoch": ipe, "plan": plan, "net": info["net"],
                           "preprocessing": {"ours_cache_s": info["cache_s"], "nnunet_s": nnunet_pre_s, **pre_check},
                           "runs": runs, **result, "differences": diffs, "total_wall_s": total})
    print(f"wrote {args.json}")
    if created and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
