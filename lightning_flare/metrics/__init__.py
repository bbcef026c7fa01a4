"""FLARE24 evaluation metrics: pure functions and a torchmetrics wrapper."""
from lightning_flare.metrics.flare import FlareMetrics
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
