"""The output folder of a pseudo-labelling round: a new nnU-Net raw dataset, built under a hidden temporary name
beside its final place and renamed into place at the end (a failed round leaves no output folder).

Images (and the labels of fully labelled cases, and ``imagesTs`` / ``labelsTs`` as whole folders) are absolute
symbolic links to the source files, resolved to the real file (a round made from a round's output links to the
originals, not to links); the folder can be moved, the source cannot."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Sequence

from .io import HOST, pid_alive, write_text
from .raw_dataset import DatasetError, kfold_splits

REPORT_COLUMNS = ("case", "kind", "components_found", "kept", "dropped", "given", "voxels_added", "voxels_ignored",
                  "healthy", "dropped_reasons")


class StagedFolder:
    """``with StagedFolder(final, overwrite) as tmp:`` build in ``tmp``; on success ``tmp`` becomes ``final``
    (an existing ``final`` is replaced only with ``overwrite``; when moving ``tmp`` into place fails, the old
    ``final`` is put back), on an exception ``tmp`` is removed. Temporary folders of killed runs (same host, dead
    pid) are removed on entry, except an old ``final`` moved aside by a run killed before its new one was in place:
    that one is put back first."""

    def __init__(self, final: str | Path, overwrite: bool = False):
        self.final = Path(final).absolute()
        self.overwrite = overwrite
        self.tmp = self.final.parent / f".{self.final.name}.partial-{HOST}-{os.getpid()}"

    def check(self) -> None:
        """The errors ``__enter__`` raises, before any work."""
        if self.final.is_symlink() or (self.final.exists() and not self.final.is_dir()):
            raise FileExistsError(f"{self.final}: exists and is not a folder")
        if self.final.exists() and not self.overwrite:
            raise FileExistsError(f"{self.final}: output folder exists; pass --overwrite to replace it")

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        pattern = re.compile(rf"^\.{re.escape(self.final.name)}\.(partial|old)-{re.escape(HOST)}-(\d+)$")
        stale = [p for p in self.final.parent.iterdir()
                 if (m := pattern.match(p.name)) and not pid_alive(int(m[2]))]
        olds = sorted((p for p in stale if ".old-" in p.name), key=lambda p: p.stat().st_mtime)
        if olds and not os.path.lexists(self.final):  # killed between its two renames: the old output goes back
            os.rename(olds[-1], self.final)
            warnings.warn(f"{self.final}: restored from {olds[-1].name}, left by a run killed while replacing it")
            stale.remove(olds[-1])
        self.check()
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, kind, value, traceback) -> bool:
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = self.final.parent / f".{self.final.name}.old-{HOST}-{os.getpid()}"
        moved = False
        try:
            if self.final.exists():  # overwrite: the old folder moves aside, then goes
                os.rename(self.final, old)
                moved = True
            os.rename(self.tmp, self.final)
        except BaseException as err:  # the old output back in its place, the new one gone
            shutil.rmtree(self.tmp, ignore_errors=True)
            if moved:
                try:
                    os.rename(old, self.final)
                except OSError as restore:
                    raise OSError(f"{self.final}: replacing it failed ({err}) and so did putting the old folder "
                                  f"back ({restore}); it is at {old}") from err
            raise
        if moved:
            shutil.rmtree(old, ignore_errors=True)
        return False


def link(target: Path, path: Path) -> None:
    """``path`` -> the real path of ``target`` (absolute)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(Path(target).resolve(), path)


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def fold_splits(source_root: Path, labelled_ids: Sequence[str], train_only_ids: Sequence[str], num_folds: int = 5,
                seed: int = 12345) -> list[dict[str, list[str]]]:
    """The student's folds: the source's ``splits_final.json`` when it has one (the teacher's folds), else
    nnU-Net's ``kfold_splits`` over the labelled ids; ``train_only_ids`` (the unlabelled scans) join every fold's
    train list, so a pseudo-labelled-only case is never a validation case."""
    splits_file = source_root / "splits_final.json"
    if splits_file.is_file():
        try:
            splits = json.loads(splits_file.read_text())
            splits = [{"train": list(s["train"]), "val": list(s["val"])} for s in splits]
        except (ValueError, KeyError, TypeError) as err:
            raise DatasetError(f"{splits_file}: not a list of {{'train': [...], 'val': [...]}} folds ({err})") from err
        unknown = sorted({k for s in splits for k in s["train"] + s["val"]} - set(labelled_ids))
        if unknown:
            raise DatasetError(f"{splits_file}: cases that are not labelled training cases: {unknown[:5]}")
    else:
        splits = kfold_splits(labelled_ids, num_folds, seed)
    extra = sorted(train_only_ids)
    return [{"train": s["train"] + extra, "val": s["val"]} for s in splits]


def output_meta(meta: dict, num_training: int, pseudo_ids: Sequence[str], ignore_value: int | None,
                source_root: Path) -> dict:
    """The student's dataset.json: the source's, with ``numTraining``, ``"ignore"`` in the labels when the round
    uses one, ``partially_labelled`` emptied (merged now) and ``pseudo_labelled`` listed. ``synthetic_params`` is
    left out (the synthetic generator would take the folder for its own output)."""
    out = {k: v for k, v in meta.items() if k != "synthetic_params"}
    labels = dict(meta["labels"])
    if ignore_value is not None:
        labels["ignore"] = labels.get("ignore", ignore_value)
    out.update(labels=labels, numTraining=int(num_training), partially_labelled=[],
               pseudo_labelled=sorted(pseudo_ids), pseudo_label_source=str(Path(source_root).resolve()))
    return out


def write_report(folder: Path, round_config: dict, cases: Sequence[dict], threshold_choice: dict | None = None) -> None:
    """``pseudo_label_report.json`` (the round's config, totals, every case with every component, and the
    ``threshold_choice`` on validation when the round made one) and ``pseudo_label_report.csv`` (one row per case)."""
    totals = {key: sum(int(c[key]) for c in cases) for key in REPORT_COLUMNS[2:9]}
    totals.update(cases=len(cases), unlabelled=sum(c["kind"] == "unlabelled" for c in cases),
                  partial=sum(c["kind"] == "partial" for c in cases))
    extra = {} if threshold_choice is None else {"threshold_choice": threshold_choice}
    write_json(folder / "pseudo_label_report.json", {"round": round_config, "totals": totals, **extra,
                                                     "cases": list(cases)})
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=REPORT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for case in cases:
        row = {k: case[k] for k in REPORT_COLUMNS[:-1]}
        row["dropped_reasons"] = "; ".join(f"component {c['index']}: {', '.join(c['reasons'])}"
                                           for c in case["components"] if c["decision"] == "dropped")
        writer.writerow(row)
    write_text(folder / "pseudo_label_report.csv", text.getvalue())
