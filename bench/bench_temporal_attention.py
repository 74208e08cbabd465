"""Benchmarks of the fused temporal attention against diffusers' path.

Op level (q, k, v given frame-major (B*F, S, H*D), output wanted frame-major):
  * svd_fast: the fused op, automatic backend (triton, else cuda, on GPU; the C++ kernel on CPU);
  * svd_fast-cuda: the CUDA kernel forced (CUDA only);
  * diffusers-path: permute + reshape to 4-D (B*S, H, F, D), scaled_dot_product_attention, permute back;
  * diffusers-path-compile: torch.compile of that path (CUDA only: CPU inductor is not the target).
Block level (what a user gets from optimize): diffusers' TemporalBasicTransformerBlock vs
svd_fast.diffusers.FusedTemporalBasicTransformerBlock with the same weights, on SVD's (B*F, S, C) activations.

Shapes: SVD-XT (F=25) and SVD (F=14), B=2 (classifier-free guidance) at 576x1024 (latent 72x128, S=9216,
5 heads of 64) and the deeper levels (36x64 x10 heads, 18x32 x20, 9x16 x20), float16 on CUDA; plus B=8 at
72x128: 73,728 positions (B*S, SDPA's batch dimension), above the 65,535 grid limit where PyTorch's
flash/efficient SDPA kernels have failed on CUDA: a failure there is recorded as an xfail with its message,
a success as extra_info["sdpa_beyond_65535"]. On the CPU: float32, and S scaled down 16x (frames, heads and
head_dim kept). bytes_moved: q, k, v read once and the output written once.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from svd_fast import backends
from svd_fast.ops import temporal_attention
from svd_fast.reference.temporal_attention import to_frame_major, to_position_major

HEAD_DIM = 64
# name: (B, F, S, heads)
SHAPES = {
    "xt-72x128-h5": (2, 25, 72 * 128, 5),
    "svd-72x128-h5": (2, 14, 72 * 128, 5),
    "xt-36x64-h10": (2, 25, 36 * 64, 10),
    "xt-18x32-h20": (2, 25, 18 * 32, 20),
    "xt-9x16-h20": (2, 25, 9 * 16, 20),
    "train8-svd-72x128-h5": (8, 14, 72 * 128, 5),
}
CPU_POSITION_DIVISOR = 16
OP_VARIANTS = ["svd_fast", "svd_fast-cuda", "diffusers-path", "diffusers-path-compile"]
BLOCK_SHAPES = ["xt-72x128-h5", "xt-36x64-h10"]


def _shape(name: str, device: torch.device) -> tuple[int, int, int, int]:
    batch, frames, positions, heads = SHAPES[name]
    if device.type != "cuda":
        positions = max(1, positions // CPU_POSITION_DIVISOR)
    return batch, frames, positions, heads


def diffusers_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frames: int, heads: int) -> torch.Tensor:
    """What diffusers' temporal transformer block runs: (B*F, S, H*D) -> 4-D (B*S, H, F, D) (a copy, as
    diffusers' permute + reshape), SDPA (its flash/efficient kernels take 4-D input), and back (a copy)."""
    batch = q.shape[0] // frames
    positions = q.shape[1]
    q4, k4, v4 = (to_position_major(t, frames, heads).reshape(batch * positions, heads, frames, -1) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q4, k4, v4)
    return to_frame_major(out.unflatten(0, (batch, positions)))


@pytest.fixture(scope="module")
def compiled_diffusers_path():
    return torch.compile(diffusers_path, dynamic=False)


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("variant", OP_VARIANTS)
def test_temporal_attention(timed, benchmark, device, compiled_diffusers_path, variant: str, shape_name: str) -> None:
    if device.type != "cuda" and variant in ("svd_fast-cuda", "diffusers-path-compile"):
        pytest.skip(f"{variant} is benchmarked on CUDA only (the CUDA kernel needs a GPU; CPU inductor is not the target)")
    batch, frames, positions, heads = _shape(shape_name, device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(batch * frames, positions, heads * HEAD_DIM, device=device, dtype=dtype) for _ in range(3))
    if variant.startswith("svd_fast"):
        backend = "cuda" if variant == "svd_fast-cuda" else "auto"

        def run():
            with backends.use_backend(backend):
                return temporal_attention(q, k, v, frames, heads)

    else:
        path = diffusers_path if variant == "diffusers-path" else compiled_diffusers_path

        def run():
            return path(q, k, v, frames, heads)

        try:
            run()
        except RuntimeError as error:  # PyTorch's SDPA kernels above the 65,535 grid limit on CUDA
            benchmark.extra_info["error"] = str(error)[:200]
            pytest.xfail(f"{variant} fails on {shape_name}: {error}")
        if batch * positions > 65_535:
            benchmark.extra_info["sdpa_beyond_65535"] = "ran"

    benchmark.group = f"op {shape_name}"
    bytes_moved = 4 * q.numel() * q.element_size()
    timed(run, bytes_moved=bytes_moved, shape=[batch, frames, positions, heads, HEAD_DIM], dtype=str(dtype), variant=variant)
    if variant.startswith("svd_fast"):
        benchmark.extra_info["backend"] = backends.last_backend("temporal_attention")


@pytest.mark.parametrize("shape_name", BLOCK_SHAPES)
@pytest.mark.parametrize("variant", ["diffusers-block", "svd_fast-block"])
def test_temporal_block(timed, benchmark, device, variant: str, shape_name: str) -> None:
    from diffusers.models.attention import TemporalBasicTransformerBlock

    from svd_fast.diffusers.temporal_transformer_block import FusedTemporalBasicTransformerBlock

    batch, frames, positions, heads = _shape(shape_name, device)
    channels = heads * HEAD_DIM
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    block = TemporalBasicTransformerBlock(channels, channels, heads, HEAD_DIM, cross_attention_dim=1024)
    block = block.to(device, dtype).eval()
    module = block if variant == "diffusers-block" else FusedTemporalBasicTransformerBlock.from_diffusers(block)
    hidden = torch.randn(batch * frames, positions, channels, device=device, dtype=dtype)
    context = torch.randn(batch, 1, 1024, device=device, dtype=dtype).repeat_interleave(positions, dim=0)

    def run():
        with torch.inference_mode():
            return module(hidden, num_frames=frames, encoder_hidden_states=context)

    benchmark.group = f"block {shape_name}"
    timed(run, shape=[batch, frames, positions, channels], dtype=str(dtype), variant=variant)
