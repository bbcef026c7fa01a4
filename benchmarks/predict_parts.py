"""In-process parts of benchmarks/predict.py: one window's forward time per precision and layout (the bound),
the windows our predictor runs per ``skip_air`` variant (counted without the network), and the optional table of
the three sliding-window implementations on one preprocessed array (ours, nnU-Net's, MONAI's)."""
from __future__ import annotations

import contextlib
import io
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common import REPO, format_table

CONFIG = REPO / "configs" / "flare24.yaml"


def _predictor(ckpt: Path, skip_air: str = "false"):
    from lightning_flare.predict import load_predictor, settings_from

    return load_predictor(ckpt, settings_from(str(CONFIG), ["tta=false", f"skip_air={skip_air}"]), torch.device("cpu"))


def _preprocessed(predictor, image: Path, case_id: str):
    from lightning_flare.raw_dataset import Case
    from lightning_flare.volumes import RawVolumes

    return RawVolumes([Case(case_id, image)], predictor.plan, with_labels=False)[0]


class _Stub(nn.Module):
    """Stands in for the network when only the windows are counted: zeros of the right shape."""

    def __init__(self, classes: int):
        super().__init__()
        self.classes = classes
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return torch.zeros(x.shape[0], self.classes, *x.shape[2:])


def windows_per_variant(ckpt: Path, image: Path, case_id: str, variants) -> tuple[dict, tuple]:
    """{skip_air variant: (windows run, windows of the full grid)} of our predictor on ``image`` (the commands'
    own code path: body box, grid, ``box_grid``, with a stand-in network), and the preprocessed shape."""
    counts, item = {}, None
    for variant in dict.fromkeys(["false", *variants]):
        predictor = _predictor(ckpt, variant)
        item = item or _preprocessed(predictor, image, case_id)  # the same preprocessing as the commands'
        predictor.net = _Stub(2)
        with torch.inference_mode():
            predictor.logits(item.image)
        counts[variant] = (predictor.counts["windows"], predictor.counts["windows_total"])
    return counts, tuple(item.image.shape[1:])


def one_window_seconds(state: dict, patch, repeats: int, layouts, threads: int) -> dict[str, float]:
    """Median seconds of one window's forward pass (batch 1, after a warm-up) per "precision layout": fp32 and
    bf16 (bf16 only with bf16 hardware: emulated bf16 takes minutes), the runs alternating."""
    from lightning_flare.cpu_precision import GIVE_UP, native_bf16
    from lightning_flare.inference import channels_last_forward
    from lightning_flare.network import PlainConvUNet

    torch.set_num_threads(threads)
    net = PlainConvUNet(deep_supervision=False)
    net.load_state_dict(state)
    net.eval()
    forwards = {"channels-last": channels_last_forward(net), "contiguous": net}
    x = torch.randn(1, 1, *patch)
    configs = [(f"{p} {layout}", forwards[layout], p == "bf16") for layout in layouts
               for p in (("fp32", "bf16") if native_bf16() else ("fp32",))]

    def run(fn, bf16: bool) -> float:
        start = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            fn(x)
        return time.perf_counter() - start

    warm = {name: run(fn, bf16) for name, fn, bf16 in configs}
    fp32 = min(v for k, v in warm.items() if k.startswith("fp32"))
    configs = [c for c in configs if warm[c[0]] <= GIVE_UP * fp32]  # bf16 emulated after all: not timed further
    times: dict[str, list[float]] = {c[0]: [] for c in configs}
    for r in range(repeats):
        for name, fn, bf16 in configs if r % 2 == 0 else configs[::-1]:
            times[name].append(run(fn, bf16))
    return {name: statistics.median(t) for name, t in times.items()}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    total = int(a.sum()) + int(b.sum())
    return float("nan") if total == 0 else 2.0 * int((a & b).sum()) / total


def extra_table(image: Path, model_dir: Path, ckpt: Path, parts, threads: int) -> str:
    """The sliding windows alone on our preprocessed array: ours (``Predictor.logits``, the commands' settings),
    nnU-Net's ``predict_logits_from_preprocessed_data`` (fp32) and MONAI's ``sliding_window_inference`` (Gaussian,
    batch 2, autocast as ours); each mask's Dice against ours on that grid."""
    from lightning_flare.inference import autocast_dtype

    predictor = _predictor(ckpt)
    item = _preprocessed(predictor, image, "CASE")
    torch.set_num_threads(threads)
    dtype = autocast_dtype("cpu", "auto")
    rows, masks = [], {}

    def timed(fn):
        start = time.perf_counter()
        out = fn()
        return time.perf_counter() - start, out

    with torch.inference_mode():
        seconds, logits = timed(lambda: predictor.logits(item.image))
    masks["ours"] = logits.argmax(0).numpy()
    rows.append([f"ours Predictor.logits ({dtype or 'fp32'}, Hann)", seconds, predictor.counts["windows"], ""])
    if "sliding" in parts:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        with contextlib.redirect_stdout(io.StringIO()):  # it prints a note about perform_everything_on_device
            nnunet = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                     perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                     allow_tqdm=False)
            nnunet.initialize_from_trained_model_folder(str(model_dir), use_folds=("all",))
        torch.set_num_threads(threads)
        zyx = item.image.permute(0, 3, 2, 1).contiguous()
        seconds, logits = timed(lambda: nnunet.predict_logits_from_preprocessed_data(zyx))
        masks["nnunet"] = logits.argmax(0).permute(2, 1, 0).numpy()
        rows.append(["nnU-Net predict_logits_from_preprocessed_data (fp32, Gaussian)", seconds, "",
                     f"Dice vs ours {_dice(masks['ours'], masks['nnunet']):.3f}"])
    if "monai" in parts:
        from monai.inferers import sliding_window_inference

        windows = [0]

        def forward(x):  # the predictor's network, full-resolution head only (full_resolution_net below)
            windows[0] += x.shape[0]
            return predictor.net(x)

        def monai():
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                with predictor.full_resolution_net():
                    return sliding_window_inference(item.image[None], roi_size=predictor.plan.patch_size,
                                                    sw_batch_size=2, predictor=forward, overlap=0.5, mode="gaussian")

        seconds, logits = timed(monai)
        masks["monai"] = logits[0].float().argmax(0).numpy()
        rows.append([f"MONAI sliding_window_inference ({dtype or 'fp32'}, Gaussian, batch 2)", seconds, windows[0],
                     f"Dice vs ours {_dice(masks['ours'], masks['monai']):.3f}"])
    return format_table(["sliding window only (same preprocessed array)", "seconds", "windows", "notes"], rows)
