"""What the two trainers feed the network (issue 13): training batches of ours and of nnU-Net v2's own data loader
and training transforms, on the same plan, fold and preprocessed arrays, summarised patch by patch.

    .venv-bench/bin/python benchmarks/batch_stats.py [--config configs/ibsi_cpu.yaml] [--batches 150]
        [--augmentation nnunet] [--cache-dir cache] [--workdir DIR] [--json FILE]

Ours: ``FlareDataModule.train_dataloader`` (the config, ``--augmentation``, fold 0, no loader workers) over as many
epochs as ``--batches`` needs. nnU-Net: ``nnUNetTrainer.get_dataloaders`` (single-threaded, numpy seeded) on
nnU-Net's preprocessing of the plan ``train_equal.py`` writes (``--workdir`` keeps and reuses it). Per patch position
(random / forced foreground, the last ``round(B * oversample)`` of each batch on both sides):
- tumour fraction of the patch, and the share of patches with any tumour, at every deep-supervision scale;
- outside: the share of the patch's voxels outside the image before augmentation (zero-filled), from the crop's box;
- the augmented image's mean and standard deviation.
Run with the benchmark environment (nnunetv2); our package is imported from this checkout.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SHARED_DATA, format_table, nnunet_environment, write_json  # noqa: E402

sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "ibsi_cpu.yaml"))
    p.add_argument("--data", default=str(SHARED_DATA / "Dataset001_IBSISTS"))
    p.add_argument("--cache-dir", default=str(REPO / "cache"), help="our preprocessed cache (built if missing)")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--batches", type=int, default=150)
    p.add_argument("--augmentation", choices=["nnunet", "basic", "none"], default="nnunet")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="nnU-Net's folders (default: a temporary folder, removed)")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def inside_fraction(shape, start, size) -> float:
    """Share of the box ``[start, start + size)`` that lies inside an array of ``shape``."""
    start, size, shape = (np.asarray(v, int) for v in (start, size, shape))
    overlap = np.clip(np.minimum(start + size, shape) - np.maximum(start, 0), 0, None)
    return float(np.prod(overlap) / np.prod(size))


def patch_row(image, labels, forced: bool, outside: float) -> dict:
    """One patch: image (x, y, z), labels: its label at each deep-supervision scale."""
    image = np.asarray(image, np.float64)
    row = {"forced": bool(forced), "outside": outside, "mean": float(image.mean()), "std": float(image.std())}
    for k, lab in enumerate(labels):
        lab = np.asarray(lab)
        row[f"tumour_{k}"] = float((lab > 0).mean())
        row[f"any_{k}"] = bool((lab > 0).any())
        row[f"negative_{k}"] = bool((lab < 0).any())
    return row


# ============================================================================================== ours
def ours_rows(args, plan_args: dict) -> list[dict]:
    from lightning_flare.datamodule import FlareDataModule
    from lightning_flare.loss import downsample_targets
    from lightning_flare.network import PlainConvUNet

    net_args = plan_args.pop("net")
    dm = FlareDataModule(data_dir=args.data, cache_dir=args.cache_dir, fold=args.fold, verify=False, num_workers=0,
                         augmentation=args.augmentation, seed=args.seed, **plan_args)
    dm.setup("fit")
    scales = PlainConvUNet(**net_args).output_scales()
    loader = dm.train_dataloader()
    shapes = {e.case_id: np.load(e.image, mmap_mode="r").shape for e in dm._cache(dm.plan, dm._fold_cases()[0])}
    rows, epoch = [], 0
    while len(rows) < 2 * args.batches:
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            targets = downsample_targets(batch["label"].long(), scales)
            for b in range(batch["image"].shape[0]):
                loc = batch["location"][b].numpy()
                outside = 1 - inside_fraction(shapes[batch["case_id"][b]], loc[:3], loc[3:] - loc[:3])
                rows.append(patch_row(batch["image"][b, 0], [t[b, 0] for t in targets],
                                      bool(batch["foreground_forced"][b]), outside))
            if len(rows) >= 2 * args.batches:
                break
        epoch += 1
    return rows


# ============================================================================================== nnU-Net
def nnunet_rows(args, folders: dict, name: str) -> list[dict]:
    import random

    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

    import train_equal as te

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    boxes = []  # (data shape, initial patch's lower corner, force_fg) of every crop, in the loader's order
    original = nnUNetDataLoader.get_bbox

    def recording_get_bbox(self, data_shape, force_fg, class_locations, *a, **k):
        lbs, ubs = original(self, data_shape, force_fg, class_locations, *a, **k)
        boxes.append((tuple(int(s) for s in data_shape), list(lbs), bool(force_fg), tuple(self.patch_size),
                      tuple(self.final_patch_size)))
        return lbs, ubs

    nnUNetDataLoader.get_bbox = recording_get_bbox
    pre = Path(folders["nnUNet_preprocessed"]) / name
    plans = load_json(str(pre / f"{te.PLANS}.json"))
    plans["continue_training"] = False
    info = json.loads((Path(args.workdir) / "info.json").read_text())
    spec = {"epochs": 1, "iterations_per_epoch": 1, "lr": info["model"]["lr"],
            "weight_decay": info["model"]["weight_decay"], "oversample": info["data"]["oversample_foreground"],
            "augmentation": args.augmentation}
    trainer = te.make_trainer_class(spec)(plans, te.CONFIGURATION, args.fold, load_json(str(pre / "dataset.json")),
                                          torch.device("cpu"))
    trainer.print_to_log_file = lambda *a, **k: None
    trainer._set_batch_size_and_oversample()  # what initialize() does besides building the network
    os.environ["nnUNet_n_proc_DA"] = "0"  # SingleThreadedAugmenter: numpy's seeded generator, this process
    train, _ = trainer.get_dataloaders()
    boxes.clear()  # get_dataloaders draws one batch of each loader to start them
    rows = []
    for _ in range(args.batches):
        batch = next(train)
        data, target = batch["data"], batch["target"]
        target = target if isinstance(target, list) else [target]
        for b in range(data.shape[0]):
            shape, lbs, forced, initial, final = boxes[-data.shape[0] + b]
            start = [lb + i // 2 - f // 2 for lb, i, f in zip(lbs, initial, final)]
            outside = 1 - inside_fraction(shape, start, final)
            # nnU-Net's arrays are (c, z, y, x): ours are (x, y, z)
            rows.append(patch_row(data[b, 0].numpy().transpose(2, 1, 0), [t[b, 0].numpy() for t in target], forced,
                                  outside))
        boxes.clear()
    nnUNetDataLoader.get_bbox = original
    return rows


# ============================================================================================== set-up and report
def prepare_nnunet(args) -> tuple[dict, str, dict]:
    """Our plan written as nnU-Net's plans, and nnU-Net's preprocessing of it, in ``args.workdir`` (reused)."""
    import train_equal as te

    work = Path(args.workdir)
    folders = nnunet_environment(work / "nnunet")
    raw = Path(args.data).resolve()
    name, dataset_id = te.dataset_name_of(raw)
    info_path = work / "info.json"
    if not info_path.is_file():
        info = te.run_child(str(REPO / ".venv" / "bin" / "python"), "ours-plan",
                            {"config": str(Path(args.config).resolve()), "overrides": [], "data": str(raw),
                             "cache": str(Path(args.cache_dir).resolve())}, te.child_env(1), work / "ours_plan.log")
        info_path.write_text(json.dumps(info))
    info = json.loads(info_path.read_text())
    folder = Path(folders["nnUNet_preprocessed"]) / name / f"{te.PLANS}_{te.CONFIGURATION}"
    if not folder.is_dir() or not any(folder.iterdir()):
        from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

        te.write_nnunet_tree(raw, info, folders, name)
        preprocess_dataset(dataset_id, te.PLANS, (te.CONFIGURATION,), (1,), verbose=False, show_progress_bar=False)
        te.compare_preprocessing(info, Path(folders["nnUNet_preprocessed"]) / name)
    return folders, name, info


def summary(rows: list[dict], n_scales: int) -> dict:
    out = {}
    for kind, forced in (("random", False), ("forced", True)):
        sel = [r for r in rows if r["forced"] == forced]
        if not sel:
            continue
        s = {"patches": len(sel), "outside_mean": statistics.fmean(r["outside"] for r in sel),
             "outside_any": statistics.fmean(r["outside"] > 0 for r in sel),
             "image_mean": statistics.fmean(r["mean"] for r in sel),
             "image_std": statistics.fmean(r["std"] for r in sel)}
        for k in range(n_scales):
            s[f"tumour_{k}"] = statistics.fmean(r[f"tumour_{k}"] for r in sel)
            s[f"any_{k}"] = statistics.fmean(r[f"any_{k}"] for r in sel)
            s[f"negative_{k}"] = sum(r[f"negative_{k}"] for r in sel)
        out[kind] = s
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from lightning_flare.cpu_precision import cpu_model

    created = args.workdir is None
    if created:
        args.workdir = tempfile.mkdtemp(prefix="batch_stats_")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_model()}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}")
    folders, name, info = prepare_nnunet(args)
    plan = info["plan"]
    data = info["data"]
    plan_args = {"target_spacing": plan["target_spacing"], "patch_size": plan["patch_size"],
                 "batch_size": data["batch_size"], "oversample_foreground": data["oversample_foreground"],
                 "iterations_per_epoch": data["iterations_per_epoch"]}
    rows = {"nnU-Net": nnunet_rows(args, folders, name)}
    from lightning_flare.network import PlainConvUNet

    n_scales = len(PlainConvUNet(**info["net"]).output_scales())
    rows["ours"] = ours_rows(args, {**plan_args, "net": info["net"]})
    result = {side: summary(r, n_scales) for side, r in rows.items()}
    header = ["side", "patches", "outside (mean)", "with outside", "image mean", "image std"]
    header += [f"tumour frac s{k}" for k in range(n_scales)] + [f"with tumour s{k}" for k in range(n_scales)]
    table = []
    for kind in ("random", "forced"):
        for side in ("nnU-Net", "ours"):
            s = result[side].get(kind)
            if s:
                table.append([f"{side} {kind}", s["patches"], s["outside_mean"], s["outside_any"], s["image_mean"],
                              s["image_std"], *[s[f"tumour_{k}"] for k in range(n_scales)],
                              *[s[f"any_{k}"] for k in range(n_scales)]])
    print(format_table(header, table, f"Training patches: {args.batches} batches per side, augmentation "
                                      f"{args.augmentation}, fold {args.fold}, patch {plan['patch_size']} (x, y, z)"))
    if args.json:
        write_json(args.json, {"cpu": cpu_model(), "batches": args.batches, "augmentation": args.augmentation,
                               "summary": result})
    if created:
        import shutil
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
