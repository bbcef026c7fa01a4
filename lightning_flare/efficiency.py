"""FLARE-style efficiency figures: per-case wall time by stage, peak RSS, peak GPU memory and the area under
the GPU-memory-over-time curve sampled every 0.1 s.

GPU memory is this process's: what torch's caching allocator holds on the device (``torch.cuda.memory_reserved``,
its peak ``max_memory_reserved``), not the whole device (other processes) and without the CUDA context itself
(a few hundred MB that nvidia-smi adds)."""
from __future__ import annotations

import csv
import io
import os
import resource
import threading
import time
from pathlib import Path

import numpy as np
import torch

from .io import write_text

# transfer: the host-to-device copy of the batch (Lightning's transfer_batch_to_device), device work waited for
STAGES = ("read", "preprocess", "transfer", "network", "postprocess", "write")
COLUMNS = ["case", *STAGES, "total_s", "peak_rss_mb", "peak_gpu_mb", "gpu_memory_area_mb_s"]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _is_cuda(device: torch.device | str | None) -> bool:
    return device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()


def reset_peak_gpu(device: torch.device | str | None) -> None:
    """Start a new peak for ``peak_gpu_mb`` (no-op off CUDA)."""
    if _is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


def peak_gpu_mb(device: torch.device | str | None) -> float:
    """The most device memory this process's allocator held since ``reset_peak_gpu`` (MB; 0 off CUDA)."""
    return torch.cuda.max_memory_reserved(device) / 2**20 if _is_cuda(device) else 0.0


def process_gpu_mb(device: torch.device | str | None) -> float:
    """Device memory this process's allocator holds now (MB; 0 off CUDA)."""
    return torch.cuda.memory_reserved(device) / 2**20 if _is_cuda(device) else 0.0


class GpuMemorySampler:
    """Samples this process's GPU memory (``read``, MB; default ``process_gpu_mb``) every ``interval`` seconds in a
    background thread; a no-op off CUDA unless ``read`` is given."""

    def __init__(self, interval: float = 0.1, device: torch.device | None = None, read=None):
        self.interval = interval
        self.device = device
        self.read = read if read is not None else (lambda: process_gpu_mb(self.device if self.device is not None else "cuda"))
        self._custom = read is not None
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        return self._custom or (torch.cuda.is_available() and (self.device is None or self.device.type == "cuda"))

    def start(self) -> "GpuMemorySampler":
        if self.active and self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), float(self.read())))
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


STARTUP = "(start-up)"


def process_uptime() -> float:
    """Seconds since this process started (Linux: from /proc; elsewhere since lightning_flare was imported), or
    since the previous command in this process ended (``command_ended``: ``make demo`` runs fit, test and
    predict in one process)."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        started = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
        start = boot + started
    except (OSError, ValueError, IndexError, StopIteration):
        start = _IMPORTED
    return max(0.0, time.time() - max(start, _last_command_end))


def command_ended() -> None:
    """A command (a LightningCLI run) of this process ended: the next one's start-up counts from now."""
    global _last_command_end
    _last_command_end = time.time()


_IMPORTED = time.time()
_last_command_end = 0.0


class EfficiencyReport:
    """One row per case, after a first row ``(start-up)``: process start to the first case (imports, model
    loading), its seconds in ``total_s``; FLARE times a case from the container's start."""

    def __init__(self):
        self.rows: list[dict] = []

    @property
    def cases(self) -> list[dict]:
        return [r for r in self.rows if r["case"] != STARTUP]

    def add_startup(self, seconds: float) -> dict:
        row = {"case": STARTUP, **{s: 0.0 for s in STAGES}, "total_s": float(seconds), "peak_rss_mb": peak_rss_mb(),
               "peak_gpu_mb": 0.0, "gpu_memory_area_mb_s": 0.0}
        self.rows.append(row)
        return row

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
        cases = self.cases
        if not cases:
            return "no case predicted"
        lines = [f"{'case':<24}" + "".join(f"{s:>12}" for s in (*STAGES, "total_s", "rss_mb", "gpu_mb", "gpu_mb_s"))]
        for r in self.rows:
            values = [r[s] for s in STAGES] + [r["total_s"], r["peak_rss_mb"], r["peak_gpu_mb"], r["gpu_memory_area_mb_s"]]
            lines.append(f"{r['case']:<24}" + "".join(f"{v:>12.2f}" for v in values))
        total = np.array([r["total_s"] for r in cases])
        startup = sum(r["total_s"] for r in self.rows if r["case"] == STARTUP)
        lines.append(f"Efficiency over {len(cases)} cases (Table 4 form): start-up {startup:.2f} s, time per case "
                     f"{total.mean():.2f} +/- {total.std():.2f} s, peak RSS {max(r['peak_rss_mb'] for r in self.rows):.0f} MB, "
                     f"peak GPU memory {max(r['peak_gpu_mb'] for r in cases):.0f} MB, mean GPU memory area "
                     f"{np.mean([r['gpu_memory_area_mb_s'] for r in cases]):.0f} MB*s")
        return "\n".join(lines)
