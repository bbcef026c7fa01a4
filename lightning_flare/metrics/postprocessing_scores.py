"""The stateful side of the postprocessing choice: candidate thresholds scored over validation cases."""
from __future__ import annotations

from typing import Sequence

import torch
from torchmetrics import Metric

from ..device import to_host
from ..postprocessing import CANDIDATES_ML, case_scores


class ComponentThresholdScores(Metric):
    """Sum of per-case FLARE DSC for each candidate ``min_component_ml`` (validation cases), DDP-synced."""

    full_state_update = False
    largest_only = False  # score each case's largest component alone (LargestComponentScores)

    def __init__(self, candidates_ml: Sequence[float] = CANDIDATES_ML, also_ml: float | str = "auto", **kwargs) -> None:
        """``also_ml``: a fixed ``inference.min_component_ml`` to score as well ("auto": only the candidates)."""
        super().__init__(**kwargs)
        extra = [] if also_ml == "auto" or float(also_ml) in {float(c) for c in candidates_ml} else [float(also_ml)]
        self.candidates = tuple(float(c) for c in [*candidates_ml, *extra])
        self.add_state("sums", default=torch.zeros(len(self.candidates), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, prediction, reference, spacing_mm: Sequence[float], ignored=None) -> None:
        """``ignored``: the case's declared ignore region (``postprocessing.case_scores``), or None."""
        prediction, reference = to_host(prediction), to_host(reference)
        ignored = None if ignored is None else to_host(ignored)
        scores = case_scores(prediction, reference, spacing_mm, self.candidates, largest_only=self.largest_only,
                             ignored=ignored)
        self.sums += torch.tensor(scores, dtype=torch.float64, device=self.sums.device)
        self.count += 1

    def compute(self) -> dict[float, float]:
        n = max(float(self.count), 1.0)
        return {t: float(s) / n for t, s in zip(self.candidates, self.sums.tolist())}


class LargestComponentScores(ComponentThresholdScores):
    """The same sums with only each prediction's largest component kept (nnU-Net's "remove all but the largest
    component"), for ``postprocessing.choose_largest_component``."""

    largest_only = True
