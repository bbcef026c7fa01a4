"""Test reports: per-case CSV, summary JSON and a table in the form of the paper's Table 5."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from .io import write_text

COLUMNS = ["case", "dsc", "nsd", "reference_ml", "predicted_ml", "healthy_false_positive"]


def summarize(values) -> dict[str, float]:
    v = np.asarray([x for x in values if x == x], float)
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "median": float("nan"), "q1": float("nan"), "q3": float("nan")}
    q1, median, q3 = np.percentile(v, [25, 50, 75])
    return {"mean": float(v.mean()), "std": float(v.std()), "median": float(median), "q1": float(q1), "q3": float(q3)}


def build_summary(rows: list[dict]) -> dict:
    return {
        "num_cases": len(rows),
        "dsc": summarize(r["dsc"] for r in rows),
        "nsd": summarize(r["nsd"] for r in rows),
        "healthy_cases": sum(r["reference_ml"] == 0 for r in rows),
        "healthy_cases_with_false_positives": sum(bool(r["healthy_false_positive"]) for r in rows),
    }


def write_reports(rows: list[dict], out_dir: str | Path) -> dict:
    out = Path(out_dir)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row[k] for k in COLUMNS})
    write_text(out / "metrics_per_case.csv", buffer.getvalue())
    summary = build_summary(rows)
    write_text(out / "metrics_summary.json", json.dumps(summary, indent=1))
    return summary


def format_table(rows: list[dict]) -> str:
    summary = build_summary(rows)
    lines = [f"{'case':<24}{'DSC':>8}{'NSD':>8}{'ref ml':>10}{'pred ml':>10}"]
    for r in rows:
        lines.append(f"{r['case']:<24}{r['dsc']:>8.4f}{r['nsd']:>8.4f}{r['reference_ml']:>10.2f}{r['predicted_ml']:>10.2f}")
    lines.append("-" * 60)
    for name in ("dsc", "nsd"):
        s = summary[name]
        lines.append(f"{name.upper()}: mean {s['mean']:.4f} +/- {s['std']:.4f}   median {s['median']:.4f} ({s['q1']:.4f}-{s['q3']:.4f})")
    lines.append(f"cases: {summary['num_cases']}, healthy: {summary['healthy_cases']}, "
                 f"healthy with false positives: {summary['healthy_cases_with_false_positives']}")
    return "\n".join(lines)


def print_test_table(results: dict) -> None:
    print("\n" + format_table(results["cases"]) + "\n", flush=True)
