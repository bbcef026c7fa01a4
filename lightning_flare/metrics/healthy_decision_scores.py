"""The stateful side of the healthy-scan decision: per-case features over validation cases, DDP-gathered."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from ..device import to_host
from ..component_confidence import THRESHOLDS
from ..healthy_choice import choose_from_rows, row_width, validation_row
from ..postprocessing import CANDIDATES_ML


class HealthyDecisionScores(Metric):
    """One ``healthy_choice.validation_row`` per validation case (healthy flag, and per candidate
    ``min_component_ml``: the most probable component's probability mass and mean probability, and the FLARE DSC,
    also of the largest component alone; the DSCs of the component rule per threshold); ``choose`` picks the rule
    after the ``min_component_ml`` and ``largest_component`` in force and says in the log when its outcome changes."""

    full_state_update = False

    def __init__(self, candidates_ml: Sequence[float] = CANDIDATES_ML, also_ml: float | str = "auto", **kwargs) -> None:
        """``also_ml``: a fixed ``inference.min_component_ml`` to score as well ("auto": only the candidates)."""
        super().__init__(**kwargs)
        extra = [] if also_ml == "auto" else [float(also_ml)]
        self.candidates = tuple(sorted({float(c) for c in [*candidates_ml, *extra]}))
        self.add_state("rows", default=[], dist_reduce_fx="cat")  # flat float32 rows (an empty rank: no row)
        self._last_outcome: tuple | None = None

    def update(self, prediction, probability, reference, spacing_mm: Sequence[float], ignored=None) -> None:
        """``ignored``: the case's declared ignore region (``healthy_choice.validation_row``), or None."""
        prediction, probability, reference = to_host(prediction), to_host(probability), to_host(reference)
        ignored = None if ignored is None else to_host(ignored)
        row = validation_row(prediction, probability, reference, spacing_mm, self.candidates, ignored)
        self.rows.append(torch.tensor(row, dtype=torch.float32, device=self.device))

    def compute(self) -> torch.Tensor:
        rows = dim_zero_cat(self.rows) if len(self.rows) else torch.zeros(0)
        return rows.reshape(-1, row_width(len(self.candidates)))

    def choose(self, after_min_component_ml: float, largest_component: bool = False) -> dict:
        """The decision record for the checkpoint (``healthy_choice.choose_from_rows``: after the
        ``min_component_ml`` and the ``largest_component`` in force); resets the states."""
        rows = to_host(self.compute()).astype(float)
        record = choose_from_rows(rows, self.candidates, after_min_component_ml, largest_component)
        # the rows themselves, so that folds can be pooled (benchmarks/cross_validate.py, nnU-Net's merged CV)
        record["validation_rows"] = {"candidates_ml": [float(c) for c in self.candidates],
                                     "component_thresholds": list(THRESHOLDS),
                                     "rows": np.round(rows, 6).tolist()}
        self.reset()
        outcome = (record["reason"], record["feature"], record["feature"] and record[record["feature"]])
        if outcome != self._last_outcome:  # a new threshold or reason, not every epoch's numbers
            rank_zero_info(record["status"])
            self._last_outcome = outcome
        return record
