"""benchmarks/train_equal.py's own-side command (the rest needs nnunetv2: the benchmark environment)."""
import sys

import yaml

from conftest import ROOT

import cli

sys.path.insert(0, str(ROOT / "benchmarks"))
import train_equal as te  # noqa: E402


def test_ours_trains_without_the_time_budget(tmp_path, monkeypatch):
    """Equal work: the same iterations on both sides, so our side drops the config's TimeBudget (which would end a
    slow fit early) and keeps every other callback; a config without one gets no extra layer."""
    config = ROOT / "configs" / "ibsi_cpu.yaml"
    args = te.without_time_budget(config, tmp_path)
    assert args == ["--config", str(tmp_path / "ours_no_time_budget.yaml")]
    kept = [c["class_path"] for c in yaml.safe_load((tmp_path / "ours_no_time_budget.yaml").read_text())["trainer"]["callbacks"]]
    original = [c["class_path"] for c in yaml.safe_load(config.read_text())["trainer"]["callbacks"]]
    assert kept == [c for c in original if c != "lightning_flare.time_budget.TimeBudget"] and len(kept) == len(original) - 1
    monkeypatch.chdir(tmp_path)
    for layers, budget in (([], True), (args, False)):
        built = cli.main(["--config", str(config), *layers, "--trainer.logger", "false"], run=False)
        names = [type(c).__name__ for c in built.trainer.callbacks]
        assert ("TimeBudget" in names) == budget and "ChannelsLastTraining" in names
    assert te.without_time_budget(ROOT / "configs" / "demo.yaml", tmp_path / "none") == []
