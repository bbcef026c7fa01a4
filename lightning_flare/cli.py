"""LightningCLI entry point: ``flare {fit,validate,test,predict} --config configs/....yaml`` (the console script;
``python cli.py ...`` at the repository root is the same)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from .checkpoint import BASE_CONFIG, load_checkpoint, network_spec
from .datamodule import FlareDataModule
from .efficiency import command_ended
from .module import FlareSegmentationModule
from .writer import NiftiPredictionWriter


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Also hands the full resolved config to the loggers (the W&B run's config)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = self.config.as_dict()
        for logger in trainer.loggers:
            logger.log_hyperparams({"cli": config})


class FlareCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(NiftiPredictionWriter, "writer")

    def _parse_ckpt_path(self) -> None:
        """The checkpoint decides the network (its weights fit no other); the YAML and the command line decide
        everything else (tta, overlap, ...). Lightning's default would let the checkpoint's saved
        hyper-parameters silently override command-line options such as ``--model.inference.tta true``. The network's
        class and args are looked up as ``lightning_flare.checkpoint.network_spec`` says."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        net = network_spec(load_checkpoint(ckpt_path, trusted_fallback=False))
        if net is not None:
            self.config = self.parser.parse_object({subcommand: {"model": {"net": net}}}, self.config)

    def before_instantiate_classes(self) -> None:
        """An explicit ``--trainer.precision`` wins over the configs' ``MeasuredCpuPrecision`` plugin (Lightning
        would refuse both)."""
        subcommand = self.config.get("subcommand")
        trainer = (self.config[subcommand] if subcommand else self.config).get("trainer")
        plugins = trainer.get("plugins") if trainer is not None else None
        if trainer is None or trainer.get("precision") is None or not isinstance(plugins, list):
            return
        trainer["plugins"] = [p for p in plugins if not str(getattr(p, "class_path", p)).endswith(".MeasuredCpuPrecision")]

    def before_predict(self) -> None:
        writers = [c for c in self.trainer.callbacks if isinstance(c, NiftiPredictionWriter)]
        if writers and not writers[0].overwrite:
            self.datamodule.skip_existing_in = str(writers[0].output_dir)




def main(args=None, run: bool = True) -> FlareCLI:
    """``--config`` files apply on top of configs/base.yaml (trainer, W&B logger, callbacks, network)."""
    os.environ.setdefault("WANDB_MODE", "offline")
    base = {"default_config_files": [str(BASE_CONFIG)]}
    if not run:  # no subcommand: one parser
        return FlareCLI(FlareSegmentationModule, FlareDataModule, subclass_mode_model=False, run=False,
                        parser_kwargs=base, args=args)
    try:
        return FlareCLI(
            FlareSegmentationModule,
            FlareDataModule,
            subclass_mode_model=False,
            save_config_callback=LoggerSaveConfigCallback,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={subcommand: base for subcommand in ("fit", "validate", "test", "predict")},
            args=args,
        )
    finally:
        command_ended()  # the next command in this process (make demo) times its start-up from here


def console_main() -> None:
    """``main`` for the command line (``python cli.py``, ``flare``): bad inputs (each named in the message) end
    with ``error: ...`` and exit status 1, without a traceback; other exceptions keep theirs."""
    from .io import ImageReadError
    from .mask_writer import CasesFailed
    from .raw_dataset import DatasetError

    try:
        main()
    except (CasesFailed, ImageReadError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    console_main()
