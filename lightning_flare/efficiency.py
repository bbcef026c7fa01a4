"""FLARE-style efficiency figures: per-case wall time by stage, peak RSS, peak GPU memory and the area under
the GPU-memory-over-time curve sampled every 0.1 s."""
from __future__ import annotations

import csv
import io
import resource
import threading
import time
from pathlib import Path

import numpy as np
import torch

from .io import write_text

STAGES = ("read", "preprocess", "network", "postprocess", "write")
COLUMNS = ["case", *STAGES, "total_s", "peak_rss_mb", "peak_gpu_mb", "gpu_memory_area_mb_s"]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class GpuMemorySampler:
    """Samples the GPU memory in use every ``interval`` seconds in a background thread (no-op without CUDA)."""

    def __init__(self, interval: float = 0.1, device: torch.device | None = None):
        self.interval = interval
        self.device = device
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        return torch.cuda.is_available() and (self.device is None or self.device.type == "cuda")

    def start(self) -> "GpuMemorySampler":
        if self.active and self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info(self.device)
            self.samples.append((time.perf_counter(), (total - free) / 2**20))  # as nvidia-smi sees it
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def window(self, start: float, stop: float) -> tuple[float, float]:
        """(peak MB, area MB*s) of the samples taken between ``start`` and ``stop`` (perf_counter seconds)."""
        values = [mb for t, mb in list(self.samples) if start <= t <= stop]
        if not values:
            return 0.0, 0.0
        return float(max(values)), float(sum(values) * self.interval)


class EfficiencyReport:
    def __init__(self):
        self.rows: list[dict] = []

    def add(self, case: str, timings: dict[str, float], gpu: tuple[float, float] = (0.0, 0.0)) -> dict:
        row = {"case": case, **{s: float(timings.get(s, 0.0)) for s in STAGES}}
        row["total_s"] = sum(row[s] for s in STAGES)
        row["peak_rss_mb"] = peak_rss_mb()
        row["peak_gpu_mb"], row["gpu_memory_area_mb_s"] = gpu
        self.rows.append(row)
        return row

    def write(self, path: str | Path) -> Path:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
        return write_text(path, buffer.getvalue())

    def format(self) -> str:
        if not self.rows:
            return "no case predicted"
        lines = [f"{'case':<24}" + "".join(f"{s:>12}" for s in (*STAGES, "total_s", "rss_mb", "gpu_mb", "gpu_mb_s"))]
        for r in self.rows:
            values = [r[s] for s in STAGES] + [r["total_s"], r["peak_rss_mb"], r["peak_gpu_mb"], r["gpu_memory_area_mb_s"]]
            lines.append(f"{r['case']:<24}" + "".join(f"{v:>12.2f}" for v in values))
        total = np.array([r["total_s"] for r in self.rows])
        lines.append(f"Efficiency over {len(self.rows)} cases (Table 4 form): time per case {total.mean():.2f} +/- "
                     f"{total.std():.2f} s, peak RSS {max(r['peak_rss_mb'] for r in self.rows):.0f} MB, peak GPU memory "
                     f"{max(r['peak_gpu_mb'] for r in self.rows):.0f} MB, mean GPU memory area "
                     f"{np.mean([r['gpu_memory_area_mb_s'] for r in self.rows]):.0f} MB*s")
        return "\n".join(lines)
