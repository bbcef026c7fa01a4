"""The healthy-scan decision: a scan-level "no lesion" rule on top of small-component removal.

FLARE scores a healthy scan 1 when its prediction is empty and 0 for a single false-positive voxel. Small-component
removal (``postprocessing.py``) drops components by volume one at a time; this rule looks at the scan as a whole:

    the scan is declared healthy (its mask emptied) when its most probable component's feature is below a
    threshold: its mean tumour probability (``mean_probability``) or its probability mass (``mass_ml``).

The component-level rule ``component_probability`` (``component_confidence.py``) removes every component whose
mean tumour probability is below its threshold instead, and declares a scan left with none healthy.

A rule is a pair (feature, threshold) (``chosen_rule``): ``healthy_decision: auto`` takes the one chosen on the
validation fold (``healthy_choice.py``: one feature, one threshold, chosen after ``min_component_ml`` and
``largest_component``), a number is a mass threshold in ml, "off" none.

Features (``component_table``, ``largest_component_features``): the tumour probability (1 - background softmax)
and the argmax mask after small-component removal, both on the plan's (preprocessed) grid, with 26-connected
components. Per component: volume (ml), probability mass (sum of tumour probabilities of its voxels times the voxel
volume: ml-equivalents), mean probability (mass / volume) and maximum probability. The "most probable" component
is the one with the largest mass; as every voxel of an argmax mask has a tumour probability of at least 1/C, its
mass lies between volume/C and its volume, so it is nearly always the largest by volume too.

Why these two: volume alone is what small-component removal already thresholds; the mean probability is the
component's confidence whatever its size (on the partial-label demo, issue 16, healthy-scan false positives had
0.71-0.85 and detected lesions >= 0.91); the mass is volume weighted by confidence (a 1 ml component at 0.55
carries 0.55 ml). The maximum probability is one voxel's value (noisy); volume and maximum are still reported.

Why the plan's grid: validation scores on it (as the choice of ``min_component_ml`` does), so the feature values
the operating point is chosen on are computed exactly as at test and predict time, and no full-resolution float
probability map is needed (0.4 GB for a FLARE scan; ``resample_to_mask`` avoids holding one). Volumes and masses
are in ml, so they hardly depend on the grid anyway.
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
# the rule's features, in the order the validation choice prefers them on ties (healthy_choice.py)
FEATURES = {"mean_probability": "mean tumour probability", "mass_ml": "tumour probability mass (ml)"}
COMPONENT_RULE = "component_probability"  # component_confidence.py: each component below the threshold removed
RULES = {**FEATURES, COMPONENT_RULE: "mean tumour probability"}
SETTING_FORMS = ("healthy_decision must be 'auto', 'off', a probability mass in ml (>= 0) or 'RULE:THRESHOLD' "
                 f"with RULE one of {list(RULES)} and a threshold >= 0 (<= 1 for a probability)")


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
    """``mass_ml``, ``mean_probability`` (mass / volume), ``volume_ml``, ``max_probability`` of the component with the
    largest probability mass (all 0 for an empty mask) and the number of ``components``."""
    _, volumes, masses, peaks = component_table(mask, probability, spacing_mm)
    if len(volumes) == 1:
        return {"mass_ml": 0.0, "mean_probability": 0.0, "volume_ml": 0.0, "max_probability": 0.0, "components": 0}
    best = int(np.argmax(masses[1:])) + 1
    return {"mass_ml": float(masses[best]), "mean_probability": float(masses[best] / volumes[best]),
            "volume_ml": float(volumes[best]), "max_probability": float(peaks[best]), "components": len(volumes) - 1}


def declared_healthy(features: Mapping[str, float], rule: tuple[str, float] | None) -> bool:
    """The rule (feature, threshold): healthy when the most probable component's feature is below the threshold
    (None: off). An empty mask (features 0) is healthy under any rule."""
    return rule is not None and features[rule[0]] < rule[1]


def chosen_rule(setting: Any, postprocessing: Mapping[str, Any] | None) -> tuple[str, float] | None:
    """The rule in force, (feature, threshold) or None: None for "off" (or 0); a number: ("mass_ml", it);
    "RULE:THRESHOLD" (e.g. "mean_probability:0.9", as ``benchmarks/cross_validate.py`` prints the choice pooled
    over folds): that rule; "auto": the checkpoint's validation choice (None when the checkpoint has none: older
    checkpoints behave as before; a choice written before ``mean_probability`` existed holds ``mass_ml`` only)."""
    if setting == "auto":
        record = (postprocessing or {}).get("healthy_decision") or {}
        found = [(name, float(record[name])) for name in RULES if record.get(name) is not None]
        return found[0] if found else None
    if setting == "off" or setting is False:
        return None
    if isinstance(setting, str):
        feature, threshold = _feature_rule(setting)
        return (feature, threshold) if threshold > 0 else None
    return ("mass_ml", float(setting)) if float(setting) > 0 else None


def _feature_rule(value: str) -> tuple[str, float]:
    feature, _, threshold = value.partition(":")
    try:
        number = float(threshold)
    except ValueError:
        number = float("nan")
    if feature not in RULES or not number >= 0 or number == float("inf") or (number > 1 and "probability" in feature):
        raise ValueError(f"{SETTING_FORMS}, got {value!r}")
    return feature, number


def check_setting(value: Any) -> Any:
    """The ``inference.healthy_decision`` value, normalised ("off" for YAML's off / false)."""
    if value is False or value == "off":
        return "off"
    if value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
        return value
    if isinstance(value, str) and ":" in value:
        _feature_rule(value)
        return value
    raise ValueError(f"{SETTING_FORMS}, got {value!r}")


def decide(logits: torch.Tensor, spacing_mm: Sequence[float], min_component_ml: float, rule: tuple[str, float],
           probability: np.ndarray | None = None, argmax: np.ndarray | None = None) -> dict:
    """Features of one scan on the plan's grid (``logits`` (C, x, y, z) of that grid, ``spacing_mm`` its spacing),
    after removing components below ``min_component_ml``, ``healthy`` (whether a scan-level ``rule`` empties it;
    the component rule is applied by the predictor, on its mask) and the rule. ``probability`` and ``argmax``: the
    logits' tumour probability and argmax on the host, when the caller has them already."""
    argmax = to_host(logits.argmax(0).to(torch.uint8)) if argmax is None else argmax
    mask = remove_small_components(argmax, spacing_mm, min_component_ml)
    probability = to_host(tumour_probability(logits)) if probability is None else probability
    features = largest_component_features(mask, probability, spacing_mm)
    return {**features, "healthy": rule[0] in FEATURES and declared_healthy(features, rule), "rule": rule}


def case_report_fields(mask: np.ndarray, reference: np.ndarray, spacing_mm: Sequence[float], decision: Mapping) -> dict:
    """A test case's report fields beyond DSC/NSD: lesion counts (``lesion_metrics``), the predicted volume before
    the decision (``predicted_ml_components_only``: small-component removal and, when on, the largest component), its
    FLARE DSC where the decision changed the mask (``dsc_components_only``; elsewhere it equals the case's DSC) and
    the decision's features ``decision_mass_ml`` and ``decision_mean_probability``. ``mask``, ``reference`` and
    ``decision["components_only_mask"]`` come with a declared ignore region already left out (``module.test_step``)."""
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    before = decision.get("components_only_mask")
    extras: dict[str, Any] = {**lesion_counts(mask, reference),
                              "predicted_ml_components_only": float(((mask if before is None else before) > 0).sum()) * voxel_ml}
    if before is not None:
        extras["dsc_components_only"] = flare_dsc(before, reference)
    for name in ("mass_ml", "mean_probability"):
        if name in decision:
            extras[f"decision_{name}"] = float(decision[name])
    return extras


def describe_rule(rule: tuple[str, float]) -> str:
    """"mean tumour probability < 0.83" (the words of ``RULES``)."""
    return f"{RULES[rule[0]]} < {rule[1]:.4g}"


def decision_report(setting: Any, postprocessing: Mapping[str, Any] | None) -> dict:
    """The decision in force, for the test report (``metrics_summary.json``'s ``healthy_decision``): ``setting``,
    ``feature`` and ``threshold`` (None: no decision), ``source`` ("validation" for auto, "setting" for a
    number) and, for auto, the validation choice's ``reason`` and ``after_min_component_ml``."""
    rule = chosen_rule(setting, postprocessing)
    record = (postprocessing or {}).get("healthy_decision") or {}
    report: dict[str, Any] = {"setting": setting, "feature": rule and rule[0], "threshold": rule and rule[1],
                              "source": "validation" if setting == "auto" else "setting"}
    if setting == "auto":
        report.update(reason=record.get("reason", "no validation choice in the checkpoint"),
                      after_min_component_ml=record.get("after_min_component_ml"))
    return report


def decision_line(setting: Any, postprocessing: Mapping[str, Any] | None) -> str:
    """One line for the test output: the decision in force and where its threshold comes from."""
    rule = chosen_rule(setting, postprocessing)
    record = (postprocessing or {}).get("healthy_decision") or {}
    if rule is None:
        why = "healthy_decision off" if setting != "auto" else f"auto: {record.get('status', 'no validation choice in the checkpoint')}"
        return f"Healthy-scan decision: none ({why})"
    source = (f" (auto: chosen on the validation fold after min_component_ml {record.get('after_min_component_ml', 0.0):g})"
              if setting == "auto" else "")
    if rule[0] == COMPONENT_RULE:
        return (f"Healthy-scan decision: components with {describe_rule(rule)} are removed (a scan left with none is "
                f"healthy){source}")
    return f"Healthy-scan decision: scans whose most probable component has {describe_rule(rule)} are emptied{source}"
