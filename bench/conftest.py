"""Shared benchmark fixtures: the device under test, its measured copy bandwidth, a timer that
records achieved GB/s and the fraction of that bandwidth in pytest-benchmark's extra_info, and a timer
for ratios (several implementations timed in alternating rounds in one run).

Run: `make bench` (GPU when present, else CPU) or `python -m pytest bench --benchmark-only
--benchmark-json=bench/last_run.json`; `python bench/report.py bench/last_run.json` prints the table
for bench/RESULTS.md. Set SVD_FAST_BENCH_DEVICE=cpu|cuda to choose the device.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch


def _bench_device() -> torch.device:
    requested = os.environ.get("SVD_FAST_BENCH_DEVICE")
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return _bench_device()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@pytest.fixture(scope="session")
def copy_bandwidth_gbps(device: torch.device) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second, in GB/s)."""
    numel = (256 if device.type == "cuda" else 32) * 2**20  # 1 GiB / 128 MiB of float32
    source = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    synchronize(device)
    repeats = 20 if device.type == "cuda" else 5
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    synchronize(device)
    seconds = (time.perf_counter() - start) / repeats
    return 2 * source.numel() * source.element_size() / seconds / 1e9


@pytest.fixture
def timed(benchmark, device: torch.device, copy_bandwidth_gbps: float) -> Callable[..., object]:
    """``timed(fn, bytes_moved=..., **info)`` benchmarks ``fn`` (synchronised) and records GB/s.

    ``bytes_moved`` is the minimum memory traffic of the operation (every input read once, every
    output written once), so GB/s over the copy bandwidth says how close to memory-bound it runs.
    """

    def run(fn: Callable[[], object], bytes_moved: int | None = None, **info: object) -> object:
        def call() -> object:
            result = fn()
            synchronize(device)
            return result

        call()  # warm-up: compilation, autotuning and allocator growth stay out of the timing
        rounds = 20 if device.type == "cuda" else 3
        result = benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
        benchmark.extra_info.update({"device": _device_name(device), **info})
        benchmark.extra_info["copy_bandwidth_gbps"] = round(copy_bandwidth_gbps, 1)
        if bytes_moved is not None and benchmark.stats is not None:  # stats is None under --benchmark-disable
            gbps = bytes_moved / benchmark.stats.stats.median / 1e9
            benchmark.extra_info["bytes_moved"] = int(bytes_moved)
            benchmark.extra_info["achieved_gbps"] = round(gbps, 1)
            benchmark.extra_info["fraction_of_copy_bandwidth"] = round(gbps / copy_bandwidth_gbps, 3)
        return result

    return run


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


@pytest.fixture
def alternating_medians(benchmark) -> Callable[..., dict[str, float]]:
    """``alternating_medians({name: fn, ...}, rounds=3)``: the median seconds of each ``fn`` over ``rounds``
    rounds that run every ``fn`` in turn, so machine load affects all alike (for ratios measured in one run).
    Records the load average beside the numbers (the machines are shared) and one benchmark round."""

    def run(runs: dict[str, Callable[[], object]], rounds: int = 3) -> dict[str, float]:
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(rounds):
            for name, fn in runs.items():
                started = time.perf_counter()
                fn()
                seconds[name].append(time.perf_counter() - started)
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)
        benchmark.extra_info["load_average_1_5_15_min"] = [round(value, 2) for value in os.getloadavg()]
        return {name: float(np.median(values)) for name, values in seconds.items()}

    return run
