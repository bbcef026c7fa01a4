"""Convert an nnU-Net v2 results folder (plans.json, dataset.json, fold_X/checkpoint_final.pth) into a
Lightning checkpoint that ``python cli.py predict --ckpt_path model.ckpt`` loads, and back
(``write_results_folder`` / ``export_results_folder``: our network as an nnU-Net results folder).

nnU-Net arrays are (z, y, x) (after ``transpose_forward``); our tensors are (x, y, z). Spacing, patch size,
per-stage kernel sizes / strides and every conv kernel's spatial dims are permuted accordingly
(``lightning_flare.nnunet_compat``, which holds the mapping in both directions).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Collection, Mapping

import torch

from .checkpoint import (NET_CLASS_PATH, build_network, checkpoint_plan, infer_net_kwargs, load_checkpoint,
                         net_differences, net_kwargs_from_checkpoint, net_kwargs_from_config, net_weights)
from .io import atomic_write, write_text
from .nnunet_compat import (DEFAULT_CONFIGURATION, ConversionError, axis_map, dataset_json, labels_of,
                            net_kwargs_from_plans, plan_from_plans, plans_from_plan, resolve_configuration,
                            weights_from_nnunet, weights_to_nnunet)

__all__ = ["ConversionError", "choose_configuration", "convert", "export_results_folder", "main",
           "net_kwargs_from_plans", "plan_from_plans", "resolve_configuration", "write_results_folder"]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(f"{path}: file not found (expected an nnU-Net v2 results folder)")
    return json.loads(path.read_text())


def choose_configuration(requested: str | None, trained: str | None, results_dir: str | Path,
                         known: Collection[str], source: str | Path) -> tuple[str, str]:
    """(configuration, why): the one asked for, else as trained (the checkpoint's init_args, then the results
    folder name TRAINER__PLANS__CONFIGURATION when plans.json has it), else 3d_fullres. Asking for another than
    the trained one is an error."""
    if requested is not None:
        if trained not in (None, requested):
            raise ConversionError(f"{source}: trained with configuration {trained!r}, not {requested!r} "
                                  "(leave out --configuration to convert it as trained)")
        return requested, "--configuration"
    if trained is not None:
        return str(trained), "as trained: the checkpoint's init_args"
    parts = Path(results_dir).resolve().name.split("__")
    if len(parts) == 3 and parts[2] in known:
        return parts[2], f"as trained: the results folder name {Path(results_dir).resolve().name!r}"
    return DEFAULT_CONFIGURATION, "default: neither the checkpoint nor the folder name says"


def convert(results_dir: str | Path, fold: str = "all", configuration: str | None = None,
            checkpoint_name: str = "checkpoint_final.pth") -> dict:
    """The Lightning checkpoint dict for one fold of an nnU-Net v2 results folder; ``configuration`` None:
    the one the checkpoint was trained with (see ``choose_configuration``)."""
    import lightning

    root = Path(results_dir)
    plans = _read_json(root / "plans.json")
    ckpt_path = root / f"fold_{fold}" / checkpoint_name
    if not ckpt_path.is_file():
        folds = sorted(p.name for p in root.glob("fold_*"))
        raise ConversionError(f"{ckpt_path}: not found (fold {fold!r}; folds present: {folds or 'none'})")
    source = load_checkpoint(ckpt_path)
    if "network_weights" not in source:
        raise ConversionError(f"{ckpt_path}: no 'network_weights' (keys: {sorted(source)})")
    init_args = source.get("init_args") or {}
    dataset_path = root / "dataset.json"
    if not dataset_path.is_file() and isinstance(init_args.get("dataset_json"), dict):
        dataset, dataset_source = init_args["dataset_json"], f"{ckpt_path} init_args['dataset_json']"
    else:  # nnU-Net writes dataset.json beside plans.json; its checkpoints carry a copy
        dataset, dataset_source = _read_json(dataset_path), str(dataset_path)
    labels_of(dataset, source=dataset_source)  # unsupported labels: the message names the file
    if configuration is not None:
        resolve_configuration(plans, configuration)  # a name plans.json lacks: say so, with the names it has
    configuration, why = choose_configuration(configuration, init_args.get("configuration"), root,
                                               known=plans.get("configurations", {}), source=ckpt_path)
    net_kwargs = net_kwargs_from_plans(plans, configuration, dataset)
    plan = plan_from_plans(plans, configuration, dataset)
    weights = weights_from_nnunet(source["network_weights"], axis_map(plans))
    # our PlainConvUNet must take the converted weights with strict=True
    build_network(net_kwargs, weights, ckpt_path, f"of configuration {configuration!r} ({why})", error=ConversionError)
    state_dict = {"net." + k: v for k, v in weights.items()}
    return {"state_dict": state_dict, "plan": plan.to_dict(),
            "hyper_parameters": {"net": {"class_path": NET_CLASS_PATH, "init_args": net_kwargs}},
            "net_init_args": net_kwargs, "pytorch-lightning_version": lightning.__version__, "epoch": 0,
            "global_step": 0,
            "nnunet": {"configuration": configuration, "configuration_source": why, "fold": str(fold),
                       "source": str(ckpt_path.resolve()), "dataset_json": dataset_source,
                       "trainer_name": source.get("trainer_name"), "plans_name": plans.get("plans_name"),
                       "dataset_name": plans.get("dataset_name"), "transpose_forward": plans.get("transpose_forward")}}


def write_results_folder(folder: str | Path, weights: Mapping[str, torch.Tensor], plans: Mapping[str, Any],
                         dataset: Mapping[str, Any], configuration: str = DEFAULT_CONFIGURATION, fold: str = "all",
                         trainer_name: str = "nnUNetTrainer") -> Path:
    """An nnU-Net v2 results folder: ``plans.json``, ``dataset.json`` and ``fold_{fold}/checkpoint_final.pth``
    holding our network's ``weights`` (its state_dict, (x, y, z)) permuted to the axes of ``plans``. Each file
    is written atomically; other files in ``folder`` are left as they are."""
    folder = Path(folder)
    resolve_configuration(plans, configuration)
    network_weights = weights_to_nnunet(weights, axis_map(plans))
    write_text(folder / "plans.json", json.dumps(plans, indent=4))
    write_text(folder / "dataset.json", json.dumps(dataset, indent=4))
    checkpoint = {"network_weights": network_weights, "trainer_name": trainer_name,
                  "init_args": {"plans": dict(plans), "configuration": configuration, "fold": str(fold),
                                "dataset_json": dict(dataset), "device": "cpu"},
                  "inference_allowed_mirroring_axes": None, "current_epoch": 0, "optimizer_state": None,
                  "grad_scaler_state": None, "logging": {}, "_best_ema": None}
    atomic_write(folder / f"fold_{fold}" / "checkpoint_final.pth", lambda tmp: torch.save(checkpoint, tmp))
    return folder


def export_results_folder(ckpt_path: str | Path, folder: str | Path, dataset_name: str = "Dataset999_LightningFlare",
                          configuration: str = DEFAULT_CONFIGURATION, fold: str = "all", batch_size: int = 2) -> Path:
    """Our checkpoint (training or ``convert``) as an nnU-Net v2 results folder (``write_results_folder``) that
    ``nnUNetPredictor`` loads and ``convert`` turns back into the same weights, plan and labels. Name the folder
    ``TRAINER__PLANS__CONFIGURATION`` (e.g. ``nnUNetTrainer__nnUNetPlans__3d_fullres``) under
    ``nnUNet_results/DATASET_NAME/`` for nnU-Net's own tools."""
    checkpoint = load_checkpoint(ckpt_path)
    plan, weights = checkpoint_plan(checkpoint, ckpt_path), net_weights(checkpoint)
    net_kwargs = net_kwargs_from_checkpoint(checkpoint, ckpt_path)
    net_kwargs = infer_net_kwargs(weights) if net_kwargs is None else net_kwargs
    build_network(net_kwargs, weights, ckpt_path, "(the checkpoint's network)", error=ConversionError)
    fingerprint = checkpoint.get("fingerprint") or {}
    plans = plans_from_plan(plan, net_kwargs, dataset_name, configuration, batch_size,
                            foreground=fingerprint.get("intensity"))
    dataset = dataset_json(plan.labels, len(fingerprint.get("case_ids") or []) or 1)
    return write_results_folder(folder, weights, plans, dataset, configuration, fold)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_flare.convert_nnunet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results_dir", help="nnU-Net results folder holding plans.json, dataset.json, fold_X/")
    for flag, default in (("--fold", "all"), ("--checkpoint-name", "checkpoint_final.pth"), ("--output", "model.ckpt")):
        parser.add_argument(flag, default=default, help=f"default: {default}")
    parser.add_argument("--configuration", help="default: as trained (the checkpoint's init_args, else the folder "
                        "name TRAINER__PLANS__CONFIGURATION, else 3d_fullres); another than the trained one is an error")
    parser.add_argument("--config", help="optional YAML config whose model.net is compared with the converted one")
    args = parser.parse_args(argv)
    try:
        checkpoint = convert(args.results_dir, args.fold, args.configuration, args.checkpoint_name)
        differences = []
        if args.config:
            differences = net_differences(net_kwargs_from_config(args.config), checkpoint["net_init_args"])
    except (ConversionError, KeyError, ValueError) as err:
        print(f"error: {err if not isinstance(err, KeyError) else f'plans.json: missing key {err}'}", file=sys.stderr)
        return 1
    atomic_write(args.output, lambda tmp: torch.save(checkpoint, tmp))
    import yaml

    plan = checkpoint["plan"]
    snippet = {"model": {"net": checkpoint["hyper_parameters"]["net"]},
               "data": {"target_spacing": plan["target_spacing"], "patch_size": plan["patch_size"],
                        "intensity_stats": plan["intensity"]}}
    info = checkpoint["nnunet"]
    print(f"configuration {info['configuration']!r} ({info['configuration_source']}); labels from {info['dataset_json']}")
    print(f"wrote {args.output} ({len(checkpoint['state_dict'])} tensors). The checkpoint carries model.net and the "
          "plan, so `cli.py predict --ckpt_path` uses them; the matching YAML is:")
    print(yaml.safe_dump(snippet, default_flow_style=None, sort_keys=False))
    for line in differences:
        print(f"warning: {args.config} (config != converted) {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
