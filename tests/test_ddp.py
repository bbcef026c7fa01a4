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
                 {"class_path": "ddp_helpers.RecordDraws", "init_args": {"out_dir": str(record)}},
                 # the DDP reducer sees channels-last parameters (set up before the wrapper)
                 {"class_path": "lightning_flare.train_layout.ChannelsLastTraining", "init_args": {"enabled": True}}]
    args[args.index("--trainer.callbacks") + 1] = json.dumps(callbacks)
    ddp = ["--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2",
           "--trainer.precision", "32-true", "--data.iterations_per_epoch", "3"]
    fit = _run(["fit", *args, *ddp, "--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "1"], tmp_path)
    assert "channels-last layout for 32-true training" in fit.stdout + fit.stderr
    assert "Grad strides do not match" not in fit.stderr

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


@pytest.fixture(scope="module")
def five_cases(tmp_path_factory):
    """5 training cases (fold 0: one validation case) and one test case: fewer cases than the 2 ranks."""
    from lightning_flare.synthetic import write_dataset

    root = tmp_path_factory.mktemp("data5") / "Dataset903_Five"
    write_dataset(root, num_train=5, num_test=1, seed=3, in_plane_size=64)
    return root


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_two_processes_with_fewer_cases_than_ranks(five_cases, tmp_path):
    """Fit (1 validation case), test (1 test case) and predict (1 image) on 2 ranks: the rank without a case gets a
    padding item, each case is scored once, and the scores equal a single-process run's."""
    import csv

    import cli

    record = tmp_path / "records"
    args = tiny_cli_args(five_cases, tmp_path / "cache", tmp_path / "out")
    args += ["--trainer.precision", "32-true", "--model.inference.autocast", "false", "--trainer.accelerator", "cpu"]
    callbacks = json.loads(args[args.index("--trainer.callbacks") + 1])
    callbacks.append({"class_path": "ddp_helpers.RecordDraws", "init_args": {"out_dir": str(record)}})
    args[args.index("--trainer.callbacks") + 1] = json.dumps(callbacks)
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
    _run(["fit", *args, *ddp, "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1"], tmp_path)
    fits = [json.loads((record / f"rank{r}_fit.json").read_text()) for r in (0, 1)]
    assert fits[0]["val"] == {"0": [fits[0]["val"]["0"][0]]} and fits[1]["val"] == {}  # the one case, on rank 0
    assert fits[1]["padding"] == ["validate"] and not fits[0]["padding"]
    ckpt = tmp_path / "out" / "ckpt" / "last.ckpt"
    single = cli.main(["validate", *args, "--ckpt_path", str(ckpt)]).trainer.callback_metrics
    assert fits[0]["metrics"]["val/dsc"] == pytest.approx(float(single["val/dsc"]), abs=1e-9)
    assert fits[0]["metrics"]["val/nsd"] == pytest.approx(float(single["val/nsd"]), abs=1e-9)

    _run(["test", *args, *ddp, "--ckpt_path", str(ckpt), "--model.report_dir", str(tmp_path / "ddp_test")], tmp_path)
    tests = [json.loads((record / f"rank{r}_test.json").read_text()) for r in (0, 1)]
    assert tests[0]["test"] == ["SYN_T000"] and tests[1]["test"] == [] and tests[1]["padding"] == ["test"]
    cli.main(["test", *args, "--ckpt_path", str(ckpt), "--model.report_dir", str(tmp_path / "single_test")])
    ddp_rows, single_rows = (list(csv.DictReader(open(tmp_path / d / "metrics_per_case.csv")))
                             for d in ("ddp_test", "single_test"))
    assert len(ddp_rows) == 1 and ddp_rows == single_rows

    out = tmp_path / "masks"
    _run(["predict", *args, *ddp, "--ckpt_path", str(ckpt), "--data.predict_dir", str(five_cases / "imagesTs"),
          "--writer.output_dir", str(out)], tmp_path)
    preds = [json.loads((record / f"rank{r}_predict.json").read_text()) for r in (0, 1)]
    assert preds[0]["predict"] == ["SYN_T000"] and preds[1]["predict"] == [] and preds[1]["padding"] == ["predict"]
    assert [p.name for p in out.glob("*.nii.gz")] == ["SYN_T000.nii.gz"]


def test_a_rank_without_cases_gets_one_padding_item(five_cases, tmp_path, monkeypatch):
    """Loaders of rank 1 of 2 when fold 0 has one validation case and there is one test image: never empty
    (Lightning stops a rank whose loader has zero length), the one item is padding; rank 0 has the case."""
    import lightning_flare.datamodule as datamodule_file

    dm = datamodule_file.FlareDataModule(data_dir=str(five_cases), cache_dir=str(tmp_path), patch_size=(16, 16, 16),
                                         target_spacing=(4.0, 4.0, 5.0), num_workers=0, verify=False,
                                         predict_dir=str(five_cases / "imagesTs"))
    dm.plan = dm.plan_from_data()
    for rank in (0, 1):
        monkeypatch.setattr(datamodule_file, "_rank_and_world", lambda: (rank, 2))
        for loader in (dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
            items = list(loader)
            assert len(loader) == len(items) == 1
            assert bool(items[0].padding) == (rank == 1)
            assert (items[0].index == 0) if rank == 0 else (items[0].index == -1 and items[0].image is None)
