"""Training-patch throughput: our pipeline vs nnU-Net v2's ``nnUNetTrainer.get_dataloaders()``, in one run, on the
same preprocessed arrays, at equal numbers of augmentation workers; plus the per-transform cost on one patch.

Both sides: batch 2, patch 128 x 128 x 96 (x, y, z) = (96, 128, 128) (z, y, x), foreground oversampling 0.33,
nnU-Net's full default augmentation drawn per patch (ours: ``build_augmentation("nnunet", crop=spatial_margin)``
inside ``PatchSampler`` / ``build_patch_loader``, exactly as ``FlareDataModule.train_dataloader`` builds it;
nnU-Net: its own training transforms, including the deep-supervision target downsampling, which we do in the
loss instead).

Data sets: (a) ``../shared/data/Dataset001_IBSISTS`` preprocessed by our cache (2 x 2 x 3 mm, FLARE24 CT
statistics), (b) synthetic CT-like scans of 512 x 512 x 200 voxels at 0.8 x 0.8 x 2.5 mm, generated directly at
2 x 2 x 3 mm (205 x 205 x 167, x y z). nnU-Net's preprocessed folder (``nnUNetPlans_3d_fullres/CASE.b2nd`` +
``CASE_seg.b2nd`` + ``CASE.pkl`` with ``class_locations``, nnUNetPlans.json, dataset.json, ...) is written from
our cached arrays, transposed to (z, y, x), with nnU-Net's own blosc2 chunking and foreground sampling, so both
loaders read the same voxels.

Workers: ours = ``tio.Queue`` loader workers; nnU-Net = ``nnUNet_n_proc_DA`` (0: ``SingleThreadedAugmenter``,
else ``NonDetMultiThreadedAugmenter``). With 0 workers everything runs in this process with ``--main-threads``
torch / SimpleITK threads (default 1: nnU-Net's transforms set 1 thread themselves, so this keeps it equal).

Run with the benchmark environment:  .venv-bench/bin/python benchmarks/pipeline.py  (see benchmarks/README.md)
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import platform
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    FLARE24_STATS, REPO, SHARED_DATA, format_table, nnunet_dataset_json, nnunet_environment, nnunet_plans,
    require_nnunet, set_threads, synthetic_ct, write_json,
)

QUEUE_LENGTH = 8  # build_patch_loader's default (and FlareDataModule's queue_length)
SYNTHETIC_RAW_SHAPE, SYNTHETIC_RAW_SPACING = (512, 512, 200), (0.8, 0.8, 2.5)
DATASET_IDS = {"ibsi": "Dataset901_BenchIBSI", "synthetic": "Dataset902_BenchSynthetic"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["ibsi", "synthetic"], choices=["ibsi", "synthetic"])
    p.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--batches", type=int, default=48,
                   help="timed batches per measurement (default 48; rounded up to a multiple of 4, see --warmup)")
    p.add_argument("--warmup", type=int, default=16,
                   help="untimed batches first: worker start-up and the prefetch buffers drained (nnU-Net buffers up "
                        "to 12 batches: 6 in its process queue + 6 in its results thread's queue; our queue fills 8 "
                        "patches = 4 batches at a time, so keep it a multiple of 4)")
    p.add_argument("--cases", type=int, default=None,
                   help="cases per data set (default: all 24 IBSI cases, 8 synthetic scans)")
    p.add_argument("--rounds", type=int, default=1, help="repeat every measurement; the median is reported")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--patch", type=int, nargs=3, default=[128, 128, 96], metavar=("X", "Y", "Z"))
    p.add_argument("--spacing", type=float, nargs=3, default=[2.0, 2.0, 3.0], metavar=("X", "Y", "Z"))
    p.add_argument("--main-threads", type=int, default=1, help="torch/SimpleITK threads of this process (0 workers)")
    p.add_argument("--transform-repeats", type=int, default=10, help="calls per transform for the cost table (0: skip)")
    p.add_argument("--nnunet-format", choices=["b2nd", "npy"], default="b2nd",
                   help="nnU-Net's preprocessed storage: b2nd (2.6+ default, blosc2) or unpacked npy (older)")
    p.add_argument("--nnunet-cold", action="store_true",
                   help="do not pre-fill nnU-Net's Gaussian-blur benchmark cache (then every fresh worker times "
                        "FFT vs direct convolution during its first blurs; see settle_blur)")
    p.add_argument("--work-dir", default=str(REPO / "cache" / "benchmarks"), help="caches and nnU-Net folders")
    p.add_argument("--data-root", default=str(SHARED_DATA))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: patch 64x64x48, 96x96x64 synthetic scans, 2 cases, 8 timed batches (numbers are noise)")
    args = p.parse_args(argv)
    if args.quick:
        args.patch, args.batches = [64, 64, 48], min(args.batches, 8)
        args.cases = args.cases or 2
        args.transform_repeats = min(args.transform_repeats, 2)
    # our queue loads QUEUE_LENGTH patches whenever it runs empty: warm-up and timed window must start and end on
    # such a fill, or buffered patches (free) or a half-used fill (paid, not counted) bias the rate
    step = max(QUEUE_LENGTH // args.batch_size, 1)
    args.warmup, args.batches = (-(-max(v, 1) // step) * step for v in (args.warmup, args.batches))
    return args


# --------------------------------------------------------------------------------------------- our data
def our_plan(args, labels=None):
    from lightning_flare.plan import Plan

    return Plan(tuple(args.spacing), tuple(args.patch), FLARE24_STATS, labels or {"background": 0, "tumor": 1}, "nnunet")


def prepare_ibsi(args, work: Path):
    from lightning_flare.preprocessing import PreprocessedCache
    from lightning_flare.raw_dataset import load_raw_dataset

    root = Path(args.data_root) / "Dataset001_IBSISTS"
    if not (root / "dataset.json").is_file():
        print(f"skipping IBSI: {root} not found")
        return None
    dataset = load_raw_dataset(root)
    cases = dataset.cases("Tr")[: args.cases or None]
    plan = our_plan(args, dataset.labels)
    start = time.perf_counter()
    entries = PreprocessedCache(work / "ours", plan, dataset.name).build(cases, num_workers=0, progress=False)
    print(f"IBSI: {len(entries)} cases preprocessed/cached by lightning_flare in {time.perf_counter() - start:.1f} s; "
          f"shapes (x, y, z) e.g. {[tuple(np.load(e.image, mmap_mode='r').shape) for e in entries[:3]]}")
    return plan, entries


def synthetic_shape(args) -> tuple[int, int, int]:
    if args.quick:
        return (96, 96, 64)
    return tuple(int(round(n * s / t)) for n, s, t in zip(SYNTHETIC_RAW_SHAPE, SYNTHETIC_RAW_SPACING, args.spacing))


def prepare_synthetic(args, work: Path):
    """CT-like scans generated at the target spacing, normalised, written as our cache entries."""
    from lightning_flare.io import write_npy, write_text
    from lightning_flare.plan import IntensityStats
    from lightning_flare.preprocessing import PreprocessedCache, foreground_locations, normalize_ct

    plan = our_plan(args)
    shape = synthetic_shape(args)
    cache = PreprocessedCache(work / "ours", plan, f"synthetic{shape[0]}x{shape[1]}x{shape[2]}")
    cache.dir.mkdir(parents=True, exist_ok=True)
    n = args.cases or 8
    start = time.perf_counter()
    entries = []
    for k in range(n):
        case_id = f"SYN_{k:03d}"
        entry = cache.entry(case_id)
        if not cache.is_complete(case_id):
            hu, label = synthetic_ct(shape, args.spacing, seed=args.seed * 1000 + k, num_lesions=2)
            image = normalize_ct(hu.astype(np.float32), IntensityStats(**FLARE24_STATS))
            write_npy(entry.image, image)
            write_npy(entry.label, label)
            write_npy(entry.foreground, foreground_locations(label, np.random.default_rng(k)))
            write_text(entry.meta, json.dumps({"case_id": case_id, "shape": list(shape),
                                               "num_foreground": int(label.sum())}))
        entries.append(entry)
    print(f"synthetic: {n} scans of {shape} (x, y, z) at {tuple(args.spacing)} mm ready in "
          f"{time.perf_counter() - start:.1f} s")
    return plan, entries


# --------------------------------------------------------------------------------------------- nnU-Net data
def write_nnunet_preprocessed(dataset_name: str, plan, entries, fmt: str) -> tuple[dict, dict]:
    """nnU-Net v2's preprocessed folder for ``entries`` (our (x, y, z) arrays -> (1, z, y, x))."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2, comp_blosc2_params

    shapes = [np.load(e.image, mmap_mode="r").shape for e in entries]
    median = [int(np.median([s[i] for s in shapes])) for i in range(3)]
    plans = nnunet_plans(dataset_name, plan.patch_size, plan.target_spacing, 2, median)
    dataset_json = nnunet_dataset_json(len(entries))
    base = Path(nnUNet_preprocessed) / dataset_name
    folder = base / plans["configurations"]["3d_fullres"]["data_identifier"]
    marker = {"format": fmt, "plans": plans, "cases": [[e.case_id, str(e.image), e.image.stat().st_mtime_ns]
                                                       for e in entries]}
    marker_path = base / "benchmark_source.json"
    if marker_path.is_file() and json.loads(marker_path.read_text()) == marker:
        return plans, dataset_json
    shutil.rmtree(base, ignore_errors=True)
    folder.mkdir(parents=True)
    write_json(base / "nnUNetPlans.json", plans)
    write_json(base / "dataset.json", dataset_json)
    zyx_spacing = [float(s) for s in reversed(plan.target_spacing)]
    write_json(base / "dataset_fingerprint.json", {
        "spacings": [zyx_spacing] * len(entries), "shapes_after_crop": [list(reversed(s)) for s in shapes],
        "foreground_intensity_properties_per_channel": plans["foreground_intensity_properties_per_channel"],
        "median_relative_size_after_cropping": 1.0})
    ids = [e.case_id for e in entries]
    write_json(base / "splits_final.json", [{"train": ids, "val": ids}])  # unused with fold "all"
    patch_zyx = tuple(plans["configurations"]["3d_fullres"]["patch_size"])
    start = time.perf_counter()
    for e in entries:
        data = np.ascontiguousarray(np.load(e.image).transpose(2, 1, 0)[None], dtype=np.float32)
        seg = np.ascontiguousarray(np.load(e.label).transpose(2, 1, 0)[None], dtype=np.int16)
        props = {"spacing": zyx_spacing, "shape_before_cropping": list(data.shape[1:]),
                 "bbox_used_for_cropping": [[0, s] for s in data.shape[1:]],
                 "shape_after_cropping_and_before_resampling": list(data.shape[1:]),
                 "class_locations": DefaultPreprocessor._sample_foreground_locations(seg, [1], verbose=False)}
        out = str(folder / e.case_id)
        if fmt == "b2nd":
            blocks, chunks = comp_blosc2_params(data.shape, patch_zyx, data.itemsize)
            blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, patch_zyx, seg.itemsize)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                nnUNetDatasetBlosc2.save_case(data, seg, props, out, chunks=chunks, blocks=blocks,
                                              chunks_seg=chunks_seg, blocks_seg=blocks_seg)
        else:  # unpacked numpy (what nnU-Net < 2.6 trained from): CASE.npy / CASE_seg.npy are memory-mapped
            import pickle

            np.save(out + ".npy", data)
            np.save(out + "_seg.npy", seg)
            np.savez(out + ".npz", data=np.zeros(1, np.float32), seg=np.zeros(1, np.int16))  # identifiers only
            with open(out + ".pkl", "wb") as f:
                pickle.dump(props, f)
    write_json(marker_path, marker)
    print(f"{dataset_name}: nnU-Net preprocessed folder ({fmt}) written in {time.perf_counter() - start:.1f} s")
    return plans, dataset_json


@contextlib.contextmanager
def quiet():
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def settle_blur(compose, patch_size_zyx, calls: int = 40) -> None:
    """nnU-Net's ``GaussianBlurTransform(benchmark=True)`` times FFT against direct convolution on its first calls
    for each (shape, kernel size) and caches the winner; that start-up cost is paid again in every fresh worker
    process. Fill the cache before the workers fork, so that the measurement is nnU-Net's steady state."""
    import torch
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform

    for blur in _walk([(compose, None)]):
        if isinstance(blur, GaussianBlurTransform) and getattr(blur, "benchmark", False):
            old_p, old_threads = blur.p_per_channel, torch.get_num_threads()
            blur.p_per_channel = 1
            torch.set_num_threads(1)
            image = torch.randn((1, *patch_size_zyx))
            try:
                for _ in range(calls):
                    blur(image=image.clone())
            finally:
                blur.p_per_channel = old_p
                torch.set_num_threads(old_threads)


def make_trainer(plans: dict, dataset_json: dict, settle: bool = False):
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class BenchmarkTrainer(nnUNetTrainer):
        """nnUNetTrainer; its training transforms only get the blur's benchmark cache filled (see settle_blur)."""

        @staticmethod
        def get_training_transforms(patch_size, *a, **k):
            compose = nnUNetTrainer.get_training_transforms(patch_size, *a, **k)
            if settle:
                settle_blur(compose, tuple(patch_size))
            return compose

    p = copy.deepcopy(plans)
    p["continue_training"] = False
    with quiet():
        trainer = BenchmarkTrainer(p, "3d_fullres", "all", dataset_json, device=torch.device("cpu"))
        trainer._set_batch_size_and_oversample()  # what initialize() does for the loaders (no network needed)
    return trainer


# --------------------------------------------------------------------------------------------- measurements
def rate_ours(plan, entries, args, workers: int) -> float:
    from lightning_flare.augmentation import build_augmentation, spatial_margin
    from lightning_flare.sampling import PatchSampler, build_patch_loader

    set_threads(args.main_threads)
    margin = spatial_margin(plan.patch_size)
    transform = build_augmentation("nnunet", crop=margin)
    sampler = PatchSampler(plan.patch_size, args.batch_size, 0.33, transform, margin=margin)
    loader = build_patch_loader(entries, sampler, plan.target_spacing, args.warmup + args.batches, workers, args.seed,
                                queue_length=QUEUE_LENGTH)
    batches = iter(loader)
    for _ in range(args.warmup):
        batch = next(batches)
    start = time.perf_counter()
    for _ in range(args.batches):
        batch = next(batches)
    seconds = time.perf_counter() - start
    assert tuple(batch["image"].shape) == (args.batch_size, 1, *plan.patch_size), batch["image"].shape
    del batches, loader
    return args.batches * args.batch_size / seconds


def rate_nnunet(plans, dataset_json, args, workers: int) -> float:
    set_threads(args.main_threads)
    os.environ["nnUNet_n_proc_DA"] = str(workers)
    trainer = make_trainer(plans, dataset_json, settle=not args.nnunet_cold)
    with quiet():
        train, val = trainer.get_dataloaders()  # already pulls one batch from each
        finish = getattr(val, "_finish", None)
        if finish is not None:  # the validation workers would compete for the CPU while we time training batches
            finish()
    try:
        for _ in range(max(args.warmup - 1, 0)):
            batch = next(train)
        start = time.perf_counter()
        for _ in range(args.batches):
            batch = next(train)
        seconds = time.perf_counter() - start
    finally:
        finish = getattr(train, "_finish", None)
        if finish is not None:
            with quiet():
                finish()
    expected = (args.batch_size, 1, *plans["configurations"]["3d_fullres"]["patch_size"])
    assert tuple(batch["data"].shape) == expected, batch["data"].shape
    return args.batches * args.batch_size / seconds


# --------------------------------------------------------------------------------------------- transform costs
NAMES = ["rotation_scaling", "noise", "blur", "brightness", "contrast", "low_resolution", "inverted_gamma", "gamma",
         "mirror"]


def nnunet_transform_costs(plans, dataset_json, repeats: int, seed: int = 0) -> tuple[dict, tuple, tuple]:
    """Seconds per call of each of nnU-Net's training transforms forced to apply (1 thread), on (1, z, y, x)."""
    import torch
    from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
    from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from batchgeneratorsv2.transforms.utils.random import RandomTransform

    trainer = make_trainer(plans, dataset_json)
    cm = trainer.configuration_manager
    with quiet():
        rotation, dummy_2d, initial, mirror_axes = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    pipeline = trainer.get_training_transforms(
        cm.patch_size, rotation, trainer._get_deep_supervision_scales(), mirror_axes, dummy_2d,
        use_mask_for_norm=cm.use_mask_for_norm, is_cascaded=False,
        foreground_labels=trainer.label_manager.foreground_labels, regions=None, ignore_label=None)

    def name_of(t) -> str:
        inner = t.transform if isinstance(t, RandomTransform) else t
        kinds = {SpatialTransform: "rotation_scaling", GaussianNoiseTransform: "noise", GaussianBlurTransform: "blur",
                 MultiplicativeBrightnessTransform: "brightness", ContrastTransform: "contrast",
                 SimulateLowResolutionTransform: "low_resolution", MirrorTransform: "mirror"}
        for kind, name in kinds.items():
            if isinstance(inner, kind):
                return name
        if isinstance(inner, GammaTransform):
            return "inverted_gamma" if inner.p_invert_image == 1 else "gamma"
        return type(inner).__name__

    def forced(t):
        inner = copy.deepcopy(t.transform if isinstance(t, RandomTransform) else t)
        if hasattr(inner, "p_per_channel"):
            inner.p_per_channel = 1
        if isinstance(inner, SpatialTransform):
            inner.p_rotation, inner.p_scaling = 1, 1
        if isinstance(inner, MirrorTransform):
            inner.get_parameters = lambda **_: {"axes": list(inner.allowed_axes)}
        return inner

    generator = torch.Generator().manual_seed(seed)
    big, small = tuple(int(v) for v in initial), tuple(int(v) for v in cm.patch_size)
    inputs = {size: (torch.randn((1, *size), generator=generator),
                     (torch.rand((1, *size), generator=generator) < 0.3).to(torch.int16)) for size in {big, small}}
    candidates = {name_of(t): (forced(t), name_of(t) != "rotation_scaling") for t in pipeline.transforms}
    candidates["nnunet_forced"] = (ComposeTransforms([forced(t) for t in pipeline.transforms]), False)
    candidates["nnunet"] = (pipeline, False)
    old = torch.get_num_threads()
    torch.manual_seed(seed)
    # GaussianBlurTransform(benchmark=True) times FFT vs direct convolution on its first calls per (shape, kernel
    # size) and caches the choice: settle that once and share it, so that the table shows the steady state
    blurs = [t for t in _walk(candidates.values()) if isinstance(t, GaussianBlurTransform)]
    if blurs:
        torch.set_num_threads(1)
        for _ in range(40):
            blurs[0](image=inputs[small][0].clone(), segmentation=inputs[small][1].clone())
        for blur in blurs[1:]:
            blur.benchmark_use_fft = copy.deepcopy(blurs[0].benchmark_use_fft)
    timings = {}
    try:
        for name, (transform, on_patch) in candidates.items():
            image, seg = inputs[small if on_patch else big]
            total = 0.0
            for i in range(repeats + 1):  # first call untimed
                data = {"image": image.clone(), "segmentation": seg.clone()}
                torch.set_num_threads(1)
                start = time.perf_counter()
                transform(**data)
                if i:
                    total += time.perf_counter() - start
            timings[name] = total / repeats
    finally:
        torch.set_num_threads(old)
    return timings, big, small


def _walk(items):
    """Every transform object inside (transform, flag) pairs, descending into composes and RandomTransforms."""
    todo = [t for t, _ in items]
    while todo:
        t = todo.pop()
        yield t
        todo += list(getattr(t, "transforms", []) or [])
        if getattr(t, "transform", None) is not None:
            todo.append(t.transform)


def transform_table(args, plan, plans, dataset_json) -> str:
    from lightning_flare.augmentation import spatial_margin, time_transforms

    margin = spatial_margin(plan.patch_size)
    crop_in = tuple(p + 2 * m for p, m in zip(plan.patch_size, margin))
    ours = time_transforms(crop_in, repeats=args.transform_repeats, num_threads=1, seed=args.seed, crop=margin)
    theirs, big, small = nnunet_transform_costs(plans, dataset_json, args.transform_repeats, args.seed)
    names = NAMES + [n for n in theirs if n not in NAMES + ["nnunet_forced", "nnunet"]] + ["nnunet_forced", "nnunet"]
    rows = []
    for name in names:
        a, b = ours.get(name, float("nan")), theirs.get(name, float("nan"))
        rows.append([name, a * 1e3, b * 1e3, b / a if a == a and b == b and a > 0 else float("nan")])
    title = (f"Per-transform cost, ms per patch (1 thread, each forced to apply; 'nnunet' = real probabilities, "
             f"mean of {args.transform_repeats} calls).\nOurs: spatial step on a {crop_in} (x, y, z) crop returning "
             f"{tuple(plan.patch_size)}, the rest on the patch.  nnU-Net: spatial step on its initial patch "
             f"{big[::-1]} (x, y, z) returning {small[::-1]}, the rest on the patch.")
    return format_table(["transform", "ours ms", "nnU-Net ms", "nnU-Net / ours"], rows, title)


# --------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work_dir).resolve()
    nnunet_environment(work / "nnunet")
    os.environ.setdefault("nnUNet_compile", "false")
    require_nnunet()
    import torch
    import nnunetv2

    try:
        from importlib.metadata import version
        nnunet_version = version("nnunetv2")
    except Exception:  # pragma: no cover
        nnunet_version = getattr(nnunetv2, "__version__", "?")
    print(f"pipeline benchmark: torch {torch.__version__}, nnunetv2 {nnunet_version}, python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    print(f"batch {args.batch_size}, patch {tuple(args.patch)} (x, y, z), spacing {tuple(args.spacing)} mm, "
          f"{args.batches} timed batches after {args.warmup} warm-up, workers {args.workers}, "
          f"{args.rounds} round(s), nnU-Net storage {args.nnunet_format}")

    prepared = {}
    for name in args.datasets:
        result = prepare_ibsi(args, work) if name == "ibsi" else prepare_synthetic(args, work)
        if result is None:
            continue
        plan, entries = result
        dataset_name = DATASET_IDS[name]
        if args.quick:
            dataset_name += "Quick"
        plans, dataset_json = write_nnunet_preprocessed(dataset_name, plan, entries, args.nnunet_format)
        prepared[name] = (plan, entries, plans, dataset_json)

    rows, ratios = [], {}
    for name, (plan, entries, plans, dataset_json) in prepared.items():
        label = "IBSI (real)" if name == "ibsi" else f"synthetic {synthetic_shape(args)}"
        for workers in args.workers:
            ours, theirs = [], []
            for r in range(args.rounds):  # alternate the order to spread drifting background load
                first_ours = r % 2 == 0
                for side in ((0, 1) if first_ours else (1, 0)):
                    if side == 0:
                        ours.append(rate_ours(plan, entries, args, workers))
                    else:
                        theirs.append(rate_nnunet(plans, dataset_json, args, workers))
            a, b = statistics.median(ours), statistics.median(theirs)
            ratios[(name, workers)] = a / b
            rows.append([f"{label}, {len(entries)} cases", workers, a, b, a / b])
            print(f"  {label} workers={workers}: ours {a:.2f} patches/s, nnU-Net {b:.2f} patches/s", flush=True)

    print(format_table(["dataset", "workers", "ours patches/s", "nnU-Net patches/s", "ratio ours/nnU-Net"], rows,
                       f"Patches per second (batch {args.batch_size}, patch {tuple(args.patch)} x y z, full nnU-Net "
                       f"augmentation per patch; median of {args.rounds} round(s) of {args.batches} batches)"))
    if "synthetic" in prepared:
        synth = [(w, ratios[("synthetic", w)]) for w in args.workers]
        met = all(r >= 1.5 for _, r in synth)
        print(f"goal (synthetic: ours >= 1.5 x nnU-Net at equal workers): {'met' if met else 'NOT met'} "
              f"({', '.join(f'{w} workers: {r:.2f}x' for w, r in synth)})")

    if args.transform_repeats > 0 and prepared:
        plan, _, plans, dataset_json = next(iter(prepared.values()))
        print(transform_table(args, plan, plans, dataset_json))
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
