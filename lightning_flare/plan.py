"""The plan: everything preprocessing and inference must agree on, saved with the checkpoint."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

PREPROCESSING_VERSION = 2  # bump when the cached arrays would change for the same plan (2: spline output clipped)


@dataclass(frozen=True)
class IntensityStats:
    """CT normalisation: clip to [clip_low, clip_high], then (x - mean) / max(std, 1e-8)."""

    clip_low: float
    clip_high: float
    mean: float
    std: float

    def __post_init__(self) -> None:
        if not self.clip_low < self.clip_high:
            raise ValueError(f"clip_low ({self.clip_low}) must be below clip_high ({self.clip_high})")
        if not self.std >= 0:
            raise ValueError(f"std must be non-negative, got {self.std}")

    @classmethod
    def from_any(cls, value: "IntensityStats | Mapping[str, float] | Sequence[float]") -> "IntensityStats":
        if isinstance(value, IntensityStats):
            return value
        if isinstance(value, Mapping):
            return cls(**{k: float(v) for k, v in value.items()})
        values = [float(v) for v in value]
        if len(values) != 4:
            raise ValueError(f"intensity statistics need 4 values (clip_low, clip_high, mean, std), got {value}")
        return cls(*values)


@dataclass(frozen=True)
class Plan:
    """Target spacing and patch size are (x, y, z), TorchIO / SimpleITK order."""

    target_spacing: tuple[float, float, float]
    patch_size: tuple[int, int, int]
    intensity: IntensityStats
    labels: dict[str, int] = field(default_factory=lambda: {"background": 0, "tumor": 1})
    resampling: str = "nnunet"
    anisotropy_threshold: float = 3.0
    anti_aliasing: bool = False  # Gaussian low-pass before downsampling the image (nnU-Net: none)
    ignore_label: int | None = None  # dataset.json's "ignore" value (num_classes): kept in the labels, left out of the loss

    def __post_init__(self) -> None:
        spacing = tuple(float(s) for s in self.target_spacing)
        patch = tuple(int(p) for p in self.patch_size)
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"target_spacing must be 3 positive numbers (x, y, z) in mm, got {self.target_spacing}")
        if len(patch) != 3 or min(patch) <= 0:
            raise ValueError(f"patch_size must be 3 positive integers (x, y, z), got {self.patch_size}")
        if self.resampling not in ("nnunet", "fast"):
            raise ValueError(f"resampling must be 'nnunet' or 'fast', got {self.resampling!r}")
        object.__setattr__(self, "anti_aliasing", bool(self.anti_aliasing))
        object.__setattr__(self, "target_spacing", spacing)
        object.__setattr__(self, "patch_size", patch)
        object.__setattr__(self, "intensity", IntensityStats.from_any(self.intensity))
        object.__setattr__(self, "labels", {str(k): int(v) for k, v in dict(self.labels).items()})
        if self.ignore_label is not None:
            if isinstance(self.ignore_label, bool) or int(self.ignore_label) != self.num_classes:
                raise ValueError(f"ignore_label must be the number of classes ({self.num_classes} for the labels "
                                 f"{self.labels}), got {self.ignore_label!r}")
            object.__setattr__(self, "ignore_label", int(self.ignore_label))

    @property
    def num_classes(self) -> int:
        return max(self.labels.values()) + 1

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        return cls(**dict(data))

    def cache_key(self) -> str:
        """Hash of what changes the preprocessed arrays (not the patch size)."""
        relevant = {k: v for k, v in self.to_dict().items() if k != "patch_size"}
        if relevant["ignore_label"] is None:
            del relevant["ignore_label"]  # the cache folders of plans made before the field existed stay valid
        relevant["version"] = PREPROCESSING_VERSION
        blob = json.dumps(relevant, sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:12]

    def differences(self, other: "Plan | Mapping[str, Any]") -> list[str]:
        """``"field: mine != theirs"`` for every field where ``other`` disagrees: another plan, or only the fields a
        configuration fixes (a mapping; ``intensity`` may be an ``IntensityStats``)."""
        mine = self.to_dict()
        theirs = other.to_dict() if isinstance(other, Plan) else _plain(other)
        return [f"{k}: {_shown(mine[k])} != {_shown(theirs[k])}" for k in theirs if k in mine and mine[k] != theirs[k]]


# configuration names of the plan's fields, for messages
CONFIG_NAMES = {"target_spacing": "data.target_spacing", "patch_size": "data.patch_size",
                "resampling": "data.resampling", "anti_aliasing": "data.anti_aliasing",
                "intensity": "data.intensity_stats", "labels": "labels (dataset.json)",
                "ignore_label": "labels.ignore (dataset.json)"}


class PlanMismatch(ValueError):
    """A checkpoint's plan that the configuration or the network contradicts; the message lists every field."""


def reconcile_plan(restored: Plan | None, configured: Mapping[str, Any], build: Callable[[], Plan],
                   num_classes: int | None = None) -> Plan:
    """The one plan of a run: a checkpoint's (``restored``) when there is one, checked against every field the
    configuration fixes (``configured``), else ``build()`` (from the configuration and the data). ``num_classes``
    (the network's output channels) must match the plan's labels either way."""
    plan = build() if restored is None else restored
    problems = []
    if restored is not None:
        for line in restored.differences(configured):
            key, _, values = line.partition(": ")
            mine, _, theirs = values.partition(" != ")
            problems.append(f"{CONFIG_NAMES.get(key, key)}: checkpoint {mine} != config {theirs}")
    if num_classes is not None and num_classes != plan.num_classes:
        problems.append(f"model.net num_classes {num_classes} != {plan.num_classes} classes of the labels {plan.labels}")
    if problems:
        raise PlanMismatch("the checkpoint's plan disagrees with the configuration (fix the config or pass the "
                           "checkpoint's values):\n  " + "\n  ".join(problems) if restored is not None else
                           "the plan disagrees with the network:\n  " + "\n  ".join(problems))
    return plan


def _plain(values: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-like values (tuples as lists, statistics as dicts), comparable with ``Plan.to_dict()``."""
    values = {k: asdict(v) if isinstance(v, IntensityStats) else v for k, v in values.items()}
    return json.loads(json.dumps(values))


def _shown(value: Any) -> str:
    """Spacings and patches as tuples, as the configuration shows them."""
    return str(tuple(value)) if isinstance(value, list) else str(value)
