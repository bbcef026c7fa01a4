"""benchmarks/skip_air.py's synthetic whole-body scans: one file per shape (and air), reused only for that shape."""
import sys

import numpy as np

from conftest import ROOT

from lightning_flare.io import read_image, to_array

sys.path.insert(0, str(ROOT / "benchmarks"))
import skip_air  # noqa: E402


def test_whole_body_scan_of_another_shape_is_not_the_cached_one(tmp_path):
    for shape in [(64, 64, 12), (64, 64, 8), (64, 48, 8)]:
        name, image, label = skip_air.whole_body(tmp_path, shape)
        assert read_image(image).GetSize() == shape == read_image(label).GetSize(), name
    _, image, _ = skip_air.whole_body(tmp_path, (64, 48, 8), air_mm=9.0)  # 10 voxels of air each side in x and y
    array = to_array(read_image(image))
    assert array.shape == (84, 68, 8) and (array[:10] == -1000).all()
