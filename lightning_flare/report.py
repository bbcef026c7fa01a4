"""Test reports: per-case CSV, summary JSON and a table in the form of the paper's Table 5.

Rows are dicts with the keys of ``COLUMNS`` (``case, dsc, nsd, reference_ml, predicted_ml,
healthy_false_positive``) and optionally ``missing`` (no prediction for that label: scored 0).
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Iterable, Sequence

from .io import write_text
from .metrics.functional import summarize

COLUMNS = ["case", "dsc", "nsd", "reference_ml", "predicted_ml", "healthy_false_positive"]
CSV_COLUMNS = [*COLUMNS, "missing"]  # the trailing flag marks labels without a prediction
CSV_NAME = "metrics_per_case.csv"
SUMMARY_NAME = "metrics_summary.json"


def _scores(rows: Iterable[dict], key: str) -> list[float]:
    """Per-case scores without NaN (a case the model could not score is left out of the statistics)."""
    return [float(r[key]) for r in rows if not math.isnan(float(r[key]))]


def build_summary(rows: list[dict], extra_predictions: Sequence[str] = (),
                  tolerance_mm: float | None = None) -> dict:
    """Table-5 statistics over cases: DSC / NSD mean, std, median, quartiles, healthy-case false positives.

    ``missing_predictions`` lists the rows flagged ``missing``; ``extra_predictions`` (predictions
    without a label, not scored) is passed through. ``tolerance_mm`` is recorded when given."""
    summary = {
        "num_cases": len(rows),
        "dsc": summarize(_scores(rows, "dsc")),
        "nsd": summarize(_scores(rows, "nsd")),
        "healthy_cases": sum(r["reference_ml"] == 0 for r in rows),
        "healthy_cases_with_false_positives": sum(bool(r["healthy_false_positive"]) for r in rows),
        "missing_predictions": [r["case"] for r in rows if r.get("missing")],
        "extra_predictions": sorted(extra_predictions),
    }
    if tolerance_mm is not None:
        summary["tolerance_mm"] = float(tolerance_mm)
    return summary


def per_case_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**{k: row[k] for k in COLUMNS}, "missing": bool(row.get("missing", False))})
    return buffer.getvalue()


def write_reports(rows: list[dict], out_dir: str | Path, extra_predictions: Sequence[str] = (),
                  tolerance_mm: float | None = None) -> dict:
    """Write ``metrics_per_case.csv`` and ``metrics_summary.json`` atomically; return the summary."""
    out = Path(out_dir)
    summary = build_summary(rows, extra_predictions, tolerance_mm)
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
    header = f"{'case':<{width}}{'DSC':>8}{'NSD':>8}{'ref ml':>11}{'pred ml':>11}  note"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['case']:<{width}}{r['dsc']:>8.4f}{r['nsd']:>8.4f}"
                     f"{r['reference_ml']:>11.3f}{r['predicted_ml']:>11.3f}  {_note(r)}".rstrip())
    lines.append("-" * len(header))
    tolerance = f", NSD at {summary['tolerance_mm']:g} mm" if "tolerance_mm" in summary else ""
    lines.append(f"Summary over {summary['num_cases']} cases (Table 5 form{tolerance})")
    for name in ("dsc", "nsd"):
        s = summary[name]
        lines.append(f"{name.upper()}: mean {s['mean']:.4f} +/- {s['std']:.4f}   "
                     f"median {s['median']:.4f} (IQR {s['q1']:.4f}-{s['q3']:.4f})")
    lines.append(f"Healthy cases with false positives: {summary['healthy_cases_with_false_positives']}"
                 f" of {summary['healthy_cases']} healthy cases")
    missing, extra = summary.get("missing_predictions", []), summary.get("extra_predictions", [])
    if missing:
        lines.append(f"Missing predictions (scored DSC = NSD = 0): {len(missing)}: {_names(missing)}")
    if extra:
        lines.append(f"Extra predictions without a label (ignored): {len(extra)}: {_names(extra)}")
    return "\n".join(lines)


def print_test_table(results: dict) -> None:
    print("\n" + format_table(results["cases"]) + "\n", flush=True)
