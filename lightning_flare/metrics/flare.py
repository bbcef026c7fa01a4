"""torchmetrics wrapper that collects FLARE24 per-case DSC and NSD."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_flare.metrics.functional import flare_case_scores, to_numpy, volume_ratio_summary


class FlareMetrics(Metric):
    """Per-case FLARE24 Task 1 DSC / NSD, averaged over unique cases, and each case's predicted and reference
    tumour volume (ml; ``case_volumes``; ``volume_ratio_median`` over the lesion cases).

    States are per-case lists concatenated across processes (``dist_reduce_fx="cat"``),
    so the means are over cases, not over per-process means. Cases repeated by a
    padding ``DistributedSampler`` are counted once (first occurrence of a ``case_index``).
    Inputs may be arrays or tensors on any device; the scores are computed on the host, the
    nearest-surfel search on the metric's own device when that is a GPU (it moves with the module)
    and ``device_search`` is true, else with a k-d tree on the CPU.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, tolerance_mm: float = 2.0, device_search: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tolerance_mm = float(tolerance_mm)
        self.device_search = device_search
        self.add_state("dsc", default=[], dist_reduce_fx="cat")
        self.add_state("nsd", default=[], dist_reduce_fx="cat")
        self.add_state("case_index", default=[], dist_reduce_fx="cat")
        self.add_state("predicted_ml", default=[], dist_reduce_fx="cat")
        self.add_state("reference_ml", default=[], dist_reduce_fx="cat")
        self._per_case: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._volumes: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def update(self, pred: torch.Tensor, target: torch.Tensor,
               spacing: Sequence[float], case_index: int) -> None:
        """Score one case. ``pred``/``target``: label maps (X, Y, Z) or (1, X, Y, Z). ``case_index < 0``: a
        placeholder row that scores no case (see ``add_placeholder``); ``pred``/``target`` are then ignored."""
        self._per_case = self._volumes = None
        if int(case_index) < 0:
            dsc = nsd = predicted = reference = float("nan")
        else:
            pred_np, target_np = (self._squeeze(to_numpy(x)) for x in (pred, target))
            device = self.device if self.device_search and self.device.type == "cuda" else None  # GPU surfel search
            dsc, nsd = flare_case_scores(pred_np, target_np, spacing, self.tolerance_mm, device=device)
            voxel_ml = float(np.prod(spacing)) / 1000.0
            predicted, reference = (float(np.count_nonzero(x > 0)) * voxel_ml for x in (pred_np, target_np))
        for name, value in (("predicted_ml", predicted), ("reference_ml", reference)):
            getattr(self, name).append(torch.tensor([value], dtype=torch.float64, device=self.device))
        self.dsc.append(torch.tensor([dsc], dtype=torch.float64, device=self.device))
        self.nsd.append(torch.tensor([nsd], dtype=torch.float64, device=self.device))
        self.case_index.append(torch.tensor([int(case_index)], dtype=torch.int64, device=self.device))

    def add_placeholder(self) -> None:
        """A row for a DDP rank that scored no case (its only item was padding): every rank then gathers states
        of the same dtypes (torchmetrics fills an empty list state with a float32 tensor, which a float64 or
        int64 one on another rank does not match). ``compute`` drops it."""
        self.update(None, None, (1.0, 1.0, 1.0), -1)

    @staticmethod
    def _squeeze(x: np.ndarray) -> np.ndarray:
        if x.ndim == 4 and x.shape[0] == 1:
            x = x[0]
        if x.ndim != 3:
            raise ValueError(f"expected one case of shape (X, Y, Z) or (1, X, Y, Z), got {x.shape}")
        return x

    def _unique_cases(self) -> tuple[torch.Tensor, ...]:
        """(case_index, dsc, nsd, predicted_ml, reference_ml) sorted by case index, first occurrence of each case kept."""
        if isinstance(self.case_index, list) and not self.case_index:
            empty = torch.zeros(0, dtype=torch.float64)
            return (torch.zeros(0, dtype=torch.int64), *(empty.clone() for _ in range(4)))
        index = dim_zero_cat(self.case_index).cpu().long()
        _, first = np.unique(index.numpy(), return_index=True)  # sorted by case index
        first = first[index.numpy()[first] >= 0]  # placeholder rows score no case
        keep = torch.from_numpy(first)
        states = (self.dsc, self.nsd, self.predicted_ml, self.reference_ml)
        return (index[keep], *(dim_zero_cat(s).cpu()[keep] for s in states))

    def compute(self) -> dict[str, torch.Tensor]:
        index, dsc, nsd, predicted, reference = self._unique_cases()
        self._per_case = (index, dsc, nsd)
        self._volumes = (index, predicted, reference)
        ratio = volume_ratio_summary(predicted.tolist(), reference.tolist())["median"]
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        return {
            "dsc": dsc.mean() if len(dsc) else nan,
            "nsd": nsd.mean() if len(nsd) else nan,
            "dsc_median": dsc.quantile(0.5) if len(dsc) else nan,
            "nsd_median": nsd.quantile(0.5) if len(nsd) else nan,
            "num_cases": torch.tensor(len(index), dtype=torch.int64),
            "volume_ratio_median": torch.tensor(ratio, dtype=torch.float64),
        }

    def per_case(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(case_index, dsc, nsd) of the unique cases, synced across processes by ``compute``."""
        if self._per_case is None:
            self.compute()
        assert self._per_case is not None
        return self._per_case

    def case_volumes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(case_index, predicted_ml, reference_ml) of the unique cases, synced across processes by ``compute``."""
        if self._volumes is None:
            self.compute()
        assert self._volumes is not None
        return self._volumes

    def reset(self) -> None:
        super().reset()
        self._per_case = self._volumes = None
