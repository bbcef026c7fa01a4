"""Issue 16's demonstration: partially labelled and unlabelled scans, three ways, one table.

    .venv/bin/python benchmarks/partial_labels.py [--out runs/partial_demo] [--quick]

On the synthetic dataset of configs/partial_demo.yaml (most lesion training cases mark only their largest lesion,
scans without labels in imagesUnlabelled/, half of the test scans healthy; test labels complete) it trains, with
the same iterations each:
  (a) the seed's way: partial labels used as if complete;
  (b) the partial-label loss (model.partial_labels.mode ignore_confident);
  (c) teacher -> pseudo-labelling round (python -m lightning_flare.pseudo_label) -> a student on the round's
      dataset, ``--rounds`` times (default 2): the first teacher is whichever of (a) and (b) ends its fit with the
      higher validation DSC (the validation fold's mean DSC with the postprocessing chosen on it, as its
      checkpoint keeps it; never the test set); each later round's teacher is the previous student, and a
      component is kept only where the previous round's teacher found it too (``--previous``);
tests each on the held-out test set and prints mean DSC / NSD (FLARE rules: a healthy scan scores 1 when the
prediction is empty), DSC over lesion cases, lesion-wise recall and precision, the healthy-scan false-positive
rate with the scan-level decision and with small-component removal alone, and wall time ((c) includes its
teacher's fit and every round and student before it). With two or more rounds the table also has the first
round's student (c1). The goals of issue 16 are checked under the table, on (c): the last round's student.
Prints the CPU model.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("WANDB_MODE", "offline")

CONFIGS = ["--config", "configs/demo.yaml", "--config", "configs/partial_demo.yaml"]
QUICK = ["--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "1", "--data.iterations_per_epoch", "3"]
COLUMNS = ["arm", "dsc", "nsd", "dsc_lesion_cases", "lesion_recall", "lesion_precision", "healthy_fp_rate",
           "healthy_fp_rate_components_only", "wall_s"]


def _fit_and_test(name: str, out: Path, extra: list[str]) -> dict:
    """Fit one arm into out/name, test its last checkpoint; the test summary plus the fit's wall time and its last
    validation DSC (``val_dsc``)."""
    from lightning_flare import cli

    root = out / name
    shutil.rmtree(root, ignore_errors=True)
    common = CONFIGS + ["--trainer.default_root_dir", str(root)] + extra
    started = time.perf_counter()
    cli.main(["fit", *common])
    fit_s = time.perf_counter() - started
    test = cli.main(["test", *common, "--ckpt_path", str(root / "checkpoints" / "last.ckpt")])
    return {"arm": name, "fit_s": fit_s, "val_dsc": validation_dsc(root / "checkpoints" / "last.ckpt"),
            **arm_summary(test.model.test_results)}


def validation_dsc(checkpoint: Path) -> float:
    """The last validation's mean DSC with the postprocessing chosen on it (the checkpoint's
    ``postprocessing.val_dsc_postprocessed``: the masks the arm's predictor gives); NaN without one."""
    from lightning_flare.checkpoint import load_checkpoint

    value = (load_checkpoint(checkpoint).get("postprocessing") or {}).get("val_dsc_postprocessed")
    return float(value) if value is not None else float("nan")


def choose_teacher(rows: dict[str, dict]) -> str:
    """The arm, 'a' or 'b', with the higher postprocessed validation DSC at the end of its fit ('a' on a tie or
    without one)."""
    a, b = rows["a"].get("val_dsc", float("nan")), rows["b"].get("val_dsc", float("nan"))
    return "b" if b == b and (a != a or b > a) else "a"


def arm_summary(results: dict) -> dict:
    """The test's DSC / NSD summary and every headline key, None where undefined (``headline_metrics`` would leave
    those out, and ``goal_lines`` reads each key)."""
    from lightning_flare.report import HEADLINE_KEYS, build_summary

    summary = build_summary(results["cases"])
    return {**results["summary"], **{k: summary.get(k) for k in HEADLINE_KEYS}}


def _defined(row: dict) -> dict:
    """The row with undefined scores (None: e.g. no healthy test case) as NaN, so every check reads MISSED."""
    return {k: float("nan") if v is None else v for k, v in row.items()}


def goal_lines(rows: dict[str, dict]) -> list[str]:
    """Issue 16's goals from the three arms' rows (keys 'a', 'b', 'c')."""
    rows = {k: _defined(v) for k, v in rows.items()}
    a, b, c = rows["a"], rows["b"], rows["c"]
    best = max(b["dsc"], c["dsc"])
    lines = [
        f"lesion recall (c) {c['lesion_recall']:.3f} >= (a) {a['lesion_recall']:.3f} + 0.15: "
        f"{'met' if c['lesion_recall'] >= a['lesion_recall'] + 0.15 else 'MISSED'}",
        f"mean DSC best of (b), (c) {best:.4f} >= (a) {a['dsc']:.4f} + 0.05: "
        f"{'met' if best >= a['dsc'] + 0.05 else 'MISSED'}",
    ]
    for key, row in rows.items():
        fp, alone = row["healthy_fp_rate"], row["healthy_fp_rate_components_only"]
        cost = row.get("dsc_lesion_cases_components_only", row["dsc_lesion_cases"]) - row["dsc_lesion_cases"]
        ok = fp <= alone / 2 and cost <= 0.01
        # with no false positive left by small-component removal there is nothing to halve: the decision is untested
        verdict = "NOT SHOWN (no healthy false positive to remove)" if alone == 0 else "met" if ok else "MISSED"
        lines.append(f"({key}) healthy FP rate with the decision {fp:.3f} <= half of components only {alone:.3f}, "
                     f"lesion-case DSC cost {cost:+.4f} <= 0.01: {verdict}")
    return lines


def format_rows(rows: dict[str, dict]) -> str:
    widths = [max(len(c), 8) for c in COLUMNS]
    lines = ["  ".join(c.rjust(w) for c, w in zip(COLUMNS, widths))]
    for row in rows.values():
        cells = [row["arm"]] + [f"{row['wall_s']:.0f}" if c == "wall_s" else
                                "n/a" if row.get(c) is None else f"{row[c]:.3f}" for c in COLUMNS[1:]]
        lines.append("  ".join(v.rjust(w) for v, w in zip(cells, widths)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/partial_demo", help="run folders (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a few iterations per arm: checks the recipe runs")
    parser.add_argument("--rounds", type=int, default=2, help="pseudo-labelling rounds of (c) (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    os.chdir(REPO)
    from lightning_flare.cpu_precision import cpu_model
    from lightning_flare.pseudo_label import main as pseudo_label

    out = Path(args.out)
    extra = QUICK if args.quick else []
    print(f"CPU: {cpu_model()}")
    from lightning_flare import cli

    # the dataset and its preprocessing cache are made once, outside every arm's clock
    cli.main(["fit", *CONFIGS, "--trainer.default_root_dir", str(out / "prepare"), "--trainer.max_steps", "0"])
    rows = {"a": _fit_and_test("a_partial_as_complete", out, extra)}
    rows["a"]["wall_s"] = rows["a"]["fit_s"]
    rows["b"] = _fit_and_test("b_partial_label_loss", out, extra + ["--model.partial_labels.mode", "ignore_confident"])
    rows["b"]["wall_s"] = rows["b"]["fit_s"]
    import yaml

    source = Path(yaml.safe_load(Path(CONFIGS[-1]).read_text())["data"]["data_dir"])
    teacher = choose_teacher(rows)
    print(f"teacher of (c): ({teacher}) {rows[teacher]['arm']} (validation DSC (a) {rows['a']['val_dsc']:.4f}, "
          f"(b) {rows['b']['val_dsc']:.4f})", flush=True)
    teacher_arm, wall, previous = rows[teacher]["arm"], rows[teacher]["fit_s"], None
    for r in range(1, args.rounds + 1):
        round_dir = out / f"round{r}"
        started = time.perf_counter()
        code = pseudo_label(["--config", "configs/pseudo_round.yaml", "--teacher",
                             str(out / teacher_arm / "checkpoints" / "last.ckpt"), "--source",
                             str(source), "--output", str(round_dir), "--overwrite"]
                            + (["--previous", str(previous)] if previous else []))
        if code:
            raise SystemExit(f"pseudo-labelling round {r} failed (exit {code})")
        wall += time.perf_counter() - started
        name = "c_teacher_pseudo_student" if r == 1 else f"c{r}_round{r}_student"
        row = _fit_and_test(name, out, extra + ["--data.data_dir", str(round_dir), "--data.synthetic", "null"])
        wall += row["fit_s"]
        row.update(wall_s=wall, teacher=teacher_arm, rounds=r)
        if "c" in rows:  # an earlier round's student keeps its row as (c1), (c2), ...
            rows[f"c{r - 1}"] = rows.pop("c")
        rows["c"] = row
        teacher_arm, previous = name, round_dir
    print(f"\nCPU: {cpu_model()}; test set: {source / 'imagesTs'} (complete labels)")
    print(format_rows(rows))
    print("\n".join(goal_lines(rows)))
    from lightning_flare.io import write_text

    write_text(out / "partial_labels_summary.json", json.dumps(rows, indent=1) + "\n")  # atomic
    return 0


if __name__ == "__main__":
    sys.exit(main())
