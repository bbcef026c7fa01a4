"""nnU-Net v2 compatibility, both directions: nnU-Net's ``plans.json`` / ``dataset.json`` / network weights <->
our ``PlainConvUNet`` init args, ``Plan`` and state_dict. ``convert_nnunet`` reads and writes the folders.

Axes: nnU-Net's arrays and networks are in its network order, the (z, y, x) array that SimpleITK reads permuted by
``transpose_forward``; ours are (x, y, z). ``axis_map(plans)`` gives, for each of our axes, the nnU-Net axis that
holds it: ``reorder(values, amap)`` takes a per-axis value (spacing, patch size, kernel size, stride) to ours,
``reorder(values, inverse(amap))`` back, and conv kernels' spatial dimensions are permuted the same way
(``weights_from_nnunet`` / ``weights_to_nnunet``). Plans written here use ``transpose_forward`` [0, 1, 2].
"""
from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import torch

from .checkpoint import CheckpointError, canonical_net_kwargs
from .plan import IntensityStats, Plan
from .raw_dataset import parse_labels

DEFAULT_CONFIGURATION, PLANS_NAME = "3d_fullres", "nnUNetPlans"
# nnU-Net's classes for our network: the reader accepts these (by their last name part), the writer writes them
NETWORK_CLASS = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
OPS = {"conv_op": "torch.nn.modules.conv.Conv3d", "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
       "nonlin": "torch.nn.LeakyReLU"}
ANISOTROPY_THRESHOLD = 3.0  # nnU-Net's ANISO_THRESHOLD: a separate axis is resampled on its own above it


class ConversionError(CheckpointError):
    """An nnU-Net folder (or a checkpoint for one) this converter cannot handle; the message names the file and
    value."""


# ------------------------------------------------------------------------------------------------ axes
def axis_map(plans: Mapping[str, Any]) -> list[int]:
    """For each of our axes (x, y, z), the nnU-Net network axis that holds it (reverse when no transpose)."""
    tf = list(plans.get("transpose_forward", [0, 1, 2]))
    if sorted(tf) != [0, 1, 2]:
        raise ConversionError(f"plans.json: transpose_forward must be a permutation of [0, 1, 2], got {tf}")
    return [tf.index(2 - j) for j in range(3)]  # our axis j = original array axis 2 - j


def inverse(order: Sequence[int]) -> list[int]:
    """The permutation that undoes ``order``."""
    return [list(order).index(i) for i in range(len(order))]


def reorder(values: Sequence, order: Sequence[int]) -> list:
    """``values`` taken in ``order``: nnU-Net's to ours with ``axis_map``, ours to nnU-Net's with its inverse."""
    return [values[i] for i in order]


def _reorder_kernel(value: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
    if value.ndim == 5:  # Conv3d (out, in, *k) and ConvTranspose3d (in, out, *k)
        value = value.permute(0, 1, *[2 + i for i in order])
    return value.detach().clone().contiguous()


def weights_from_nnunet(weights: Mapping[str, torch.Tensor], amap: Sequence[int]) -> dict[str, torch.Tensor]:
    """nnU-Net's ``network_weights`` -> our network's state_dict (conv kernels permuted to x, y, z)."""
    out = {}
    for key, value in weights.items():
        for prefix in ("module.", "_orig_mod."):
            key = key[len(prefix):] if key.startswith(prefix) else key
        out[key] = _reorder_kernel(value, amap)
    return out


def weights_to_nnunet(weights: Mapping[str, torch.Tensor], amap: Sequence[int]) -> dict[str, torch.Tensor]:
    """Our network's state_dict -> nnU-Net's ``network_weights`` (conv kernels permuted to nnU-Net's axes)."""
    return {key: _reorder_kernel(value, inverse(amap)) for key, value in weights.items()}


# ------------------------------------------------------------------------------------------------ nnU-Net -> ours
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


def _triples(name: str, value: Any, n: int) -> list[list[int]]:
    values = value if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ConversionError(f"plans.json: {name} must have {n} entries (one per stage), got {value}")
    return [[int(v)] * 3 if isinstance(v, int) else [int(i) for i in v] for v in values]


def _check_op(key: str, value: Any, expected: str) -> None:
    expected = expected.split(".")[-1]
    if str(value).split(".")[-1] != expected:
        raise ConversionError(f"plans.json: {key}={value!r} is not supported (only {expected})")


def _architecture(config: Mapping[str, Any]) -> dict:
    """Architecture in nnU-Net axis order, from the new ("architecture") or the v2.2 style keys."""
    if "architecture" in config:
        arch = config["architecture"]
        _check_op("network_class_name", arch.get("network_class_name"), NETWORK_CLASS)
        kw = arch.get("arch_kwargs", {})
        for key, name in OPS.items():
            _check_op(key, kw.get(key), name)
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
    _check_op("UNet_class_name", config["UNet_class_name"], NETWORK_CLASS)
    kernels, base, top = config["conv_kernel_sizes"], config["UNet_base_num_features"], config["unet_max_num_features"]
    n = len(kernels)
    return {"features_per_stage": [min(base * 2 ** i, top) for i in range(n)],
            "kernel_sizes": _triples("conv_kernel_sizes", kernels, n),
            "strides": _triples("pool_op_kernel_sizes", config["pool_op_kernel_sizes"], n),
            "n_conv_per_stage": config["n_conv_per_stage_encoder"],
            "n_conv_per_stage_decoder": config["n_conv_per_stage_decoder"], "norm_eps": 1e-5, "negative_slope": 0.01}


def labels_of(dataset: Mapping[str, Any], source: Any = "dataset.json") -> dict[str, int]:
    """{name: int} from dataset.json's labels (ints or "1" strings; DatasetError for regions, ignore, ...)."""
    return parse_labels(dataset.get("labels", {"background": 0, "tumor": 1}), source=source)


def net_kwargs_from_plans(plans: Mapping[str, Any], configuration: str,
                          dataset: Mapping[str, Any] | None = None) -> dict:
    """``PlainConvUNet`` init args (x, y, z order) for a configuration; num_classes from dataset.json (else 2)."""
    config = resolve_configuration(plans, configuration)
    arch, amap = _architecture(config), axis_map(plans)
    channels = len((dataset or {}).get("channel_names", (dataset or {}).get("modality", {"0": "CT"})))
    return {"in_channels": channels, "num_classes": len(labels_of(dataset)) if dataset else 2,
            "features_per_stage": arch["features_per_stage"],
            "kernel_sizes": [reorder(k, amap) for k in arch["kernel_sizes"]],
            "strides": [reorder(s, amap) for s in arch["strides"]],
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
    return Plan(tuple(float(s) for s in reorder(config["spacing"], amap)),
                tuple(int(p) for p in reorder(config["patch_size"], amap)), intensity, labels_of(dataset),
                resampling="nnunet", anisotropy_threshold=ANISOTROPY_THRESHOLD)


# ------------------------------------------------------------------------------------------------ ours -> nnU-Net
def architecture_from_net_kwargs(net_kwargs: Mapping[str, Any], amap: Sequence[int] = (2, 1, 0)) -> dict:
    """nnU-Net's ``architecture`` entry for ``PlainConvUNet(**net_kwargs)``; ``amap``: ``axis_map`` of the plans
    it goes into (default: ``transpose_forward`` [0, 1, 2])."""
    net, back = canonical_net_kwargs(net_kwargs), inverse(amap)
    return {"network_class_name": NETWORK_CLASS,
            "arch_kwargs": {
                "n_stages": len(net["features_per_stage"]),
                "features_per_stage": [int(f) for f in net["features_per_stage"]], "conv_op": OPS["conv_op"],
                "kernel_sizes": [reorder([int(v) for v in k], back) for k in net["kernel_sizes"]],
                "strides": [reorder([int(v) for v in s], back) for s in net["strides"]],
                "n_conv_per_stage": [int(n) for n in net["n_conv_per_stage"]],
                "n_conv_per_stage_decoder": [int(n) for n in net["n_conv_per_stage_decoder"]], "conv_bias": True,
                "norm_op": OPS["norm_op"], "norm_op_kwargs": {"eps": float(net["norm_eps"]), "affine": True},
                "dropout_op": None, "dropout_op_kwargs": None, "nonlin": OPS["nonlin"],
                "nonlin_kwargs": {"inplace": True, "negative_slope": float(net["negative_slope"])}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def plans_from_plan(plan: Plan, net_kwargs: Mapping[str, Any], dataset_name: str,
                    configuration: str = DEFAULT_CONFIGURATION, batch_size: int = 2,
                    median_shape: Sequence[int] | None = None, foreground: Mapping[str, float] | None = None) -> dict:
    """nnU-Net v2 ``plans.json`` with one configuration that preprocesses as ``plan`` and builds our network
    (nnU-Net's default resampling: order 3 image / order 1 seg, separate z when anisotropic). ``median_shape``
    (x, y, z; default the patch size) and ``foreground`` (max, min, median of the foreground intensities, e.g. a
    checkpoint's fingerprint; default: clip bounds and mean) only fill fields nnU-Net's inference does not use."""
    if plan.resampling != "nnunet" or plan.anti_aliasing or plan.anisotropy_threshold != ANISOTROPY_THRESHOLD:
        raise ConversionError(f"the plan preprocesses differently from nnU-Net (resampling {plan.resampling!r}, "
                              f"anti_aliasing {plan.anti_aliasing}, anisotropy_threshold {plan.anisotropy_threshold}); "
                              "only resampling 'nnunet', no anti-aliasing and threshold 3 have an nnU-Net equivalent")
    if int(net_kwargs.get("in_channels", 1)) != 1 or int(net_kwargs.get("num_classes", 2)) != len(plan.labels):
        raise ConversionError(f"the network ({net_kwargs.get('in_channels', 1)} input channels, "
                              f"{net_kwargs.get('num_classes', 2)} classes) does not fit a single-channel CT plan "
                              f"with labels {plan.labels}")
    amap = axis_map({"transpose_forward": [0, 1, 2]})
    back = inverse(amap)
    spacing = [float(s) for s in reorder(plan.target_spacing, back)]
    median = [int(s) for s in reorder(median_shape or plan.patch_size, back)]
    resample, stats, foreground = "resample_data_or_seg_to_shape", plan.intensity, foreground or {}
    return {
        "dataset_name": dataset_name, "plans_name": PLANS_NAME, "original_median_spacing_after_transp": spacing,
        "original_median_shape_after_transp": median, "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {configuration: {
            "data_identifier": f"{PLANS_NAME}_{configuration}", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": int(batch_size), "patch_size": [int(p) for p in reorder(plan.patch_size, back)],
            "median_image_size_in_voxels": median, "spacing": spacing,
            "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": resample, "resampling_fn_seg": resample,
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": resample,
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
            "architecture": architecture_from_net_kwargs(net_kwargs, amap), "batch_dice": True}},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": float(foreground.get("max", stats.clip_high)), "mean": stats.mean,
            "median": float(foreground.get("median", stats.mean)), "min": float(foreground.get("min", stats.clip_low)),
            "percentile_00_5": stats.clip_low, "percentile_99_5": stats.clip_high, "std": stats.std}},
    }


def dataset_json(labels: Mapping[str, int], num_training: int, file_ending: str = ".nii.gz") -> dict:
    """nnU-Net v2 ``dataset.json`` of a single-channel CT dataset."""
    return {"channel_names": {"0": "CT"}, "labels": dict(labels), "numTraining": int(num_training),
            "file_ending": file_ending}
