"""Benchmarks of fused GroupNorm + SiLU against torch's GroupNorm followed by SiLU.

Variants: svd_fast with the automatic backend (triton, else cuda, on GPU; ATen's kernels on CPU),
svd_fast forced to the CUDA kernel (CUDA only), torch eager
F.group_norm + F.silu, and torch.compile of that pair (CUDA only: on this 2-core CPU, inductor's
compile dominates the run and CPU inductor is not the target).

Shapes: the SVD UNet's spatial norms (B*F = 50 frames of 320/640/1280 channels at 72x128, 36x64,
9x16 latents) and its temporal (5-D) norms, float16 on CUDA, 32 groups. On the CPU the shapes are
scaled down ~16x (4-D: 3 frames instead of 50; 5-D: 2 frames instead of 25 for the large one) and the
dtype is float32 (CPU float16 GroupNorm is not what anyone runs). bytes_moved: read x, write y.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from svd_fast import backends
from svd_fast.ops import group_norm

GROUPS = 32
EPS = 1e-5
GPU_SHAPES = {
    "up0-320x72x128": (50, 320, 72, 128),
    "mid-640x36x64": (50, 640, 36, 64),
    "down-1280x9x16": (50, 1280, 9, 16),
    "temporal-320x25x72x128": (2, 320, 25, 72, 128),
    "temporal-1280x25x9x16": (2, 1280, 25, 9, 16),
}
CPU_SHAPES = {
    "up0-320x72x128": (3, 320, 72, 128),
    "mid-640x36x64": (3, 640, 36, 64),
    "down-1280x9x16": (3, 1280, 9, 16),
    "temporal-320x25x72x128": (2, 320, 2, 72, 128),
    "temporal-1280x25x9x16": (2, 1280, 2, 9, 16),
}
VARIANTS = ["svd_fast", "svd_fast-cuda", "torch-eager", "torch-compile"]


def _torch_group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.silu(F.group_norm(x, GROUPS, weight, bias, EPS))


@pytest.fixture(scope="module")
def compiled_group_norm_silu():
    return torch.compile(_torch_group_norm_silu, dynamic=False)


@pytest.mark.parametrize("shape_name", list(GPU_SHAPES))
@pytest.mark.parametrize("variant", VARIANTS)
def test_group_norm_silu(timed, benchmark, device, compiled_group_norm_silu, variant: str, shape_name: str) -> None:
    if device.type != "cuda" and variant in ("svd_fast-cuda", "torch-compile"):
        pytest.skip(f"{variant} is benchmarked on CUDA only (Triton on CPU is the interpreter; CPU inductor is not the target)")
    shape = (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)[shape_name]
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    x = (torch.randn(shape, device=device) + 1.0).to(dtype)
    weight = torch.rand(shape[1], device=device, dtype=dtype) + 0.5
    bias = torch.randn(shape[1], device=device, dtype=dtype)
    if variant.startswith("svd_fast"):
        backend = "cuda" if variant == "svd_fast-cuda" else "auto"

        def run():
            with backends.use_backend(backend):
                return group_norm(x, GROUPS, weight, bias, EPS, "silu")

    elif variant == "torch-eager":

        def run():
            return _torch_group_norm_silu(x, weight, bias)

    else:

        def run():
            return compiled_group_norm_silu(x, weight, bias)

    benchmark.group = shape_name
    timed(run, bytes_moved=2 * x.numel() * x.element_size(), shape=list(shape), dtype=str(dtype), variant=variant)
    if variant.startswith("svd_fast"):
        benchmark.extra_info["backend"] = backends.last_backend("group_norm")
