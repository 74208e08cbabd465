"""Parallel generation (svd_fast.diffusers.parallel) on the CPU: 2 processes x 1 thread against 1 process x 1 thread,
timed in alternating rounds in the same two processes (bench/parallel_timing.py), per mode; the bytes each rank sent
per UNet call, as counted by the collectives; and the SVD-XT projection for NVLink H100s.

Workloads: the tiny pipeline (a whole 2-step call, 8 frames) and one call of the random full-size SVD UNet (fp32,
about 6 GiB per rank, so 12 GiB for the pair) on a CFG batch of 2, 8 frames at a 32 x 32 latent. The speedup is
extra_info["speedup"] (single-process median / parallel median); pytest-benchmark's own time is the whole run.

Run: OMP_NUM_THREADS=1 python -m pytest bench/bench_parallel.py --benchmark-only -s
"""

from __future__ import annotations

import json

import pytest
from parallel_timing import FULL_FRAMES, FULL_LATENT, communication_model, time_alternating

from svd_fast.diffusers.parallel_launch import spawn

ROUNDS = {"tiny": 5, "full": 3}
# The projection's assumptions (bench/RESULTS.md): NVLink per direction, the latency of one collective, and the
# throughput a UNet step sustains on one H100 in bf16 (a share of the 989 TFLOP/s dense peak).
NVLINK_BYTES_PER_S = 450e9
COLLECTIVE_LATENCY_S = 25e-6
H100_SUSTAINED_FLOPS = 400e12


@pytest.mark.parametrize("workload", ["tiny", "full"])
@pytest.mark.parametrize("mode", ["guidance", "frames"])
def test_two_ranks_against_one(benchmark, workload: str, mode: str, tmp_path) -> None:
    out = tmp_path / "timing.json"
    benchmark.pedantic(spawn, args=(time_alternating, 2, str(out), workload, mode, ROUNDS[workload]), rounds=1, iterations=1)
    result = json.loads(out.read_text())
    result["speedup"] = result["single_median_s"] / result["parallel_median_s"]
    if workload == "full":
        result["shape"] = f"CFG batch 2 x {FULL_FRAMES} frames x {FULL_LATENT}x{FULL_LATENT} latent, fp32"
        model = communication_model(mode, 2, FULL_FRAMES, FULL_LATENT, FULL_LATENT, 4)
        result["modelled_sent_bytes"] = model["sent_bytes"]
    benchmark.extra_info.update(result)
    print(workload, mode, json.dumps(result))


def svd_xt_projection() -> list[dict[str, float | str | int]]:
    """Communication per UNet call at SVD-XT (CFG batch 2, 25 frames, 72 x 128 latent, bf16) as a share of the step."""
    rows = []
    for mode, ranks in [("guidance", 2), ("frames", 2), ("frames", 4), ("frames", 8), ("guidance+frames", 4), ("guidance+frames", 8)]:
        model = communication_model(mode, ranks, 25, 72, 128, 2)
        compute_s = model["flops"] / H100_SUSTAINED_FLOPS / ranks
        communication_s = model["sent_bytes"] / NVLINK_BYTES_PER_S + model["collectives"] * COLLECTIVE_LATENCY_S
        rows.append({"mode": mode, "ranks": ranks, "sent_MB": model["sent_bytes"] / 1e6, "collectives": int(model["collectives"]),
                     "unet_tflop": model["flops"] / 1e12, "compute_ms": compute_s * 1e3, "communication_ms": communication_s * 1e3,
                     "share": communication_s / (compute_s + communication_s)})  # fmt: skip
    return rows


def test_svd_xt_projection(benchmark) -> None:
    rows = benchmark.pedantic(svd_xt_projection, rounds=1, iterations=1)
    benchmark.extra_info["rows"] = rows
    for row in rows:
        print(" | ".join(f"{value:.3g}" if isinstance(value, float) else str(value) for value in row.values()))
