"""Checkpoints go to the run's own folder (trainer.default_root_dir), whatever the working directory."""
from pathlib import Path

from conftest import tiny_cli_args

import cli


def _args(dataset: Path, tmp_path: Path, run: str, epochs: int) -> list[str]:
    args = tiny_cli_args(dataset, tmp_path / "cache", tmp_path / run)
    i = args.index("--trainer.callbacks")
    del args[i : i + 2]  # keep configs/demo.yaml's own callbacks
    return ["fit", *args, "--trainer.max_epochs", str(epochs), "--trainer.check_val_every_n_epoch", "9"]


def test_runs_with_different_root_dirs_keep_their_own_checkpoints(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli.main(_args(tiny_dataset, tmp_path, "a", epochs=2))
    cli.main(_args(tiny_dataset, tmp_path, "b", epochs=1))
    for run in ("a", "b"):
        assert (tmp_path / run / "checkpoints" / "last.ckpt").is_file()
    assert not list(tmp_path.rglob("last-v*.ckpt")), "runs shared a checkpoint folder"
    assert not (tmp_path / "runs").exists(), "checkpoints written relative to the working directory"

    resumed = cli.main(_args(tiny_dataset, tmp_path, "b", epochs=2) + ["--ckpt_path", "last"])
    assert Path(resumed.trainer.ckpt_path) == (tmp_path / "b" / "checkpoints" / "last.ckpt").resolve()
    assert resumed.trainer.global_step == 4  # b's epoch 1 resumed, not a's finished run
