"""grid_guard: a spacing that would resample a scan to a grid larger than memory is refused, naming the file."""
import numpy as np
import pytest
import torch

from lightning_flare import grid_guard
from lightning_flare.grid_guard import BYTES_PER_VOXEL, available_memory, check_target_grid
from lightning_flare.io import Geometry, from_array, write_image
from lightning_flare.plan import IntensityStats, Plan
from lightning_flare.preprocessing import PreprocessedCache, preprocess_image, preprocess_tensor
from lightning_flare.raw_dataset import Case
from lightning_flare.volumes import RawVolumes

STATS = IntensityStats(-900.0, 619.0, -52.232, 268.799)
PLAN = Plan((2.0, 2.0, 4.0), (16, 16, 8), STATS, resampling="fast")


def test_the_target_grid_by_hand_and_the_limit():
    # 10 x 20 x 5 voxels at 4 x 1 x 8 mm -> 2 x 2 x 4 mm: 20 x 10 x 10 = 2000 voxels, 32000 bytes
    assert check_target_grid((10, 20, 5), (4, 1, 8), (2, 2, 4), available=2000 * BYTES_PER_VOXEL) == (20, 10, 10)
    with pytest.raises(ValueError, match=r"\(10, 20, 5\) voxels at \(4, 1, 8\) mm resample to \(20, 10, 10\) at the "
                                         r"plan's \(2, 2, 4\) mm: .* check the spacing in the image header"):
        check_target_grid((10, 20, 5), (4, 1, 8), (2, 2, 4), available=2000 * BYTES_PER_VOXEL - 1)


def test_available_memory_is_positive_where_known():
    value = available_memory()
    assert value is None or value > 0


def _huge_spacing_scan(tmp_path):
    """A 12 x 12 x 6 scan whose header says 50 cm voxels: 2.6 x 10^9 voxels at the plan's spacing."""
    geometry = Geometry((12, 12, 6), (500.0, 500.0, 1000.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    path = tmp_path / "wrong_0000.nii.gz"
    write_image(from_array(np.zeros((12, 12, 6), np.int16), geometry), path)
    return path


def test_predict_reader_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(grid_guard, "available_memory", lambda: 2**30)  # 1 GiB, whatever the machine has
    path = _huge_spacing_scan(tmp_path)
    for on_device in (False, True):
        item = RawVolumes([Case("wrong", path)], PLAN, with_labels=False, on_device=on_device)[0]
        if on_device:  # the device path checks when it preprocesses (the reader hands over raw voxels)
            assert item.error is None
            with pytest.raises(ValueError, match="resample to \\(3000, 3000, 1500\\)"):
                preprocess_tensor(item.image, item.geometry.spacing, PLAN, "cpu")
        else:
            assert item.error.startswith(f"{path}: (12, 12, 6) voxels at (500, 500, 1000) mm resample to (3000, 3000, 1500)")
            assert "GiB of memory available" in item.error


def test_training_cache_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(grid_guard, "available_memory", lambda: 2**30)
    path = _huge_spacing_scan(tmp_path)
    with pytest.raises(ValueError, match=f"^{path}: .* check the spacing"):
        PreprocessedCache(tmp_path / "cache", PLAN).build([Case("wrong", path)], progress=False)


def test_ordinary_scans_pass_unchanged():
    image = from_array(np.zeros((20, 20, 10), np.float32), Geometry((20, 20, 10), (1.0, 1.0, 2.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    assert preprocess_image(image, PLAN).shape == (10, 10, 5)
    assert tuple(preprocess_tensor(torch.zeros(1, 20, 20, 10), (1.0, 1.0, 2.0), PLAN, "cpu").shape) == (1, 10, 10, 5)
