"""The plan: everything preprocessing and inference must agree on, saved with the checkpoint."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

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
        relevant["version"] = PREPROCESSING_VERSION
        blob = json.dumps(relevant, sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:12]

    def differences(self, other: "Plan") -> list[str]:
        """Human-readable list of fields that differ, e.g. for checkpoint/config mismatch errors."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{k}: {mine[k]} != {theirs[k]}" for k in mine if mine[k] != theirs.get(k)]
