"""Every Triton kernel compiles ahead of time for Hopper (sm_90) and Ampere (sm_80) at the configurations
SVD and SVD-XT's real shapes select, without a GPU, under whichever Triton is imported (CI runs this file
under the pinned version in `make test` and under the GPU image's Triton 3.6 in a separate step of .ci/run):
no spills to local memory, shared memory within the target's per-block limit, no redundant tensor-core work
in temporal attention, and enough bytes in flight per SM to keep memory busy (bench/kernel_report.py).

Residency, by Little's law: to sustain a bandwidth B with a loaded memory latency L, B x L bytes must be in
flight. H200: 4.8e12 B/s x 700e-9 s = 3.36 MB over 132 SMs = 25,455 bytes per SM (H100: 3.35e12 x 700e-9 /
132 = 17,765). A kernel that issues its loads before any use (every kernel checked here: no loops) has
resident programs per SM x bytes per program in flight; e.g. the temporal-attention forward at SVD-XT shapes
moves 12,900 bytes per position (q, k, v, out: 25 frames x 64 channels x 2 bytes each, and lse), so two
positions per SM would do; its plan keeps 18. This replaces occupancy >= 0.5, which says nothing about how
much each resident warp has in flight.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parents[1]
SHARED_PER_BLOCK = {"sm_90": 232448, "sm_80": 166912}
NEEDED_BYTES_PER_SM = 25_455
# The elementwise/tiled kernels that move the op's data (not GroupNorm's combine of per-tile statistics, which
# reads 1/1000 of x and is launch-bound), and the Triton temporal-attention backward.
DATA_KERNELS = (
    "group_norm_silu:partial_stats_kernel", "group_norm_silu:normalize_kernel", "group_norm_silu:one_pass_kernel",
    "temporal_attention:forward_kernel",
    "temporal_attention_backward:backward_kernel", "edm_euler_step:euler_step_kernel",
    "edm_prepare_model_input:prepare_model_input_kernel",
)  # fmt: skip


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("aot") / "kernels.json"
    # The Triton under test may come first on PYTHONPATH (.ci/run's Triton 3.6 step): keep it there.
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kernel_report.py"), "--no-cuda", "--targets", "sm_90", "sm_80", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_every_kernel_compiles_for_both_targets_under_the_imported_triton(rows: list[dict]) -> None:
    kernels = {row["kernel"].split(":")[1] for row in rows}
    assert {"partial_stats_kernel", "combine_stats_kernel", "normalize_kernel", "one_pass_kernel", "backward_partials_kernel",
            "backward_dx_kernel", "forward_kernel", "backward_kernel", "euler_step_kernel",
            "prepare_model_input_kernel"} <= kernels  # fmt: skip
    assert {row["target"] for row in rows} == {"sm_90", "sm_80"}
    assert all(row["registers"] > 0 for row in rows)
    assert {row["triton"] for row in rows} == {triton.__version__}


@pytest.mark.slow
def test_no_spills_and_shared_memory_fits(rows: list[dict]) -> None:
    spilling = [(r["kernel"], r["target"], r["shape"], r["spill_bytes"]) for r in rows if r["spill_bytes"]]
    assert not spilling
    too_big = [(r["kernel"], r["target"], r["shared_bytes"]) for r in rows if r["shared_bytes"] > SHARED_PER_BLOCK[r["target"]]]
    assert not too_big


@pytest.mark.slow
def test_group_norm_moves_two_or_three_bytes_per_element_with_no_idle_lanes(rows: list[dict]) -> None:
    """Per forward call (every SVD / SVD-XT / VAE-decoder shape), the kernels' compulsory bytes over x's bytes:
    2 for the one-pass plan (x read once, y written once), 3 for the two-pass plan (x read twice), plus the
    per-tile statistics (count, mean, M2: 24 bytes written and read per group and tile; under 2% except at the
    9x16 and 18x32 levels' 5-D view, whose exact tiles hold 128-512 elements of a group: up to 9.5% of 18-74 MB).
    The two-pass
    tiles divide every axis (no padding lane); the one-pass group pads 45 x 2^k elements to 64 x 2^k (29.7%
    idle lanes, which cost issue slots, not bytes). The one-pass kernel runs fewer SASS instructions per
    element than the two-pass kernels together."""
    forward = [r for r in rows if r["kernel"].startswith("group_norm_silu:") and r["target"] == "sm_90"]
    per_call: dict[str, list[dict]] = {}
    for row in forward:
        per_call.setdefault(row["shape"], []).append(row)
    two_pass_sass = []
    for shape, kernels in per_call.items():
        dims = [int(d) for d in shape[shape.index("(") + 1 : shape.index(")")].split(",")]
        x_bytes = 2 * math.prod(dims)  # fp16
        one_pass = [r for r in kernels if r["kernel"].endswith("one_pass_kernel")]
        ratio = sum(r["min_bytes"] for r in kernels) / x_bytes
        assert (2.0 if one_pass else 3.0) <= ratio < (2.0 if one_pass else 3.0) + (0.02 if "4d" in shape or "VAE" in shape else 0.1), (shape, ratio)
        for row in kernels:
            if row["kernel"].endswith("one_pass_kernel"):
                assert row["idle_lanes"] < 0.3, (shape, row["idle_lanes"])
            elif not row["kernel"].endswith("combine_stats_kernel"):
                assert row["idle_lanes"] == 0.0, (shape, row["kernel"], row["idle_lanes"])
        if not one_pass:
            two_pass_sass.append(sum(r["sass_per_element"] for r in kernels if r["sass_per_element"]))
    one_pass_sass = [r["sass_per_element"] for r in forward if r["kernel"].endswith("one_pass_kernel")]
    assert one_pass_sass and max(one_pass_sass) < min(two_pass_sass)


@pytest.mark.slow
def test_temporal_attention_does_no_redundant_tensor_core_work(rows: list[dict]) -> None:
    """HMMA per position = what the padded products need (frames padded to 16/32 count as needed): no warp
    repeats another's product, at SVD (F=14) and SVD-XT (F=25), forward and backward, both targets."""
    attention = [r for r in rows if r["kernel"].startswith("temporal_attention")]
    assert {r["kernel"] for r in attention} == {"temporal_attention:forward_kernel", "temporal_attention_backward:backward_kernel"}
    assert {r["shape"].split(" ")[0] for r in attention} == {"SVD", "SVD-XT"}
    assert all(r["mma_needed_per_position"] for r in attention)
    redundant = [
        (r["kernel"], r["target"], r["shape"], r["block_p"], r["num_warps"], r["mma_per_position"], r["mma_needed_per_position"])
        for r in attention
        if r["mma_per_position"] != r["mma_needed_per_position"]
    ]
    assert not redundant


@pytest.mark.slow
def test_enough_bytes_in_flight_per_sm_at_svd_xt_shapes(rows: list[dict]) -> None:
    checked = [r for r in rows if r["kernel"] in DATA_KERNELS and "SVD-XT" in r["shape"]]
    assert {r["kernel"] for r in checked} == set(DATA_KERNELS)
    low = [
        (r["kernel"], r["target"], r["shape"], r["registers"], r["resident_programs"], r["bytes_in_flight_per_sm"])
        for r in checked
        if r["bytes_in_flight_per_sm"] < NEEDED_BYTES_PER_SM
    ]
    assert not low


@pytest.mark.slow
def test_needed_bytes_per_sm_and_needed_mma_are_the_stated_arithmetic() -> None:
    """bench/kernel_report.py's constants, in a subprocess with the interpreter off (it compiles for GPUs)."""
    script = (
        "import kernel_report as k; "
        "print(k.NEEDED_BYTES_PER_SM, *(k.mma_needed_per_position(kernel, f, 64, 'HMMA.16816.F32') "
        "for kernel, f in (('forward_kernel', 32), ('backward_kernel', 32), ('forward_kernel', 16))))"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT / "bench"), os.environ.get("PYTHONPATH"))))}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    needed_bytes, forward, backward, forward_svd = (int(value) for value in result.stdout.split())
    assert needed_bytes == NEEDED_BYTES_PER_SM == -(-4.8e12 * 700e-9 // 132)
    # m16n8k16 at SVD-XT (F 25 -> 32, D 64): scores 2*4*4 + output 2*8*2 = 64; backward 2*32 + 3*32 = 160;
    # at SVD (F 14 -> 16): scores 1*2*4 + output 1*8*1 = 16.
    assert (forward, backward, forward_svd) == (64, 160, 16)
