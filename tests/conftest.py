import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

SHARED_DATA = Path(os.environ.get("LF_SHARED_DATA", ROOT.parent / "shared" / "data"))

TINY_NET = [
    "--model.net.features_per_stage", "[4, 8, 16, 32]",
]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A small synthetic nnU-Net raw dataset (6 training cases, 2 test cases, 64x64 in-plane)."""
    from lightning_flare.synthetic import write_dataset

    root = tmp_path_factory.mktemp("data") / "Dataset901_Tiny"
    write_dataset(root, num_train=6, num_test=2, seed=3, in_plane_size=64)
    return root


def tiny_cli_args(dataset: Path, cache: Path, out: Path) -> list[str]:
    """Overrides of configs/demo.yaml for a seconds-long run."""
    return [
        "--config", str(ROOT / "configs" / "demo.yaml"),
        *TINY_NET,
        "--data.data_dir", str(dataset),
        "--data.cache_dir", str(cache),
        "--data.patch_size", "[16, 16, 16]",
        "--data.target_spacing", "[4.0, 4.0, 5.0]",
        "--data.iterations_per_epoch", "2",
        "--data.num_workers", "0",
        "--trainer.logger", "false",
        "--trainer.default_root_dir", str(out),
        "--trainer.callbacks", json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                            "init_args": {"dirpath": str(out / "ckpt"), "filename": "last", "save_top_k": 1,
                                                          "every_n_epochs": 1, "save_on_train_epoch_end": True}}]),
        "--trainer.enable_progress_bar", "false",
        "--writer.output_dir", str(out / "predictions"),
    ]


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _finish_wandb_runs():
    """A W&B run left open by one test (e.g. predict logging its efficiency table) would be reused by the next
    test's WandbLogger in this process: finish it."""
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
