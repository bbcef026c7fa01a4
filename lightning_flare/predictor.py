"""From an image to a mask: sliding window (with mirroring) on the plan's grid, logits back to the original grid,
small-component removal, largest component, the healthy-scan decision. No Lightning here: the module's steps, ``python -m lightning_flare.predict`` and the
benchmarks all run this."""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from .body_box import MIN_PART_ML, body_box, body_threshold, grid_region, windows_touching
from .device import synchronize, to_host
from .component_confidence import remove_unconfident_components
from .healthy_decision import COMPONENT_RULE, check_setting, chosen_rule, decide, decision_line, tumour_probability
from .inference import (air_logits, check_autocast_setting, sliding_window_logits, use_channels_last, window_batch_size,
                        window_locations)
from .io import Geometry
from .plan import Plan
from .postprocessing import choose_largest_component, choose_threshold, keep_largest_component, remove_small_components
from .preprocessing import preprocess_tensor
from .resample import probability_axis, resample_to_mask

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferenceSettings:
    """How a whole volume is predicted; in the YAML under ``model.inference``.

    - ``sw_overlap``: fraction of the window shared by neighbours (0.5: nnU-Net's step 0.5);
    - ``sw_batch_size``: windows per forward pass, or "auto" (``inference.window_batch_size``);
    - ``sw_weighting``: "hann" (TorchIO) or "gaussian" (nnU-Net); ``sw_steps``: "torchio" or "nnunet" windows;
    - ``sw_channels_last``: true, false or "auto" (``inference.use_channels_last``);
    - ``tta``: average the 8 mirrored passes (nnU-Net's default);
    - ``autocast``: true, false, "auto", "bf16" or "fp16" (``inference.autocast_dtype``);
    - ``min_component_ml``: remove predicted components below this volume; "auto": the volume chosen on the
      validation fold (kept in the checkpoint);
    - ``healthy_decision``: "off" (the default), "auto" (the rule chosen on the validation fold, kept in the
      checkpoint: a scan whose most probable component, after ``min_component_ml``, has a mean tumour probability
      or a probability mass below a threshold is emptied, or every component of a mean tumour probability below a
      threshold is removed (``component_probability``, before ``largest_component``); off for checkpoints without
      one), a probability mass in ml (the mass rule with that threshold; ``healthy_decision.py``) or
      "RULE:THRESHOLD" (``component_probability:0.9``: a rule chosen elsewhere, e.g. on pooled cross-validation);
    - ``largest_component``: keep only the largest predicted component (nnU-Net's "remove all but the largest
      component"): true, false, or "auto": as chosen on the validation fold (kept in the checkpoint);
    - ``skip_air``: run only the windows that touch the body (``body_box``: parts above -500 HU, grown by
      ``body_margin_mm``); inside that box the logits are those of the whole grid, outside it background.
      "box_grid": a fresh window grid laid over that box instead (``grid_region``) where it runs fewer windows than
      those (else as true): the windows move, so the logits inside the box differ from the whole grid's.
    """

    sw_overlap: float = 0.5
    sw_batch_size: int | str = "auto"
    sw_weighting: str = "hann"
    sw_steps: str = "torchio"
    sw_channels_last: bool | str = "auto"
    tta: bool = False
    autocast: bool | str = "auto"
    min_component_ml: float | str = 0.0
    healthy_decision: bool | float | str = "off"  # YAML's off is false: read as "off"
    largest_component: bool | str = False
    skip_air: bool | str = False
    body_margin_mm: float = 20.0

    def __post_init__(self) -> None:
        if not 0 <= self.sw_overlap < 1:
            raise ValueError(f"inference.sw_overlap must be in [0, 1), got {self.sw_overlap!r}")
        window_batch_size(self.sw_batch_size, "cpu")
        if self.sw_weighting not in ("hann", "gaussian"):
            raise ValueError(f"inference.sw_weighting must be 'hann' or 'gaussian', got {self.sw_weighting!r}")
        if self.sw_steps not in ("torchio", "nnunet"):
            raise ValueError(f"inference.sw_steps must be 'torchio' or 'nnunet', got {self.sw_steps!r}")
        use_channels_last(self.sw_channels_last, "cpu")
        if not (isinstance(self.skip_air, bool) or self.skip_air == "box_grid"):
            raise ValueError(f"inference.skip_air must be true, false or 'box_grid', got {self.skip_air!r}")
        if isinstance(self.body_margin_mm, bool) or not isinstance(self.body_margin_mm, (int, float)) or self.body_margin_mm < 0:
            raise ValueError(f"inference.body_margin_mm must be a distance in mm (>= 0), got {self.body_margin_mm!r}")
        if not isinstance(self.tta, bool):
            raise ValueError(f"inference.tta must be true or false, got {self.tta!r}")
        check_autocast_setting(self.autocast)
        value = self.min_component_ml
        if not (value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0)):
            raise ValueError(f"min_component_ml must be a volume in ml (>= 0) or 'auto', got {value!r}")
        object.__setattr__(self, "healthy_decision", check_setting(self.healthy_decision))
        if self.largest_component not in (True, False, "auto") or not isinstance(self.largest_component, (bool, str)):
            raise ValueError(f"inference.largest_component must be true, false or 'auto', got {self.largest_component!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "InferenceSettings":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown inference settings {unknown}; known: {sorted(names)}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def chosen_min_component_ml(settings: InferenceSettings, postprocessing: Mapping[str, Any] | None) -> float:
    """``settings.min_component_ml``, or for "auto" the volume chosen on the validation fold (0 before any).

    The choice's ``min_component_ml`` goes with its ``largest_component_only`` (``choose_largest_component``).
    Where ``settings.largest_component`` is fixed (true / false) and differs from that choice, the volume is the
    best one of the arm applied, from the validation scores kept beside it (the same rule: ties to the smaller)."""
    value = settings.min_component_ml
    if value != "auto":
        return float(value)
    choice = postprocessing or {}
    largest = settings.largest_component
    if largest != "auto" and bool(choice.get("largest_component_only", False)) != bool(largest):
        key = "val_dsc_largest_component_by_min_component_ml" if largest else "val_dsc_by_min_component_ml"
        scores = {float(t): float(v) for t, v in (choice.get(key) or {}).items()}
        if scores:
            if not largest:
                return float(choose_threshold(scores))
            best = max(scores.values())
            return float(min(t for t, v in scores.items() if v >= best - 1e-12))
    return float(choice.get("min_component_ml", 0.0))


def chosen_largest_component(settings: InferenceSettings, postprocessing: Mapping[str, Any] | None) -> bool:
    """``settings.largest_component``, or for "auto" the validation fold's choice (false before any, and in
    checkpoints written before the choice existed)."""
    value = settings.largest_component
    return bool((postprocessing or {}).get("largest_component_only", False)) if value == "auto" else value


def postprocessing_summary(settings: InferenceSettings, postprocessing: Mapping[str, Any] | None) -> str:
    """One line: what the predictor's postprocessing does with these settings and this validation choice."""
    auto = [name for name in ("min_component_ml", "largest_component") if getattr(settings, name) == "auto"]
    largest = "; only the largest component kept" if chosen_largest_component(settings, postprocessing) else ""
    return (f"Postprocessing: components below {chosen_min_component_ml(settings, postprocessing):g} ml removed{largest}"
            + (f" ({', '.join(auto)} auto: chosen on the validation fold)" if auto else "")
            + "\n" + decision_line(settings.healthy_decision, postprocessing))


def scored_ml(settings: InferenceSettings) -> float | str:
    """A fixed ``min_component_ml`` the validation scores beside the candidates where ``validation_choice`` compares
    the largest-component arms at it (``largest_component`` "auto"); "auto": only the candidates."""
    return settings.min_component_ml if settings.largest_component == "auto" else "auto"


def validation_choice(settings: InferenceSettings, scores: Mapping[float, float], largest_scores: Mapping[float, float],
                      choose_decision: Callable[[float, bool], dict], epoch: int) -> dict:
    """The postprocessing dict of a full validation (the checkpoint's ``postprocessing``): ``min_component_ml``
    (``choose_threshold``), the largest-component choice (at a fixed ``min_component_ml`` when ``largest_component``
    is "auto": the volume applied with it) and the healthy-scan decision, ``choose_decision(min_component_ml,
    largest_component)`` after those two in force, in ``Predictor.mask``'s order."""
    choice = {"min_component_ml": choose_threshold(dict(scores)), "epoch": int(epoch),
              "val_dsc_by_min_component_ml": {str(t): round(v, 6) for t, v in scores.items()}}
    fixed = scored_ml(settings)
    choice.update(choose_largest_component(dict(scores), dict(largest_scores),
                                           fixed_ml=None if fixed == "auto" else float(fixed)))
    choice["healthy_decision"] = choose_decision(chosen_min_component_ml(settings, choice),
                                                 chosen_largest_component(settings, choice))
    return choice


def postprocessing_logs(choice: Mapping[str, Any]) -> dict[str, float]:
    """The validation metrics of a postprocessing choice (the module's ``postprocessing`` dict)."""
    decision = choice["healthy_decision"]
    return {"val/pp_min_component_ml": choice["min_component_ml"],
            "val/pp_largest_component": float(choice["largest_component_only"]),
            "val/dsc_postprocessed": choice["val_dsc_postprocessed"],
            "val/healthy_decision_mass_ml": decision["mass_ml"] or 0.0,  # 0: off (or the other feature)
            "val/healthy_decision_mean_probability": decision.get("mean_probability") or 0.0,
            "val/healthy_decision_component_probability": decision.get("component_probability") or 0.0,
            "val/dsc_healthy_decision": decision["val_dsc"]}


@dataclass
class Prediction:
    """One case's outcome, handed to the prediction writer (``predict_step``'s return value): a ``mask`` to write
    on ``geometry``, an ``error`` to report, or nothing at all (``padding``: a rank without a case of its own).
    ``timings`` (stage seconds), ``started`` (perf_counter() before the copy to the device) and ``peak_gpu_mb``
    go to the efficiency report."""

    case_id: str
    source: str = ""
    mask: np.ndarray | None = None  # uint8 (host), the input's size
    geometry: Geometry | None = None
    timings: dict[str, float] = field(default_factory=dict)
    started: float | None = None
    peak_gpu_mb: float = 0.0
    error: str | None = None
    padding: bool = False


class Predictor:
    """``net`` + ``plan`` + ``settings`` -> logits on the plan's grid, masks on the original grid.

    ``postprocessing`` is the checkpoint's validation choice (read when ``min_component_ml``,
    ``largest_component`` or ``healthy_decision`` is "auto");
    ``precision`` the trainer's ("bf16-mixed", ...), which ``autocast`` true / "auto" follow on CUDA."""

    def __init__(self, net: nn.Module, plan: Plan, settings: InferenceSettings = InferenceSettings(),
                 postprocessing: Mapping[str, Any] | None = None, device: torch.device | str | None = None,
                 precision: str | None = None) -> None:
        if plan is None:
            raise RuntimeError("the model has no plan: train it first or load a checkpoint made by lightning_flare")
        self.net, self.plan, self.settings = net, plan, settings
        self.postprocessing = dict(postprocessing or {})
        self.device = torch.device(device) if device is not None else next(net.parameters()).device
        self.precision = precision
        self.counts: dict[str, int] = {}  # windows run / of the whole grid, of the latest volume

    def min_component_ml(self) -> float:
        return chosen_min_component_ml(self.settings, self.postprocessing)

    def healthy_rule(self) -> tuple[str, float] | None:
        """The healthy-scan decision's rule in force, (feature, threshold) (None: off)."""
        return chosen_rule(self.settings.healthy_decision, self.postprocessing)

    def largest_component(self) -> bool:
        return chosen_largest_component(self.settings, self.postprocessing)

    @contextlib.contextmanager
    def full_resolution_net(self):
        """The network with deep supervision off (only the full-resolution head), restored afterwards."""
        previous = getattr(self.net, "deep_supervision", None)
        if previous is not None:
            self.net.deep_supervision = False
        try:
            yield self.net
        finally:
            if previous is not None:
                self.net.deep_supervision = previous

    def logits(self, image: torch.Tensor, tta: bool | None = None) -> torch.Tensor:
        """Aggregated float32 logits (C, x, y, z) on the plan's grid, on the device, for a preprocessed (1, x, y, z)
        image; ``tta`` overrides the settings' mirroring."""
        s = self.settings
        tta = s.tta if tta is None else tta
        body = None
        if s.skip_air:
            level, stats = body_threshold(self.plan.intensity), self.plan.intensity
            body = body_box(image, level, self.plan.target_spacing, s.body_margin_mm)
            if body is None:
                log.warning(f"skip_air: no body found (no part of at least {MIN_PART_ML:g} ml above "
                            f"{level * stats.std + stats.mean:g} HU); running the whole grid")
        if s.skip_air == "box_grid" and body is not None:  # a fresh grid over the box, where it runs fewer windows
            shape, patch = tuple(image.shape[1:]), self.plan.patch_size
            region = grid_region(body, shape, patch)
            grid = window_locations(shape, patch, s.sw_overlap, s.sw_steps)
            shifted = tuple(slice(b.start + max(p - n, 0) // 2, b.stop + max(p - n, 0) // 2)  # as the padded grid
                            for b, p, n in zip(body, patch, shape))
            fresh = window_locations([r.stop - r.start for r in region], patch, s.sw_overlap, s.sw_steps)
            if len(fresh) < int(windows_touching(grid, shifted).sum()):
                inner = self._sliding_window(image[(slice(None), *region)], tta, None)
                output = air_logits(inner.shape[0], shape, inner.device)
                output[(slice(None), *region)] = inner
                self.counts["windows_total"] = len(grid)
                return output
        return self._sliding_window(image, tta, body)

    def _sliding_window(self, image: torch.Tensor, tta: bool, body) -> torch.Tensor:
        s = self.settings
        with self.full_resolution_net() as net:
            return sliding_window_logits(net, image, self.plan.patch_size, s.sw_overlap,
                                         window_batch_size(s.sw_batch_size, self.device), s.autocast,
                                         mirror_axes=(0, 1, 2) if tta else (), device=self.device,
                                         weighting=s.sw_weighting, steps=s.sw_steps,
                                         channels_last=s.sw_channels_last, precision=self.precision,
                                         body=body, counts=self.counts)

    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities (C, x, y, z) on the plan's grid."""
        return torch.softmax(self.logits(image), 0)

    def mask(self, image: torch.Tensor, spacing, size, preprocessed: bool = True,
             timings: dict[str, float] | None = None, decision: dict | None = None) -> np.ndarray:
        """uint8 mask (host) of ``size`` on the original grid of ``spacing``; ``image`` is preprocessed (1, x, y, z),
        or, not ``preprocessed``, the raw HU volume (preprocessed here, on the device). Stage seconds go to
        ``timings`` (device work is waited for before each clock is read). With the healthy-scan decision on,
        ``decision`` receives its features (``healthy_decision.decide``) and, when it changed the mask,
        ``components_only_mask``: the mask without it (small-component removal and, when on, the largest component).
        The order is that validation scored them in: min_component_ml, the component rule, the largest component,
        a scan-level rule."""
        timings = {} if timings is None else timings
        if not preprocessed:
            start = time.perf_counter()
            image = preprocess_tensor(image, spacing, self.plan, self.device)
            synchronize(image.device)
            timings["preprocess"] = timings.get("preprocess", 0.0) + time.perf_counter() - start
        start = time.perf_counter()
        logits = self.logits(image)  # resampled as logits, then argmax: as nnU-Net's export
        synchronize(logits.device)
        network = time.perf_counter()
        nearest = probability_axis(self.plan.target_spacing, spacing, self.plan.resampling)
        mask = remove_small_components(resample_to_mask(logits, size, nearest_axis=nearest), spacing,
                                       self.min_component_ml())
        largest = keep_largest_component if self.largest_component() else (lambda m: m)
        rule = self.healthy_rule()
        if rule is None:
            mask = largest(mask)
        else:  # features on the plan's grid, where the threshold was chosen (validation)
            probability, plan_mask = to_host(tumour_probability(logits)), to_host(logits.argmax(0).to(torch.uint8))
            found = decide(logits, self.plan.target_spacing, self.min_component_ml(), rule, probability, plan_mask)
            alone = largest(mask)
            if rule[0] == COMPONENT_RULE:  # before the largest component, as validation scores it
                kept, found["components_removed"] = remove_unconfident_components(mask, probability, rule[1], plan_mask)
                mask = largest(kept) if found["components_removed"] else alone
                found["healthy"] = not mask.any()
            else:
                mask = np.zeros_like(alone) if found["healthy"] and alone.any() else alone
            if mask is not alone:
                found["components_only_mask"] = alone
            if decision is not None:
                decision.update(found)
        timings.update(network=network - start, postprocess=time.perf_counter() - network)
        return mask
