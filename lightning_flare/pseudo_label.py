"""One pseudo-labelling round: a teacher checkpoint labels the unlabelled and partially labelled scans of a raw
dataset; confident components are kept, the others ignored; the result is a new raw dataset for the student.

    python -m lightning_flare.pseudo_label --config ROUND.yaml [--teacher CKPT] [--source DIR] [--output DIR]
        [--previous DIR] [--set KEY=VALUE ...] [--device cpu] [--overwrite]

For each unlabelled scan (``imagesUnlabelled/``) and each partially labelled training case (dataset.json
``partially_labelled``) the teacher gives the tumour probability on the scan's grid with mirroring and its mask
without (``pseudo_teacher``); each connected component of the mirrored mask is kept when its mean probability, its
Dice agreement with the pass without mirroring (and with the previous round's teacher mask) and its volume reach the
thresholds; merged with the given label as ``pseudo_filter`` says. The output folder (``pseudo_output``) holds
imagesTr (links), labelsTr, teacher_masks/ (this teacher's masks, the next round's ``previous``), dataset.json,
splits_final.json, round.yaml (this round's config, rerunnable) and pseudo_label_report.json / .csv.

Config keys (YAML; relative paths are relative to the working directory): ``teacher``, ``source``, ``output``
(required); ``previous`` (a previous round's output folder); ``min_mean_prob`` (0.75), ``min_agreement`` (0.5),
``min_volume_ml`` (0.1); ``tta`` (true: the main pass mirrors and is compared with the pass without; false: one
pass, no mirror agreement); ``ignore_dropped`` (true: dropped components become the ignore label, the dataset's or
one added as the number of classes, 2; false: background); ``num_folds`` (5), ``split_seed`` (12345); ``device``
("auto"); ``inference`` (``model.inference`` settings of the predictor, except those in ``ROUND_DECIDES``);
``teacher_sha256`` (checked when given: round.yaml records it).

``choose_on: validation`` chooses ``min_mean_prob`` on the fully labelled validation cases (``pseudo_validation``)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .io import Geometry, from_array, read_image, write_image, write_text
from .predict import load_predictor
from .predictor import InferenceSettings, Predictor
from .preprocessing import preprocess_image
from .pseudo_filter import Thresholds, choose_min_mean_prob, merge_labels, score_components
from .pseudo_output import StagedFolder, fold_splits, link, output_meta, write_json, write_report
from .pseudo_source import PseudoLabelError, Source, read_mask, read_source
from .pseudo_teacher import file_sha256, teacher_passes
from .pseudo_validation import validation_components
from .raw_dataset import Case

TEACHER_MASKS = "teacher_masks"


# inference settings a round replaces with its own rules (the teacher's mask is the argmax, filtered per component)
ROUND_DECIDES = {"tta": "the top-level tta", "min_component_ml": "min_volume_ml",
                 "largest_component": "every component is filtered on its own", "healthy_decision": "a scan without a kept component is healthy"}

CHOOSE_ON = ("none", "validation")


@dataclass
class RoundConfig:
    """A round's settings (the keys of the module docstring); ``round.yaml`` of an output holds them resolved."""

    teacher: str
    source: str
    output: str
    previous: str | None = None
    min_mean_prob: float = 0.75
    min_agreement: float = 0.5
    min_volume_ml: float = 0.1
    tta: bool = True
    ignore_dropped: bool = True
    num_folds: int = 5
    split_seed: int = 12345
    device: str = "auto"
    inference: dict = field(default_factory=dict)
    teacher_sha256: str | None = None
    choose_on: str = "none"  # "validation": min_mean_prob chosen on the fully labelled validation cases
    precision_target: float = 0.95
    min_validation_components: int = 5
    validation_fold: int = 0

    def __post_init__(self) -> None:
        if self.choose_on not in CHOOSE_ON:
            raise PseudoLabelError(f"choose_on must be one of {list(CHOOSE_ON)}, got {self.choose_on!r}")
        if isinstance(self.precision_target, bool) or not isinstance(self.precision_target, (int, float)) \
                or not 0 < self.precision_target <= 1:
            raise PseudoLabelError(f"precision_target must be a number in (0, 1], got {self.precision_target!r}")
        for name in ("min_validation_components", "validation_fold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PseudoLabelError(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("tta", "ignore_dropped"):
            if not isinstance(getattr(self, name), bool):
                raise PseudoLabelError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("teacher", "source", "output"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise PseudoLabelError(f"{name} is required (a path), got {getattr(self, name)!r}")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (self.num_folds, self.split_seed)):
            raise PseudoLabelError(f"num_folds and split_seed must be integers, got {self.num_folds!r}, {self.split_seed!r}")
        blocked = sorted(set(ROUND_DECIDES) & set(self.inference or {}))
        if blocked:
            raise PseudoLabelError(f"inference.{blocked[0]} is the round's to decide ({ROUND_DECIDES[blocked[0]]})")
        self.thresholds  # validates them
        self.settings

    @property
    def thresholds(self) -> Thresholds:
        try:
            return Thresholds(self.min_mean_prob, self.min_agreement, self.min_volume_ml)
        except ValueError as err:
            raise PseudoLabelError(str(err)) from err

    @property
    def settings(self) -> InferenceSettings:
        try:
            return InferenceSettings.from_dict(self.inference or {})
        except ValueError as err:
            raise PseudoLabelError(f"inference: {err}") from err

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> "RoundConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise PseudoLabelError(f"{source}: unknown keys {unknown}; known: {sorted(names)}")
        missing = sorted({"teacher", "source", "output"} - set(values))
        if missing:
            raise PseudoLabelError(f"{source}: {', '.join(missing)} required (or pass --{missing[0]})")
        try:
            return cls(**dict(values))
        except PseudoLabelError as err:  # a bad value: say where it came from
            raise PseudoLabelError(f"{source}: {err}") from err


def read_config(path: str | None, overrides: Mapping[str, Any] = {}, sets: Sequence[str] = ()) -> RoundConfig:
    """A round's YAML config, then the command-line paths (``overrides``), then ``KEY=VALUE`` items (YAML values;
    ``inference.KEY`` for predictor settings)."""
    import yaml  # jsonargparse's dependency; only read here

    values: dict = {}
    if path:
        if not Path(path).is_file():
            raise PseudoLabelError(f"{path}: config file not found")
        values = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(values, dict):
            raise PseudoLabelError(f"{path}: must hold a mapping of config keys")
    values.update({k: v for k, v in overrides.items() if v is not None})
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise PseudoLabelError(f"--set needs KEY=VALUE (e.g. min_mean_prob=0.9), got {item!r}")
        if key.startswith("inference."):
            values["inference"] = {**(values.get("inference") or {}), key[len("inference."):]: yaml.safe_load(value)}
        else:
            values[key.strip()] = yaml.safe_load(value)
    return RoundConfig.from_dict(values, source=path or "command line")


def _device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)


def _check_paths(config: RoundConfig, source: Source) -> tuple[str, dict | None]:
    """Paths that cannot work, the teacher's sha256 and the previous round's record."""
    output = Path(config.output).absolute()
    if output.resolve() == source.root.resolve() or source.root.resolve() in output.resolve().parents:
        raise PseudoLabelError(f"{output}: the output folder must lie outside the source dataset {source.root}")
    if not Path(config.teacher).is_file():
        raise PseudoLabelError(f"{config.teacher}: teacher checkpoint not found")
    sha = file_sha256(config.teacher)
    if config.teacher_sha256 and config.teacher_sha256 != sha:
        raise PseudoLabelError(f"{config.teacher}: sha256 {sha} differs from the config's teacher_sha256 "
                               f"{config.teacher_sha256} (another checkpoint than the round was made with)")
    previous = None
    if config.previous:
        folder = Path(config.previous)
        if folder.absolute() == output:
            raise PseudoLabelError(f"{folder}: previous and output are the same folder")
        if not (folder / "round.yaml").is_file() or not (folder / TEACHER_MASKS).is_dir():
            raise PseudoLabelError(f"{folder}: not a pseudo-labelling round's output (no round.yaml and "
                                   f"{TEACHER_MASKS}/)")
        import yaml

        previous = yaml.safe_load((folder / "round.yaml").read_text()) or {}
        if previous.get("teacher_sha256") == sha:
            raise PseudoLabelError(f"{folder}: the previous round used the same teacher ({config.teacher}); the "
                                   "agreement between rounds needs the new round's teacher (the student of the last)")
    return sha, previous


def label_case(predictor: Predictor, case: Case, kind: str, config: RoundConfig, source: Source, ignore: int | None,
               previous_dir: Path | None, folder: Path) -> dict:
    """Teacher, filter and merge for one case; writes its label and teacher mask into ``folder``; its report."""
    started = time.perf_counter()
    image = read_image(case.image)
    geometry = Geometry.of(image)
    tumour, ending = source.tumour, source.file_ending
    given = None
    if kind == "partial":
        allowed = {0, tumour} | ({source.ignore_label} if source.ignore_label is not None else set())
        given = read_mask(case.label, geometry, allowed, "given label")
    previous = None
    if previous_dir is not None:
        previous = read_mask(previous_dir / TEACHER_MASKS / f"{case.case_id}{ending}", geometry, {0, 1},
                              "previous round's teacher mask") > 0
    tensor = torch.from_numpy(preprocess_image(image, predictor.plan))[None]
    with torch.inference_mode():
        teacher = teacher_passes(predictor, tensor, geometry.spacing, geometry.size, tta=config.tta)
    components, scores = score_components(teacher.mask, teacher.probability, geometry.spacing, config.thresholds,
                                          plain=teacher.plain_mask, previous=previous,
                                          given_tumour=None if given is None else given == tumour)
    label = merge_labels(components, scores, tumour=tumour, ignore=ignore, given=given)
    write_image(from_array(label, geometry), folder / "labelsTr" / f"{case.case_id}{ending}")
    write_image(from_array(teacher.mask.astype(np.uint8), geometry), folder / TEACHER_MASKS / f"{case.case_id}{ending}")
    if kind == "unlabelled":  # a training case's image is linked with the others
        link(case.image, folder / "imagesTr" / f"{case.case_id}_0000{ending}")
    count = lambda array, value: 0 if value is None or array is None else int(np.count_nonzero(array == value))  # noqa: E731
    decisions = [s.decision for s in scores]
    return {"case": case.case_id, "kind": kind, "image": str(case.image), "components_found": len(scores),
            "kept": decisions.count("kept"), "dropped": decisions.count("dropped"), "given": decisions.count("given"),
            "voxels_added": count(label, tumour) - count(given, tumour),
            "voxels_ignored": count(label, ignore) - count(given, ignore),
            "healthy": not bool(np.any(label == tumour)), "seconds": round(time.perf_counter() - started, 3),
            "components": [s.to_dict() for s in scores]}


def run_round(config: RoundConfig, overwrite: bool = False, log: Callable[[str], None] = print) -> Path:
    """Runs the round; returns the output folder. Nothing is left at ``config.output`` when it fails."""
    source = read_source(config.source)
    if "pseudo_labelled" in source.meta:
        raise PseudoLabelError(f"{source.meta_path}: a round's output; a round's source is the original dataset "
                               "(give this folder as previous)")
    staged = StagedFolder(config.output, overwrite)
    staged.check()
    sha, previous = _check_paths(config, source)
    predictor = load_predictor(config.teacher, config.settings, _device(config.device))
    if predictor.plan.num_classes != 2 or predictor.plan.labels.get("background") != 0:
        raise PseudoLabelError(f"{config.teacher}: pseudo-labelling needs a two-class teacher (background 0, tumour), "
                               f"the checkpoint's labels are {predictor.plan.labels}")
    choice = None
    if config.choose_on == "validation":
        choice = choose_min_mean_prob(validation_components(predictor, config, source, log), config.thresholds,
                                      config.precision_target, config.min_validation_components)
        log(f"min_mean_prob {choice['min_mean_prob']:.4g} ({choice['reason']}: {choice['kept']} of "
            f"{choice['eligible_components']} validation component(s) kept, precision {choice['precision']})")
    labelling = config if choice is None else replace(config, min_mean_prob=choice["min_mean_prob"])
    # the dataset's ignore label, else nnU-Net's: the number of classes (what raw_dataset requires of a declared one)
    ignore = None if not config.ignore_dropped else \
        source.ignore_label if source.ignore_label is not None else source.num_classes
    record = {**asdict(config), "teacher": str(Path(config.teacher).resolve()), "teacher_sha256": sha,
              "source": str(source.root.resolve()), "output": str(staged.final),
              "previous": str(Path(config.previous).resolve()) if config.previous else None,
              "inference": {k: v for k, v in config.settings.to_dict().items() if k not in ROUND_DECIDES}}
    jobs = [(c, "partial") for c in source.labelled if c.case_id in source.partially_labelled]
    jobs += [(c, "unlabelled") for c in source.unlabelled]
    log(f"pseudo-labelling {len(jobs)} case(s) of {source.root} with {config.teacher} -> {staged.final}")
    with staged as folder:
        for case in source.labelled:
            link(case.image, folder / "imagesTr" / f"{case.case_id}_0000{source.file_ending}")
            if case.case_id not in source.partially_labelled:
                link(case.label, folder / "labelsTr" / f"{case.case_id}{source.file_ending}")
        for split in ("imagesTs", "labelsTs"):
            if (source.root / split).is_dir():
                link(source.root / split, folder / split)
        cases = []
        for case, kind in jobs:
            try:
                report = label_case(predictor, case, kind, labelling, source, ignore,
                                    Path(config.previous) if config.previous else None, folder)
            except (ValueError, OSError, RuntimeError) as err:
                raise PseudoLabelError(f"case {case.case_id} ({kind}, {case.image}): {err}") from err
            log(f"  {case.case_id} ({kind}): {report['components_found']} component(s), {report['kept']} kept, "
                f"{report['dropped']} dropped, {report['given']} given")
            cases.append(report)
        ignore_used = source.ignore_label if source.ignore_label is not None else \
            ignore if any(c["voxels_ignored"] for c in cases) else None
        pseudo_ids = [c["case"] for c in cases]
        write_json(folder / "dataset.json", output_meta(source.meta, len(source.labelled) + len(source.unlabelled),
                                                        pseudo_ids, ignore_used, source.root))
        write_json(folder / "splits_final.json",
                   fold_splits(source.root, [c.case_id for c in source.labelled],
                               [c.case_id for c in source.unlabelled], config.num_folds, config.split_seed))
        import yaml

        write_text(folder / "round.yaml", yaml.safe_dump(record, sort_keys=False))
        write_report(folder, record, cases, choice)
    log(json.dumps({"output": str(staged.final), "cases": len(cases),
                    "kept": sum(c["kept"] for c in cases), "dropped": sum(c["dropped"] for c in cases)}))
    return staged.final


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_flare.pseudo_label", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="the round's YAML config (keys above)")
    for name, text in (("teacher", "teacher checkpoint"), ("source", "source raw dataset folder"),
                       ("output", "output raw dataset folder (must not exist unless --overwrite)"),
                       ("previous", "the previous round's output folder (agreement between rounds)"),
                       ("device", "cpu, cuda, cuda:1 or auto")):
        parser.add_argument(f"--{name}", help=text)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config key (repeatable), e.g. --set min_mean_prob=0.9 --set inference.sw_overlap=0.25")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    try:
        config = read_config(args.config, {k: getattr(args, k) for k in ("teacher", "source", "output", "previous",
                                                                          "device")}, args.set)
        run_round(config, overwrite=args.overwrite)
    except (OSError, ValueError, RuntimeError) as err:
        print(f"error: {err}\n(no output folder written)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
