"""Exact resume from the last checkpoint, and a checkpoint on SIGTERM (preemption)."""
import json
import os
import signal
import subprocess
import sys

import lightning as L
import pytest
import torch

from conftest import tiny_cli_args

import cli


def _fit(args, *extra):
    return cli.main(["fit", *args, "--trainer.max_epochs", "3", "--trainer.check_val_every_n_epoch", "5", *extra])


def _args(dataset, tmp_path, name):
    args = tiny_cli_args(dataset, tmp_path / "cache", tmp_path / name)
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(tmp_path / name / "ckpt"), "filename": "last", "save_top_k": 1,
                                "every_n_epochs": 1, "save_on_train_epoch_end": True}},
                 {"class_path": "lightning_flare.preemption.PreemptionCheckpoint"}]
    args[args.index("--trainer.callbacks") + 1] = json.dumps(callbacks)
    # bf16 whatever precision this CPU would be measured to prefer: resume must be exact with oneDNN's bf16 kernels
    return args + ["--trainer.precision", "bf16-mixed"]


def _state(result):
    trainer = result.trainer
    return {"step": trainer.global_step, "epoch": trainer.current_epoch,
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "weights": {k: v.detach().clone() for k, v in result.model.state_dict().items()}}


def test_resume_after_an_epoch_matches_an_uninterrupted_run(tiny_dataset, tmp_path):
    straight = _state(_fit(_args(tiny_dataset, tmp_path, "straight")))
    again = _state(_fit(_args(tiny_dataset, tmp_path, "again")))  # nothing may leak from one fit to the next
    for key, value in straight["weights"].items():
        assert torch.equal(again["weights"][key], value), f"two identical fits in one process differ at {key}"
    args = _args(tiny_dataset, tmp_path, "interrupted")
    first = _fit(args, "--trainer.max_steps", "2")  # stops after epoch 0
    assert first.trainer.global_step == 2 and (tmp_path / "interrupted" / "ckpt" / "last.ckpt").is_file()
    resumed = _state(_fit(args, "--ckpt_path", "last"))
    assert resumed["step"] == straight["step"] == 6
    assert resumed["epoch"] == straight["epoch"]
    assert resumed["lr"] == pytest.approx(straight["lr"])
    for key, value in straight["weights"].items():
        torch.testing.assert_close(resumed["weights"][key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("isa", ["AVX512_CORE_BF16", "AVX2"])
def test_resume_is_exact_on_other_onednn_paths(isa):
    """The same test in a fresh process whose oneDNN may not use this CPU's newest instructions (AMX, ...):
    CI's machine may lack them. A cap above what the CPU has changes nothing."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa}
    test = f"{__file__}::test_resume_after_an_epoch_matches_an_uninterrupted_run"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]


class _SigtermAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_saves_a_checkpoint_that_resumes(tiny_dataset, tmp_path):
    args = _args(tiny_dataset, tmp_path, "preempted")
    callbacks = json.loads(args[args.index("--trainer.callbacks") + 1])
    callbacks.append({"class_path": "test_resume._SigtermAt", "init_args": {"step": 3}})
    preempted = list(args)
    preempted[preempted.index("--trainer.callbacks") + 1] = json.dumps(callbacks)
    with pytest.raises(BaseException) as err:
        _fit(preempted)
    assert type(err.value).__name__ == "SIGTERMException"
    ckpt = torch.load(tmp_path / "preempted" / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3 and "plan" in ckpt
    resumed = _fit(args, "--ckpt_path", "last")
    assert resumed.trainer.global_step == 6
