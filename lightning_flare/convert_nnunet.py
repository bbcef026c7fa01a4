"""Convert an nnU-Net v2 results folder (plans.json, dataset.json, fold_X/checkpoint_final.pth) into a
Lightning checkpoint that ``python cli.py predict --ckpt_path model.ckpt`` loads.

nnU-Net arrays are (z, y, x) (after ``transpose_forward``); our tensors are (x, y, z). Spacing, patch size,
per-stage kernel sizes / strides and every conv kernel's spatial dims are permuted accordingly.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any, Collection, Mapping

import torch

from .io import atomic_write
from .network import PlainConvUNet
from .plan import IntensityStats, Plan
from .raw_dataset import parse_labels

NET_CLASS_PATH = "lightning_flare.network.PlainConvUNet"


class ConversionError(ValueError):
    """An nnU-Net folder this converter cannot handle; the message names the file and value."""


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(f"{path}: file not found (expected an nnU-Net v2 results folder)")
    return json.loads(path.read_text())


def resolve_configuration(plans: Mapping[str, Any], name: str) -> dict:
    """The configuration ``name`` with its ``inherits_from`` chain merged (child keys win, as in nnU-Net)."""
    configs = plans.get("configurations", {})
    chain: list[str] = []
    while name is not None:
        if name not in configs:
            raise ConversionError(f"plans.json: configuration {name!r} not found; available: {sorted(configs)}")
        if name in chain:
            raise ConversionError(f"plans.json: circular inherits_from: {' -> '.join(chain + [name])}")
        chain.append(name)
        name = configs[name].get("inherits_from")
    merged: dict = {}
    for parent in reversed(chain):
        merged |= copy.deepcopy(configs[parent])
    return {k: v for k, v in merged.items() if k != "inherits_from"}


def axis_map(plans: Mapping[str, Any]) -> list[int]:
    """For each of our axes (x, y, z), the nnU-Net network axis that holds it (reverse when no transpose)."""
    tf = list(plans.get("transpose_forward", [0, 1, 2]))
    if sorted(tf) != [0, 1, 2]:
        raise ConversionError(f"plans.json: transpose_forward must be a permutation of [0, 1, 2], got {tf}")
    return [tf.index(2 - j) for j in range(3)]  # our axis j = original array axis 2 - j


def _triples(name: str, value: Any, n: int) -> list[list[int]]:
    values = value if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ConversionError(f"plans.json: {name} must have {n} entries (one per stage), got {value}")
    return [[int(v)] * 3 if isinstance(v, int) else [int(i) for i in v] for v in values]


def _check_op(key: str, value: Any, expected: str) -> None:
    if str(value).split(".")[-1] != expected:
        raise ConversionError(f"plans.json: {key}={value!r} is not supported (only {expected})")


def _architecture(config: Mapping[str, Any]) -> dict:
    """Architecture in nnU-Net axis order, from the new ("architecture") or the v2.2 style keys."""
    if "architecture" in config:
        arch = config["architecture"]
        _check_op("network_class_name", arch.get("network_class_name"), "PlainConvUNet")
        kw = arch.get("arch_kwargs", {})
        _check_op("conv_op", kw.get("conv_op"), "Conv3d")
        _check_op("norm_op", kw.get("norm_op"), "InstanceNorm3d")
        _check_op("nonlin", kw.get("nonlin"), "LeakyReLU")
        norm_kwargs, nonlin_kwargs = kw.get("norm_op_kwargs") or {}, kw.get("nonlin_kwargs") or {}
        for key, bad in (("conv_bias", kw.get("conv_bias") is not True), ("dropout_op", kw.get("dropout_op")),
                         ("nonlin_first", kw.get("nonlin_first")),
                         ("norm_op_kwargs", not norm_kwargs.get("affine", True))):
            if bad:
                raise ConversionError(f"plans.json: arch_kwargs {key}={kw.get(key)!r} is not supported")
        n, features = int(kw["n_stages"]), kw["features_per_stage"]
        return {"features_per_stage": [int(f) for f in ([features] * n if isinstance(features, int) else features)],
                "kernel_sizes": _triples("kernel_sizes", kw["kernel_sizes"], n),
                "strides": _triples("strides", kw["strides"], n), "n_conv_per_stage": kw["n_conv_per_stage"],
                "n_conv_per_stage_decoder": kw["n_conv_per_stage_decoder"],
                "norm_eps": float(norm_kwargs.get("eps", 1e-5)),
                "negative_slope": float(nonlin_kwargs.get("negative_slope", 0.01))}
    if "UNet_class_name" not in config:
        raise ConversionError("plans.json: configuration has neither 'architecture' nor 'UNet_class_name'")
    _check_op("UNet_class_name", config["UNet_class_name"], "PlainConvUNet")
    kernels, base, top = config["conv_kernel_sizes"], config["UNet_base_num_features"], config["unet_max_num_features"]
    n = len(kernels)
    return {"features_per_stage": [min(base * 2 ** i, top) for i in range(n)],
            "kernel_sizes": _triples("conv_kernel_sizes", kernels, n),
            "strides": _triples("pool_op_kernel_sizes", config["pool_op_kernel_sizes"], n),
            "n_conv_per_stage": config["n_conv_per_stage_encoder"],
            "n_conv_per_stage_decoder": config["n_conv_per_stage_decoder"], "norm_eps": 1e-5, "negative_slope": 0.01}


def _labels(dataset: Mapping[str, Any], source: str | Path = "dataset.json") -> dict[str, int]:
    """{name: int} from dataset.json's labels (ints or "1" strings; DatasetError for regions, ignore, ...)."""
    return parse_labels(dataset.get("labels", {"background": 0, "tumor": 1}), source=source)


def net_kwargs_from_plans(plans: Mapping[str, Any], configuration: str,
                          dataset: Mapping[str, Any] | None = None) -> dict:
    """``PlainConvUNet`` init args (x, y, z order) for a configuration; num_classes from dataset.json (else 2)."""
    config = resolve_configuration(plans, configuration)
    arch, amap = _architecture(config), axis_map(plans)
    channels = len((dataset or {}).get("channel_names", (dataset or {}).get("modality", {"0": "CT"})))
    return {"in_channels": channels, "num_classes": len(_labels(dataset)) if dataset else 2,
            "features_per_stage": arch["features_per_stage"],
            "kernel_sizes": [[k[i] for i in amap] for k in arch["kernel_sizes"]],
            "strides": [[s[i] for i in amap] for s in arch["strides"]],
            "n_conv_per_stage": arch["n_conv_per_stage"], "n_conv_per_stage_decoder": arch["n_conv_per_stage_decoder"],
            "deep_supervision": True, "norm_eps": arch["norm_eps"], "negative_slope": arch["negative_slope"]}


def plan_from_plans(plans: Mapping[str, Any], configuration: str, dataset: Mapping[str, Any]) -> Plan:
    """Our (x, y, z) Plan: spacing, patch, CT normalisation of channel 0, labels."""
    config, amap = resolve_configuration(plans, configuration), axis_map(plans)
    schemes = config.get("normalization_schemes", ["CTNormalization"])
    if list(schemes) != ["CTNormalization"]:
        raise ConversionError(f"plans.json: normalization_schemes={schemes} is not supported (CTNormalization only)")
    props = plans.get("foreground_intensity_properties_per_channel", {}).get("0")
    if props is None:
        raise ConversionError("plans.json: foreground_intensity_properties_per_channel['0'] is missing")
    intensity = IntensityStats(float(props["percentile_00_5"]), float(props["percentile_99_5"]),
                               float(props["mean"]), float(props["std"]))
    spacing, patch = config["spacing"], config["patch_size"]
    return Plan(tuple(float(spacing[i]) for i in amap), tuple(int(patch[i]) for i in amap), intensity,
                _labels(dataset), resampling="nnunet", anisotropy_threshold=3.0)


def convert_state_dict(weights: Mapping[str, torch.Tensor], amap: list[int]) -> dict[str, torch.Tensor]:
    """nnU-Net network weights -> our module's state_dict ("net." prefix, conv kernels permuted to x, y, z)."""
    perm = [0, 1] + [2 + i for i in amap]
    out = {}
    for key, value in weights.items():
        for prefix in ("module.", "_orig_mod."):
            key = key[len(prefix):] if key.startswith(prefix) else key
        if value.ndim == 5:  # Conv3d (out, in, *k) and ConvTranspose3d (in, out, *k)
            value = value.permute(*perm)
        out["net." + key] = value.detach().clone().contiguous()
    return out


def readable(path: str) -> None:
    """Give a temporary file (mkstemp: 0600) the usual umask-based mode before it is renamed into place."""
    umask = os.umask(0o022)
    os.umask(umask)  # os.umask only reads by also setting; restore at once
    os.chmod(path, 0o666 & ~umask)


def load_checkpoint(path: str | Path) -> dict:
    """torch.load on CPU, weights_only when possible."""
    if not Path(path).is_file():
        raise ConversionError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # e.g. nnU-Net checkpoints pickle numpy scalars in their logs
        warnings.warn(f"{path}: not loadable with weights_only=True; unpickling it in full (only convert "
                      "checkpoints you trust)", stacklevel=2)
        return torch.load(path, map_location="cpu", weights_only=False)


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
    return "3d_fullres", "default: neither the checkpoint nor the folder name says"


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
    _labels(dataset, source=dataset_source)  # unsupported labels: the message names the file
    if configuration is not None:
        resolve_configuration(plans, configuration)  # a name plans.json lacks: say so, with the names it has
    configuration, why = choose_configuration(configuration, init_args.get("configuration"), root,
                                               known=plans.get("configurations", {}), source=ckpt_path)
    net_kwargs = net_kwargs_from_plans(plans, configuration, dataset)
    plan = plan_from_plans(plans, configuration, dataset)
    state_dict = convert_state_dict(source["network_weights"], axis_map(plans))
    try:  # our PlainConvUNet must take the converted weights with strict=True
        PlainConvUNet(**net_kwargs).load_state_dict({k[len("net."):]: v for k, v in state_dict.items()}, strict=True)
    except RuntimeError as err:
        raise ConversionError(f"{ckpt_path}: weights do not fit PlainConvUNet({net_kwargs}) of configuration "
                              f"{configuration!r} ({why}): {str(err)[:800]}") from err
    return {"state_dict": state_dict, "plan": plan.to_dict(),
            "hyper_parameters": {"net": {"class_path": NET_CLASS_PATH, "init_args": net_kwargs}},
            "net_init_args": net_kwargs, "pytorch-lightning_version": lightning.__version__, "epoch": 0,
            "global_step": 0,
            "nnunet": {"configuration": configuration, "configuration_source": why, "fold": str(fold),
                       "source": str(ckpt_path.resolve()), "dataset_json": dataset_source,
                       "trainer_name": source.get("trainer_name"), "plans_name": plans.get("plans_name"),
                       "dataset_name": plans.get("dataset_name"), "transpose_forward": plans.get("transpose_forward")}}


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
            from .export import net_kwargs_from_config, net_differences

            differences = net_differences(net_kwargs_from_config(args.config), checkpoint["net_init_args"])
    except (ConversionError, KeyError, ValueError) as err:
        print(f"error: {err if not isinstance(err, KeyError) else f'plans.json: missing key {err}'}", file=sys.stderr)
        return 1
    atomic_write(args.output, lambda tmp: (torch.save(checkpoint, tmp), readable(tmp)))
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
