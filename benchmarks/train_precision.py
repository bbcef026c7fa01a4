"""Seconds per training iteration of the CPU recipes in fp32 and bf16, side by side in one run, and what the
measured choice (``MeasuredCpuPrecision``) picks on this CPU; optionally also with oneDNN capped below AMX
(``--isa AVX512_CORE_BF16``: the kernels of an AVX512_BF16 CPU without AMX, on a CPU that has AMX).

    .venv/bin/python benchmarks/train_precision.py [--configs demo ibsi_cpu] [--steps 12] [--isa ALL AVX512_CORE_BF16]
        [--set "data.patch_size=[48,48,48]" ...]

Each (config, precision, isa) runs ``cli.py fit`` in a fresh process for ``--steps`` iterations, no validation;
the first two iterations are dropped (oneDNN primitive creation). Project venv.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, cli_overrides, format_table  # noqa: E402
from lightning_flare.cpu_precision import cpu_model  # noqa: E402  (lscpu's Model name)


class StepTimer(L.Callback):
    """Writes the trainer's precision and the seconds of every training iteration to $STEP_TIMES (JSON)."""

    def on_train_start(self, trainer, *args) -> None:
        self.record = {"precision": str(trainer.precision), "times": []}

    def on_train_batch_start(self, trainer, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, *args) -> None:
        self.record["times"].append(time.perf_counter() - self._start)
        Path(os.environ["STEP_TIMES"]).write_text(json.dumps(self.record))


def run(config: str, precision: str | None, isa: str, steps: int, work: Path,
        overrides: list[str] = ()) -> tuple[float, str]:
    times = work / f"{config}_{precision}_{isa}.json"
    times.unlink(missing_ok=True)
    callbacks = [{"class_path": "lightning_flare.train_layout.ChannelsLastTraining"},  # as the configs' fits
                 {"class_path": "train_precision.StepTimer"}]
    cmd = [sys.executable, str(REPO / "cli.py"), "fit", "--config", str(REPO / "configs" / f"{config}.yaml"),
           "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
           "--trainer.callbacks", json.dumps(callbacks), "--trainer.enable_checkpointing", "false",
           "--trainer.default_root_dir", str(work / "runs"), "--trainer.enable_progress_bar", "false"]
    if precision is not None:
        cmd += ["--trainer.precision", precision]
    cmd += list(overrides)  # LightningCLI arguments of every run (--set KEY=VALUE, parsed in main)
    env = {**os.environ, "STEP_TIMES": str(times), "ONEDNN_MAX_CPU_ISA": isa, "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")]),
           "LIGHTNING_FLARE_CACHE": str(work / "precision_cache")}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    record = json.loads(times.read_text())
    per_step = record["times"][2:]
    return sum(per_step) / len(per_step), record["precision"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["demo", "ibsi_cpu"])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--isa", nargs="+", default=["ALL", "AVX512_CORE_BF16"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a LightningCLI override")
    args = p.parse_args()
    try:
        overrides = cli_overrides(args.set)
    except ValueError as err:
        p.error(str(err))
    print(f"CPU: {cpu_model()}; load average {os.getloadavg()[0]:.2f}; overrides {args.set or 'none'}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for config in args.configs:
            for isa in args.isa:
                fp32, _ = run(config, "32-true", isa, args.steps, work, overrides)
                bf16, _ = run(config, "bf16-mixed", isa, args.steps, work, overrides)
                measured, chosen = run(config, None, isa, args.steps, work, overrides)
                rows.append([config, isa, fp32, bf16, bf16 / fp32, chosen, measured])
    print(format_table(["config", "oneDNN ISA cap", "fp32 s/it", "bf16 s/it", "bf16/fp32", "measured choice",
                        "measured s/it"], rows, title="Training seconds per iteration (iterations 3 and later)"))
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
