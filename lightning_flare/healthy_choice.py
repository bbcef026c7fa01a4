"""The healthy-scan decision's operating point, chosen on validation cases (the rule itself: ``healthy_decision.py``).

Two features of the most probable component (the one with the largest probability mass, after small-component
removal), each a candidate rule "the scan is healthy when the feature is below a threshold":

- ``mean_probability``: its mean tumour probability (mass / volume). Independent of the component's size, which
  ``min_component_ml`` already thresholds: a confident small lesion keeps its scan, an unsure large blob does not.
- ``mass_ml``: its probability mass (ml-equivalents: volume weighted by confidence), the decision's first feature.

One feature and one threshold are chosen, not a pair of thresholds: a two-threshold search on the few healthy
validation cases of a fold would overfit. Per feature, the candidates come from the observed values of the
validation cases (``candidate_thresholds``: midpoints between consecutive distinct positive values, and twice the
largest, which empties every case). The choice, on validation cases, healthy and lesion cases together, AFTER
``min_component_ml`` and ``largest_component`` (chosen on the masks they leave, as ``Predictor.mask`` applies them
before it): the largest mean FLARE DSC over all cases (an emptied case scores 1 when healthy, 0 when not), subject
to losing at most ``max_lesion_dsc_loss`` (0.01) of the mean DSC of the lesion cases; off unless it beats no
decision. Ties go to ``mean_probability`` (in ``FEATURES``' order: it does not reward or punish size, which the
volume threshold before it already judged), then to the smaller threshold.

The component-level rule ``component_probability`` (``component_confidence.py``: every component below the
threshold removed, a scan left with none declared healthy) competes under the same objective and budget, its
candidates the fixed grid ``component_confidence.THRESHOLDS``; it comes last on ties (the scan-level rules were
there first). Rows written before it existed have no columns for it: it is then not a candidate.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .component_confidence import THRESHOLDS, threshold_dscs
from .postprocessing import flare_dsc
from .healthy_decision import COMPONENT_RULE, FEATURES, MAX_LESION_DSC_LOSS, RULES, component_table

BLOCKS = ("mass_ml", "mean_probability", "dsc", "largest_dsc")  # a validation row's blocks, one column per candidate
# then, per candidate, one column per component threshold: the DSC with the component rule, of every component left
# and of the largest left (the predictor applies the rule before keeping the largest component)
COMPONENT_BLOCKS = ("component_dsc", "component_largest_dsc")


def row_width(n_candidates: int, n_thresholds: int = len(THRESHOLDS)) -> int:
    """The length of a validation row (``n_thresholds`` 0: a row written before the component rule)."""
    return 1 + len(BLOCKS) * n_candidates + len(COMPONENT_BLOCKS) * n_candidates * n_thresholds


def validation_row(prediction: np.ndarray, probability: np.ndarray, reference: np.ndarray,
                   spacing_mm: Sequence[float], candidates_ml: Sequence[float],
                   ignored: np.ndarray | None = None) -> np.ndarray:
    """One validation case: [healthy (1/0)] and, per block of ``BLOCKS``, one value per candidate
    min_component_ml: the most probable component's mass and mean probability after removal (0 when nothing is
    left), the FLARE DSC after removal and that of the largest component alone after removal (what the
    predictor's ``largest_component`` leaves before the decision); then, per block of ``COMPONENT_BLOCKS`` and
    candidate, the DSCs of the component rule at each of ``THRESHOLDS``. Components are labelled once.

    ``ignored``: a declared ignore region (``reference`` background there). The features are those of the whole
    prediction, as ``decide`` computes them at test / predict time (no ignore region known there); only the DSCs
    leave the region out, as test scores do."""
    components, volumes, masses, _ = component_table(prediction > 0, probability, spacing_mm)
    known = None if ignored is None else ~np.asarray(ignored, bool)
    blocks: dict[str, list[float]] = {name: [] for name in (*BLOCKS, *COMPONENT_BLOCKS)}
    sizes = np.bincount(components.ravel(), minlength=len(volumes))
    scored = sizes if known is None else np.bincount(components[known], minlength=len(volumes))
    hits = (reference > 0) if known is None else (reference > 0) & known
    overlaps = np.bincount(components.ravel(), weights=hits.ravel().astype(np.float64), minlength=len(volumes))
    means = masses / np.maximum(volumes, 1e-12)
    largest = 1 + int(np.argmax(volumes[1:])) if len(volumes) > 1 else 0  # keep_largest_component's (most voxels)
    for threshold in candidates_ml:
        keep = volumes >= threshold
        keep[0] = False
        best = int(np.argmax(np.where(keep, masses, -1.0))) if keep.any() else 0
        blocks["mass_ml"].append(float(masses[best]) if best else 0.0)
        blocks["mean_probability"].append(float(masses[best] / volumes[best]) if best else 0.0)
        only = np.zeros_like(keep)
        only[largest] = keep[largest]
        for flags, name in ((keep, "dsc"), (only, "largest_dsc")):
            kept = flags[components]
            blocks[name].append(flare_dsc(kept if known is None else kept & known, reference))
        every, largest_left = threshold_dscs(sizes, scored, overlaps, means, int(hits.sum()), keep)
        blocks["component_dsc"] += every
        blocks["component_largest_dsc"] += largest_left
    return np.asarray([float(not (reference > 0).any())] + [v for name in (*BLOCKS, *COMPONENT_BLOCKS) for v in blocks[name]])


def candidate_thresholds(values: Sequence[float]) -> list[float]:
    """0 (off), midpoints between consecutive distinct positive values, twice the largest value."""
    values = np.unique(np.asarray(values, float))
    values = values[values > 0]
    if values.size == 0:
        return [0.0]
    return [0.0, *((values[:-1] + values[1:]) / 2).tolist(), float(2 * values[-1])]


def decision_scores(values: Sequence[float], dsc_kept: Sequence[float], healthy: Sequence[bool],
                    threshold: float) -> tuple[float, float]:
    """(mean FLARE DSC over all cases, mean over lesion cases) when cases whose feature is below ``threshold`` are
    emptied (an emptied case scores 1 when healthy, 0 when not); NaN for a mean over no case."""
    values, dsc, healthy = np.asarray(values, float), np.asarray(dsc_kept, float), np.asarray(healthy, bool)
    return _means(np.where(values < threshold, healthy.astype(float), dsc), healthy)


def _means(scores: np.ndarray, healthy: np.ndarray) -> tuple[float, float]:
    """(mean over all cases, mean over the lesion cases) of per-case ``scores``; NaN for a mean over no case."""
    lesion = scores[~healthy]
    return float(scores.mean()) if scores.size else float("nan"), float(lesion.mean()) if lesion.size else float("nan")


def choose_rule(features: Mapping[str, Sequence[float]], dsc_kept: Sequence[float], healthy: Sequence[bool],
                max_lesion_dsc_loss: float = MAX_LESION_DSC_LOSS, min_gain: float = 1e-6,
                component_dsc: np.ndarray | None = None, component_thresholds: Sequence[float] = THRESHOLDS) -> dict:
    """The operating point on validation cases (see the module docstring). ``features``: per feature name of
    ``FEATURES`` (those given are searched, in that order), its value per case; ``mass_ml`` is required (a case
    with mass 0 has nothing predicted). ``component_dsc``: (cases, thresholds) DSCs with the component rule at each
    of ``component_thresholds`` (None: not a candidate). Returns ``feature`` (the chosen rule's name, None: off)
    and per rule of ``RULES`` its threshold (None unless chosen), ``val_dsc`` / ``val_dsc_off`` (mean
    FLARE DSC with / without it), ``val_lesion_dsc_loss``, counts of healthy and lesion cases and of healthy cases
    with a false positive with / without it, ``reason`` ("chosen", "no_healthy_cases", "no_lesion_cases",
    "no_gain") and ``status`` (one line for the log)."""
    unknown = set(features) - set(FEATURES)
    if unknown or "mass_ml" not in features:
        raise ValueError(f"features must include 'mass_ml' and be among {list(FEATURES)}, got {sorted(features)}")
    values = {name: np.asarray(features[name], float) for name in FEATURES if name in features}
    masses, healthy = values["mass_ml"], np.asarray(healthy, bool)
    if any(len(v) != len(healthy) for v in values.values()) or len(dsc_kept) != len(healthy):
        raise ValueError(f"features, dsc_kept and healthy differ in length: {[len(v) for v in values.values()]}, "
                         f"{len(dsc_kept)}, {len(healthy)}")
    if max_lesion_dsc_loss < 0:
        raise ValueError(f"max_lesion_dsc_loss must be >= 0, got {max_lesion_dsc_loss!r}")
    if component_dsc is not None:
        component_dsc = np.asarray(component_dsc, float)
        if component_dsc.shape != (len(healthy), len(component_thresholds)):
            raise ValueError(f"component_dsc must be (cases, thresholds) = ({len(healthy)}, "
                             f"{len(component_thresholds)}), got {component_dsc.shape}")
    n_healthy, n_lesion = int(healthy.sum()), int((~healthy).sum())
    off_all, off_lesion = decision_scores(masses, dsc_kept, healthy, 0.0)
    record: dict[str, Any] = {"feature": None, **{name: None for name in RULES}, "val_dsc": off_all,
                              "val_dsc_off": off_all, "val_lesion_dsc_loss": 0.0, "healthy_cases": n_healthy,
                              "lesion_cases": n_lesion, "healthy_fp_off": int((healthy & (masses > 0)).sum())}
    record["healthy_fp"] = record["healthy_fp_off"]
    if n_healthy == 0 or n_lesion == 0:
        kind = "healthy" if n_healthy == 0 else "lesion"
        record["reason"] = f"no_{kind}_cases"
        record["status"] = (f"healthy-scan decision off: no {kind} case among the {len(masses)} validation cases "
                            "(its operating point needs both)")
        return record
    best_feature, best_t, best, best_j = None, 0.0, off_all, -1
    for name, feature in values.items():
        for t in candidate_thresholds(feature)[1:]:
            score, lesion = decision_scores(feature, dsc_kept, healthy, t)
            if off_lesion - lesion <= max_lesion_dsc_loss + 1e-12 and score > best + 1e-12:  # ties stay earlier
                best_feature, best_t, best = name, t, score
    for j, t in enumerate(component_thresholds if component_dsc is not None else ()):
        score, lesion = _means(component_dsc[:, j], healthy)
        if off_lesion - lesion <= max_lesion_dsc_loss + 1e-12 and score > best + 1e-12:
            best_feature, best_t, best, best_j = COMPONENT_RULE, float(t), score, j
    if best_feature is None or best <= off_all + min_gain:
        searched = [f"the {' or '.join(values)} of the most probable component"]
        searched += ["the mean probability of each component"] if component_dsc is not None else []
        record["reason"] = "no_gain"
        record["status"] = (f"healthy-scan decision off: no threshold on {' or on '.join(searched)} improves the "
                            f"mean validation DSC ({off_all:.4f}) within {max_lesion_dsc_loss:g} lesion DSC")
        return record
    if best_feature == COMPONENT_RULE:
        scores = component_dsc[:, best_j]
        lesion, healthy_fp, action = _means(scores, healthy)[1], int((healthy & (scores < 0.5)).sum()), "removed"
    else:
        lesion = decision_scores(values[best_feature], dsc_kept, healthy, best_t)[1]
        healthy_fp = int((healthy & (masses > 0) & (values[best_feature] >= best_t)).sum())
        action = "emptied"
    record.update(feature=best_feature, reason="chosen", val_dsc=best, val_lesion_dsc_loss=max(0.0, off_lesion - lesion),
                  healthy_fp=healthy_fp)
    record[best_feature] = float(best_t)
    subject = "components whose" if best_feature == COMPONENT_RULE else "scans whose most probable component has"
    record["status"] = (f"healthy-scan decision: {subject} {RULES[best_feature]} < {best_t:.4g} are {action} "
                        f"(validation DSC {off_all:.4f} -> {best:.4f}, healthy false positives "
                        f"{record['healthy_fp_off']} -> {record['healthy_fp']} of {n_healthy})")
    return record


def choose_from_rows(rows: np.ndarray, candidates_ml: Sequence[float], after_min_component_ml: float,
                     largest_component: bool = False) -> dict:
    """``choose_rule`` on ``validation_row`` rows, at the column of ``after_min_component_ml``; the DSCs of the
    largest component alone when ``largest_component`` (the predictor keeps only it before the decision)."""
    candidates = [float(c) for c in candidates_ml]
    if float(after_min_component_ml) not in candidates:
        raise ValueError(f"after_min_component_ml {after_min_component_ml!r} is not among the scored candidates {candidates}")
    n, g = len(candidates), len(THRESHOLDS)
    rows = np.asarray(rows, float)
    if rows.size and rows.ndim != 2:
        raise ValueError(f"validation rows must be 2-D (cases, values), got shape {rows.shape}")
    width = rows.shape[-1] if rows.size else row_width(n)
    if width not in (row_width(n), row_width(n, 0)):
        raise ValueError(f"validation rows of {width} values fit neither {row_width(n)} nor, written before the "
                         f"component rule, {row_width(n, 0)} values for {n} candidates")
    rows = rows.reshape(-1, width)
    k = candidates.index(float(after_min_component_ml))
    column = {name: rows[:, 1 + i * n + k] for i, name in enumerate(BLOCKS)}
    component = None
    if width == row_width(n):  # the component rule's DSCs at this candidate
        start = 1 + len(BLOCKS) * n + COMPONENT_BLOCKS.index("component_largest_dsc" if largest_component else "component_dsc") * n * g
        component = rows[:, start + k * g: start + (k + 1) * g]
    record = choose_rule({name: column[name] for name in FEATURES}, column["largest_dsc" if largest_component else "dsc"],
                         rows[:, 0] > 0.5, component_dsc=component)
    record["after_min_component_ml"] = float(after_min_component_ml)
    record["after_largest_component"] = bool(largest_component)
    return record
