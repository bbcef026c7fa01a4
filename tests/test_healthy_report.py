"""The test report's healthy-scan false-positive rates, lesion-case DSC and lesion-wise recall / precision, and the
healthy-scan decision's round trip through a checkpoint file."""
import json

import pytest
import torch

from lightning_flare.checkpoint import load_checkpoint
from lightning_flare.healthy_decision import chosen_rule
from lightning_flare.predictor import chosen_min_component_ml
from lightning_flare.report import HEADLINE_KEYS, build_summary, format_table, headline_metrics, write_reports

COUNTS = ("lesions_reference", "lesions_detected", "components_predicted", "components_true_positive")


def _row(case, dsc, reference_ml, predicted_ml, alone_ml, counts, dsc_alone=None):
    row = {"case": case, "dsc": dsc, "nsd": dsc, "reference_ml": reference_ml, "predicted_ml": predicted_ml,
           "healthy_false_positive": reference_ml == 0 and predicted_ml > 0, "predicted_ml_components_only": alone_ml,
           "dsc_components_only": dsc if dsc_alone is None else dsc_alone, **dict(zip(COUNTS, counts))}
    return row


ROWS = [
    _row("h1", 1.0, 0.0, 0.0, 0.0, (0, 0, 0, 0)),  # clean either way
    _row("h2", 1.0, 0.0, 0.0, 0.7, (0, 0, 0, 0), dsc_alone=0.0),  # the decision emptied a false positive
    _row("h3", 0.0, 0.0, 2.0, 2.0, (0, 0, 1, 0)),  # a false positive either way
    _row("h4", 1.0, 0.0, 0.0, 0.3, (0, 0, 0, 0), dsc_alone=0.0),  # emptied
    _row("l1", 0.8, 5.0, 5.5, 5.5, (2, 1, 2, 1)),
    _row("l2", 0.0, 1.0, 0.0, 0.9, (1, 0, 0, 0), dsc_alone=0.3),  # a lesion case the decision emptied
]


def test_summary_rates_and_pooled_lesion_scores_hand_computed():
    summary = build_summary(ROWS)
    assert summary["healthy_fp_rate"] == pytest.approx(1 / 4)  # h3
    assert summary["healthy_fp_rate_components_only"] == pytest.approx(3 / 4)  # h2, h3, h4
    assert summary["healthy_cases_with_false_positives_components_only"] == 3
    assert summary["dsc_lesion_cases"] == pytest.approx(0.4)  # (0.8 + 0) / 2
    assert summary["dsc_lesion_cases_components_only"] == pytest.approx(0.55)  # (0.8 + 0.3) / 2
    assert summary["lesion_recall"] == pytest.approx(1 / 3) and summary["lesion_precision"] == pytest.approx(1 / 3)
    assert summary["lesion_counts"] == {"lesions_reference": 3, "lesions_detected": 1, "components_predicted": 3,
                                        "components_true_positive": 1}
    assert headline_metrics(summary) == pytest.approx({"healthy_fp_rate": 0.25, "healthy_fp_rate_components_only": 0.75,
                                                       "lesion_recall": 1 / 3, "lesion_precision": 1 / 3,
                                                       "dsc_lesion_cases": 0.4, "dsc_lesion_cases_components_only": 0.55})


def test_undefined_rates_are_none_and_not_logged():
    plain = [{k: v for k, v in r.items() if k in ("case", "dsc", "nsd", "reference_ml", "predicted_ml",
                                                  "healthy_false_positive")} for r in ROWS[4:]]  # lesion cases only
    summary = build_summary(plain)
    assert summary["healthy_fp_rate"] is None and summary["healthy_fp_rate_components_only"] is None
    assert summary["lesion_recall"] is None and "lesion_counts" not in summary  # rows without counts
    assert headline_metrics(summary) == {"dsc_lesion_cases": pytest.approx(0.4)}
    assert "false-positive rate" not in format_table(plain)


def test_written_report_has_the_keys_and_columns(tmp_path):
    summary = write_reports(ROWS, tmp_path)
    saved = json.loads((tmp_path / "metrics_summary.json").read_text())
    assert set(HEADLINE_KEYS) <= set(saved) and saved["healthy_fp_rate"] == summary["healthy_fp_rate"] == 0.25
    lines = (tmp_path / "metrics_per_case.csv").read_text().splitlines()
    assert lines[0] == ("case,dsc,nsd,reference_ml,predicted_ml,healthy_false_positive,volume_ratio,missing,"
                        "predicted_ml_components_only,dsc_components_only,lesions_reference,lesions_detected,"
                        "components_predicted,components_true_positive")
    assert lines[2] == "h2,1.0,1.0,0.0,0.0,False,,False,0.7,0.0,0,0,0,0"  # a healthy case has no volume ratio
    table = format_table(ROWS)
    assert "Healthy-scan false-positive rate: 0.2500 (small-component removal alone: 0.7500, 3 of 4)" in table
    assert "Mean DSC on lesion cases: 0.4000 (small-component removal alone: 0.5500)" in table
    assert "Lesion-wise recall 0.3333 (1 of 3 reference lesions detected), precision 0.3333 (1 of 3" in table


def test_the_decision_travels_in_the_checkpoint(tmp_path):
    from lightning_flare.module import FlareSegmentationModule
    from lightning_flare.network import PlainConvUNet
    from lightning_flare.predictor import InferenceSettings

    net = PlainConvUNet(features_per_stage=[4, 8, 16, 32])
    module = FlareSegmentationModule(net, inference=InferenceSettings(min_component_ml="auto"))
    module.postprocessing = {"min_component_ml": 0.5, "epoch": 3, "healthy_decision": {
        "mass_ml": 1.25, "after_min_component_ml": 0.5, "reason": "chosen", "val_dsc": 0.9, "status": "..."}}
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "c.ckpt")
    loaded = load_checkpoint(tmp_path / "c.ckpt")  # weights_only=True: plain values only
    assert loaded["postprocessing"]["healthy_decision"]["mass_ml"] == 1.25
    auto = FlareSegmentationModule(net, inference={"min_component_ml": "auto", "healthy_decision": "auto"})
    assert auto.hparams["inference"]["healthy_decision"] == "auto"
    auto.on_load_checkpoint(loaded)
    assert chosen_rule(auto.inference.healthy_decision, auto.postprocessing) == ("mass_ml", 1.25)
    assert chosen_min_component_ml(auto.inference, auto.postprocessing) == 0.5
    auto.on_load_checkpoint({"postprocessing": {"min_component_ml": 1.0}})  # an older checkpoint
    assert chosen_rule(auto.inference.healthy_decision, auto.postprocessing) is None
    off = FlareSegmentationModule(net, inference={"healthy_decision": "off"})
    off.on_load_checkpoint(loaded)
    assert chosen_rule(off.inference.healthy_decision, off.postprocessing) is None
    module.postprocessing["healthy_decision"].update(feature="mean_probability", mass_ml=None, mean_probability=0.8)
    module.on_save_checkpoint(checkpoint)  # a choice on the mean probability (the other threshold None)
    torch.save(checkpoint, tmp_path / "p.ckpt")
    auto.on_load_checkpoint(load_checkpoint(tmp_path / "p.ckpt"))
    assert chosen_rule(auto.inference.healthy_decision, auto.postprocessing) == ("mean_probability", 0.8)
