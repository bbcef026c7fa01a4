"""Efficiency figures: this process's GPU memory, the transfer stage, device work inside the timed stages."""
import time

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from lightning_flare.efficiency import COLUMNS, EfficiencyReport, GpuMemorySampler
from lightning_flare.volumes import VolumeItem


def _sample(sampler: GpuMemorySampler, count: int = 3) -> list[tuple[float, float]]:
    sampler.start()
    deadline = time.monotonic() + 10
    while len(sampler.samples) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    sampler.stop()
    return sampler.samples


def test_gpu_sampler_reads_this_process_not_the_device(monkeypatch):
    """The curve is what this process's allocator holds (memory_reserved), not the device's used memory
    (mem_get_info: every process on the GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * 2**20)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**30, 80 * 2**30))  # 79 GB used by others
    samples = _sample(GpuMemorySampler(interval=0.01, device=torch.device("cuda")))
    assert len(samples) >= 3 and {mb for _, mb in samples} == {3.0}


def test_gpu_sampler_window_peak_and_area():
    values = iter([1.0, 5.0, 2.0] + [0.0] * 10_000)
    sampler = GpuMemorySampler(interval=0.01, read=lambda: next(values))
    samples = _sample(sampler)
    start, stop = samples[0][0], samples[2][0]
    assert sampler.window(start, stop) == (5.0, pytest.approx(8.0 * 0.01))
    assert GpuMemorySampler(device=torch.device("cpu")).active is False


def test_transfer_is_a_stage_and_waits_for_the_copy(monkeypatch, tmp_path):
    """The datamodule's transfer hooks time the batch's copy to the device, device work waited for."""
    import lightning_flare.datamodule as datamodule_file

    waits = []

    def wait(device):  # stands in for the wait on a non-blocking CUDA copy
        waits.append(device)
        time.sleep(0.05)

    monkeypatch.setattr(datamodule_file, "synchronize", wait, raising=False)
    dm = datamodule_file.FlareDataModule(cache_dir=str(tmp_path))
    item = VolumeItem(0, "A", image=torch.zeros(1, 4, 4, 4), timings={"read": 0.1, "preprocess": 0.2})
    item = dm.on_before_batch_transfer(item, 0)
    item = dm.on_after_batch_transfer(move_data_to_device(item, torch.device("cpu")), 0)
    assert waits and item.timings["transfer"] >= 0.05
    row = EfficiencyReport().add("A", item.timings)
    assert "transfer" in COLUMNS and row["transfer"] >= 0.05 and row["total_s"] == pytest.approx(0.3 + row["transfer"])


def test_preprocess_and_network_stages_wait_for_the_device(monkeypatch):
    """preprocess_on: device: the stage's timer is read after the queued device work is done (CUDA runs
    asynchronously; without the wait its time would fall into the next stage)."""
    import lightning_flare.module as module_file
    import lightning_flare.predictor as predictor_file
    from lightning_flare.io import Geometry
    from lightning_flare.predictor import InferenceSettings
    from lightning_flare.network import PlainConvUNet
    from lightning_flare.plan import IntensityStats, Plan

    waits = []

    def wait(device):
        waits.append(device)
        time.sleep(0.05)

    monkeypatch.setattr(predictor_file, "synchronize", wait, raising=False)
    module = module_file.FlareSegmentationModule(PlainConvUNet(features_per_stage=[4, 8, 16, 32]),
                                                 inference=InferenceSettings(autocast=False))
    module.plan = Plan((2.0, 2.0, 2.0), (16, 16, 16), IntensityStats(-100.0, 100.0, 0.0, 50.0), resampling="fast")
    geometry = Geometry(size=(16, 16, 16), spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0),
                        direction=tuple(np.eye(3).ravel()))
    item = VolumeItem(0, "A", image=torch.zeros(1, 16, 16, 16, dtype=torch.int16), preprocessed=False, geometry=geometry,
                      timings={})
    module.eval().predict_original_grid(item)
    assert len(waits) == 2 and item.timings["preprocess"] >= 0.05 and item.timings["network"] >= 0.05


def test_start_up_counts_from_process_start_or_the_previous_command(monkeypatch):
    import lightning_flare.efficiency as efficiency

    monkeypatch.setattr(efficiency, "_last_command_end", 0.0)  # as if no command had run in this process yet
    assert efficiency.process_uptime() > 0.5  # this test process has run for longer than that already
    efficiency.command_ended()
    assert efficiency.process_uptime() < 0.5
