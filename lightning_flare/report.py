"""Test reports: per-case CSV, summary JSON and a table in the form of the paper's Table 5.

Rows are dicts with the keys of ``COLUMNS`` (``case, dsc, nsd, reference_ml, predicted_ml,
healthy_false_positive``) and optionally ``missing`` (no prediction for that label: scored 0) and the
``EXTRA_COLUMNS`` (the module's test rows carry them all; a CSV gets them when any row has them):

- ``predicted_ml_components_only`` / ``dsc_components_only``: the prediction before the healthy-scan decision
  (small-component removal and, when on, the largest component; a declared ignore region left out as for
  ``predicted_ml`` / ``dsc``, which they equal where the decision is off or kept the mask);
- ``lesions_reference``, ``lesions_detected``, ``components_predicted``, ``components_true_positive``: lesion-wise
  counts (``lesion_metrics``: 26-connected components; detected = overlapped by any predicted voxel);
- ``decision_mass_ml`` / ``decision_mean_probability``: the healthy-scan decision's features (probability mass and
  mean tumour probability of the most probable component).

The reports add each lesion case's predicted / reference volume (``volume_ratio``; empty for a healthy case) and
its median. Summary keys beside DSC / NSD (``HEADLINE_KEYS``, also logged as ``test/<key>`` at the end of ``test``;
None where undefined): ``healthy_fp_rate`` (fraction of healthy cases, empty reference, with a non-empty final
mask), ``healthy_fp_rate_components_only`` (the same for small-component removal alone), ``lesion_recall`` and
``lesion_precision`` (pooled over all cases: detected / reference lesions, true-positive / predicted components),
``dsc_lesion_cases`` and ``dsc_lesion_cases_components_only`` (mean DSC over cases with a reference lesion);
``healthy_decision`` (when given: the rule in force, ``healthy_decision.decision_report``).
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Iterable, Sequence

from .io import write_text
from .lesion_metrics import pooled_lesion_scores
from .metrics.functional import VOLUME_RATIO_GOAL, summarize, volume_ratio_summary

COLUMNS = ["case", "dsc", "nsd", "reference_ml", "predicted_ml", "healthy_false_positive"]
CSV_COLUMNS = [*COLUMNS, "volume_ratio", "missing"]  # the trailing flag marks labels without a prediction
WANDB_COLUMNS = [*COLUMNS, "volume_ratio"]
EXTRA_COLUMNS = ["predicted_ml_components_only", "dsc_components_only", "lesions_reference", "lesions_detected",
                 "components_predicted", "components_true_positive", "decision_mass_ml",
                 "decision_mean_probability"]
HEADLINE_KEYS = ("healthy_fp_rate", "healthy_fp_rate_components_only", "lesion_recall", "lesion_precision",
                 "dsc_lesion_cases", "dsc_lesion_cases_components_only")
CSV_NAME = "metrics_per_case.csv"
SUMMARY_NAME = "metrics_summary.json"


def volume_ratio(row: dict) -> float | None:
    """Predicted / reference tumour volume of a case; None for a healthy case (no reference volume)."""
    return float(row["predicted_ml"]) / float(row["reference_ml"]) if float(row["reference_ml"]) > 0 else None


def _scores(rows: Iterable[dict], key: str) -> list[float]:
    """Per-case scores without NaN (a case the model could not score is left out of the statistics)."""
    return [float(r[key]) for r in rows if not math.isnan(float(r[key]))]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def healthy_and_lesion_scores(rows: list[dict]) -> dict:
    """Healthy-scan false-positive rates (final masks; small-component removal alone) and mean DSC over the
    lesion cases (both), None where undefined (no healthy / lesion case, or rows without the fields)."""
    healthy = [r for r in rows if r["reference_ml"] == 0]
    lesion = [r for r in rows if r["reference_ml"] > 0]
    alone = all("predicted_ml_components_only" in r for r in rows)
    fp_alone = sum(float(r["predicted_ml_components_only"]) > 0 for r in healthy) if alone else None
    return {
        "healthy_fp_rate": _mean([float(bool(r["healthy_false_positive"])) for r in healthy]),
        "healthy_fp_rate_components_only": fp_alone / len(healthy) if alone and healthy else None,
        "healthy_cases_with_false_positives_components_only": fp_alone,
        "dsc_lesion_cases": _mean(_scores(lesion, "dsc")),
        "dsc_lesion_cases_components_only": _mean(_scores(lesion, "dsc_components_only"))
        if all("dsc_components_only" in r for r in rows) else None,
    }


def headline_metrics(summary: dict) -> dict[str, float]:
    """The ``HEADLINE_KEYS`` of a summary that are defined, as floats (what ``test`` logs)."""
    return {k: float(summary[k]) for k in HEADLINE_KEYS if summary.get(k) is not None}


def build_summary(rows: list[dict], extra_predictions: Sequence[str] = (),
                  tolerance_mm: float | None = None, healthy_decision: dict | None = None) -> dict:
    """Table-5 statistics over cases: DSC / NSD mean, std, median, quartiles, healthy-case false positives.

    ``missing_predictions`` lists the rows flagged ``missing``; ``extra_predictions`` (predictions
    without a label, not scored) is passed through. ``tolerance_mm`` and ``healthy_decision`` (the rule in
    force) are recorded when given."""
    summary = {
        "num_cases": len(rows),
        "dsc": summarize(_scores(rows, "dsc")),
        "nsd": summarize(_scores(rows, "nsd")),
        "healthy_cases": sum(r["reference_ml"] == 0 for r in rows),
        "healthy_cases_with_false_positives": sum(bool(r["healthy_false_positive"]) for r in rows),
        "volume_ratio": volume_ratio_summary([r["predicted_ml"] for r in rows], [r["reference_ml"] for r in rows]),
        "missing_predictions": [r["case"] for r in rows if r.get("missing")],
        "extra_predictions": sorted(extra_predictions),
        **healthy_and_lesion_scores(rows),
        **pooled_lesion_scores(rows),
    }
    if tolerance_mm is not None:
        summary["tolerance_mm"] = float(tolerance_mm)
    if healthy_decision is not None:
        summary["healthy_decision"] = dict(healthy_decision)
    return summary


def per_case_csv(rows: list[dict]) -> str:
    extra = [c for c in EXTRA_COLUMNS if any(c in r for r in rows)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*CSV_COLUMNS, *extra], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        ratio = volume_ratio(row)
        writer.writerow({**{k: row[k] for k in COLUMNS}, "volume_ratio": "" if ratio is None else round(ratio, 6),
                         "missing": bool(row.get("missing", False)), **{k: row.get(k, "") for k in extra}})
    return buffer.getvalue()


def write_reports(rows: list[dict], out_dir: str | Path, extra_predictions: Sequence[str] = (),
                  tolerance_mm: float | None = None, healthy_decision: dict | None = None) -> dict:
    """Write ``metrics_per_case.csv`` and ``metrics_summary.json`` atomically; return the summary."""
    out = Path(out_dir)
    summary = build_summary(rows, extra_predictions, tolerance_mm, healthy_decision)
    write_text(out / CSV_NAME, per_case_csv(rows))
    write_text(out / SUMMARY_NAME, json.dumps(summary, indent=1) + "\n")
    return summary


def _note(row: dict) -> str:
    if row.get("missing"):
        return "missing prediction"
    if row["healthy_false_positive"]:
        return "healthy, false positive"
    return "healthy" if row["reference_ml"] == 0 else ""


def _names(cases: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(cases[:limit])
    return shown + (f", ... ({len(cases) - limit} more)" if len(cases) > limit else "")


def format_table(rows: list[dict], summary: dict | None = None) -> str:
    """Per-case lines, then the Table-5 summary: mean +/- std, median (IQR), healthy cases with false positives."""
    summary = summary if summary is not None else build_summary(rows)
    width = max([len("case"), *(len(str(r["case"])) for r in rows)]) + 2
    header = f"{'case':<{width}}{'DSC':>8}{'NSD':>8}{'ref ml':>11}{'pred ml':>11}{'pred/ref':>10}  note"
    lines = [header, "-" * len(header)]
    for r in rows:
        ratio = volume_ratio(r)
        lines.append(f"{r['case']:<{width}}{r['dsc']:>8.4f}{r['nsd']:>8.4f}{r['reference_ml']:>11.3f}"
                     f"{r['predicted_ml']:>11.3f}{'-' if ratio is None else f'{ratio:.3f}':>10}  {_note(r)}".rstrip())
    lines.append("-" * len(header))
    tolerance = f", NSD at {summary['tolerance_mm']:g} mm" if "tolerance_mm" in summary else ""
    lines.append(f"Summary over {summary['num_cases']} cases (Table 5 form{tolerance})")
    for name in ("dsc", "nsd"):
        s = summary[name]
        lines.append(f"{name.upper()}: mean {s['mean']:.4f} +/- {s['std']:.4f}   "
                     f"median {s['median']:.4f} (IQR {s['q1']:.4f}-{s['q3']:.4f})")
    lines.append(f"Healthy cases with false positives: {summary['healthy_cases_with_false_positives']}"
                 f" of {summary['healthy_cases']} healthy cases")
    lines.extend(_healthy_and_lesion_lines(summary))
    lines.append(format_volume_ratio(summary["volume_ratio"]))
    missing, extra = summary.get("missing_predictions", []), summary.get("extra_predictions", [])
    if missing:
        lines.append(f"Missing predictions (scored DSC = NSD = 0): {len(missing)}: {_names(missing)}")
    if extra:
        lines.append(f"Extra predictions without a label (ignored): {len(extra)}: {_names(extra)}")
    return "\n".join(lines)


def _fraction(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _healthy_and_lesion_lines(summary: dict) -> list[str]:
    """The healthy-scan false-positive rates and lesion-wise recall / precision, where the summary has them."""
    lines = []
    if summary.get("healthy_fp_rate") is not None:
        line = f"Healthy-scan false-positive rate: {_fraction(summary['healthy_fp_rate'])}"
        if summary.get("healthy_fp_rate_components_only") is not None:
            line += (f" (small-component removal alone: {_fraction(summary['healthy_fp_rate_components_only'])},"
                     f" {summary['healthy_cases_with_false_positives_components_only']} of {summary['healthy_cases']})")
        lines.append(line)
    if summary.get("dsc_lesion_cases") is not None:
        line = f"Mean DSC on lesion cases: {summary['dsc_lesion_cases']:.4f}"
        if summary.get("dsc_lesion_cases_components_only") is not None:
            line += f" (small-component removal alone: {summary['dsc_lesion_cases_components_only']:.4f})"
        lines.append(line)
    counts = summary.get("lesion_counts")
    if counts:
        lines.append(f"Lesion-wise recall {_fraction(summary['lesion_recall'])} ({counts['lesions_detected']} of "
                     f"{counts['lesions_reference']} reference lesions detected), precision "
                     f"{_fraction(summary['lesion_precision'])} ({counts['components_true_positive']} of "
                     f"{counts['components_predicted']} predicted components overlap a lesion)")
    return lines


def format_volume_ratio(ratio: dict) -> str:
    """The summary line of the predicted / reference volumes over the lesion cases (``volume_ratio_summary``)."""
    if not ratio["lesion_cases"]:
        return "Predicted / reference volume: no lesion case"
    low, high = VOLUME_RATIO_GOAL
    return (f"Predicted / reference volume over {ratio['lesion_cases']} lesion cases: median {ratio['median']:.3f} "
            f"(IQR {ratio['q1']:.3f}-{ratio['q3']:.3f}), {ratio['within_goal']} within {low:g}-{high:g}")


def wandb_rows(rows: list[dict]) -> list[list]:
    """Per-case rows as the W&B table of ``WANDB_COLUMNS`` (a healthy case's ratio: NaN)."""
    return [[r[c] for c in COLUMNS] + [float("nan") if volume_ratio(r) is None else volume_ratio(r)] for r in rows]


def case_volume_table(metric, case_ids: Sequence[str] | None = None) -> dict:
    """A W&B table (``columns``, ``data``) of every case's DSC and predicted / reference volume from a computed
    ``FlareMetrics`` (validation); ``case_ids[index]`` names the cases when given."""
    index, dsc, _ = metric.per_case()
    _, predicted, reference = metric.case_volumes()
    data = []
    for i, d, p, r in zip(index.tolist(), dsc.tolist(), predicted.tolist(), reference.tolist()):
        name = case_ids[i] if case_ids is not None and i < len(case_ids) else str(i)
        data.append([name, d, r, p, p / r if r > 0 else float("nan")])
    return {"columns": ["case", "dsc", "reference_ml", "predicted_ml", "volume_ratio"], "data": data}


def log_case_volumes(trainer, key: str, metric) -> None:
    """Log ``case_volume_table`` of a computed ``metric`` to the trainer's W&B loggers (global rank 0), the cases
    named by the validation loader's dataset (``CachedVolumes.case_ids``)."""
    if not trainer.is_global_zero:
        return
    case_ids = getattr(getattr(trainer.val_dataloaders, "dataset", None), "case_ids", None)
    for logger in trainer.loggers:
        if hasattr(logger, "log_table"):
            logger.log_table(key=key, **case_volume_table(metric, case_ids))


def print_test_table(results: dict) -> None:
    print("\n" + format_table(results["cases"]) + "\n", flush=True)
