"""Cross-validation of a config: fit each fold, test each fold's final checkpoint on its own validation cases
(original grid, FLARE scorer: ``cli.py test --data.test_split val``), one table.

    .venv/bin/python benchmarks/cross_validate.py --config configs/ibsi_cpu.yaml [--name NAME] [--folds 0 1 2 3 4]
        [--set data.patch_size=[96,96,48] ...] [--trainer.max_epochs 20 ...] [--out runs/cv] [--reuse] [--dry-run]
    .venv/bin/python benchmarks/cross_validate.py --config configs/ibsi_cpu.yaml --name NAME --retest tta \
        --set model.inference.tta=true       # test the fitted folds again (reports in fold_K/test_tta), pooled

``--config`` may be repeated (layered configs, e.g. ``--config configs/demo.yaml --config
configs/partial_demo.yaml``; the name defaults to the last one's).
Each fold K runs in its own folder, ``OUT/NAME/fold_K`` (checkpoints, W&B run, ``fit_time.json``, ``test/``);
``--set KEY=VALUE`` and any other ``--trainer.* / --model.* / --data.* / --seed_everything`` arguments are
passed to both ``fit`` and ``test`` as LightningCLI overrides. Prints per fold: validation cases, mean DSC, NSD,
median predicted / reference volume, fit seconds (the whole ``fit`` process: preprocessing and validation
included), seconds per training iteration, the postprocessing each fold chose; then the pooled CV figures over
every validation case of the folds run, the CPU model and the precision each fold trained in, and the
postprocessing chosen on the pooled validation scores (nnU-Net's way: the flags for the ``fold: all`` model).
Writes ``OUT/NAME/cv_summary.json``. ``--dry-run`` prints the commands only. ``--retest LABEL`` fits nothing: it
tests every fold's existing checkpoint again with the overrides given (e.g. mirroring at test) into
``fold_K/test_LABEL`` and pools those (``cv_summary_LABEL.json``). With ``--revalidate`` it first chooses each
checkpoint's postprocessing again on its validation cases (``cli.py validate`` with
``lightning_flare.validation_choice.ValidationChoiceCheckpoint``: a model trained before a rule existed gets it)
into ``checkpoints/revalidated_NAME.ckpt`` beside it, and tests and pools that one. Project venv.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cli_overrides, format_table  # noqa: E402

from lightning_flare.io import write_text  # noqa: E402
from lightning_flare.metrics.functional import volume_ratio_summary  # noqa: E402
from lightning_flare.component_confidence import THRESHOLDS  # noqa: E402
from lightning_flare.healthy_choice import choose_from_rows, row_width  # noqa: E402
from lightning_flare.healthy_decision import chosen_rule  # noqa: E402
from lightning_flare.postprocessing import choose_largest_component, choose_threshold  # noqa: E402
from lightning_flare.report import healthy_and_lesion_scores  # noqa: E402

FIT_TIME = "fit_time.json"
TIMER = {"class_path": "lightning_flare.fit_timer.FitTimer", "init_args": {"path": FIT_TIME}}
PASSED_PREFIXES = ("--trainer.", "--model.", "--data.", "--seed_everything")
COMPONENTS_ONLY = ("predicted_ml_components_only", "dsc_components_only")  # the test report's figures before the decision


def overrides_from(sets: Sequence[str], raw: Sequence[str]) -> list[str]:
    """LightningCLI arguments from ``--set KEY=VALUE`` items and raw ``--trainer.x V`` style arguments."""
    out = cli_overrides(sets)
    options = [a for a in raw if a.startswith("--")]
    wrong = [a for a in options if not a.startswith(PASSED_PREFIXES)]
    if wrong or (raw and not raw[0].startswith("--")):
        raise ValueError(f"unknown arguments {wrong or list(raw[:1])}: only --trainer.*, --model.*, --data.* and "
                         "--seed_everything are passed to the LightningCLI")
    return out + list(raw)


def _configs(config: str | Path | Sequence[str | Path]) -> list[Path]:
    return [Path(c) for c in ([config] if isinstance(config, (str, Path)) else config)]


def uses_logger(config: str | Path | Sequence[str | Path]) -> bool:
    """Whether the configs (over configs/base.yaml, whose W&B logger they keep unless one sets its own; the last one
    that sets it wins) log."""
    import yaml

    logs = True
    for path in _configs(config):
        trainer = (yaml.safe_load(path.read_text()) or {}).get("trainer") or {}
        if "logger" in trainer:
            logs = trainer["logger"] not in (False, None)
    return logs


def test_folder(label: str | None = None) -> str:
    """The folder of a fold's test reports: ``test``, or ``test_LABEL`` for a re-test (``--retest LABEL``)."""
    return "test" if label is None else f"test_{label}"


def fold_commands(config: str | Path | Sequence[str | Path], fold: int, name: str, fold_dir: Path, overrides: Sequence[str],
                  checkpoint: str = "checkpoints/last.ckpt", python: str = sys.executable,
                  label: str | None = None) -> tuple[list[str], list[str]]:
    """``cli.py fit`` of ``fold`` into ``fold_dir`` (with the ``FitTimer``), and ``cli.py test`` of its final
    checkpoint on the fold's validation cases (reports in ``fold_dir/test``, or ``fold_dir/test_LABEL``).
    ``config``: one config or several, in the order LightningCLI reads them."""
    common = [*(a for c in _configs(config) for a in ("--config", str(c))), "--data.fold", str(fold),
              "--trainer.default_root_dir", str(fold_dir)]

    def logger(suffix: str) -> list[str]:
        if not uses_logger(config):
            return []
        return ["--trainer.logger.init_args.save_dir", str(fold_dir),
                "--trainer.logger.init_args.name", f"{name}_fold{fold}{suffix}"]

    fit = [python, str(REPO / "cli.py"), "fit", *common, *logger(""), "--trainer.callbacks+", json.dumps(TIMER),
           *overrides]
    test = [python, str(REPO / "cli.py"), "test", *common, *logger("_" + test_folder(label)), "--data.test_split", "val",
            "--model.report_dir", str(fold_dir / test_folder(label)), "--ckpt_path", str(fold_dir / checkpoint), *overrides]
    return fit, test


def revalidated_name(checkpoint: str) -> str:
    """``checkpoints/last.ckpt`` -> ``checkpoints/revalidated_last.ckpt``: where ``--revalidate`` writes."""
    path = Path(checkpoint)
    return str(path.with_name(f"revalidated_{path.stem}{path.suffix}"))


def revalidate_command(config: str | Path | Sequence[str | Path], fold: int, fold_dir: Path, overrides: Sequence[str],
                       checkpoint: str = "checkpoints/last.ckpt", python: str = sys.executable) -> list[str]:
    """``cli.py validate`` of the fold's ``checkpoint`` on its validation cases, writing it again with that
    validation's postprocessing choice to ``revalidated_name(checkpoint)`` (no logger: nothing is trained)."""
    writer = {"class_path": "lightning_flare.validation_choice.ValidationChoiceCheckpoint",
              "init_args": {"path": str(fold_dir / revalidated_name(checkpoint))}}
    return [python, str(REPO / "cli.py"), "validate", *(a for c in _configs(config) for a in ("--config", str(c))),
            "--data.fold", str(fold), "--trainer.default_root_dir", str(fold_dir), "--trainer.logger", "false",
            "--ckpt_path", str(fold_dir / checkpoint), "--trainer.callbacks+", json.dumps(writer), *overrides]


def read_fold(fold: int, fold_dir: Path, fit_s: float | None, checkpoint: str = "checkpoints/last.ckpt",
              label: str | None = None) -> dict:
    """One fold's figures from its folder: the test reports (``test`` or ``test_LABEL``), ``fit_time.json`` and the
    checkpoint's postprocessing choice (``fit_s``: the fit process's wall seconds, when this run measured them)."""
    with open(fold_dir / test_folder(label) / "metrics_per_case.csv", newline="") as f:
        cases = [{"case": r["case"], "dsc": float(r["dsc"]), "nsd": float(r["nsd"]), "reference_ml": float(r["reference_ml"]),
                  "predicted_ml": float(r["predicted_ml"]),
                  **{k: float(r[k]) for k in COMPONENTS_ONLY if r.get(k) not in (None, "")}} for r in csv.DictReader(f)]
    timing = json.loads((fold_dir / FIT_TIME).read_text())
    postprocessing = None
    if (fold_dir / checkpoint).is_file():
        from lightning_flare.checkpoint import load_checkpoint

        postprocessing = load_checkpoint(fold_dir / checkpoint).get("postprocessing")
    return {"fold": fold, "cases": cases, "fit_s": fit_s if fit_s is not None else timing["fit_s"], "timing": timing,
            "postprocessing": postprocessing}


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]
    return sum(values) / len(values) if values else float("nan")


def pooled_postprocessing(folds: Sequence[dict]) -> dict | None:
    """The postprocessing chosen on the folds' validation scores pooled over their cases (each fold's mean score
    per candidate weighted by its number of cases), as nnU-Net chooses it on the merged cross-validation."""
    scored = [f for f in folds if f["postprocessing"] and "val_dsc_by_min_component_ml" in f["postprocessing"]]
    if not scored or len(scored) < len(folds):
        return None
    total = sum(len(f["cases"]) for f in scored)

    def pool(key: str) -> dict[float, float] | None:
        if any(key not in f["postprocessing"] for f in scored):
            return None
        keys = set.intersection(*(set(f["postprocessing"][key]) for f in scored))
        return {float(t): sum(f["postprocessing"][key][t] * len(f["cases"]) for f in scored) / total for t in keys}

    plain, largest = pool("val_dsc_by_min_component_ml"), pool("val_dsc_largest_component_by_min_component_ml")
    if largest is None:
        pooled = {"min_component_ml": choose_threshold(plain), "largest_component_only": False}
    else:
        choice = choose_largest_component(plain, largest)
        pooled = {"min_component_ml": choice["min_component_ml"], "largest_component_only": choice["largest_component_only"],
                  "val_dsc_postprocessed": choice["val_dsc_postprocessed"]}
    pooled["healthy_decision"] = pooled_healthy_decision(scored, pooled["min_component_ml"], pooled["largest_component_only"])
    return pooled


def pooled_healthy_decision(folds: Sequence[dict], min_component_ml: float, largest_component: bool) -> dict | None:
    """The healthy-scan decision chosen on every fold's validation rows together (``healthy_choice.choose_from_rows``
    after the pooled ``min_component_ml`` / largest component): a fold validates on a few healthy scans, the folds
    together on all of them. None when a fold's checkpoint holds no rows (written before they were kept) or the
    folds scored different candidates."""
    stored = [((f["postprocessing"] or {}).get("healthy_decision") or {}).get("validation_rows") for f in folds]
    if not stored or any(s is None for s in stored) or any(s["candidates_ml"] != stored[0]["candidates_ml"] for s in stored):
        return None
    with_rows = [s for s in stored if s["rows"]]
    parts = [np.asarray(s["rows"], float).reshape(len(s["rows"]), -1) for s in with_rows]
    legacy = row_width(len(stored[0]["candidates_ml"]), 0)
    stale = any(p.shape[1] > legacy and s.get("component_thresholds") != list(THRESHOLDS) for p, s in zip(parts, with_rows))
    if parts and (len({p.shape[1] for p in parts}) > 1 or stale):
        # rows of folds validated before the component rule (or with other thresholds): its columns do not pool;
        # the scan-level columns come first in every row, so the choice falls back to those
        print("pooled healthy-scan decision: the folds' rows differ in their component-rule columns (some were "
              "validated before it or with other thresholds; --revalidate chooses again): scan-level rules only")
        parts = [p[:, :legacy] for p in parts]
    try:
        rows = np.concatenate(parts)
        record = choose_from_rows(rows, stored[0]["candidates_ml"], min_component_ml, largest_component)
    except ValueError:  # no rows at all, or the pooled min_component_ml is not among the decision's candidates
        return None
    rule = chosen_rule("auto", {"healthy_decision": record})
    record["setting"] = f"{rule[0]}:{float(rule[1])!r}" if rule else "off"  # repr: the exact threshold chosen
    return record


def summarize(folds: Sequence[dict]) -> dict:
    """Per-fold and pooled figures (the pooled ones over every case of the folds given)."""
    rows = []
    for f in folds:
        ratio = volume_ratio_summary([c["predicted_ml"] for c in f["cases"]], [c["reference_ml"] for c in f["cases"]])
        pp = f["postprocessing"] or {}
        rows.append({"fold": f["fold"], "cases": len(f["cases"]), "dsc": _mean([c["dsc"] for c in f["cases"]]),
                     "nsd": _mean([c["nsd"] for c in f["cases"]]), "volume_ratio_median": ratio["median"],
                     "fit_s": f["fit_s"], "seconds_per_iteration": f["timing"]["seconds_per_iteration"],
                     "iterations": f["timing"]["iterations"], "precision": f["timing"]["precision"],
                     "cpu": f["timing"]["cpu"], "min_component_ml": pp.get("min_component_ml"),
                     "largest_component_only": pp.get("largest_component_only")})
    cases = [c for f in folds for c in f["cases"]]
    ratio = volume_ratio_summary([c["predicted_ml"] for c in cases], [c["reference_ml"] for c in cases])
    pooled = {"cases": len(cases), "dsc": _mean([c["dsc"] for c in cases]), "nsd": _mean([c["nsd"] for c in cases]),
              "volume_ratio": ratio, "fit_s": sum(r["fit_s"] for r in rows),
              "healthy_cases": sum(c["reference_ml"] == 0 for c in cases),
              "healthy_false_positives": sum(c["reference_ml"] == 0 and c["predicted_ml"] > 0 for c in cases),
              "seconds_per_iteration": _mean([r["seconds_per_iteration"] for r in rows]),
              **healthy_and_lesion_scores([{**c, "healthy_false_positive": c["reference_ml"] == 0 and c["predicted_ml"] > 0}
                                           for c in cases])}  # the test report's rows: its figures before the decision
    return {"folds": rows, "pooled": pooled, "cpu": sorted({r["cpu"] for r in rows}),
            "precision": sorted({r["precision"] for r in rows}), "postprocessing": pooled_postprocessing(folds),
            "cases": {f["fold"]: f["cases"] for f in folds}}


def _pp(row: dict) -> str:
    if row["min_component_ml"] is None:
        return "-"
    return f"<{row['min_component_ml']:g} ml" + (", largest" if row["largest_component_only"] else "")


def format_summary(summary: dict, name: str = "") -> str:
    rows = [[str(r["fold"]), str(r["cases"]), f"{r['dsc']:.4f}", f"{r['nsd']:.4f}", f"{r['volume_ratio_median']:.3f}",
             f"{r['fit_s']:.0f}", f"{r['seconds_per_iteration']:.3f}", str(r["iterations"]), r["precision"], _pp(r)]
            for r in summary["folds"]]
    p = summary["pooled"]
    rows.append(["CV", str(p["cases"]), f"{p['dsc']:.4f}", f"{p['nsd']:.4f}", f"{p['volume_ratio']['median']:.3f}",
                 f"{p['fit_s']:.0f}", f"{p['seconds_per_iteration']:.3f}", "", "", ""])
    table = format_table(["fold", "cases", "DSC", "NSD", "pred/ref vol (median)", "fit s", "s/it", "iterations",
                          "precision", "postprocessing"], rows,
                         title=f"Cross-validation {name}: each fold's final checkpoint on its validation cases "
                               "(original grid, FLARE DSC / NSD); CV: pooled over every case")
    ratio = p["volume_ratio"]
    lines = [table, f"CPU: {', '.join(summary['cpu'])}; precision: {', '.join(summary['precision'])}",
             f"Pooled predicted / reference volume: median {ratio['median']:.3f} (IQR {ratio['q1']:.3f}-{ratio['q3']:.3f}), "
             f"{ratio['within_goal']} of {ratio['lesion_cases']} lesion cases within 0.8-1.25"]
    if p.get("healthy_cases"):
        alone = p.get("healthy_cases_with_false_positives_components_only")
        lines.append(f"Healthy scans (empty reference): {p['healthy_cases']}, with a false positive: "
                     f"{p['healthy_false_positives']}"
                     + (f" (small-component removal alone: {alone})" if alone is not None else "")
                     + f"; mean DSC of the lesion cases {p['dsc_lesion_cases']:.4f}"
                     + (f" (alone: {p['dsc_lesion_cases_components_only']:.4f})"
                        if p.get("dsc_lesion_cases_components_only") is not None else ""))
    pp = summary["postprocessing"]
    if pp is not None:
        decision = pp.get("healthy_decision")
        flag = f" --model.inference.healthy_decision {decision['setting']}" if decision else ""
        lines.append(f"Postprocessing chosen on the pooled validation scores (for the fold 'all' model): "
                     f"--model.inference.min_component_ml {pp['min_component_ml']:g} "
                     f"--model.inference.largest_component {str(pp['largest_component_only']).lower()}{flag}")
        if decision:
            lines.append(f"  pooled {decision['status']}")
    return "\n".join(lines)


def run_command(command: Sequence[str]) -> None:
    """One ``cli.py`` command in a fresh process, in the repository (the configs' relative paths)."""
    subprocess.run(command, cwd=REPO, check=True)


def main(argv: Sequence[str] | None = None, run: Callable[[Sequence[str]], None] = run_command) -> int:
    """``run``: how a ``cli.py`` command runs (the tests run it in their own process)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, action="append",
                        help="the training config (over configs/base.yaml); repeat it to layer configs")
    parser.add_argument("--name", help="run name (default: the config's file name)")
    parser.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", default="runs/cv", help="folder of the runs (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a LightningCLI override")
    parser.add_argument("--checkpoint", default="checkpoints/last.ckpt", help="the final checkpoint, in the fold folder")
    parser.add_argument("--reuse", action="store_true", help="keep folds already fitted and tested in OUT/NAME")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--retest", metavar="LABEL", help="fit nothing: test the fitted folds again with the overrides "
                        "given, reports in fold_K/test_LABEL, pooled into cv_summary_LABEL.json")
    parser.add_argument("--revalidate", action="store_true", help="with --retest: choose each checkpoint's "
                        "postprocessing again on its validation cases first (checkpoints/revalidated_*.ckpt)")
    args, raw = parser.parse_known_args(argv)
    try:
        overrides = overrides_from(args.set, raw)
    except ValueError as err:
        parser.error(str(err))
    name = args.name or Path(args.config[-1]).stem
    config = [Path(c).resolve() for c in args.config]  # the commands run in the repository (the configs' relative paths)
    root = Path(args.out).resolve() / name
    folds = []
    label = args.retest
    if label is not None and (not label or not all(c.isalnum() or c in "-_" for c in label)):
        parser.error(f"--retest needs a label of letters, digits, '-' and '_' (a folder name), got {label!r}")
    if args.revalidate and label is None:
        parser.error("--revalidate needs --retest LABEL (it tests existing checkpoints)")
    checkpoint = revalidated_name(args.checkpoint) if args.revalidate else args.checkpoint
    for fold in args.folds:
        fold_dir = root / f"fold_{fold}"
        fit, test = fold_commands(config, fold, name, fold_dir, overrides, checkpoint, label=label)
        revalidate = revalidate_command(config, fold, fold_dir, overrides, args.checkpoint) if args.revalidate else None
        if args.dry_run:
            print(*([] if label else [shlex.join(fit)]), *([shlex.join(revalidate)] if revalidate else []),
                  shlex.join(test), sep="\n")
            continue
        done = (fold_dir / FIT_TIME).is_file() and (fold_dir / test_folder(label) / "metrics_per_case.csv").is_file()
        fit_s = None
        if label is not None:
            if not (fold_dir / FIT_TIME).is_file() or not (fold_dir / args.checkpoint).is_file():
                sys.exit(f"{fold_dir}: fold {fold} is not fitted ({FIT_TIME} and {args.checkpoint} needed for --retest)")
            if revalidate and not (args.reuse and (fold_dir / checkpoint).is_file()):
                print(f"fold {fold}: {shlex.join(revalidate)}", flush=True)
                run(revalidate)
            if not (args.reuse and done):
                print(f"fold {fold}: {shlex.join(test)}", flush=True)
                run(test)
        elif not (args.reuse and done):
            print(f"fold {fold}: {shlex.join(fit)}", flush=True)
            start = time.perf_counter()
            run(fit)
            fit_s = time.perf_counter() - start
            if not (fold_dir / FIT_TIME).is_file():
                sys.exit(f"{fold_dir / FIT_TIME}: not written (a --trainer.callbacks override drops the FitTimer?)")
            print(f"fold {fold}: {shlex.join(test)}", flush=True)
            run(test)
        folds.append(read_fold(fold, fold_dir, fit_s, checkpoint, label))
    if args.dry_run:
        return 0
    summary = summarize(folds)
    summary.update(name=name, config=[str(c) for c in config], overrides=overrides, load_average=os.getloadavg()[0])
    root.mkdir(parents=True, exist_ok=True)
    summary_path = root / ("cv_summary.json" if label is None else f"cv_summary_{label}.json")
    write_text(summary_path, json.dumps(summary, indent=1) + "\n")  # atomic (tmp file + rename)
    print(format_summary(summary, name if label is None else f"{name} (re-test '{label}': {shlex.join(overrides)})"))
    print(f"Summary: {summary_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
