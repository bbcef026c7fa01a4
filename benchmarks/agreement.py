"""Mask agreement with nnU-Net v2's ``nnUNetPredictor`` when both use the same trained weights.

Goal (issue "Fast, memory-bounded predictor", item 4): Dice >= 0.99 per case between our mask and
nnU-Net's (step 0.5, Gaussian, no mirroring) on the shared lung CT and a synthetic 512 x 512 x 200 scan.

Weights: one of our checkpoints trained with nnU-Net's preprocessing (``--data.resampling nnunet``, no
anti-aliasing), briefly, so that the masks are not trivial; e.g. ``python cli.py fit --config configs/demo.yaml
--data.anti_aliasing false`` (the demo itself low-passes before downsampling, which nnU-Net cannot reproduce). It is written as an nnU-Net v2 results folder (plans.json
from the checkpoint's plan and network arguments; weights permuted from our (x, y, z) to nnU-Net's (z, y, x));
that folder converted back with ``python -m lightning_flare.convert_nnunet`` must give identical tensors.
Ours runs as users run it (``cli.py predict``: bf16 autocast, Hann weighting); nnU-Net in fp32 with its
Gaussian weighting, as its predictor does on the CPU. Both read the same file and write a mask on its grid.

Run with the benchmark environment:
  .venv-bench/bin/python benchmarks/agreement.py --ckpt CKPT --config configs/demo.yaml --override=--data.anti_aliasing=false
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    REPO, SHARED_DATA, convert_and_compare, format_table, nnunet_environment, require_nnunet, run_measured,
    synthetic_ct, write_nifti,
)
from predict import TRAINER_FOLDER, child_env, dice, run_nnunet  # noqa: E402

GOAL = 0.99
MODEL_DATASET = "Dataset904_AgreementCheck"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(REPO / "runs" / "demo" / "checkpoints" / "last.ckpt"))
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"),
                   help="our YAML for cli.py predict (its plan settings must match the checkpoint)")
    p.add_argument("--override", action="append", default=[],
                   help="an extra cli.py argument for our side (repeatable), e.g. --override=--data.anti_aliasing=false")
    p.add_argument("--cases", nargs="+", choices=["lung", "synthetic"], default=["lung", "synthetic"])
    p.add_argument("--images", nargs="*", default=[], help="more CASE_0000.nii.gz files to compare on")
    p.add_argument("--seed", type=int, default=0, help="synthetic scan")
    p.add_argument("--nnunet-processes", type=int, default=2)
    p.add_argument("--work-dir", default=str(REPO / "cache" / "benchmarks" / "agreement"))
    p.add_argument("--data-root", default=str(SHARED_DATA))
    return p.parse_args(argv)


def export_nnunet_folder(ckpt: Path, work: Path) -> Path:
    """Our checkpoint as an nnU-Net v2 results folder; checks that converting it back is lossless."""
    from lightning_flare.convert_nnunet import ConversionError, export_results_folder
    from lightning_flare.export import load_for_export

    net, plan, _ = load_for_export(ckpt)
    ours = {k: v.detach().clone() for k, v in net.state_dict().items()}
    model_dir = work / "model" / MODEL_DATASET / TRAINER_FOLDER
    shutil.rmtree(model_dir, ignore_errors=True)
    try:
        export_results_folder(ckpt, model_dir, MODEL_DATASET)
    except ConversionError as err:  # e.g. a plan that preprocesses differently from nnU-Net
        raise SystemExit(f"{ckpt}: {err}; train one with --data.resampling nnunet --data.anti_aliasing false for "
                         "this comparison") from err
    convert_and_compare(model_dir, work / "model" / "converted_back.ckpt", ours, child_env())
    print(f"{ckpt}: plan spacing {plan.target_spacing} mm, patch {plan.patch_size}; nnU-Net folder {model_dir} "
          "(converted back: identical tensors)")
    return model_dir


def inputs(args, work: Path) -> list[tuple[str, Path]]:
    """(case id, image path) pairs; each image sits alone in a folder named after the case."""
    found = []
    if "lung" in args.cases:
        source = Path(args.data_root) / "Dataset002_LungCT" / "imagesTs" / "LUNG1_0000.nii.gz"
        if source.is_file():
            found.append(("LUNG1", source))
        else:
            print(f"skipping the lung CT: {source} not found")
    if "synthetic" in args.cases:
        path = work / "inputs" / f"SYNTH{args.seed}_0000.nii.gz"
        if not path.is_file():
            hu, _ = synthetic_ct((512, 512, 200), (0.8, 0.8, 2.5), seed=args.seed, num_lesions=3)
            write_nifti(hu, (0.8, 0.8, 2.5), path, origin=(-204.8, -204.8, -250.0))
        found.append((f"SYNTH{args.seed}", path))
    found += [(Path(p).name.removesuffix(".nii.gz").removesuffix("_0000"), Path(p)) for p in args.images]
    return found


def run_ours(case_id: str, image: Path, ckpt: Path, config: Path, work: Path, override: list[str]) -> dict:
    folder, out = work / "ours_in" / case_id, work / "out" / "ours" / case_id
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / f"{case_id}_0000.nii.gz").symlink_to(image.resolve())
    cmd = [sys.executable, str(REPO / "cli.py"), "predict", "--config", str(config), "--ckpt_path", str(ckpt),
           "--data.predict_dir", str(folder), "--writer.output_dir", str(out), "--writer.overwrite", "true",
           "--trainer.accelerator", "cpu", "--trainer.logger", "false",
           "--trainer.default_root_dir", str(work / "lightning_root"),
           "--model.inference.tta", "false",  # nnU-Net's side runs without mirroring (the demo config mirrors)
           *override]
    result = run_measured(cmd, env=child_env(), cwd=REPO, log=work / "out" / f"{case_id}_ours.log")
    if result["returncode"] != 0:
        raise SystemExit(f"ours (cli.py predict) failed on {image}:\n{result['output'][-3000:]}")
    result["mask"] = out / f"{case_id}.nii.gz"
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    require_nnunet()
    import SimpleITK as sitk

    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    nnunet_environment(work / "nnunet")
    ckpt, config = Path(args.ckpt).resolve(), Path(args.config).resolve()
    if not ckpt.is_file():
        raise SystemExit(f"{ckpt}: no such checkpoint (run `make demo` first, or give --ckpt)")
    print(f"agreement benchmark: load average {os.getloadavg()[0]:.2f} at start")
    model_dir = export_nnunet_folder(ckpt, work)
    rows, failed = [], []
    for case_id, image in inputs(args, work):
        start = time.perf_counter()
        ours = run_ours(case_id, image, ckpt, config, work, args.override)
        theirs = run_nnunet(case_id, image, model_dir, work / "out" / "nnunet", args.nnunet_processes,
                            work / "out" / f"{case_id}_nnunet.log")
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(ours["mask"])))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(theirs["mask"])))
        if a.shape != b.shape:
            raise SystemExit(f"{case_id}: mask shapes differ (ours {a.shape}, nnU-Net {b.shape})")
        d = dice(a, b)
        ok = d >= GOAL or (a.sum() == 0 and b.sum() == 0)
        failed += [] if ok else [case_id]
        rows.append([case_id, "x".join(map(str, reversed(a.shape))), f"{100 * (a > 0).mean():.3f}",
                     f"{100 * (b > 0).mean():.3f}", int((a != b).sum()), d, "yes" if ok else "NO",
                     ours["seconds"], theirs["seconds"]])
        print(f"{case_id}: done in {time.perf_counter() - start:.0f} s", flush=True)
    print(format_table(["case", "size (x y z)", "ours fg %", "nnU-Net fg %", "voxels differing", "Dice",
                        f">= {GOAL}", "ours s", "nnU-Net s"], rows,
                       f"ours (cli.py predict --config {config.name} {' '.join(args.override)}) vs nnUNetPredictor "
                       f"(fp32, Gaussian, step 0.5, no mirroring); weights {ckpt}"))
    print(json.dumps({"goal": GOAL, "failed": failed}))
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
