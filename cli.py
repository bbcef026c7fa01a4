"""``python cli.py {fit,validate,test,predict} --config configs/....yaml``: the ``flare`` console script."""
import lightning_flare  # noqa: F401  (first: it sets torch's environment defaults before torch loads)
from lightning_flare.cli import BASE_CONFIG, FlareCLI, LoggerSaveConfigCallback, console_main, main  # noqa: F401

if __name__ == "__main__":
    console_main()
