"""2-process CPU DDP (gloo): fit, validate and predict split the work across ranks without duplicates."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_cli_args

from lightning_flare.raw_dataset import load_raw_dataset, select_fold
from lightning_flare.sampling import EpochSubjectSampler


def _run(args, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]), "WANDB_MODE": "offline"}
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_two_process_ddp_fit_validate_predict(tiny_dataset, tmp_path):
    record = tmp_path / "records"
    args = tiny_cli_args(tiny_dataset, tmp_path / "cache", tmp_path / "out")
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(tmp_path / "out" / "ckpt"), "filename": "last", "save_top_k": 1,
                                "every_n_epochs": 1, "save_on_train_epoch_end": True}},
                 {"class_path": "ddp_helpers.RecordDraws", "init_args": {"out_dir": str(record)}}]
    args[args.index("--trainer.callbacks") + 1] = json.dumps(callbacks)
    ddp = ["--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2",
           "--trainer.precision", "32-true", "--data.iterations_per_epoch", "3"]
    _run(["fit", *args, *ddp, "--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "1"], tmp_path)

    fits = [json.loads((record / f"rank{r}_fit.json").read_text()) for r in (0, 1)]
    dataset = load_raw_dataset(tiny_dataset)
    train_ids = [c.case_id for c in select_fold(dataset, dataset.cases("Tr"), 0)[0]]
    for epoch in ("0", "1"):
        # the ranks split one draw sequence (rank r takes draws r, r + 2, ...): each draw used by one rank
        sequence = EpochSubjectSampler(len(train_ids), 3 * 2 * 2, seed=0)
        sequence.set_epoch(int(epoch))
        expected = [train_ids[i] for i in sequence.subjects()]
        assert fits[0]["train"][epoch] == expected[0::2]
        assert fits[1]["train"][epoch] == expected[1::2]
        assert set(expected) == set(train_ids)  # every training subject used this epoch
    assert fits[0]["train"]["0"] != fits[0]["train"]["1"]  # reshuffled between epochs
    for epoch in ("0", "1"):
        val = fits[0]["val"][epoch] + fits[1]["val"][epoch]
        assert len(val) == len(set(val)) == 2  # each validation case scored once, by one rank

    ckpt = tmp_path / "out" / "ckpt" / "last.ckpt"
    _run(["validate", *args, *ddp, "--ckpt_path", str(ckpt)], tmp_path)
    vals = [sum(json.loads((record / f"rank{r}_validate.json").read_text())["val"].values(), []) for r in (0, 1)]
    assert not set(vals[0]) & set(vals[1]) and len(vals[0]) + len(vals[1]) == len(set(val))

    out = tmp_path / "masks"
    _run(["predict", *args, *ddp, "--ckpt_path", str(ckpt), "--data.predict_dir", str(tiny_dataset / "imagesTs"),
          "--writer.output_dir", str(out)], tmp_path)
    preds = [json.loads((record / f"rank{r}_predict.json").read_text())["predict"] for r in (0, 1)]
    inputs = sorted(p.name[: -len("_0000.nii.gz")] for p in (tiny_dataset / "imagesTs").glob("*_0000.nii.gz"))
    assert sorted(preds[0] + preds[1]) == inputs and not set(preds[0]) & set(preds[1])
    assert sorted(p.name[:-7] for p in out.glob("*.nii.gz")) == inputs
