"""train_log.jsonl: one JSON record per logged step (rank 0 writes). Opening it for a run keeps exactly the records
of the steps before the run's first step (none for a fresh run), so a resumed run never repeats a step, and a
line cut short by a kill is dropped. Each record also goes to the experiment tracker (svd_fast.training.tracking)."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import torch

from svd_fast import _io
from svd_fast.training.step import StepStats, sigma_bin_names
from svd_fast.training.tracking import Tracker


def _records_before(path: Path, step: int) -> list[str]:
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    return kept


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS (KiB on Linux)


def peak_reserved_mb(device: torch.device) -> float | None:
    """The caching allocator's peak reserved memory (what the GPU must hold, and what ``svd-fast train
    --plan-memory`` plans); None on the CPU, which has no such allocator."""
    return torch.cuda.max_memory_reserved(device) / 2**20 if device.type == "cuda" else None


class TrainLog:
    def __init__(self, path: Path, start_step: int, sigma_bins: list[float], world_size: int, device: torch.device, rank: int,
                 run_id: str = "", tracker: Tracker | None = None) -> None:
        self.path = path
        self.tracker = tracker
        self.run_id = run_id
        self.bin_names = sigma_bin_names(sigma_bins)
        self.world_size = world_size
        self.device = device
        self.rank = rank
        self._interval_start = time.perf_counter()
        self._interval_samples = 0
        if rank == 0:
            kept = _records_before(path, start_step)
            _io.write_bytes(path, "".join(line + "\n" for line in kept).encode(), fsync=True)

    def record(self, step: int, stats: StepStats, write: bool, extra: dict[str, Any] | None = None) -> None:
        """Count ``stats``; when ``write``, reduce the loss over ranks (a collective) and append a record (with
        ``extra``'s keys, e.g. the step's validation clips)."""
        self._interval_samples += stats.samples
        if not write:
            return
        mean_loss = torch.tensor([stats.loss])
        torch.distributed.all_reduce(mean_loss)
        now = time.perf_counter()
        record: dict[str, Any] = {
            "step": step,
            "run_id": self.run_id,
            "loss": mean_loss.item() / self.world_size,
            "lr": stats.lr,
            "samples_per_s": self._interval_samples * self.world_size / max(now - self._interval_start, 1e-9),
            "memory_mb": peak_memory_mb(self.device),
            "memory_reserved_mb": peak_reserved_mb(self.device),
            "sigma_binned_loss": {
                name: (s / c).item() for name, s, c in zip(self.bin_names, stats.bin_sums, stats.bin_counts) if c > 0
            },
        }
        record.update(extra or {})
        self._interval_start, self._interval_samples = now, 0
        if self.rank == 0:
            with self.path.open("a") as log:
                log.write(json.dumps(record) + "\n")
            if self.tracker is not None:
                self.tracker.log(record)
