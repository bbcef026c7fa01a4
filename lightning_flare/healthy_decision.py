"""The healthy-scan decision: a scan-level "no lesion" rule on top of small-component removal.

FLARE scores a healthy scan 1 when its prediction is empty and 0 for a single false-positive voxel. Small-component
removal (``postprocessing.py``) drops components by volume one at a time; this rule looks at the scan as a whole:

    the scan is declared healthy (its mask emptied) when no predicted component carries ``mass_ml`` millilitres of
    tumour probability, i.e. when the probability mass of its most probable component is below ``mass_ml``.

Features (``component_table``, ``largest_component_features``): the tumour probability (1 - background softmax)
and the argmax mask after small-component removal, both on the plan's (preprocessed) grid, with 26-connected
components. Per component: volume (ml), probability mass (sum of tumour probabilities of its voxels times the voxel
volume: ml-equivalents) and maximum probability. The "largest" component is the one with the largest mass; as every
voxel of an argmax mask has a tumour probability of at least 1/C, its mass lies between volume/C and its volume, so
it is nearly always the largest by volume too.

One feature, the mass: volume alone is what small-component removal already thresholds, and mass is volume
weighted by confidence (a 1 ml component at probability 0.55 carries 0.55 ml, one at 0.99 carries 0.99 ml); the
maximum probability is one voxel's value (noisy); a two-threshold search on the few healthy validation cases of a
fold would overfit. Volume and maximum probability are still reported.

Why the plan's grid: validation scores on it (as the choice of ``min_component_ml`` does), so the feature values
the operating point is chosen on are computed exactly as at test and predict time, and no full-resolution float
probability map is needed (0.4 GB for a FLARE scan; ``resample_to_mask`` avoids holding one). Volumes and masses
are in ml, so they hardly depend on the grid anyway.

The operating point (``choose_mass_threshold``) is chosen on validation cases, healthy and lesion cases together,
AFTER ``min_component_ml`` and ``largest_component`` (those choices are unchanged; the decision is chosen on the
masks they leave, as ``Predictor.mask`` applies them before it): the largest
mean FLARE DSC over all cases, subject to losing at most ``max_lesion_dsc_loss`` (0.01) of the mean DSC of the
lesion cases, ties to the smaller threshold, and off unless it beats no decision. Candidates come from the observed
masses: the midpoint between consecutive distinct positive masses, and twice the largest (empties every case).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage

from .device import to_host
from .lesion_metrics import lesion_counts
from .postprocessing import component_volumes, flare_dsc, remove_small_components

MAX_LESION_DSC_LOSS = 0.01  # at most 1 point of mean DSC on the lesion cases
FEATURE = "largest_component_probability_mass_ml"


def tumour_probability(logits: torch.Tensor) -> torch.Tensor:
    """Probability of any tumour class, 1 - softmax background, of (C, x, y, z) logits (on their device)."""
    return 1.0 - torch.softmax(logits.float(), 0)[0]


def component_table(mask: np.ndarray, probability: np.ndarray, spacing_mm: Sequence[float]):
    """Labelled components (26-connected) of ``mask`` and, per component 1..n, volume (ml), probability mass
    (ml-equivalents) and maximum probability (index 0 of each array: the background)."""
    if mask.shape != probability.shape:
        raise ValueError(f"probability shape {probability.shape} differs from mask shape {mask.shape}")
    components, volumes = component_volumes(mask, spacing_mm)
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    flat = components.ravel()
    masses = np.bincount(flat, weights=probability.ravel().astype(np.float64), minlength=len(volumes)) * voxel_ml
    peaks = np.zeros(len(volumes))
    if len(volumes) > 1:
        peaks[1:] = ndimage.maximum(probability, components, index=np.arange(1, len(volumes)))
    masses[0] = 0.0
    return components, volumes, masses, peaks


def largest_component_features(mask: np.ndarray, probability: np.ndarray, spacing_mm: Sequence[float]) -> dict:
    """``mass_ml``, ``volume_ml``, ``max_probability`` of the component with the largest probability mass
    (all 0 for an empty mask) and the number of ``components``."""
    _, volumes, masses, peaks = component_table(mask, probability, spacing_mm)
    if len(volumes) == 1:
        return {"mass_ml": 0.0, "volume_ml": 0.0, "max_probability": 0.0, "components": 0}
    best = int(np.argmax(masses[1:])) + 1
    return {"mass_ml": float(masses[best]), "volume_ml": float(volumes[best]),
            "max_probability": float(peaks[best]), "components": len(volumes) - 1}


def declared_healthy(mass_ml: float, threshold_ml: float | None) -> bool:
    """The rule: healthy when the largest component's probability mass is below the threshold (None: off)."""
    return threshold_ml is not None and mass_ml < threshold_ml


def validation_row(prediction: np.ndarray, probability: np.ndarray, reference: np.ndarray,
                   spacing_mm: Sequence[float], candidates_ml: Sequence[float],
                   ignored: np.ndarray | None = None) -> np.ndarray:
    """One validation case: [healthy (1/0), mass after removal at each candidate min_component_ml ...,
    FLARE DSC after removal at each candidate ..., FLARE DSC of the largest component alone after removal at each
    candidate ...] (components labelled once; the last block is what the predictor's ``largest_component`` leaves
    before the decision).

    ``ignored``: a declared ignore region (``reference`` background there). The masses are those of the whole
    prediction, as ``decide`` computes them at test / predict time (no ignore region known there); only the DSCs
    leave the region out, as test scores do."""
    components, volumes, masses, _ = component_table(prediction > 0, probability, spacing_mm)
    known = None if ignored is None else ~np.asarray(ignored, bool)
    row = [float(not (reference > 0).any())]
    dscs, largest_dscs = [], []
    largest = 1 + int(np.argmax(volumes[1:])) if len(volumes) > 1 else 0  # keep_largest_component's (most voxels)
    for threshold in candidates_ml:
        keep = volumes >= threshold
        keep[0] = False
        row.append(float(masses[keep].max()) if keep.any() else 0.0)
        only = np.zeros_like(keep)
        only[largest] = keep[largest]
        for flags, out in ((keep, dscs), (only, largest_dscs)):
            kept = flags[components]
            out.append(flare_dsc(kept if known is None else kept & known, reference))
    return np.asarray(row + dscs + largest_dscs)


def candidate_thresholds(masses: Sequence[float]) -> list[float]:
    """0 (off), midpoints between consecutive distinct positive masses, twice the largest mass."""
    values = np.unique(np.asarray(masses, float))
    values = values[values > 0]
    if values.size == 0:
        return [0.0]
    return [0.0, *((values[:-1] + values[1:]) / 2).tolist(), float(2 * values[-1])]


def decision_scores(masses: Sequence[float], dsc_kept: Sequence[float], healthy: Sequence[bool],
                    threshold_ml: float) -> tuple[float, float]:
    """(mean FLARE DSC over all cases, mean over lesion cases) when cases with mass < ``threshold_ml`` are emptied
    (an emptied case scores 1 when healthy, 0 when not); NaN for a mean over no case."""
    masses, dsc, healthy = np.asarray(masses, float), np.asarray(dsc_kept, float), np.asarray(healthy, bool)
    scores = np.where(masses < threshold_ml, healthy.astype(float), dsc)
    lesion = scores[~healthy]
    return float(scores.mean()) if scores.size else float("nan"), float(lesion.mean()) if lesion.size else float("nan")


def choose_mass_threshold(masses: Sequence[float], dsc_kept: Sequence[float], healthy: Sequence[bool],
                          max_lesion_dsc_loss: float = MAX_LESION_DSC_LOSS, min_gain: float = 1e-6) -> dict:
    """The operating point on validation cases (see the module docstring). Returns ``mass_ml`` (None: off),
    ``val_dsc`` / ``val_dsc_off`` (mean FLARE DSC with / without it), ``val_lesion_dsc_loss``, counts of healthy
    and lesion cases and of healthy cases with a false positive with / without it, ``reason`` ("chosen",
    "no_healthy_cases", "no_lesion_cases", "no_gain") and ``status`` (one line for the log)."""
    masses, healthy = np.asarray(masses, float), np.asarray(healthy, bool)
    if not (len(masses) == len(dsc_kept) == len(healthy)):
        raise ValueError(f"masses, dsc_kept and healthy differ in length: {len(masses)}, {len(dsc_kept)}, {len(healthy)}")
    if max_lesion_dsc_loss < 0:
        raise ValueError(f"max_lesion_dsc_loss must be >= 0, got {max_lesion_dsc_loss!r}")
    n_healthy, n_lesion = int(healthy.sum()), int((~healthy).sum())
    off_all, off_lesion = decision_scores(masses, dsc_kept, healthy, 0.0)
    record: dict[str, Any] = {"mass_ml": None, "feature": FEATURE, "val_dsc": off_all, "val_dsc_off": off_all,
                              "val_lesion_dsc_loss": 0.0, "healthy_cases": n_healthy, "lesion_cases": n_lesion,
                              "healthy_fp_off": int((healthy & (masses > 0)).sum())}
    record["healthy_fp"] = record["healthy_fp_off"]
    if n_healthy == 0 or n_lesion == 0:
        kind = "healthy" if n_healthy == 0 else "lesion"
        record["reason"] = f"no_{kind}_cases"
        record["status"] = (f"healthy-scan decision off: no {kind} case among the {len(masses)} validation cases "
                            "(its operating point needs both)")
        return record
    best_t, best = 0.0, off_all
    for t in candidate_thresholds(masses)[1:]:
        score, lesion = decision_scores(masses, dsc_kept, healthy, t)
        if off_lesion - lesion <= max_lesion_dsc_loss + 1e-12 and score > best + 1e-12:  # ascending: ties stay smaller
            best_t, best = t, score
    if best <= off_all + min_gain:
        record["reason"] = "no_gain"
        record["status"] = (f"healthy-scan decision off: no threshold on the {FEATURE} improves the mean validation "
                            f"DSC ({off_all:.4f}) within {max_lesion_dsc_loss:g} lesion DSC")
        return record
    _, lesion = decision_scores(masses, dsc_kept, healthy, best_t)
    record.update(mass_ml=float(best_t), reason="chosen", val_dsc=best, val_lesion_dsc_loss=max(0.0, off_lesion - lesion),
                  healthy_fp=int((healthy & (masses >= best_t)).sum()))
    record["status"] = (f"healthy-scan decision: scans whose most probable component carries < {best_t:.4g} ml of "
                        f"tumour probability are emptied (validation DSC {off_all:.4f} -> {best:.4f}, healthy false "
                        f"positives {record['healthy_fp_off']} -> {record['healthy_fp']} of {n_healthy})")
    return record


def choose_from_rows(rows: np.ndarray, candidates_ml: Sequence[float], after_min_component_ml: float,
                     largest_component: bool = False) -> dict:
    """``choose_mass_threshold`` on ``validation_row`` rows, at the column of ``after_min_component_ml``; the DSCs
    of the largest component alone when ``largest_component`` (the predictor keeps only it before the decision)."""
    candidates = [float(c) for c in candidates_ml]
    if float(after_min_component_ml) not in candidates:
        raise ValueError(f"after_min_component_ml {after_min_component_ml!r} is not among the scored candidates {candidates}")
    n = len(candidates)
    rows = np.asarray(rows, float).reshape(-1, 1 + 3 * n)
    k = candidates.index(float(after_min_component_ml))
    dsc = rows[:, 1 + (2 if largest_component else 1) * n + k]
    record = choose_mass_threshold(rows[:, 1 + k], dsc, rows[:, 0] > 0.5)
    record["after_min_component_ml"] = float(after_min_component_ml)
    record["after_largest_component"] = bool(largest_component)
    return record


def chosen_mass_threshold(setting: Any, postprocessing: Mapping[str, Any] | None) -> float | None:
    """The threshold in force: None for "off" (or 0); a number itself; "auto": the checkpoint's validation choice
    (None when the checkpoint has none: older checkpoints behave as before)."""
    if setting == "auto":
        return ((postprocessing or {}).get("healthy_decision") or {}).get("mass_ml")
    if setting == "off" or setting is False:
        return None
    return float(setting) if float(setting) > 0 else None


def check_setting(value: Any) -> Any:
    """The ``inference.healthy_decision`` value, normalised ("off" for YAML's off / false)."""
    if value is False or value == "off":
        return "off"
    if value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
        return value
    raise ValueError(f"healthy_decision must be 'auto', 'off' or a probability mass in ml (>= 0), got {value!r}")


def decide(logits: torch.Tensor, spacing_mm: Sequence[float], min_component_ml: float, threshold_ml: float) -> dict:
    """Features of one scan on the plan's grid (``logits`` (C, x, y, z) of that grid, ``spacing_mm`` its spacing),
    after removing components below ``min_component_ml``, and ``healthy``: whether the rule empties it."""
    mask = remove_small_components(to_host(logits.argmax(0).to(torch.uint8)), spacing_mm, min_component_ml)
    features = largest_component_features(mask, to_host(tumour_probability(logits)), spacing_mm)
    return {**features, "healthy": declared_healthy(features["mass_ml"], threshold_ml), "threshold_ml": threshold_ml}


def case_report_fields(mask: np.ndarray, reference: np.ndarray, spacing_mm: Sequence[float], decision: Mapping) -> dict:
    """A test case's report fields beyond DSC/NSD: lesion counts (``lesion_metrics``), the predicted volume before
    the decision (``predicted_ml_components_only``: small-component removal and, when on, the largest component), its
    FLARE DSC where the decision emptied the mask (``dsc_components_only``; elsewhere it equals the case's DSC) and
    the decision's ``decision_mass_ml``. ``mask``, ``reference`` and ``decision["components_only_mask"]`` come with
    a declared ignore region already left out (``module.test_step``)."""
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    before = decision.get("components_only_mask")
    extras: dict[str, Any] = {**lesion_counts(mask, reference),
                              "predicted_ml_components_only": float(((mask if before is None else before) > 0).sum()) * voxel_ml}
    if before is not None:
        extras["dsc_components_only"] = flare_dsc(before, reference)
    if "mass_ml" in decision:
        extras["decision_mass_ml"] = float(decision["mass_ml"])
    return extras


def decision_line(setting: Any, postprocessing: Mapping[str, Any] | None) -> str:
    """One line for the test output: the decision in force and where its threshold comes from."""
    threshold = chosen_mass_threshold(setting, postprocessing)
    record = (postprocessing or {}).get("healthy_decision") or {}
    if threshold is None:
        why = "healthy_decision off" if setting != "auto" else f"auto: {record.get('status', 'no validation choice in the checkpoint')}"
        return f"Healthy-scan decision: none ({why})"
    source = (f" (auto: chosen on the validation fold after min_component_ml {record.get('after_min_component_ml', 0.0):g})"
              if setting == "auto" else "")
    return f"Healthy-scan decision: scans whose most probable component carries < {threshold:.4g} ml of tumour probability are emptied{source}"
