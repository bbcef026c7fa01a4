"""FLARE24 evaluation metrics: pure functions and a torchmetrics wrapper (imported when first used: the pure
functions need no torchmetrics)."""
from lightning_flare.metrics.functional import (
    SurfaceDistances,
    dice,
    flare_case_scores,
    normalized_surface_dice,
    summarize,
    surface_dice_from_distances,
    surface_distances,
    surfel_area_table,
)

__all__ = [
    "FlareMetrics",
    "SurfaceDistances",
    "dice",
    "flare_case_scores",
    "normalized_surface_dice",
    "summarize",
    "surface_dice_from_distances",
    "surface_distances",
    "surfel_area_table",
]


def __getattr__(name: str):
    if name == "FlareMetrics":
        from lightning_flare.metrics.flare import FlareMetrics

        return FlareMetrics
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
