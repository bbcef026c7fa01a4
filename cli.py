"""LightningCLI entry point: ``python cli.py {fit,validate,test,predict} --config configs/....yaml``."""
from __future__ import annotations

import os

from lightning.pytorch.cli import LightningCLI

from lightning_flare.datamodule import FlareDataModule
from lightning_flare.module import FlareSegmentationModule
from lightning_flare.writer import NiftiPredictionWriter


class FlareCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(NiftiPredictionWriter, "writer")


def main(args=None) -> FlareCLI:
    os.environ.setdefault("WANDB_MODE", "offline")
    return FlareCLI(
        FlareSegmentationModule,
        FlareDataModule,
        subclass_mode_model=False,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
