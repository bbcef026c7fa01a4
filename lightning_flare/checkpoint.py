"""Reading our checkpoints: the file itself, its plan, the network's weights and the network's arguments.

The network of a checkpoint (its class path and init args) is looked up in one order, used by ``cli.py``
(``validate`` / ``test`` / ``predict`` with ``--ckpt_path``), ``export`` and the nnU-Net converter:

1. ``hyper_parameters["net"]``: ``{"class_path": ..., "init_args": ...}`` as LightningCLI writes ``model.net``
   (``convert_nnunet`` writes it; our module does not save the network as a hyper-parameter). It comes first
   because it is the only entry that names the class.
2. ``net_init_args``: what ``FlareSegmentationModule.on_save_checkpoint`` stores from ``net.init_args`` (every
   checkpoint training writes); its class is ``PlainConvUNet`` (``NET_CLASS_PATH``), the one network with
   ``init_args``.

Both hold the same arguments whenever both are present (``convert_nnunet`` writes the same dict twice).
Without either, ``export`` falls back to a YAML config's ``model.net`` and then to the weight shapes.
"""
from __future__ import annotations

import inspect
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from .network import PlainConvUNet, _as_triple, _per_stage
from .plan import Plan

NET_CLASS_PATH = "lightning_flare.network.PlainConvUNet"
_NET_CLASS_NAMES = (NET_CLASS_PATH, "PlainConvUNet")


class CheckpointError(ValueError):
    """A checkpoint (or config) that cannot be used; the message names the file and value."""


def load_checkpoint(path: str | Path, trusted_fallback: bool = True) -> dict:
    """``torch.load`` on the CPU with ``weights_only=True``; ``trusted_fallback``: when that fails (e.g. nnU-Net
    checkpoints pickle numpy scalars in their logs), warn and unpickle the file in full."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trusted_fallback:
            raise
        warnings.warn(f"{path}: not loadable with weights_only=True; unpickling it in full (only convert "
                      "checkpoints you trust)", stacklevel=2)
        return torch.load(path, map_location="cpu", weights_only=False)


def network_spec(checkpoint: Mapping[str, Any]) -> dict | None:
    """``{"class_path", "init_args"}`` of the checkpoint's network (order: module docstring), else None."""
    net = (checkpoint.get("hyper_parameters") or {}).get("net")
    if isinstance(net, Mapping):
        return {"class_path": net.get("class_path", NET_CLASS_PATH), "init_args": dict(net.get("init_args") or {})}
    if isinstance(checkpoint.get("net_init_args"), Mapping):
        return {"class_path": NET_CLASS_PATH, "init_args": dict(checkpoint["net_init_args"])}
    return None


def _plain_unet_args(net: Mapping[str, Any], source: str | Path) -> dict:
    if net.get("class_path", NET_CLASS_PATH) not in _NET_CLASS_NAMES:
        raise CheckpointError(f"{source}: model.net.class_path={net.get('class_path')!r} is not supported "
                              f"({NET_CLASS_PATH})")
    return dict(net.get("init_args") or {})


def net_kwargs_from_checkpoint(checkpoint: Mapping[str, Any], source: str | Path = "checkpoint") -> dict | None:
    """``PlainConvUNet`` init args of the checkpoint (``network_spec``), else None; another class is an error."""
    spec = network_spec(checkpoint)
    return None if spec is None else _plain_unet_args(spec, source)


BASE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "base.yaml"  # read by cli.py before any --config


def net_kwargs_from_config(path: str | Path) -> dict:
    """``model.net.init_args`` of a LightningCLI YAML config on top of ``configs/base.yaml`` (as ``cli.py``
    composes them: the config's init_args update the base's for the same class); the class must be our
    PlainConvUNet."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: config file not found")
    net: dict = {}
    for source in ([BASE_CONFIG] if BASE_CONFIG.is_file() and BASE_CONFIG.resolve() != path.resolve() else []) + [path]:
        found = ((yaml.safe_load(source.read_text()) or {}).get("model") or {}).get("net")
        if isinstance(found, Mapping):
            same_class = found.get("class_path", net.get("class_path")) == net.get("class_path")
            init_args = {**(net.get("init_args") or {}), **(found.get("init_args") or {})} if same_class else \
                dict(found.get("init_args") or {})
            net = {"class_path": found.get("class_path", net.get("class_path", NET_CLASS_PATH)), "init_args": init_args}
    if not net:
        raise CheckpointError(f"{path}: no model.net section (nor in {BASE_CONFIG})")
    return _plain_unet_args(net, path)


def infer_net_kwargs(weights: Mapping[str, torch.Tensor]) -> dict:
    """PlainConvUNet init args read off the weight shapes (stage 0 stride assumed 1; default eps/slope)."""
    enc = [(int(m[1]), int(m[2]), w) for k, w in weights.items()
           if (m := re.fullmatch(r"encoder\.stages\.(\d+)\.0\.convs\.(\d+)\.conv\.weight", k))]
    dec = [int(m[1]) for k in weights if (m := re.fullmatch(r"decoder\.stages\.(\d+)\.convs\.(\d+)\.conv\.weight", k))]
    if not enc or "decoder.seg_layers.0.weight" not in weights:
        raise CheckpointError("state_dict does not look like a PlainConvUNet (no encoder.stages.*.conv.weight)")
    n = max(s for s, _, _ in enc) + 1
    first = {s: w for s, i, w in enc if i == 0}
    return {"in_channels": int(first[0].shape[1]), "num_classes": int(weights["decoder.seg_layers.0.weight"].shape[0]),
            "features_per_stage": [int(first[s].shape[0]) for s in range(n)],
            "kernel_sizes": [list(first[s].shape[2:]) for s in range(n)],
            "strides": [[1, 1, 1]] + [list(weights[f"decoder.transpconvs.{n - 1 - s}.weight"].shape[2:])
                                      for s in range(1, n)],
            "n_conv_per_stage": [sum(1 for s2, _, _ in enc if s2 == s) for s in range(n)],
            "n_conv_per_stage_decoder": [dec.count(t) for t in range(n - 1)]}


def canonical_net_kwargs(kwargs: Mapping[str, Any]) -> dict:
    """Init args with defaults filled in and per-stage values expanded to lists (kernels and strides as
    [x, y, z]); ``deep_supervision`` is dropped (it changes the outputs, not the weights)."""
    full = {k: p.default for k, p in inspect.signature(PlainConvUNet).parameters.items()} | dict(kwargs)
    n = len(full["features_per_stage"])
    full["features_per_stage"] = list(full["features_per_stage"])
    for key, count in (("kernel_sizes", n), ("strides", n)):
        full[key] = [list(_as_triple(key, v)) for v in _per_stage(key, full[key], count)]
    for key, count in (("n_conv_per_stage", n), ("n_conv_per_stage_decoder", n - 1)):
        full[key] = list(_per_stage(key, full[key], count))
    full.pop("deep_supervision", None)
    return full


def net_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two PlainConvUNet init-arg sets (first vs second)."""
    ca, cb = canonical_net_kwargs(a), canonical_net_kwargs(b)
    return [f"{k}: {ca.get(k)} != {cb.get(k)}" for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)]


def net_weights(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The network's entries of the module's state_dict, without their ``net.`` prefix."""
    return {k[len("net."):]: v for k, v in (checkpoint.get("state_dict") or {}).items() if k.startswith("net.")}


def checkpoint_plan(checkpoint: Mapping[str, Any], source: str | Path = "checkpoint") -> Plan:
    """The plan the checkpoint carries (training and ``convert_nnunet`` store it)."""
    if "plan" not in checkpoint:
        raise CheckpointError(f"{source}: checkpoint has no plan (not made by lightning_flare training or conversion)")
    return Plan.from_dict(checkpoint["plan"])


def build_network(kwargs: Mapping[str, Any], weights: Mapping[str, torch.Tensor], source: str | Path, context: str,
                  error: type[CheckpointError] = CheckpointError) -> PlainConvUNet:
    """``PlainConvUNet(**kwargs)`` holding ``weights`` (strict); else ``error`` naming ``source`` (the file) and
    ``context`` (where the args came from)."""
    net = PlainConvUNet(**kwargs)
    try:
        net.load_state_dict(dict(weights), strict=True)
    except RuntimeError as err:
        raise error(f"{source}: weights do not fit PlainConvUNet({dict(kwargs)}) {context}: {str(err)[:800]}") from err
    return net
