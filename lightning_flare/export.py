"""Export a checkpoint's U-Net to ONNX or TorchScript with the plan as metadata.

The exported model takes a normalised image (N, C, x, y, z) on the plan's grid (N and x, y, z dynamic; each
spatial size a multiple of ``size_divisor``) and returns full-resolution logits (N, num_classes, x, y, z).
ONNX: metadata_props "lightning_flare_plan" (Plan.to_dict() as JSON) and "lightning_flare_model".
TorchScript: extra files "plan.json" and "model.json" (read with ``torch.jit.load(..., _extra_files=...)``).
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from .convert_nnunet import NET_CLASS_PATH, ConversionError, load_checkpoint, readable
from .io import atomic_write
from .network import PlainConvUNet, _as_triple, _per_stage
from .plan import Plan

PLAN_KEY, MODEL_KEY = "lightning_flare_plan", "lightning_flare_model"


class ExportError(ValueError):
    """A checkpoint or config that cannot be exported; the message names the file and value."""


def net_kwargs_from_config(path: str | Path) -> dict:
    """``model.net.init_args`` of a LightningCLI YAML config (class must be our PlainConvUNet)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: config file not found")
    net = ((yaml.safe_load(path.read_text()) or {}).get("model") or {}).get("net")
    if not isinstance(net, Mapping):
        raise ExportError(f"{path}: no model.net section")
    if net.get("class_path", NET_CLASS_PATH) not in (NET_CLASS_PATH, "PlainConvUNet"):
        raise ExportError(f"{path}: model.net.class_path={net.get('class_path')!r} is not supported ({NET_CLASS_PATH})")
    return dict(net.get("init_args") or {})


def net_kwargs_from_checkpoint(checkpoint: Mapping[str, Any]) -> dict | None:
    """``checkpoint["net_init_args"]``, else ``hyper_parameters["net"]["init_args"]``, else None."""
    if isinstance(checkpoint.get("net_init_args"), Mapping):
        return dict(checkpoint["net_init_args"])
    net = (checkpoint.get("hyper_parameters") or {}).get("net")
    if isinstance(net, Mapping) and isinstance(net.get("init_args"), Mapping):
        return dict(net["init_args"])
    return None


def infer_net_kwargs(weights: Mapping[str, torch.Tensor]) -> dict:
    """PlainConvUNet init args read off the weight shapes (stage 0 stride assumed 1; default eps/slope)."""
    enc = [(int(m[1]), int(m[2]), w) for k, w in weights.items()
           if (m := re.fullmatch(r"encoder\.stages\.(\d+)\.0\.convs\.(\d+)\.conv\.weight", k))]
    dec = [int(m[1]) for k in weights if (m := re.fullmatch(r"decoder\.stages\.(\d+)\.convs\.(\d+)\.conv\.weight", k))]
    if not enc or "decoder.seg_layers.0.weight" not in weights:
        raise ExportError("state_dict does not look like a PlainConvUNet (no encoder.stages.*.conv.weight)")
    n = max(s for s, _, _ in enc) + 1
    first = {s: w for s, i, w in enc if i == 0}
    return {"in_channels": int(first[0].shape[1]), "num_classes": int(weights["decoder.seg_layers.0.weight"].shape[0]),
            "features_per_stage": [int(first[s].shape[0]) for s in range(n)],
            "kernel_sizes": [list(first[s].shape[2:]) for s in range(n)],
            "strides": [[1, 1, 1]] + [list(weights[f"decoder.transpconvs.{n - 1 - s}.weight"].shape[2:])
                                      for s in range(1, n)],
            "n_conv_per_stage": [sum(1 for s2, _, _ in enc if s2 == s) for s in range(n)],
            "n_conv_per_stage_decoder": [dec.count(t) for t in range(n - 1)]}


def _canonical(kwargs: Mapping[str, Any]) -> dict:
    """Init args with defaults filled in and per-stage values expanded (deep_supervision dropped)."""
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
    ca, cb = _canonical(a), _canonical(b)
    return [f"{k}: {ca.get(k)} != {cb.get(k)}" for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)]


def load_for_export(ckpt_path: str | Path, config: str | Path | None = None) -> tuple[PlainConvUNet, Plan, dict]:
    """Rebuilt network (eval, no deep supervision), its plan, and a description of where the args came from."""
    checkpoint = load_checkpoint(ckpt_path)
    if "plan" not in checkpoint:
        raise ExportError(f"{ckpt_path}: checkpoint has no plan (not made by lightning_flare training or conversion)")
    plan = Plan.from_dict(checkpoint["plan"])
    weights = {k[len("net."):]: v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith("net.")}
    if not weights:
        raise ExportError(f"{ckpt_path}: state_dict has no 'net.*' weights")
    kwargs, source = net_kwargs_from_checkpoint(checkpoint), "checkpoint"
    if kwargs is None and config is not None:
        kwargs, source = net_kwargs_from_config(config), str(config)
    if kwargs is None:
        kwargs, source = infer_net_kwargs(weights), "inferred from the weight shapes"
    kwargs = dict(kwargs) | {"deep_supervision": False}
    net = PlainConvUNet(**kwargs)
    try:
        net.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise ExportError(f"{ckpt_path}: weights do not fit PlainConvUNet({kwargs}) (net args from {source}): "
                          f"{str(err)[:800]}") from err
    return net.eval(), plan, {"net_init_args": kwargs, "net_args_source": source, "checkpoint": str(ckpt_path)}


class FullResLogits(nn.Module):
    """The U-Net without its Python-side shape check (not traceable), full-resolution logits only."""

    def __init__(self, net: PlainConvUNet) -> None:
        super().__init__()
        net.deep_supervision = False
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net.decoder(self.net.encoder(image))


def _metadata(net: PlainConvUNet, plan: Plan, info: dict) -> dict[str, str]:
    model = {"input": "image (N, C, x, y, z) float32: CT normalised as plan.intensity, on plan.target_spacing",
             "output": "logits (N, num_classes, x, y, z), softmax over dim 1", "axis_order": "x, y, z (TorchIO)",
             "size_divisor": list(net.size_divisor()), **info}
    return {PLAN_KEY: json.dumps(plan.to_dict()), MODEL_KEY: json.dumps(model)}


def _example(net: PlainConvUNet) -> torch.Tensor:
    in_channels = net.encoder.stages[0][0].convs[0].conv.in_channels
    return torch.randn(1, in_channels, *(2 * d for d in net.size_divisor()))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' known, harmless warnings (legacy exporter, instance_norm train flag)."""
    with warnings.catch_warnings():
        for pattern in (".*legacy TorchScript-based ONNX export.*", ".*instance_norm.*", ".*will be removed.*",
                        ".*Converting a tensor to a Python.*"):
            warnings.filterwarnings("ignore", message=pattern)
        yield


def export_onnx(net: PlainConvUNet, plan: Plan, path: str | Path, info: dict | None = None, opset: int = 17) -> Path:
    try:
        import onnx
    except ImportError as err:
        raise ExportError("ONNX export needs the 'onnx' package: pip install onnx") from err
    model, metadata = FullResLogits(net).eval(), _metadata(net, plan, info or {})
    axes = {0: "batch", 2: "x", 3: "y", 4: "z"}

    def write(tmp: str) -> None:
        with torch.no_grad(), _quiet():
            torch.onnx.export(model, (_example(net),), tmp, dynamo=False, opset_version=opset, input_names=["image"],
                              output_names=["logits"], dynamic_axes={"image": axes, "logits": axes})
        proto = onnx.load(tmp)
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, tmp)
        readable(tmp)
    return atomic_write(path, write)


def export_torchscript(net: PlainConvUNet, plan: Plan, path: str | Path, info: dict | None = None) -> Path:
    model, metadata = FullResLogits(net).eval(), _metadata(net, plan, info or {})
    extra = {"plan.json": metadata[PLAN_KEY], "model.json": metadata[MODEL_KEY]}

    def write(tmp: str) -> None:
        with torch.no_grad(), _quiet():
            traced = torch.jit.trace(model, _example(net), check_trace=False)
        torch.jit.save(traced, tmp, _extra_files=extra)
        readable(tmp)
    return atomic_write(path, write)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_flare.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint (training or convert_nnunet output)")
    parser.add_argument("--format", choices=("onnx", "torchscript"), required=True)
    parser.add_argument("--output", help="default: the checkpoint path with .onnx / .pt")
    parser.add_argument("--config", help="YAML config for model.net when the checkpoint does not carry it")
    parser.add_argument("--opset", type=int, default=17)
    args = parser.parse_args(argv)
    output = args.output or str(Path(args.ckpt).with_suffix(".onnx" if args.format == "onnx" else ".pt"))
    try:
        net, plan, info = load_for_export(args.ckpt, args.config)
        if args.format == "onnx":
            export_onnx(net, plan, output, info, args.opset)
        else:
            export_torchscript(net, plan, output, info)
    except (ExportError, ConversionError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {output} ({args.format}; net args: {info['net_args_source']}; "
          f"input (N, {net.encoder.stages[0][0].convs[0].conv.in_channels}, x, y, z), "
          f"x, y, z multiples of {net.size_divisor()}; patch {plan.patch_size}, spacing {plan.target_spacing})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
