"""Pseudo-label filtering and merging for one case, NumPy only: the teacher's mask cut into connected components
(26-connectivity), each scored (mean probability, volume, Dice agreement with the pass without mirroring and with
the previous round's teacher), kept or dropped, then merged with the case's given label.

Agreement of a component ``C`` with another mask ``M``: Dice between ``C`` and the union ``M'`` of the components
of ``M`` (26-connected) that touch ``C``: ``2 |C & M'| / (|C| + |M'|)``; 0 when none touches it. A lesion of
``M`` elsewhere in the scan does not lower the agreement of ``C``.

Merge rules (``merge_labels``): the given label always wins: only voxels it calls background change. A component
that overlaps a given tumour voxel is that given lesion ("given": not filtered, left as the given label draws it).
Other kept components become tumour; dropped ones become the ignore label (we do not know what they are), or stay
background when the round uses no ignore label. A scan without any kept component is background outside its
dropped components: a confident healthy scan.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import ndimage

CONNECTIVITY = np.ones((3, 3, 3), bool)  # 26-neighbourhood, as postprocessing.py


@dataclass(frozen=True)
class Thresholds:
    """A component is kept when its mean teacher probability, its agreement (each one measured) and its volume
    reach these values."""

    min_mean_prob: float = 0.75
    min_agreement: float = 0.5
    min_volume_ml: float = 0.1

    def __post_init__(self) -> None:
        for name in ("min_mean_prob", "min_agreement"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        value = self.min_volume_ml
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"min_volume_ml must be a volume in ml (>= 0), got {value!r}")


@dataclass
class ComponentScore:
    """One component of the teacher's mask: ``index`` in the labelled component array (1, 2, ...)."""

    index: int
    voxels: int
    volume_ml: float
    mean_prob: float
    mirror_agreement: float | None = None  # None: no pass without mirroring (tta off)
    round_agreement: float | None = None  # None: no previous round
    given: bool = False  # overlaps a given tumour voxel
    reasons: list[str] = field(default_factory=list)  # thresholds it failed

    @property
    def decision(self) -> str:
        return "given" if self.given else "dropped" if self.reasons else "kept"

    def to_dict(self) -> dict:
        return {"index": self.index, "decision": self.decision, "voxels": self.voxels,
                "volume_ml": round(self.volume_ml, 6), "mean_prob": round(self.mean_prob, 6),
                "mirror_agreement": None if self.mirror_agreement is None else round(self.mirror_agreement, 6),
                "round_agreement": None if self.round_agreement is None else round(self.round_agreement, 6),
                "reasons": list(self.reasons)}


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of ``mask > 0`` (int32 array, 0 = none) and their count."""
    components, count = ndimage.label(np.asarray(mask) > 0, structure=CONNECTIVITY)
    return components, int(count)


class _Other:
    """A mask to measure agreement against, labelled once."""

    def __init__(self, mask: np.ndarray):
        self.components, count = label_components(mask)
        self.sizes = np.bincount(self.components.ravel(), minlength=count + 1)

    def agreement(self, inside: np.ndarray, box: tuple[slice, ...]) -> float:
        """Dice of the component (``inside``: its voxels within ``box``) with the components that touch it."""
        touched = self.components[box][inside]
        ids = np.unique(touched)
        ids = ids[ids > 0]
        if ids.size == 0:
            return 0.0
        overlap = int(np.count_nonzero(touched))  # every voxel of M in C belongs to a touching component
        return 2.0 * overlap / (int(inside.sum()) + int(self.sizes[ids].sum()))


def score_components(mask: np.ndarray, probability: np.ndarray, spacing: Sequence[float], thresholds: Thresholds,
                     plain: np.ndarray | None = None, previous: np.ndarray | None = None,
                     given_tumour: np.ndarray | None = None) -> tuple[np.ndarray, list[ComponentScore]]:
    """The components of the teacher's ``mask`` (x, y, z) and their scores.

    ``probability``: the teacher's tumour probability (same grid); ``spacing``: mm per voxel; ``plain``: the mask
    of the pass without mirroring; ``previous``: the previous round's teacher mask; ``given_tumour``: the given
    label's tumour voxels (partially labelled cases). Agreements not given are not tested."""
    shape = np.shape(mask)
    for name, other in (("probability", probability), ("plain", plain), ("previous", previous),
                        ("given_tumour", given_tumour)):
        if other is not None and np.shape(other) != shape:
            raise ValueError(f"{name} has the shape {np.shape(other)}, the teacher's mask {shape}")
    components, count = label_components(mask)
    others = {name: _Other(m) for name, m in (("mirror", plain), ("round", previous)) if m is not None}
    voxel_ml = float(np.prod(spacing)) / 1000.0
    scores = []
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        inside = components[box] == index
        voxels = int(inside.sum())
        score = ComponentScore(index, voxels, voxels * voxel_ml, float(np.asarray(probability)[box][inside].mean(dtype=np.float64)))
        if "mirror" in others:
            score.mirror_agreement = others["mirror"].agreement(inside, box)
        if "round" in others:
            score.round_agreement = others["round"].agreement(inside, box)
        score.given = given_tumour is not None and bool(np.asarray(given_tumour)[box][inside].any())
        if not score.given:
            score.reasons = failed_thresholds(score, thresholds)
        scores.append(score)
    assert len(scores) == count
    return components, scores


def failed_thresholds(score: ComponentScore, thresholds: Thresholds) -> list[str]:
    """Why a component is dropped: each threshold it misses, with its value."""
    checks = [("mean_prob", score.mean_prob, thresholds.min_mean_prob),
              ("mirror_agreement", score.mirror_agreement, thresholds.min_agreement),
              ("round_agreement", score.round_agreement, thresholds.min_agreement),
              ("volume_ml", score.volume_ml, thresholds.min_volume_ml)]
    return [f"{name} {value:.4g} < {'min_agreement' if 'agreement' in name else 'min_' + name} {limit:g}"
            for name, value, limit in checks if value is not None and value < limit]


def merge_labels(components: np.ndarray, scores: Sequence[ComponentScore], tumour: int = 1,
                 ignore: int | None = None, given: np.ndarray | None = None) -> np.ndarray:
    """The merged uint8 label (rules: module docstring): ``given`` (or all background) where it is not background;
    kept components as ``tumour``, dropped ones as ``ignore`` (background when None), elsewhere."""
    out = np.zeros(components.shape, np.uint8) if given is None else np.array(given, np.uint8, copy=True)
    if out.shape != components.shape:
        raise ValueError(f"given label has the shape {out.shape}, the teacher's mask {components.shape}")
    boxes = ndimage.find_objects(components)
    for score in scores:
        value = None if score.given else tumour if score.decision == "kept" else ignore
        if value is None:
            continue
        box = boxes[score.index - 1]
        region = out[box]  # a view
        region[(components[box] == score.index) & (region == 0)] = value
    return out


def choose_min_mean_prob(components: Sequence[tuple[ComponentScore, bool]], thresholds: Thresholds,
                         precision_target: float, min_components: int = 1) -> dict:
    """``min_mean_prob`` chosen on fully labelled validation cases that the teacher predicted: ``components`` are
    their components' scores with whether each overlaps a reference lesion (true) or not (a false positive).

    The loosest (smallest) threshold at which the components kept (mean probability at least the threshold, and
    the other thresholds of ``thresholds`` passed) have a precision (true / kept) of at least ``precision_target``
    and number at least ``min_components``. Candidates: the midpoint below each distinct mean probability of those
    components, between it and the next lower one (0.5 below the lowest: an argmax component of a two-class
    teacher has a mean probability above 0.5), as ``healthy_decision`` takes midpoints; when none qualifies,
    ``thresholds.min_mean_prob`` stays. Returns ``min_mean_prob``, ``reason`` ("chosen", "no_components",
    "too_few_components", "target_not_reached"), the kept count and precision at the chosen or kept threshold, and
    ``table``: per candidate ``[threshold, kept, true]`` (ascending)."""
    if not 0 < precision_target <= 1:
        raise ValueError(f"precision_target must be in (0, 1], got {precision_target!r}")
    others = Thresholds(0.0, thresholds.min_agreement, thresholds.min_volume_ml)
    eligible = [(s.mean_prob, bool(true)) for s, true in components if not failed_thresholds(s, others)]
    table = []
    values = sorted({p for p, _ in eligible})
    for lower, value in zip([0.5] + values[:-1], values):
        kept = [true for p, true in eligible if p >= value]
        table.append([float((lower + value) / 2), len(kept), int(sum(kept))])

    def at(t: float) -> tuple[int, float | None]:
        kept = [true for p, true in eligible if p >= t]
        return len(kept), (sum(kept) / len(kept) if kept else None)

    record = {"min_mean_prob": float(thresholds.min_mean_prob), "precision_target": float(precision_target),
              "min_components": int(min_components), "validation_components": len(components),
              "eligible_components": len(eligible), "false_positives": sum(not t for _, t in eligible), "table": table}
    for t, kept, true in table:  # ascending: the first that qualifies is the loosest
        if kept >= min_components and true / kept >= precision_target - 1e-12:
            record.update(min_mean_prob=t, reason="chosen", kept=kept, precision=true / kept)
            return record
    kept, precision = at(thresholds.min_mean_prob)
    reason = "no_components" if not eligible else "too_few_components" if len(eligible) < min_components else \
        "target_not_reached"
    record.update(reason=reason, kept=kept, precision=precision)
    return record
