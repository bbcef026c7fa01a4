"""Faults: SIGKILL during cache building, fit and predict; re-running the same command completes, reuses what was
finished and gives the outputs of an uninterrupted run. A crashed write leaves the old file (never a partial one)
and its temporary is cleaned up by the next run. A crashing Queue worker raises instead of hanging."""
import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import ROOT, tiny_cli_args

import cli
from lightning_flare.checkpoint_io import AtomicCheckpointIO
from lightning_flare.io import atomic_write

# given statistics skip the fingerprint (1e8 sampled voxels: seconds we do not need here)
STATS = json.dumps({"clip_low": -150.0, "clip_high": 250.0, "mean": 40.0, "std": 70.0})
ATOMIC_PLUGIN = ["--trainer.plugins", "lightning_flare.checkpoint_io.AtomicCheckpointIO"]
POLL_S = 0.01
# one thread: on a CPU shared with other jobs, OpenMP's spinning threads make tiny steps 50x slower
ENV = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")


@contextlib.contextmanager
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------- helpers
class _Run:
    """``python cli.py ARGS`` in a subprocess (cwd=tmp_path), output to a log file."""

    def __init__(self, args: list[str], cwd: Path, name: str):
        self.log = cwd / f"{name}.log"
        self.args = args
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, env=ENV,
                                         stdout=log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, condition, what: str, timeout: float = 60.0, action=None):
        """Poll ``condition()`` until truthy; fail clearly if the process ends first or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if action is not None:
                action()
            if self.proc.poll() is not None:
                pytest.fail(f"the process ended (exit {self.proc.returncode}) before {what}: the kill missed its "
                            f"moment (make that stage slower/longer)\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{self.output()[-3000:]}")
            time.sleep(POLL_S)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(30) == -signal.SIGKILL

    def finish(self, timeout: float = 120.0, during=None) -> str:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if during is not None:
                during()
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"{self.args[0]} did not finish in {timeout:.0f} s\n{self.output()[-3000:]}")
            time.sleep(POLL_S)
        out = self.output()
        assert self.proc.returncode == 0, f"{self.args[0]} failed (exit {self.proc.returncode}):\n{out[-4000:]}"
        return out


def _crash_while_writing(path: Path) -> None:
    """A process that dies (SIGKILL) half-way through ``atomic_write(path)``: leaves the product's own temporary."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"half a file")
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    child = multiprocessing.get_context("fork").Process(target=atomic_write, args=(path, write))
    child.start()
    child.join(30)
    assert child.exitcode == -signal.SIGKILL


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name)


def _stamps(paths) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_ino) for p in paths}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------- cache building
def test_kill_during_cache_building_then_rerun(tmp_path):
    from lightning_flare.datamodule import FlareDataModule
    from lightning_flare.preprocessing import PreprocessedCache
    from lightning_flare.synthetic import write_dataset

    dataset = write_dataset(tmp_path / "data" / "Dataset903_Faults", num_train=10, num_test=1, seed=5,
                            in_plane_size=96, name="Dataset903_Faults")
    spacing = "[0.75, 0.75, 1.25]"  # finer than the images in-plane: ~0.2 s per case, a window for the kill
    args = ["fit", *tiny_cli_args(dataset, tmp_path / "cache", tmp_path / "out"), "--data.target_spacing", spacing,
            "--data.intensity_stats", STATS, "--data.anti_aliasing", "false", "--trainer.max_epochs", "1",
            "--trainer.limit_val_batches", "0"]  # plan as the reference FlareDataModule below (defaults)
    markers = lambda: [p for p in (tmp_path / "cache").glob("*/*.json") if p.name != "plan.json"]  # noqa: E731

    run = _Run(args, tmp_path, "interrupted")
    run.wait_for(markers, "the first cache entry was complete")
    run.kill()
    done = markers()
    entry_dir = done[0].parent
    num_train = 8  # fold 0 of 5 over 10 cases
    assert 1 <= len(done) < num_train, f"{len(done)} of {num_train} entries were complete at the kill (missed the moment)"
    finished = {p.stem for p in done}
    kept = _stamps(entry_dir / f"{c}{end}" for c in finished for end in ("_image.npy", "_label.npy", "_fg.npy", ".json"))
    # a crash in the middle of a write leaves the old file (and a temporary the rerun must clean up)
    victim = entry_dir / f"{sorted(finished)[0]}_image.npy"
    _crash_while_writing(victim)
    assert _temporaries(entry_dir) and _stamps([victim])[str(victim)] == kept[str(victim)]

    run = _Run(args, tmp_path, "rerun")
    run.finish()
    assert not run.output().count("Traceback")
    assert _stamps(Path(k) for k in kept) == kept, "entries finished before the kill were rewritten"
    assert len(markers()) >= num_train
    assert _temporaries(tmp_path / "cache") == [], "temporary files left in the cache"

    # the same arrays as an uninterrupted build (own process state, separate cache folder)
    dm = FlareDataModule(data_dir=str(dataset), cache_dir=str(tmp_path / "ref_cache"), target_spacing=json.loads(spacing),
                         patch_size=[16, 16, 16], intensity_stats=json.loads(STATS), num_workers=0)
    plan = dm.plan_from_data()
    built = {p.stem for p in markers()}
    reference = PreprocessedCache(dm.cache_dir, plan, dm.dataset.name).build(
        [c for c in dm.dataset.cases("Tr") if c.case_id in built], progress=False)
    assert reference[0].image.parent.name == entry_dir.name  # same plan, same cache key
    for ref in reference:
        for kind in ("image", "label", "foreground"):
            got, want = np.load(entry_dir / getattr(ref, kind).name), np.load(getattr(ref, kind))
            assert got.dtype == want.dtype and np.array_equal(got, want), f"{ref.case_id} {kind} differs"
        meta, ref_meta = json.loads((entry_dir / ref.meta.name).read_text()), ref.load_meta()
        assert {k: v for k, v in meta.items() if k != "pid"} == {k: v for k, v in ref_meta.items() if k != "pid"}


# ----------------------------------------------------------------------------------------------- fit
class _KillWhilePickled:
    """Pickling this kills the process: a crash in the middle of ``torch.save``."""

    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)


def _crash_while_saving_checkpoint(path: Path) -> None:
    def save() -> None:
        checkpoint = {"state_dict": {"w": torch.randn(256, 256)}, "boom": _KillWhilePickled()}
        AtomicCheckpointIO().save_checkpoint(checkpoint, path)

    child = multiprocessing.get_context("fork").Process(target=save)
    child.start()
    child.join(30)
    assert child.exitcode == -signal.SIGKILL


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_kill_during_fit_then_resume(tiny_dataset, tmp_path):
    out, epochs, iterations = tmp_path / "out", 20, 2  # ~0.1 s per epoch: a window for the kill
    args = ["fit", *tiny_cli_args(tiny_dataset, tmp_path / "cache", out), *ATOMIC_PLUGIN,
            "--data.intensity_stats", STATS, "--trainer.max_epochs", str(epochs),
            "--trainer.check_val_every_n_epoch", "100", "--trainer.callbacks", json.dumps([
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(out / "ckpt"), "filename": None, "save_last": True, "save_top_k": 1,
                               "monitor": None, "every_n_epochs": 1, "save_on_train_epoch_end": True}}])]
    last = out / "ckpt" / "last.ckpt"

    run = _Run(args, tmp_path, "interrupted")
    run.wait_for(last.is_file, "the first checkpoint was written")
    run.kill()
    step = _load(last)["global_step"]  # the checkpoint left by the killed run loads
    assert 0 < step < epochs * iterations, f"killed at step {step}: the kill missed its moment"

    # a crash in the middle of saving leaves the old last.ckpt (and a temporary that "last" never picks)
    before = _digest(last)
    _crash_while_saving_checkpoint(last)
    assert _digest(last) == before and _load(last)["global_step"] == step
    assert _temporaries(last.parent)

    loads, next_load = [], [0.0]

    def load_last() -> None:  # readers see a complete checkpoint at all times (every 0.1 s: leave the CPU to fit)
        if time.monotonic() >= next_load[0]:
            loads.append(_load(last)["global_step"])
            next_load[0] = time.monotonic() + 0.1

    run = _Run([*args, "--ckpt_path", "last"], tmp_path, "resumed")
    output = run.finish(during=load_last)
    assert f"Restoring states from the checkpoint path at {last}" in output or "Restored all states" in output, output[-3000:]
    final = _load(last)
    assert final["global_step"] == epochs * iterations and final["epoch"] == epochs - 1
    assert loads and min(loads) >= step and loads == sorted(loads)
    assert _temporaries(last.parent) == [], "temporary files left next to the checkpoints"


# ----------------------------------------------------------------------------------------------- predict
def _read_mask(path: Path) -> tuple[np.ndarray, tuple]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), (image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def test_kill_during_predict_then_rerun(tiny_dataset, tmp_path):
    args = tiny_cli_args(tiny_dataset, tmp_path / "cache", tmp_path / "fit")
    with _one_thread():
        fitted = cli.main(["fit", *args, *ATOMIC_PLUGIN, "--data.intensity_stats", STATS, "--trainer.max_epochs", "1"])
    assert isinstance(fitted.trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # the CLI flag is honoured
    ckpt = tmp_path / "fit" / "ckpt" / "last.ckpt"

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    sources = sorted((tiny_dataset / "imagesTs").glob("*_0000.nii.gz"))
    for i in range(12):
        shutil.copy(sources[i % len(sources)], inputs / f"case{i:02d}_0000.nii.gz")

    def predict_args(output: Path) -> list[str]:
        return ["predict", *args, "--data.intensity_stats", STATS, "--ckpt_path", str(ckpt),
                "--data.predict_dir", str(inputs), "--writer.output_dir", str(output)]

    pred = tmp_path / "pred"
    masks = lambda: sorted(pred.glob("case*.nii.gz"))  # noqa: E731
    run = _Run(predict_args(pred), tmp_path, "interrupted")
    run.wait_for(masks, "the first mask was written")
    run.kill()
    finished = masks()
    assert 1 <= len(finished) < 12, f"{len(finished)} of 12 masks were written at the kill (missed the moment)"
    kept = _stamps(finished)
    _crash_while_writing(finished[0])  # the old mask stays, a temporary is left behind
    assert _stamps(finished) == kept and _temporaries(pred)

    run = _Run(predict_args(pred), tmp_path, "rerun")
    output = run.finish()
    assert f"skipping {len(finished)} case(s) already predicted" in output, output[-3000:]
    assert len(masks()) == 12
    assert _stamps(finished) == kept, "masks finished before the kill were rewritten"
    assert _temporaries(pred) == [], "temporary files left in the output folder"

    reference = tmp_path / "pred_ref"
    with _one_thread():
        cli.main(predict_args(reference))
    for path in masks():
        got, want = _read_mask(path), _read_mask(reference / path.name)
        assert np.array_equal(got[0], want[0]) and got[1] == want[1], f"{path.name} differs from an uninterrupted run"


# ----------------------------------------------------------------------------------------------- queue worker
def _exit_in_worker(subject):
    os._exit(1)


def _raise_in_worker(subject):
    raise RuntimeError("augmentation failed on purpose")


@pytest.mark.parametrize("transform", [_exit_in_worker, _raise_in_worker], ids=["worker-dies", "worker-raises"])
def test_crashing_queue_worker_raises_instead_of_hanging(tmp_path, transform):
    from lightning_flare.preprocessing import CachedCase
    from lightning_flare.sampling import PatchSampler, build_patch_loader

    entries = []
    for i in range(2):
        e = CachedCase(f"c{i}", tmp_path / f"c{i}_image.npy", tmp_path / f"c{i}_label.npy", tmp_path / f"c{i}_fg.npy",
                       tmp_path / f"c{i}.json")
        np.save(e.image, np.zeros((12, 12, 12), np.float32))
        np.save(e.label, np.zeros((12, 12, 12), np.uint8))
        np.save(e.foreground, np.zeros((0, 3), np.int32))
        e.meta.write_text("{}")
        entries.append(e)
    loader = build_patch_loader(entries, PatchSampler((8, 8, 8), 2, transform=transform), (1.0, 1.0, 1.0),
                                iterations_per_epoch=2, num_workers=1)
    outcome = {}

    def consume() -> None:
        try:
            for _ in loader:
                pass
            outcome["result"] = "finished"
        except BaseException as err:  # noqa: BLE001
            outcome["result"] = err

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "iterating the training loader hangs after its Queue worker crashed"
    assert isinstance(outcome["result"], Exception), outcome["result"]
    message = str(outcome["result"])
    assert ("exited unexpectedly" in message) if transform is _exit_in_worker else ("on purpose" in message), message
