"""Export a checkpoint's U-Net to ONNX or TorchScript with the plan as metadata.

The exported model takes a normalised image (N, C, x, y, z) on the plan's grid (N and x, y, z dynamic; each
spatial size a multiple of ``size_divisor``) and returns full-resolution logits (N, num_classes, x, y, z).
ONNX: metadata_props "lightning_flare_plan" (Plan.to_dict() as JSON) and "lightning_flare_model".
TorchScript: extra files "plan.json" and "model.json" (read with ``torch.jit.load(..., _extra_files=...)``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .checkpoint import (CheckpointError, build_network, checkpoint_plan, infer_net_kwargs, load_checkpoint,
                         net_differences, net_kwargs_from_checkpoint, net_kwargs_from_config, net_weights)
from .io import atomic_write
from .network import PlainConvUNet
from .plan import Plan

__all__ = ["ExportError", "load_for_export", "export_onnx", "export_torchscript", "main",
           "infer_net_kwargs", "net_differences", "net_kwargs_from_checkpoint", "net_kwargs_from_config"]

PLAN_KEY, MODEL_KEY = "lightning_flare_plan", "lightning_flare_model"


class ExportError(CheckpointError):
    """A checkpoint or config that cannot be exported; the message names the file and value."""


def load_for_export(ckpt_path: str | Path, config: str | Path | None = None) -> tuple[PlainConvUNet, Plan, dict]:
    """Rebuilt network (eval, no deep supervision), its plan, and a description of where the args came from.
    The network's args: the checkpoint's (``checkpoint.network_spec``), else ``config``'s ``model.net``, else
    read off the weight shapes."""
    try:
        checkpoint = load_checkpoint(ckpt_path)
        plan = checkpoint_plan(checkpoint, ckpt_path)
        weights = net_weights(checkpoint)
        if not weights:
            raise ExportError(f"{ckpt_path}: state_dict has no 'net.*' weights")
        kwargs, source = net_kwargs_from_checkpoint(checkpoint, ckpt_path), "checkpoint"
        if kwargs is None and config is not None:
            kwargs, source = net_kwargs_from_config(config), str(config)
        if kwargs is None:
            kwargs, source = infer_net_kwargs(weights), "inferred from the weight shapes"
    except ExportError:
        raise
    except CheckpointError as err:
        raise ExportError(str(err)) from err
    kwargs = dict(kwargs) | {"deep_supervision": False}
    net = build_network(kwargs, weights, ckpt_path, f"(net args from {source})", error=ExportError)
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
    return atomic_write(path, write)


def export_torchscript(net: PlainConvUNet, plan: Plan, path: str | Path, info: dict | None = None) -> Path:
    model, metadata = FullResLogits(net).eval(), _metadata(net, plan, info or {})
    extra = {"plan.json": metadata[PLAN_KEY], "model.json": metadata[MODEL_KEY]}

    def write(tmp: str) -> None:
        with torch.no_grad(), _quiet():
            traced = torch.jit.trace(model, _example(net), check_trace=False)
        torch.jit.save(traced, tmp, _extra_files=extra)
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
    except ValueError as err:  # ExportError, CheckpointError, a Plan's ValueError
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {output} ({args.format}; net args: {info['net_args_source']}; "
          f"input (N, {net.encoder.stages[0][0].convs[0].conv.in_channels}, x, y, z), "
          f"x, y, z multiples of {net.size_divisor()}; patch {plan.patch_size}, spacing {plan.target_spacing})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
