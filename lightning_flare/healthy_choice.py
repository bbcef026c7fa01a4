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
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .postprocessing import flare_dsc
from .healthy_decision import FEATURES, MAX_LESION_DSC_LOSS, component_table

BLOCKS = ("mass_ml", "mean_probability", "dsc", "largest_dsc")  # a validation row's blocks, one column per candidate


def validation_row(prediction: np.ndarray, probability: np.ndarray, reference: np.ndarray,
                   spacing_mm: Sequence[float], candidates_ml: Sequence[float],
                   ignored: np.ndarray | None = None) -> np.ndarray:
    """One validation case: [healthy (1/0)] and, per block of ``BLOCKS``, one value per candidate
    min_component_ml: the most probable component's mass and mean probability after removal (0 when nothing is
    left), the FLARE DSC after removal and that of the largest component alone after removal (what the
    predictor's ``largest_component`` leaves before the decision). Components are labelled once.

    ``ignored``: a declared ignore region (``reference`` background there). The features are those of the whole
    prediction, as ``decide`` computes them at test / predict time (no ignore region known there); only the DSCs
    leave the region out, as test scores do."""
    components, volumes, masses, _ = component_table(prediction > 0, probability, spacing_mm)
    known = None if ignored is None else ~np.asarray(ignored, bool)
    blocks: dict[str, list[float]] = {name: [] for name in BLOCKS}
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
    return np.asarray([float(not (reference > 0).any())] + [v for name in BLOCKS for v in blocks[name]])


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
    scores = np.where(values < threshold, healthy.astype(float), dsc)
    lesion = scores[~healthy]
    return float(scores.mean()) if scores.size else float("nan"), float(lesion.mean()) if lesion.size else float("nan")


def choose_rule(features: Mapping[str, Sequence[float]], dsc_kept: Sequence[float], healthy: Sequence[bool],
                max_lesion_dsc_loss: float = MAX_LESION_DSC_LOSS, min_gain: float = 1e-6) -> dict:
    """The operating point on validation cases (see the module docstring). ``features``: per feature name of
    ``FEATURES`` (those given are searched, in that order), its value per case; ``mass_ml`` is required (a case
    with mass 0 has nothing predicted). Returns ``feature`` (the chosen one's name, None: off) and per feature
    ``mass_ml`` / ``mean_probability`` (its threshold, None unless chosen), ``val_dsc`` / ``val_dsc_off`` (mean
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
    n_healthy, n_lesion = int(healthy.sum()), int((~healthy).sum())
    off_all, off_lesion = decision_scores(masses, dsc_kept, healthy, 0.0)
    record: dict[str, Any] = {"feature": None, **{name: None for name in FEATURES}, "val_dsc": off_all,
                              "val_dsc_off": off_all, "val_lesion_dsc_loss": 0.0, "healthy_cases": n_healthy,
                              "lesion_cases": n_lesion, "healthy_fp_off": int((healthy & (masses > 0)).sum())}
    record["healthy_fp"] = record["healthy_fp_off"]
    if n_healthy == 0 or n_lesion == 0:
        kind = "healthy" if n_healthy == 0 else "lesion"
        record["reason"] = f"no_{kind}_cases"
        record["status"] = (f"healthy-scan decision off: no {kind} case among the {len(masses)} validation cases "
                            "(its operating point needs both)")
        return record
    best_feature, best_t, best = None, 0.0, off_all
    for name, feature in values.items():
        for t in candidate_thresholds(feature)[1:]:
            score, lesion = decision_scores(feature, dsc_kept, healthy, t)
            if off_lesion - lesion <= max_lesion_dsc_loss + 1e-12 and score > best + 1e-12:  # ties stay earlier
                best_feature, best_t, best = name, t, score
    if best_feature is None or best <= off_all + min_gain:
        record["reason"] = "no_gain"
        record["status"] = (f"healthy-scan decision off: no threshold on the {' or '.join(values)} of the most "
                            f"probable component improves the mean validation DSC ({off_all:.4f}) within "
                            f"{max_lesion_dsc_loss:g} lesion DSC")
        return record
    _, lesion = decision_scores(values[best_feature], dsc_kept, healthy, best_t)
    record.update(feature=best_feature, reason="chosen", val_dsc=best, val_lesion_dsc_loss=max(0.0, off_lesion - lesion),
                  healthy_fp=int((healthy & (masses > 0) & (values[best_feature] >= best_t)).sum()))
    record[best_feature] = float(best_t)
    record["status"] = (f"healthy-scan decision: scans whose most probable component has {FEATURES[best_feature]} "
                        f"< {best_t:.4g} are emptied (validation DSC {off_all:.4f} -> {best:.4f}, healthy false "
                        f"positives {record['healthy_fp_off']} -> {record['healthy_fp']} of {n_healthy})")
    return record


def choose_from_rows(rows: np.ndarray, candidates_ml: Sequence[float], after_min_component_ml: float,
                     largest_component: bool = False) -> dict:
    """``choose_rule`` on ``validation_row`` rows, at the column of ``after_min_component_ml``; the DSCs of the
    largest component alone when ``largest_component`` (the predictor keeps only it before the decision)."""
    candidates = [float(c) for c in candidates_ml]
    if float(after_min_component_ml) not in candidates:
        raise ValueError(f"after_min_component_ml {after_min_component_ml!r} is not among the scored candidates {candidates}")
    n = len(candidates)
    rows = np.asarray(rows, float).reshape(-1, 1 + len(BLOCKS) * n)
    k = candidates.index(float(after_min_component_ml))
    column = {name: rows[:, 1 + i * n + k] for i, name in enumerate(BLOCKS)}
    record = choose_rule({name: column[name] for name in FEATURES}, column["largest_dsc" if largest_component else "dsc"],
                         rows[:, 0] > 0.5)
    record["after_min_component_ml"] = float(after_min_component_ml)
    record["after_largest_component"] = bool(largest_component)
    return record
