"""Checks on the real scans in ../shared/data (skipped when absent)."""
import numpy as np
import pytest

from lightning_flare.io import read_image, to_array
from lightning_flare.plan import IntensityStats, Plan
from lightning_flare.preprocessing import preprocess_image, preprocess_label
from lightning_flare.raw_dataset import load_raw_dataset, select_fold
from lightning_flare.resample import new_shape_for_spacing

FLARE_STATS = IntensityStats(-900.0, 619.0, -52.232, 268.799)


def test_ibsi_dataset_layout_and_split(shared_data):
    ds = load_raw_dataset(shared_data / "Dataset001_IBSISTS")
    cases = ds.cases("Tr")
    assert len(cases) == 24 and all(c.label is not None for c in cases)
    train, val = select_fold(ds, cases, 0)
    assert len(train) + len(val) == 24 and len(val) == 5


@pytest.mark.parametrize("dataset, split", [("Dataset001_IBSISTS", "Tr"), ("Dataset002_LungCT", "Ts")])
def test_real_case_preprocessing_keeps_the_tumour(shared_data, dataset, split):
    ds = load_raw_dataset(shared_data / dataset)
    case = ds.cases(split)[0]
    plan = Plan((2.0, 2.0, 3.0), (128, 128, 96), FLARE_STATS)
    image = read_image(case.image)
    array = preprocess_image(image, plan)
    assert array.shape == new_shape_for_spacing(image.GetSize(), image.GetSpacing(), plan.target_spacing)
    low = (FLARE_STATS.clip_low - FLARE_STATS.mean) / FLARE_STATS.std
    high = (FLARE_STATS.clip_high - FLARE_STATS.mean) / FLARE_STATS.std
    # nnU-Net normalises before resampling, so cubic-spline overshoot at sharp edges may leave the clip range a little
    assert low - 0.5 <= array.min() and array.max() <= high + 0.5
    label = read_image(case.label)
    seg = preprocess_label(label, plan, array.shape)
    original_ml = (to_array(label, np.uint8) > 0).sum() * np.prod(label.GetSpacing()) / 1000
    resampled_ml = (seg > 0).sum() * np.prod(plan.target_spacing) / 1000
    assert original_ml > 0
    assert abs(resampled_ml - original_ml) / original_ml < 0.25
