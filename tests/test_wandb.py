"""An offline W&B run keeps the metrics, the resolved config and validation image panels."""
import json

from conftest import tiny_cli_args
from wandb_records import config_value, history_keys, read_finished_run

import cli


def test_offline_wandb_run_has_history_config_and_images(tiny_dataset, tmp_path):
    args = tiny_cli_args(tiny_dataset, tmp_path / "cache", tmp_path / "out")
    logger = {"class_path": "lightning.pytorch.loggers.WandbLogger",
              "init_args": {"save_dir": str(tmp_path / "wb"), "offline": True, "project": "tests", "name": "tiny"}}
    args[args.index("--trainer.logger") + 1] = json.dumps(logger)
    args[args.index("--trainer.callbacks") + 1] = json.dumps([{"class_path": "lightning_flare.callbacks.ValidationImageLogger"}])
    for _ in range(2):  # a second run into the same folder must not fail on an existing config.yaml
        result = cli.main(["fit", *args, "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1",
                           "--trainer.log_every_n_steps", "1"])
        result.trainer.logger.experiment.finish()
    runs = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    files = runs[-1] / "files"
    images = list((files / "media" / "images" / "val").glob("slices_*.png"))
    masks = list((files / "media" / "images" / "mask" / "val").glob("slices_*.mask.png"))
    assert images and len(masks) == 2 * len(images)  # ground truth + prediction per panel
    records = read_finished_run(runs[-1])
    history = history_keys(records)
    for key in ("train/loss_step", "train/loss_epoch", "val/dsc", "val/nsd", "train/lr", "val/slices/count"):
        assert key in history, key
    config = config_value(records, "cli")  # the full resolved LightningCLI config
    assert "target_spacing" in config and "features_per_stage" in config and "ValidationImageLogger" in config


def test_offline_wandb_predict_logs_the_efficiency_table(tiny_dataset, tmp_path):
    args = tiny_cli_args(tiny_dataset, tmp_path / "cache", tmp_path / "out")
    cli.main(["fit", *args, "--trainer.max_epochs", "1"])
    logger = {"class_path": "lightning.pytorch.loggers.WandbLogger",
              "init_args": {"save_dir": str(tmp_path / "wb"), "offline": True, "project": "tests", "name": "predict"}}
    args[args.index("--trainer.logger") + 1] = json.dumps(logger)
    result = cli.main(["predict", *args, "--ckpt_path", str(tmp_path / "out" / "ckpt" / "last.ckpt"),
                       "--data.predict_dir", str(tiny_dataset / "imagesTs")])
    result.trainer.logger.experiment.finish()
    run = next((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert "predict/efficiency/_type" in history_keys(read_finished_run(run))
