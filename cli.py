"""LightningCLI entry point: ``python cli.py {fit,validate,test,predict} --config configs/....yaml``."""
from __future__ import annotations

import os

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from lightning_flare.datamodule import FlareDataModule
from lightning_flare.module import FlareSegmentationModule
from lightning_flare.writer import NiftiPredictionWriter


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Also hands the full resolved config to the loggers (the W&B run's config)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = self.config.as_dict()
        for logger in trainer.loggers:
            logger.log_hyperparams({"cli": config})


class FlareCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(NiftiPredictionWriter, "writer")


def main(args=None) -> FlareCLI:
    os.environ.setdefault("WANDB_MODE", "offline")
    return FlareCLI(
        FlareSegmentationModule,
        FlareDataModule,
        subclass_mode_model=False,
        save_config_callback=LoggerSaveConfigCallback,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
