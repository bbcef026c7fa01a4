"""Predict a folder of CTs with a checkpoint, without Lightning: the FLARE submission path.

    python -m lightning_flare.predict --ckpt model.ckpt -i INPUTS -o OUTPUTS [--config YAML] [--set tta=true ...]

Reads ``INPUTS/*.nii.gz`` (also NRRD, MHA, DICOM folders; ``CASE_0000.nii.gz`` -> ``CASE``), writes
``OUTPUTS/CASE.nii.gz`` on each input's grid and ``OUTPUTS/efficiency.csv`` (a start-up row, then one row per
case). Defaults are the FLARE24 containers' folders (/workspace/inputs -> /workspace/outputs). Inference
settings: the checkpoint's training defaults, then ``model.inference`` of ``--config``, then ``--set``. Imports
only torch, TorchIO, SimpleITK and SciPy, so the first window starts within a few seconds of the process."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from .checkpoint import build_network, checkpoint_plan, infer_net_kwargs, load_checkpoint, net_kwargs_from_checkpoint, net_weights
from .efficiency import peak_gpu_mb, reset_peak_gpu
from .mask_writer import MaskWriter
from .predictor import InferenceSettings, Prediction, Predictor
from .volumes import RawVolumes, list_images


def settings_from(config: str | None, overrides: Sequence[str]) -> InferenceSettings:
    """``model.inference`` of a YAML config (the training configs' own), then ``KEY=VALUE`` overrides (YAML values)."""
    import yaml  # jsonargparse's dependency; only read here

    values: dict = {}
    if config:
        data = yaml.safe_load(Path(config).read_text()) or {}
        values.update(((data.get("model") or {}).get("inference")) or {})
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set needs KEY=VALUE (e.g. tta=true), got {item!r}")
        values[key.strip()] = yaml.safe_load(value)
    return InferenceSettings.from_dict(values)


def load_predictor(ckpt: str | Path, settings: InferenceSettings, device: torch.device) -> Predictor:
    """The checkpoint's network, plan and postprocessing choice as a ``Predictor`` on ``device``."""
    checkpoint = load_checkpoint(ckpt)
    weights = net_weights(checkpoint)
    kwargs = net_kwargs_from_checkpoint(checkpoint, ckpt)
    context = "(the checkpoint's network args)"
    if kwargs is None:
        kwargs, context = infer_net_kwargs(weights), "(args read off the weight shapes)"
    net = build_network(kwargs, weights, ckpt, context)
    net.to(device).eval()
    return Predictor(net, checkpoint_plan(checkpoint, ckpt), settings, checkpoint.get("postprocessing"), device)


def predict_folder(predictor: Predictor, inputs: str | Path, outputs: str | Path, overwrite: bool = False) -> list[Path]:
    """Masks of every image in ``inputs`` (finished ones kept unless ``overwrite``); bad inputs are reported
    together at the end (``RuntimeError``) after the others are written."""
    cases = list_images(inputs)
    if not overwrite:
        cases = [c for c in cases if not (Path(outputs) / f"{c.case_id}.nii.gz").exists()]
    writer = MaskWriter(outputs, predictor.device)
    volumes = RawVolumes(cases, predictor.plan, with_labels=False)
    with torch.inference_mode():
        for index in range(len(volumes)):
            started = time.perf_counter()
            item = volumes[index]
            if item.error is not None:
                writer.submit(Prediction(item.case_id, item.source, error=item.error))
                continue
            reset_peak_gpu(predictor.device)
            mask = predictor.mask(item.image, item.geometry.spacing, item.geometry.size, timings=item.timings)
            writer.submit(Prediction(item.case_id, item.source, mask=mask, geometry=item.geometry, timings=item.timings,
                                     started=started, peak_gpu_mb=peak_gpu_mb(predictor.device)))
    writer.finish()
    return writer.written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_flare.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a lightning_flare checkpoint (or one made by convert_nnunet)")
    parser.add_argument("-i", "--input", default="/workspace/inputs", help="folder of images (default: %(default)s)")
    parser.add_argument("-o", "--output", default="/workspace/outputs", help="folder for masks (default: %(default)s)")
    parser.add_argument("--config", help="a YAML config whose model.inference settings apply (e.g. configs/flare24.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an inference setting (repeatable), e.g. --set tta=false --set sw_batch_size=2")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (a GPU when there is one)")
    parser.add_argument("--overwrite", action="store_true", help="redo masks that already exist")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    try:
        predictor = load_predictor(args.ckpt, settings_from(args.config, args.set), device)
        written = predict_folder(predictor, args.input, args.output, args.overwrite)
    except (OSError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps({"written": len(written), "output": str(args.output)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
