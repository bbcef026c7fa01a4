"""Long tests (``make test-slow``): the paper's configuration itself, not the tiny one."""
import pytest

from conftest import tiny_cli_args

import cli

pytestmark = pytest.mark.slow


def test_flare24_config_trains_and_validates_one_step(tiny_dataset, tmp_path):
    """configs/flare24.yaml as shipped (5.6M-parameter U-Net, 128 x 128 x 96 patch, batch 2, 16-mixed -> bf16
    on a CPU): one training step and one full-volume validation on small scans padded to the patch."""
    args = tiny_cli_args(tiny_dataset, tmp_path / "cache", tmp_path / "run")
    args[args.index("--config") + 1] = args[args.index("--config") + 1].replace("demo.yaml", "flare24.yaml")
    for option in ("--model.net.features_per_stage", "--data.patch_size", "--data.target_spacing"):
        i = args.index(option)
        del args[i : i + 2]
    result = cli.main(["fit", *args, "--trainer.fast_dev_run", "1", "--data.fold", "0"])
    assert result.trainer.global_step == 1
    assert sum(p.numel() for p in result.model.net.parameters()) == 5_602_950
    assert 0.0 <= float(result.trainer.callback_metrics["val/dsc"]) <= 1.0
