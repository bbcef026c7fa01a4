"""One plan per run: a checkpoint's plan checked against the configuration and the network, else a new one."""
import pytest

from conftest import TINY_NET, tiny_cli_args
from lightning_flare.plan import IntensityStats, Plan, PlanMismatch, reconcile_plan

import cli

STATS = IntensityStats(-900.0, 600.0, -50.0, 250.0)
PLAN = Plan((2.0, 2.0, 3.0), (128, 128, 96), STATS)
CONFIGURED = {"target_spacing": (2.0, 2.0, 3.0), "patch_size": (128, 128, 96), "resampling": "nnunet", "anti_aliasing": False}


def _never():
    raise AssertionError("a restored plan must not be rebuilt")


def test_a_restored_plan_that_the_configuration_agrees_with_wins():
    assert reconcile_plan(PLAN, CONFIGURED, _never, num_classes=2) is PLAN
    assert reconcile_plan(PLAN, {**CONFIGURED, "intensity": STATS, "labels": {"background": 0, "tumor": 1}}, _never) is PLAN


def test_without_a_restored_plan_one_is_built():
    built = Plan((3.0, 3.0, 4.0), (40, 40, 32), STATS)
    assert reconcile_plan(None, CONFIGURED, lambda: built, num_classes=2) is built


def test_every_disagreement_is_listed_with_its_configuration_name():
    configured = {**CONFIGURED, "patch_size": (64, 64, 32), "intensity": IntensityStats(-900.0, 600.0, -50.0, 200.0),
                  "labels": {"background": 0, "tumor": 1, "cyst": 2}}
    with pytest.raises(PlanMismatch) as err:
        reconcile_plan(PLAN, configured, _never, num_classes=3)
    message = str(err.value)
    assert "data.patch_size: checkpoint (128, 128, 96) != config (64, 64, 32)" in message
    assert "data.intensity_stats: checkpoint" in message and "'std': 200.0" in message
    assert "labels (dataset.json): checkpoint" in message
    assert "model.net num_classes 3 != 2 classes" in message
    assert "target_spacing" not in message


def test_network_classes_must_match_the_labels_of_a_new_plan():
    with pytest.raises(PlanMismatch, match="num_classes 3 != 2 classes"):
        reconcile_plan(None, CONFIGURED, lambda: PLAN, num_classes=3)


def test_fit_stops_when_the_network_has_other_classes_than_the_dataset(tiny_dataset, tmp_path):
    args = tiny_cli_args(tiny_dataset, tmp_path / "cache", tmp_path / "out")
    assert "--model.net.features_per_stage" in TINY_NET
    with pytest.raises(PlanMismatch, match=r"model.net num_classes 3 != 2 classes of the labels"):
        cli.main(["fit", *args, "--model.net.init_args.num_classes", "3", "--trainer.max_epochs", "1"])
